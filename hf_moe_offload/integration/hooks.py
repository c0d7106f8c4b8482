"""Install and remove hf_moe_offload's hooks into transformers, exactly reversibly.

`install()` (run on import) registers the offloaded experts forward in `ExpertsInterface` and in the FP8 experts
registry, and wraps `PreTrainedModel.from_pretrained` so that it accepts `offload_config=` (the first offloaded
load also wraps the text-generation pipeline's `__call__`, see pipelines.py); the Auto classes and
`pipeline(model_kwargs=...)` reach it through that method. `uninstall()` puts the original method back and removes
the registrations (the experts forward stays registered while an offloaded model is alive).

Programs that never import the package get here through `_hf_moe_offload_autoload` (run by a .pth file at start-up):
it wraps `from_pretrained` with a stub that imports hf_moe_offload on the first `offload_config=`; `install()`
replaces that stub, so `uninstall()` restores transformers' own method, not the stub.
"""

from __future__ import annotations

import functools

from transformers import PreTrainedModel
from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
from transformers.integrations.moe import ExpertsInterface

from .auto_classes import install_auto, uninstall_auto
from .engine import live_engines
from .experts_forward import IMPLEMENTATION_NAME, offloaded_experts_forward
from .loading import load_offloaded
from .pipelines import uninstall_pipeline_grouping

__all__ = ["install", "uninstall", "is_installed"]

_ORIGINAL_ATTR = "_hf_moe_offload_original_from_pretrained"
_AUTOLOAD_ORIGINAL_ATTR = "_hf_moe_offload_autoload_original"  # = _hf_moe_offload_autoload.ORIGINAL_ATTR
_INTERFACES = (ExpertsInterface, FP8ExpertsInterface)


def is_installed() -> bool:
    return _ORIGINAL_ATTR in PreTrainedModel.__dict__


def install() -> None:
    """Install the hooks (idempotent)."""
    for interface in _INTERFACES:
        interface.register(IMPLEMENTATION_NAME, offloaded_experts_forward)
    install_auto()  # Auto classes: resolve the path before their config read (a bad path fails at once)
    if is_installed():
        return
    original = PreTrainedModel.__dict__["from_pretrained"]
    original = getattr(original.__func__, _AUTOLOAD_ORIGINAL_ATTR, original)  # the autoload stub steps aside
    original_func = original.__func__

    @functools.wraps(original_func)
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, offload_config=None, **kwargs):
        bound = original_func.__get__(cls, cls)
        if offload_config is None:
            return bound(pretrained_model_name_or_path, *model_args, **kwargs)
        return load_offloaded(cls, bound, pretrained_model_name_or_path, model_args, kwargs, offload_config)

    setattr(PreTrainedModel, _ORIGINAL_ATTR, original)
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


def uninstall() -> None:
    """Restore `PreTrainedModel.from_pretrained`; unregister the experts forward unless a model still uses it."""
    if is_installed():
        PreTrainedModel.from_pretrained = PreTrainedModel.__dict__[_ORIGINAL_ATTR]
        delattr(PreTrainedModel, _ORIGINAL_ATTR)
    uninstall_auto()
    uninstall_pipeline_grouping()
    if not live_engines():
        for interface in _INTERFACES:
            interface._global_mapping.pop(IMPLEMENTATION_NAME, None)
