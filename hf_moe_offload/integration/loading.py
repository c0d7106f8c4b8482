"""`from_pretrained(..., offload_config=...)`: load every weight except the experts, then attach the engine.

```
offload_config --coerce--> OffloadConfig
path --local folder / HF cache--> headers checked, layout and budget checked on a meta model   (nothing loaded)
from_pretrained with a module-registration hook: each experts module loses its expert Parameters as soon as it
    is built, so their checkpoint keys are "unexpected" and never read (and silenced in the load report)
OffloadEngine(model) + experts_implementation="hf_moe_offload" + model.offload_stats()
```
All validation happens before transformers reads a byte of weights, so bad input raises a typed error and leaves
nothing half-built. The registration hook is installed only for the duration of one call, on this thread.
"""

from __future__ import annotations

import os
import re
import threading

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from ..adapters import find_adapter
from ..config import OffloadConfig
from ..errors import OffloadConfigError
from ..storage import checkpoint_files
from .engine import OffloadEngine, inspect_checkpoint, plan_slots, resolve_device
from .experts_forward import IMPLEMENTATION_NAME
from .generation import wrap_generate

__all__ = ["load_offloaded", "resolve_folder", "ignore_patterns"]

_state = threading.local()
_INCOMPATIBLE = ("state_dict", "gguf_file", "quantization_config", "tp_plan", "device_mesh", "offload_folder")


def resolve_folder(path: str | os.PathLike, kwargs: dict) -> str:
    """The local folder holding the checkpoint: `path` itself, or its snapshot in the Hugging Face cache."""
    path = os.fspath(path)
    sub = kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        return os.path.join(path, sub)
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            path, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"), local_files_only=True
        )
    except Exception as e:  # noqa: BLE001 - any failure means "not available locally"
        raise OffloadConfigError(
            f"{path!r} is not a local folder and is not in the Hugging Face cache ({type(e).__name__}); "
            f"hf_moe_offload reads experts from local files: download the model first "
            f"(e.g. `hf download {path}`) and pass its folder"
        ) from None
    return os.path.join(folder, sub)


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
    if isinstance(parent, PreTrainedModel):
        current = set(getattr(parent, "_keys_to_ignore_on_load_unexpected", None) or [])
        parent._keys_to_ignore_on_load_unexpected = current | ctx
    return None


def _check_kwargs(kwargs: dict, device: torch.device) -> None:
    for name in _INCOMPATIBLE:
        if kwargs.get(name) is not None:
            raise OffloadConfigError(
                f"from_pretrained: {name}= cannot be combined with offload_config=; hf_moe_offload reads experts "
                f"from the checkpoint's safetensors files itself. Remove {name}= or load without offload_config"
            )
    device_map = kwargs.get("device_map")
    if device_map is None:
        if device.type == "cuda":
            kwargs["device_map"] = {"": str(device)}
        return
    targets = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
    if len(targets) != 1 or {str(t) for t in targets} & {"auto", "disk", "meta", "balanced", "sequential"}:
        raise OffloadConfigError(
            f"from_pretrained: device_map={device_map!r} cannot be combined with offload_config=; non-expert weights "
            f"go to one device and experts are managed by hf_moe_offload. Pass offload_config(device=...) instead"
        )


def _meta_model(cls, folder: str, kwargs: dict) -> nn.Module:
    config = kwargs.get("config")
    if not isinstance(config, PretrainedConfig):
        config = AutoConfig.from_pretrained(folder, trust_remote_code=kwargs.get("trust_remote_code", False))
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = cls(config)
    return model.to(dtype)


def load_offloaded(cls, original, path, model_args: tuple, kwargs: dict, offload_config) -> PreTrainedModel:
    """Body of the patched `from_pretrained` when `offload_config` is given (see the module docstring)."""
    cfg = OffloadConfig.coerce(offload_config)
    device = resolve_device(cfg)
    kwargs = dict(kwargs)
    _check_kwargs(kwargs, device)
    folder = resolve_folder(path, kwargs)

    topology, layout, expert_keys = inspect_checkpoint(_meta_model(cls, folder, kwargs), folder)
    if cfg.mode == "auto":  # measured hardware profile + planner -> concrete budgets and prefetch depth
        from ..scheduling.auto import auto_config

        sample = max(checkpoint_files(folder), key=os.path.getsize)
        cfg = auto_config(cfg, topology.summary(), sample_file=sample, device=device)
    plan_slots(cfg, topology, layout.slot_nbytes, device)

    handle = torch.nn.modules.module.register_module_module_registration_hook(_registration_hook)
    fused_keys = [layer.param_key(p.name) for layer in topology.layers for p in layer.params]
    _state.ctx = ignore_patterns(expert_keys + fused_keys)
    try:
        result = original(path, *model_args, **kwargs)
    finally:
        _state.ctx = None
        handle.remove()
    model = result[0] if isinstance(result, tuple) else result
    for module in model.modules():  # an experts module built outside the hook's reach: strip it now
        adapter = find_adapter(module)
        if adapter is not None:
            adapter.strip(module)

    engine = OffloadEngine(model, folder, cfg)
    model.set_experts_implementation(IMPLEMENTATION_NAME)
    for layer in engine.topology.layers:
        sub_config = getattr(layer.module, "config", None)
        if sub_config is not None and sub_config._experts_implementation != IMPLEMENTATION_NAME:
            sub_config._experts_implementation = IMPLEMENTATION_NAME
    wrap_generate(model, engine)
    model.offload_engine = engine
    model.offload_stats = engine.stats_dict
    model.reset_offload_stats = engine.reset_stats
    return result
