"""The only layer (with adapters/) that touches transformers internals: hooks, loading, the experts forward."""

from .._import_hook import run_pending
from .engine import OffloadEngine
from .experts_forward import IMPLEMENTATION_NAME, offloaded_experts_forward
from .hooks import install, is_installed, uninstall
from .loading import load_offloaded
from .plan import LoadPlan, inspect_checkpoint, make_plan, plan_slots

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
    "LoadPlan",
    "make_plan",
]

# `import hf_moe_offload` promised the hooks; transformers may have been loaded by this package's own imports.
run_pending()
