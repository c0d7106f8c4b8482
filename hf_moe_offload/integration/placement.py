"""Where an offloaded model lives: `device_map=` at load time, `.to()` / `.cuda()` / `.half()` afterwards.

The experts' cache slots are allocated once, on one device and in one dtype, when the model loads; the non-expert
weights sit on the same device. So:

```
device_map=<one device>, offload_config device "auto" --> the experts follow the map (lm_eval passes {"": "cuda"})
device_map=<one device>, an explicit other device     --> OffloadConfigError before any weight is read
device_map="auto" / several devices / "disk"          --> OffloadConfigError (plan.py)
model.to(x), .cuda(), .half(), .float(), ... (nn.Module._apply on the model):
    same device and dtype --> a no-op, as for any model
    a move or a cast      --> UnsupportedFeatureError (only the non-expert weights would change; outputs would not
                              match the normal model): load with the device / dtype wanted instead
```
The check applies the caller's conversion to an empty tensor of each (device, dtype) among the model's parameters, so
it sees exactly what `.to()` would do (including dtype rules for floating-point tensors) without parsing its
arguments.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import OffloadConfig
from ..errors import OffloadConfigError, UnsupportedFeatureError

__all__ = ["map_device", "follow_device_map", "check_device_map", "refuse_moves"]

_NOT_ONE_DEVICE = {"auto", "disk", "meta", "balanced", "balanced_low_0", "sequential"}


def map_device(device_map) -> torch.device | None:
    """The one device `device_map` puts the whole model on; None when there is no map or it is not a single device
    (plan.py refuses those)."""
    if device_map is None:
        return None
    targets = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
    if len(targets) != 1:
        return None
    (target,) = targets
    if isinstance(target, str) and target in _NOT_ONE_DEVICE:
        return None
    if isinstance(target, int) and not isinstance(target, bool):
        return torch.device("cuda", target)  # transformers: an int is an accelerator index
    try:
        return torch.device(target)
    except (RuntimeError, TypeError):
        return None


def _same(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda" and (a.index is None) != (b.index is None):
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def follow_device_map(cfg: OffloadConfig, kwargs: dict) -> OffloadConfig:
    """`cfg` with `device="auto"` replaced by the single device of `device_map=` (unchanged otherwise)."""
    target = map_device(kwargs.get("device_map"))
    if target is None or cfg.device != "auto":
        return cfg
    return dataclasses.replace(cfg, device=str(target))


def check_device_map(kwargs: dict, device: torch.device) -> None:
    """Refuse a `device_map=` whose one device is not the device the experts are computed on.

    Raises:
        OffloadConfigError: the map puts the non-expert weights on another device than `offload_config`'s device.
    """
    target = map_device(kwargs.get("device_map"))
    if target is not None and not _same(target, device):
        raise OffloadConfigError(
            f"from_pretrained: device_map={kwargs['device_map']!r} puts the model on {target}, but offload_config "
            f"computes the experts on {device}; both must be one device. Leave offload_config device='auto' (it "
            f"follows device_map) or pass the same device to both"
        )


def refuse_moves(model: nn.Module, device: torch.device) -> None:
    """Make `model.to()`, `.cuda()`, `.cpu()`, `.half()`, `.float()`, ... refuse a move or a cast (see the module
    docstring); calls that keep the model where and as it is still run (e.g. lm_eval's `model.to(device)`)."""
    apply = model._apply

    def _apply(fn, *args, **kwargs):
        for where, dtype in {(p.device, p.dtype) for p in model.parameters()}:  # e.g. fp32 routers in a bf16 model
            probe = torch.empty(0, dtype=dtype, device=where)
            moved = fn(probe)
            if isinstance(moved, torch.Tensor) and (moved.device != probe.device or moved.dtype != probe.dtype):
                wanted = [f"dtype={moved.dtype}"] if moved.dtype != probe.dtype else []
                if moved.device != probe.device:
                    wanted.append(f"offload_config={{..., 'device': '{moved.device}'}}")
                raise UnsupportedFeatureError(
                    f"this model's experts are offloaded: their cache slots were allocated on {device} when it "
                    f"was loaded, for its weights' dtype, so moving or casting it ({probe.device}, {probe.dtype} -> "
                    f"{moved.device}, {moved.dtype}) would change the non-expert weights only and its outputs would "
                    f"no longer be the normal model's. Load it as wanted instead: "
                    f"from_pretrained(..., {', '.join(wanted)})"
                )
        return apply(fn, *args, **kwargs)

    model._apply = _apply
