"""The only layer (with adapters/) that touches transformers internals: hooks, loading, the experts forward."""

from .engine import OffloadEngine, inspect_checkpoint, plan_slots
from .experts_forward import IMPLEMENTATION_NAME, offloaded_experts_forward
from .hooks import install, is_installed, uninstall
from .loading import load_offloaded

__all__ = [
    "OffloadEngine",
    "inspect_checkpoint",
    "plan_slots",
    "IMPLEMENTATION_NAME",
    "offloaded_experts_forward",
    "install",
    "is_installed",
    "uninstall",
    "load_offloaded",
]
