"""hf_moe_offload: run Mixture-of-Experts models whose experts exceed memory, through plain transformers.

Importing the package installs its hooks (`uninstall()` removes them):

    import hf_moe_offload
    model = AutoModelForCausalLM.from_pretrained(path, offload_config={"host_budget": "2GiB"})

The import itself stays light (no torch, no transformers): the hooks go in as soon as transformers defines
`PreTrainedModel` (at once when it already has, see `_import_hook.py`), and the names below that need torch load
on first use.
"""

import logging as _logging

from ._compat import check_transformers_version
from ._import_hook import install_when_transformers_loads
from .config import OffloadConfig
from .errors import (
    BudgetTooLargeError,
    BudgetTooSmallError,
    CheckpointChangedError,
    CorruptCheckpointError,
    ExpertLoadError,
    ExpertLoadTimeoutError,
    MissingShardError,
    ModelNotFoundError,
    OffloadConfigError,
    OffloadError,
    SidecarError,
    UnknownNameError,
    UnsupportedLayoutError,
    UnsupportedModelError,
    UnsupportedParallelismError,
)

__version__ = "0.1.0"

# Silent unless the application configures logging (like transformers' INFO messages): at INFO, each offloaded load
# reports its decisions (budgets -> slots, device, predictors, I/O mode, threads).
_logging.getLogger(__name__).addHandler(_logging.NullHandler())
check_transformers_version()

_LAZY = {
    "install": ".integration",
    "uninstall": ".integration",
    "is_installed": ".integration",
    "list_policies": ".cache",
    "register_policy": ".cache",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


install_when_transformers_loads()

__all__ = [
    "OffloadConfig",
    "install",
    "uninstall",
    "is_installed",
    "list_policies",
    "register_policy",
    "OffloadError",
    "OffloadConfigError",
    "UnsupportedModelError",
    "UnsupportedParallelismError",
    "UnsupportedLayoutError",
    "BudgetTooSmallError",
    "BudgetTooLargeError",
    "ModelNotFoundError",
    "UnknownNameError",
    "MissingShardError",
    "CorruptCheckpointError",
    "CheckpointChangedError",
    "ExpertLoadError",
    "ExpertLoadTimeoutError",
    "SidecarError",
    "__version__",
]
