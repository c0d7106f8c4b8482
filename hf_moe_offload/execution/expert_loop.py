r"""`run_experts`: the cache-driven loop over one MoE layer's routed experts.

```
[Router] -> top_k_index (T, k) int64, top_k_weights (T, k)
   -> [Dispatch] sort the T*k (token, slot) pairs by expert once
   -> [Experts]  pin the resident experts and compute them first, while the missing ones load
                 (at most as many loads in flight as free slots; then wait for the first that lands)
   -> [Combine]  each expert's rows * routing weight -> (T*k, H) buffer in the promoted dtype -> sum over k -> (T, H)
```
Summing the k weighted outputs per token in the promoted dtype before casting back is what transformers' own
paths do, so offloaded logits match the normal model. Routing indices `>= num_experts` (expert-parallel sentinels)
contribute nothing. Every lease taken is released, also when an expert's computation raises.

This stage knows the cache and nothing of transformers: `integration/experts_forward.py` and the adapters of
undecorated families are thin adapters that call it with their family's per-expert math (`expert_fn`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait

import torch

from ..cache import ExpertCache, Lease

__all__ = ["ExpertFn", "run_experts"]

# `expert_fn(weights, x (n, H), e) -> (n, H)`: one expert's math; `weights` maps each offloaded weight name to the
# expert's slice (compute dtype, on the compute device).
ExpertFn = Callable[[dict[str, torch.Tensor], torch.Tensor, int], torch.Tensor]


def _check_shapes(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
    if hidden.dim() != 2 or top_k_index.dim() != 2 or top_k_index.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"run_experts: expected hidden (T, H) and top_k_index (T, k), got {tuple(hidden.shape)} and "
            f"{tuple(top_k_index.shape)}"
        )
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"run_experts: top_k_weights must have top_k_index's shape {tuple(top_k_index.shape)}, got "
            f"{tuple(top_k_weights.shape)}"
        )
    if top_k_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"run_experts: top_k_index must be an integer tensor, got {top_k_index.dtype}")


def run_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    expert_fn: ExpertFn,
    *,
    cache: ExpertCache,
    layer: int,
    num_experts: int,
    step: int | None = None,
) -> torch.Tensor:
    """Compute one MoE layer's routed experts through `cache`.

    Args:
        hidden: `(T, H)` the layer's MoE input.
        top_k_index: `(T, k)` int64 expert ids per token; ids `>= num_experts` are dropped.
        top_k_weights: `(T, k)` routing weights.
        expert_fn: one expert's math, `(weights, x (n, H), e) -> (n, H)`.
        cache: the shared expert cache (leases, loads, statistics, timeline).
        layer: MoE layer index (the cache key is `(layer, e)`).
        num_experts: experts in this layer.
        step: decode step, only recorded on the timeline.

    Returns:
        `(T, H)` in `hidden`'s dtype: `sum_k top_k_weights[t, k] * expert_{top_k_index[t, k]}(hidden[t])`.
    """
    _check_shapes(hidden, top_k_index, top_k_weights)
    stats, timeline = cache.stats, cache.timeline
    stats.forward()
    num_tokens, k = top_k_index.shape
    flat = top_k_index.reshape(-1).clamp(min=0, max=num_experts)  # num_experts = sentinel bucket
    counts = torch.bincount(flat, minlength=num_experts + 1).tolist()
    order = torch.argsort(flat, stable=True)
    starts = [0] * (num_experts + 2)
    for i, c in enumerate(counts):
        starts[i + 1] = starts[i] + c
    flat_weights = top_k_weights.reshape(-1)
    out_dtype = torch.promote_types(hidden.dtype, top_k_weights.dtype)
    buf = hidden.new_zeros(num_tokens * k, hidden.shape[-1], dtype=out_dtype)
    t_layer = time.perf_counter()

    def compute(e: int, weights: dict[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        pos = order[starts[e] : starts[e + 1]]
        y = expert_fn(weights, hidden[pos // k], e)
        buf[pos] = (y * flat_weights[pos, None]).to(out_dtype)
        timeline.record("compute", f"L{layer}E{e}", t0, time.perf_counter(), layer=layer, expert=e, tokens=len(pos))

    needed = [e for e in range(num_experts) if counts[e]]
    leases: dict[int, Lease] = {}
    for e in needed:  # pin what is already there: resident experts run first
        lease = cache.acquire_resident((layer, e))
        if lease is not None:
            leases[e] = lease
    pending = [e for e in reversed(needed) if e not in leases]

    def issue() -> None:
        while pending:
            lease = cache.try_acquire((layer, pending[-1]))
            if lease is None:
                return
            leases[pending.pop()] = lease

    issue()
    try:
        while leases or pending:
            if not leases:  # every slot is held elsewhere: wait for one
                e = pending.pop()
                leases[e] = cache.acquire((layer, e))
            ready = [e for e, lease in leases.items() if lease.ready()]
            if not ready:
                t0 = time.perf_counter()
                wait([lease.future for lease in leases.values()], return_when=FIRST_COMPLETED)
                t1 = time.perf_counter()
                stats.stall(t1 - t0)
                timeline.record("stall", f"wait L{layer}", t0, t1, layer=layer)
                ready = [e for e, lease in leases.items() if lease.ready()]
            e = ready[0]
            lease = leases.pop(e)
            try:
                compute(e, lease.wait())
            finally:
                lease.release()
            issue()
    finally:
        for lease in leases.values():
            lease.release()
    out = buf.view(num_tokens, k, -1).sum(dim=1).to(hidden.dtype)
    timeline.record("layer", f"MoE L{layer}", t_layer, time.perf_counter(), layer=layer, step=step, tokens=num_tokens)
    return out
