"""Speculative loads that go unused are reported: bytes per generated token, in `offload_stats()` and in bench."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

SHIPPED = "models/moe-tiny"
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 11, 64]])


def _stats(**cfg):
    model = AutoModelForCausalLM.from_pretrained(SHIPPED, offload_config={"host_budget": "10%", **cfg})
    model.generate(IDS, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    return model.offload_stats()


def test_wasted_prefetch_bytes_are_whole_experts_and_counted_per_token():
    s = _stats(prefetch="gate_lookahead", prefetch_depth=2)
    assert s["tokens_generated"] == 16
    assert s["prefetch_wasted_bytes"] % s["bytes_per_expert"] == 0
    assert s["prefetch_wasted_bytes"] <= s["prefetch_wasted"] * s["bytes_per_expert"]
    assert s["prefetch_wasted_bytes_per_token"] == s["prefetch_wasted_bytes"] / 16


def test_without_prefetch_nothing_is_wasted():
    s = _stats(prefetch="none")
    assert s["prefetch_wasted"] == 0 and s["prefetch_wasted_bytes_per_token"] == 0
