"""Conformance suite (issue 15): every model class and feature of each MoE family, offloaded vs normal.

A package so that its modules (`test_generate.py`, ...) do not clash with the top-level tests of the same name.
"""
