"""Scheduling: hardware profile, roofline planner, auto configuration, compute placement, token scheduler."""

from .auto import auto_config, resolve_auto
from .planner import Plan, expected_distinct, place_expert, plan
from .profile import HardwareProfile, measure_profile
from .token_scheduler import group_sequences

__all__ = [
    "auto_config",
    "resolve_auto",
    "Plan",
    "expected_distinct",
    "place_expert",
    "plan",
    "HardwareProfile",
    "measure_profile",
    "group_sequences",
]
