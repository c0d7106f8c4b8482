"""Model-family adapters (the only package besides `integration` that imports transformers)."""

# Registers the adapters: `interface` (every @use_experts_implementation class) and the undecorated families,
# which install instance-level forwards. Their `matches` are disjoint, so registration order does not matter.
from . import dbrx, interface, jetmoe, llama4, longcat_flash, nllb_moe, switch_transformers  # noqa: F401
from .base import (
    STRIPPED_ATTR,
    ExpertForward,
    ExpertParam,
    ExpertsAdapter,
    RunExperts,
    find_adapter,
    get_adapter,
    list_adapters,
    register_adapter,
)
from .conversion import Interleaving, KeyTarget, resolve_expert_keys
from .discovery import MoEFamily, discover_moe_families
from .topology import MoETopology, describe_model

__all__ = [
    "STRIPPED_ATTR",
    "ExpertParam",
    "ExpertsAdapter",
    "find_adapter",
    "get_adapter",
    "list_adapters",
    "register_adapter",
    "ExpertForward",
    "RunExperts",
    "Interleaving",
    "KeyTarget",
    "resolve_expert_keys",
    "MoEFamily",
    "discover_moe_families",
    "MoETopology",
    "describe_model",
]
