"""`from_pretrained(..., offload_config=...)`: load every weight except the experts, then attach the engine.

```
offload_config --coerce--> OffloadConfig
path --local folder / HF cache--> headers checked, layout and budget checked on a meta model   (nothing loaded)
a pre-quantized checkpoint (config.json `quantization_config`): FP8 or MXFP4 only; transformers keeps the experts
    modules unquantized (`modules_to_not_convert`, or `dequantize=True` for MXFP4) and we dequantize per expert
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
from ..errors import OffloadConfigError, UnsupportedQuantizationError
from ..storage import SUPPORTED_METHODS, checkpoint_files
from .engine import OffloadEngine, inspect_checkpoint, plan_slots, resolve_device
from .experts_forward import IMPLEMENTATION_NAME
from .generation import wrap_generate

__all__ = ["load_offloaded", "resolve_folder", "ignore_patterns"]

_state = threading.local()
_INCOMPATIBLE = ("state_dict", "gguf_file", "quantization_config", "tp_plan", "device_mesh", "offload_folder")
_HINTS = {"quantization_config": " (a checkpoint already quantized with FP8 or MXFP4 loads without it)"}


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
                f"{_HINTS.get(name, '')}"
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


def _config(folder: str, kwargs: dict) -> PretrainedConfig:
    config = kwargs.get("config")
    if not isinstance(config, PretrainedConfig):
        config = AutoConfig.from_pretrained(folder, trust_remote_code=kwargs.get("trust_remote_code", False))
    return config


def _quantization(config: PretrainedConfig) -> dict | None:
    """The checkpoint's `quantization_config` as a dict, or None.

    Raises:
        UnsupportedQuantizationError: a method (or FP8 variant) whose expert weights we cannot dequantize.
    """
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    q = q.to_dict() if hasattr(q, "to_dict") else dict(q)
    method = q.get("quant_method")
    if method not in SUPPORTED_METHODS or (method == "fp8" and q.get("expert_dtype", "fp8") != "fp8"):
        what = f"{method!r} with expert_dtype={q.get('expert_dtype')!r}" if method == "fp8" else repr(method)
        raise UnsupportedQuantizationError(
            f"the checkpoint is quantized with quant_method={what}; hf_moe_offload dequantizes expert weights of "
            f"quant_method {' and '.join(map(repr, SUPPORTED_METHODS))} (DeepSeek-style block FP8 with "
            f"weight_scale_inv, GPT-OSS MXFP4 blocks/scales) only. Use an unquantized or FP8/MXFP4 checkpoint, or "
            f"load without offload_config"
        )
    return q


def _quantization_arg(q: dict, expert_modules: list[str]):
    """`quantization_config=` that keeps the experts modules unquantized (their weights never load: we read them)."""
    from transformers import FineGrainedFP8Config, Mxfp4Config

    if q["quant_method"] == "mxfp4":  # only the experts are MXFP4: dequantizing changes nothing else
        return Mxfp4Config(dequantize=True)
    keep = list(q.get("modules_to_not_convert") or []) + expert_modules
    return FineGrainedFP8Config(dequantize=bool(q.get("dequantize", False)), modules_to_not_convert=keep)


def _meta_model(cls, config: PretrainedConfig, kwargs: dict) -> nn.Module:
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
    config = _config(folder, kwargs)
    quantization = _quantization(config)

    topology, layout, expert_keys = inspect_checkpoint(_meta_model(cls, config, kwargs), folder)
    if quantization is not None:
        kwargs["quantization_config"] = _quantization_arg(quantization, [x.module_name for x in topology.layers])
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
