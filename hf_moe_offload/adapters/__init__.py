"""Model-family adapters (the only package besides `integration` that imports transformers)."""

from . import interface  # noqa: F401  (registers the generic adapter)
from .base import (
    STRIPPED_ATTR,
    ExpertParam,
    ExpertsAdapter,
    find_adapter,
    get_adapter,
    list_adapters,
    register_adapter,
)
from .conversion import KeyTarget, resolve_expert_keys
from .topology import MoETopology, describe_model

__all__ = [
    "STRIPPED_ATTR",
    "ExpertParam",
    "ExpertsAdapter",
    "find_adapter",
    "get_adapter",
    "list_adapters",
    "register_adapter",
    "KeyTarget",
    "resolve_expert_keys",
    "MoETopology",
    "describe_model",
]
