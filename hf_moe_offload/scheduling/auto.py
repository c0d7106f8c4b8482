r"""`OffloadConfig(mode="auto")`: concrete budgets and prefetch depth from the machine's free memory and profile.

```
OffloadConfig (mode="auto") + topology summary + HardwareProfile (measured once, cached as JSON)
    --> host_budget   = free host RAM - dense weights (when they live on the host) - KV of the planned batch - reserve
    --> device_budget = free accelerator memory - dense weights - KV - reserve                   (CUDA only)
    --> prefetch_depth = layers one expert load needs to hide behind compute, ceil(load / layer compute), 1..4
    --> {"host_budget": int, "device_budget": int, "prefetch_depth": int}  ->  dataclasses.replace(cfg, **values)
```
Budgets are floored at one layer's top-k experts (the least the engine runs with) and capped at all expert bytes.
The profile is measured at the model's expert shapes on the disk that holds the checkpoint, then reused from
`~/.cache/hf_moe_offload/` (`auto_profile`), so only the first load of a model shape pays a few seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any

import torch

from ..config import OffloadConfig
from .planner import ModelShape, estimate_step
from .profile import HardwareProfile, canonical_dims, measure_profile

__all__ = ["resolve_auto", "auto_config", "auto_profile", "default_profile_dir"]


def default_profile_dir() -> str:
    """`$HF_MOE_OFFLOAD_CACHE` or `$XDG_CACHE_HOME/hf_moe_offload` (default `~/.cache/hf_moe_offload`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("HF_MOE_OFFLOAD_CACHE") or os.path.join(base, "hf_moe_offload")


def _device(cfg: OffloadConfig, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def resolve_auto(
    cfg: OffloadConfig,
    topology_summary: dict[str, Any] | ModelShape,
    profile: HardwareProfile | None = None,
    *,
    device: str | torch.device | None = None,
    host_memory_bytes: int | None = None,
    device_memory_bytes: int | None = None,
    reserve_fraction: float = 0.1,
    batch_size: int = 1,
    seq_bytes: int = 0,
    max_depth: int = 4,
) -> dict[str, int]:
    """Concrete `OffloadConfig` values for `mode="auto"`.

    Args:
        cfg: the user's config (its `device` decides whether an accelerator budget is needed).
        topology_summary: `MoETopology.summary()` (or a `ModelShape`).
        profile: the machine's profile; without one `prefetch_depth` keeps `cfg.prefetch_depth`.
        device: overrides `cfg.device` (e.g. the engine's resolved device).
        host_memory_bytes: host memory available; default `psutil.virtual_memory().available`.
        device_memory_bytes: accelerator memory available; default the free memory CUDA reports.
        reserve_fraction: share of each memory kept free for activations and the allocator.
        batch_size, seq_bytes: sequences expected at once and KV bytes per sequence, reserved from the tier that
            holds the KV cache.
        max_depth: the deepest prefetch (predictions get worse with distance).

    Returns:
        `{"host_budget": bytes, "device_budget": bytes, "prefetch_depth": layers}`.
    """
    shape = topology_summary if isinstance(topology_summary, ModelShape) else ModelShape.from_summary(topology_summary)
    dev = _device(cfg, device)
    if host_memory_bytes is None:
        import psutil

        host_memory_bytes = psutil.virtual_memory().available
    least, most = shape.top_k * shape.expert_nbytes, shape.total_expert_nbytes
    kv = batch_size * seq_bytes
    host = int(host_memory_bytes * (1 - reserve_fraction))
    device_budget = 0
    if dev.type == "cuda":
        if device_memory_bytes is None:
            device_memory_bytes = torch.cuda.mem_get_info(dev)[0]
        device_budget = int(device_memory_bytes * (1 - reserve_fraction)) - shape.other_nbytes - kv
        device_budget = min(max(device_budget, least), most)
    else:
        host -= shape.other_nbytes + kv
    host_budget = min(max(host, least), most)

    depth = cfg.prefetch_depth
    if profile is not None:
        slots = (device_budget if dev.type == "cuda" else host_budget) // shape.expert_nbytes
        cost = estimate_step(profile, shape, batch_size, slots, host_budget // shape.expert_nbytes,
                             seq_bytes=seq_bytes, on_device=dev.type == "cuda")  # fmt: skip
        layer_compute = max(sum(cost.compute_s) / shape.num_layers, 1e-9)
        one_load = shape.expert_nbytes / profile.disk_read_Bps
        depth = min(max(1, math.ceil(one_load / layer_compute)), max_depth)
    return {"host_budget": host_budget, "device_budget": device_budget, "prefetch_depth": depth}


def auto_profile(
    topology_summary: dict[str, Any], sample_file: str | None, device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> HardwareProfile:  # fmt: skip
    """The profile for this model shape, device and disk: loaded from `cache_dir` or measured and saved there."""
    hidden, inter = canonical_dims(topology_summary["params"])
    dtype = topology_summary.get("dtype", "bfloat16")
    disk = os.stat(sample_file).st_dev if sample_file else "scratch"
    key = hashlib.sha1(f"{hidden}x{inter}:{dtype}:{torch.device(device)}:{disk}".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir or default_profile_dir(), f"profile-{key}.json")
    if os.path.isfile(path):
        try:
            return HardwareProfile.load(path)
        except (ValueError, KeyError, TypeError):
            pass  # an older or damaged profile: measure again
    profile = measure_profile((hidden, inter), dtype, sample_file=sample_file, device=device)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    profile.save(path)
    return profile


def auto_config(
    cfg: OffloadConfig, topology_summary: dict[str, Any], sample_file: str | None = None, **kwargs
) -> OffloadConfig:
    """`cfg` with `resolve_auto`'s values filled in (the profile from `auto_profile` on `sample_file`'s disk).

    Example:
        ```python
        >>> topology, layout, _ = inspect_checkpoint(meta_model, folder)
        >>> cfg = auto_config(cfg, topology.summary(), sample_file=checkpoint_files(folder)[0], device=device)
        ```
    """
    dev = _device(cfg, kwargs.get("device"))
    profile = kwargs.pop("profile", None) or auto_profile(topology_summary, sample_file, dev)
    return dataclasses.replace(cfg, **resolve_auto(cfg, topology_summary, profile, **kwargs))
