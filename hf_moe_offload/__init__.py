"""hf_moe_offload: run Mixture-of-Experts models whose experts exceed memory, through plain transformers.

Importing the package installs its hooks (`uninstall()` removes them):

    import hf_moe_offload
    model = AutoModelForCausalLM.from_pretrained(path, offload_config={"host_budget": "2GiB"})
"""

from .cache import list_policies, register_policy
from .config import OffloadConfig
from .errors import (
    BudgetTooSmallError,
    CheckpointChangedError,
    CorruptCheckpointError,
    ExpertLoadError,
    ExpertLoadTimeoutError,
    MissingShardError,
    OffloadConfigError,
    OffloadError,
    UnknownNameError,
    UnsupportedLayoutError,
    UnsupportedModelError,
)
from .integration import install, is_installed, uninstall

__version__ = "0.1.0"

install()

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
    "UnsupportedLayoutError",
    "BudgetTooSmallError",
    "UnknownNameError",
    "MissingShardError",
    "CorruptCheckpointError",
    "CheckpointChangedError",
    "ExpertLoadError",
    "ExpertLoadTimeoutError",
    "__version__",
]
