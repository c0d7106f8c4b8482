"""`from_pretrained(..., offload_config=...)`: plan, load every weight except the experts, attach the engine.

```
device "auto" follows a one-device device_map (placement.py); make_plan: config, kwargs, checkpoint headers, layout,
    budgets, names, side files   (nothing loaded; typed errors); a device_map on another device is refused
from_pretrained with a module-registration hook: each experts module loses its expert Parameters as soon as it
    is built, so their checkpoint keys are "unexpected" and never read (and silenced in the load report)
OffloadEngine(model, plan) + experts_implementation="hf_moe_offload" + model.offload_stats()
    + (models that generate) generate() wrapped with the step-boundary processor
    + save_pretrained() that streams the experts into the saved checkpoint (saving.py)
    + .to() / .cuda() / .half() that refuse to move or cast the model (placement.py)
```
Every model class loads this way: the base model, `*ForCausalLM` and the task heads. The registration hook is
installed only for the duration of one call, on this thread.
"""

from __future__ import annotations

import functools
import re
import threading

from torch import nn
from transformers import PreTrainedModel

from ..adapters import find_adapter
from ..config import OffloadConfig
from ..errors import UnsupportedFeatureError
from .distributed import localize_experts
from .engine import OffloadEngine
from .experts_forward import IMPLEMENTATION_NAME
from .generation import wrap_generate
from .pipelines import install_pipeline_grouping
from .placement import check_device_map, follow_device_map, refuse_moves
from .plan import LoadPlan, make_plan
from .saving import save_offloaded

__all__ = ["load_offloaded", "ignore_patterns"]

_state = threading.local()


def ignore_patterns(keys: list[str]) -> set[str]:
    """Regexes covering the expert checkpoint keys (numeric parts generalised), to silence the load report."""
    return {"^" + r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in k.split(".")) + "$" for k in keys}


def _registration_hook(parent: nn.Module, name: str, child: nn.Module):
    ctx = getattr(_state, "ctx", None)
    if ctx is None:
        return None
    adapter = find_adapter(child) if isinstance(child, nn.Module) else None
    if adapter is not None:
        adapter.strip(child)
        localize_experts(child, getattr(_state, "shard", None))
    if isinstance(parent, PreTrainedModel):
        current = set(getattr(parent, "_keys_to_ignore_on_load_unexpected", None) or [])
        parent._keys_to_ignore_on_load_unexpected = current | ctx
    return None


def _load_without_experts(original, path, model_args: tuple, plan: LoadPlan):
    import torch

    handle = torch.nn.modules.module.register_module_module_registration_hook(_registration_hook)
    fused_keys = [layer.param_key(p.name) for layer in plan.topology.layers for p in layer.params]
    _state.ctx = ignore_patterns(list(plan.expert_keys) + fused_keys)
    _state.shard = plan.shard
    try:
        return original(path, *model_args, **plan.kwargs)
    finally:
        _state.ctx = _state.shard = None
        handle.remove()


def _refuse_other_experts_implementation(model: PreTrainedModel) -> None:
    """`set_experts_implementation` to anything else would compute with experts that are not in memory."""
    set_impl = model.set_experts_implementation

    def set_experts_implementation(experts_implementation=None, *args, **kwargs):
        name = experts_implementation
        if isinstance(name, dict):
            bad = {v for v in name.values() if v != IMPLEMENTATION_NAME}
        else:
            bad = set() if name == IMPLEMENTATION_NAME else {name}
        if bad:
            raise UnsupportedFeatureError(
                f"set_experts_implementation({experts_implementation!r}): this model's experts are offloaded and only "
                f"experts_implementation={IMPLEMENTATION_NAME!r} can compute them; load the model without "
                f"offload_config to use transformers' in-memory implementations"
            )
        return set_impl(experts_implementation, *args, **kwargs)

    model.set_experts_implementation = set_experts_implementation


def load_offloaded(cls, original, path, model_args: tuple, kwargs: dict, offload_config) -> PreTrainedModel:
    """Body of the patched `from_pretrained` when `offload_config` is given (see the module docstring)."""
    cfg = follow_device_map(OffloadConfig.coerce(offload_config), kwargs)
    plan = make_plan(cls, path, kwargs, cfg)
    check_device_map(kwargs, plan.device)
    result = _load_without_experts(original, path, model_args, plan)
    model = result[0] if isinstance(result, tuple) else result
    for module in model.modules():  # an experts module built outside the hook's reach: strip it now
        adapter = find_adapter(module)
        if adapter is not None:
            adapter.strip(module)

    engine = OffloadEngine(model, plan)
    model.set_experts_implementation(IMPLEMENTATION_NAME)
    for layer in engine.topology.layers:
        sub_config = getattr(layer.module, "config", None)
        if sub_config is not None and sub_config._experts_implementation != IMPLEMENTATION_NAME:
            sub_config._experts_implementation = IMPLEMENTATION_NAME
    _refuse_other_experts_implementation(model)
    refuse_moves(model, engine.device)
    if callable(getattr(model, "generate", None)):
        wrap_generate(model, engine)
        install_pipeline_grouping()
    model.save_pretrained = functools.partial(save_offloaded, model, engine, model.save_pretrained)
    model.offload_engine = engine
    model.offload_stats = engine.stats_dict
    model.reset_offload_stats = engine.reset_stats
    return result
