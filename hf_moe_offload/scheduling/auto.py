r"""`OffloadConfig(mode="auto")`: concrete budgets and prefetch depth from the machine's free memory and profile.

```
OffloadConfig (mode="auto") + topology summary + model config + HardwareProfile (measured once, cached as JSON)
    --> memory the run may use = free memory - reserve_fraction       (host RAM; and the accelerator's on CUDA)
    --> model_plan.plan_for_model (what `hf-moe-offload plan` calls): the computing tier keeps the dense weights
        and the KV cache of `batch_size` sequences of `context` tokens, the rest is expert slots
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
import json
import math
import os
from typing import Any

import torch

from ..config import OffloadConfig
from .cost_model import ModelShape
from .model_plan import DEFAULT_CONTEXT, plan_for_model, shape_for_model
from .planner import expert_slots
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
    model_config=None,
    batch_size: int = 1,
    context: int = DEFAULT_CONTEXT,
    seq_bytes: int | None = None,
    max_depth: int = 4,
) -> dict[str, int]:
    """Concrete `OffloadConfig` values for `mode="auto"`.

    Args:
        cfg: the user's config (its `device` decides whether an accelerator budget is needed).
        topology_summary: `MoETopology.summary()` (or a `ModelShape`).
        profile: the machine's profile; without one the budgets come from memory alone and `prefetch_depth` keeps
            `cfg.prefetch_depth`.
        device: overrides `cfg.device` (e.g. the engine's resolved device).
        host_memory_bytes: host memory available; default `psutil.virtual_memory().available`.
        device_memory_bytes: accelerator memory available; default the free memory CUDA reports.
        reserve_fraction: share of each memory kept free for activations and the allocator.
        model_config: a `PretrainedConfig` or its dict, for the KV cache and embedding sizes.
        batch_size, context: sequences expected at once and their tokens; their KV cache is reserved from the
            tier that holds it.
        seq_bytes: KV bytes per sequence, instead of `context` tokens of `model_config`'s KV.
        max_depth: the deepest prefetch (predictions get worse with distance).

    Returns:
        `{"host_budget": bytes, "device_budget": bytes, "prefetch_depth": layers}`.
    """
    dev = _device(cfg, device)
    if host_memory_bytes is None:
        import psutil

        host_memory_bytes = psutil.virtual_memory().available
    if dev.type == "cuda" and device_memory_bytes is None:
        device_memory_bytes = torch.cuda.mem_get_info(dev)[0]
    host = int(host_memory_bytes * (1 - reserve_fraction))
    device_mem = int(device_memory_bytes * (1 - reserve_fraction)) if dev.type == "cuda" else None
    shape, kv = shape_for_model(topology_summary, model_config)
    seq_bytes = context * kv if seq_bytes is None else seq_bytes
    depth = cfg.prefetch_depth
    if profile is not None:
        p = plan_for_model(
            profile,
            topology_summary,
            host,
            model_config=model_config,
            seq_bytes=seq_bytes,
            device_memory_bytes=device_mem,
            batch_candidates=(batch_size,),
        )
        host_budget, device_budget = p.host_budget_bytes, p.device_budget_bytes
        layer_compute = max(sum(p.compute_s) / shape.num_layers, 1e-9)
        depth = min(max(1, math.ceil(shape.expert_nbytes / profile.disk_read_Bps / layer_compute)), max_depth)
    else:
        host_slots, device_slots = expert_slots(shape, batch_size, seq_bytes, host, device_mem)
        host_budget, device_budget = host_slots * shape.expert_nbytes, device_slots * shape.expert_nbytes
    least, most = shape.top_k * shape.expert_nbytes, shape.total_expert_nbytes
    host_budget = min(max(host_budget, least), most)
    device_budget = min(max(device_budget, least), most) if dev.type == "cuda" else 0
    return {"host_budget": host_budget, "device_budget": device_budget, "prefetch_depth": depth}


def auto_profile(
    topology_summary: dict[str, Any],
    sample_file: str | None,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> HardwareProfile:
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


def _config_beside(sample_file: str | None) -> dict | None:
    """The `config.json` of the checkpoint folder that holds `sample_file`, as a dict (None when absent)."""
    path = os.path.join(os.path.dirname(os.path.abspath(sample_file)), "config.json") if sample_file else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def auto_config(
    cfg: OffloadConfig, topology_summary: dict[str, Any], sample_file: str | None = None, **kwargs
) -> OffloadConfig:
    """`cfg` with `resolve_auto`'s values filled in (the profile from `auto_profile` on `sample_file`'s disk).

    Args:
        cfg: the user's config.
        topology_summary: `MoETopology.summary()`.
        sample_file: a checkpoint file: its disk is profiled, and the `config.json` beside it gives the KV cache
            and embedding sizes unless `model_config=` is passed.
        **kwargs: `profile=` (skips `auto_profile`) and `resolve_auto`'s keyword arguments (`device`,
            `model_config`, `batch_size`, `context`, `host_memory_bytes`, ...).

    Example:
        ```python
        >>> topology, layout, _ = inspect_checkpoint(meta_model, folder)
        >>> cfg = auto_config(cfg, topology.summary(), sample_file=checkpoint_files(folder)[0], device=device)
        ```
    """
    dev = _device(cfg, kwargs.get("device"))
    profile = kwargs.pop("profile", None) or auto_profile(topology_summary, sample_file, dev)
    if kwargs.get("model_config") is None:
        kwargs["model_config"] = _config_beside(sample_file)
    return dataclasses.replace(cfg, **resolve_auto(cfg, topology_summary, profile, **kwargs))
