"""Scheduling: hardware profile, roofline planner, auto configuration, compute placement, token scheduler."""

from .auto import auto_config, resolve_auto
from .cost_model import expected_distinct, lower_bound, place_expert
from .model_plan import plan_for_model
from .planner import Plan, plan
from .profile import HardwareProfile, measure_profile
from .token_scheduler import group_sequences

__all__ = [
    "auto_config",
    "resolve_auto",
    "plan_for_model",
    "Plan",
    "expected_distinct",
    "lower_bound",
    "place_expert",
    "plan",
    "HardwareProfile",
    "measure_profile",
    "group_sequences",
]
