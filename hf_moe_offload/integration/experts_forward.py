r"""The offloaded experts forward, registered in transformers' `ExpertsInterface` as `"hf_moe_offload"`.

```
top_k_index (T, k) --sort once--> tokens per expert --> [resident experts: compute now]
                                                   \--> [missing: start loads] --> compute each as it lands
                                  every expert's rows -> (T, k, H) buffer -> sum over k -> (T, H)
```
The math mirrors transformers' `grouped_mm` path, expert by expert, honouring the experts class flags
(`has_gate`, `has_bias`, `is_transposed`, `_apply_gate`, `has_post_expert_norm`): per-(token, slot) outputs are
weighted by the routing weights in the promoted dtype and summed over k before casting back, so offloaded logits
match the normal model. Routing indices `>= num_experts` (expert-parallel sentinels) contribute nothing.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, wait

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["offloaded_experts_forward", "expert_mlp", "IMPLEMENTATION_NAME"]

IMPLEMENTATION_NAME = "hf_moe_offload"


def expert_mlp(module: nn.Module, w: dict[str, torch.Tensor], x: torch.Tensor, e: int) -> torch.Tensor:
    """One expert applied to its tokens: `x (n, H) -> (n, H)`, with `w` the expert's weight slices."""
    transposed = module.is_transposed
    if module.has_gate:
        weight, bias = w["gate_up_proj"], module.gate_up_proj_bias[e] if module.has_bias else None
    else:
        weight, bias = w["up_proj"], module.up_proj_bias[e] if module.has_bias else None
    x = x.to(weight.dtype)
    h = x @ weight if transposed else F.linear(x, weight)
    if bias is not None:
        h = h + bias
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    down = w["down_proj"]
    out = h @ down if transposed else F.linear(h, down)
    if module.has_bias:
        out = out + module.down_proj_bias[e]
    if module.has_post_expert_norm:
        out = module.post_expert_norm(out)
    return out


def offloaded_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`ExpertsInterface` contract: `hidden_states (T, H)`, `top_k_index (T, k) int64`, `top_k_weights (T, k)`."""
    handle = self.__dict__.get("_hf_moe_offload")
    if handle is None:
        raise RuntimeError(
            f"{type(self).__name__} uses experts_implementation='{IMPLEMENTATION_NAME}' but was not loaded with "
            f"offload_config=...; load the model with from_pretrained(..., offload_config=...)"
        )
    return run_layer(self, handle.engine, handle.layer, hidden_states, top_k_index, top_k_weights)


def run_layer(module, engine, layer, hidden_states, top_k_index, top_k_weights, expert_fn=None) -> torch.Tensor:
    """The cache-driven loop over one layer's routed experts. `expert_fn(weights, x, e)` is one expert's math;
    None means `expert_mlp` (the `ExpertsInterface` classes); adapters of undecorated classes pass their own."""
    cache, stats = engine.cache, engine.stats
    stats.forward()
    if engine.prefetcher is not None:
        engine.prefetcher.on_layer(layer, hidden_states, top_k_index)
    num_tokens, k = top_k_index.shape
    num_experts = engine.num_experts(layer)
    flat = top_k_index.reshape(-1).clamp(min=0, max=num_experts)  # num_experts = sentinel bucket
    counts = torch.bincount(flat, minlength=num_experts + 1).tolist()
    order = torch.argsort(flat, stable=True)
    starts = [0] * (num_experts + 2)
    for i, c in enumerate(counts):
        starts[i + 1] = starts[i] + c
    flat_weights = top_k_weights.reshape(-1)
    out_dtype = torch.promote_types(hidden_states.dtype, top_k_weights.dtype)
    buf = hidden_states.new_zeros(num_tokens * k, hidden_states.shape[-1], dtype=out_dtype)

    timeline = cache.timeline
    t_layer = time.perf_counter()

    def compute(e: int, weights: dict[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        pos = order[starts[e] : starts[e + 1]]
        x = hidden_states[pos // k]
        y = expert_mlp(module, weights, x, e) if expert_fn is None else expert_fn(weights, x, e)
        buf[pos] = (y * flat_weights[pos, None]).to(out_dtype)
        timeline.record("compute", f"L{layer}E{e}", t0, time.perf_counter(), layer=layer, expert=e, tokens=len(pos))

    needed = [e for e in range(num_experts) if counts[e]]
    leases = {}
    for e in needed:  # pin what is already there: resident experts run first
        lease = cache.acquire_resident((layer, e))
        if lease is not None:
            leases[e] = lease
    pending = [e for e in needed if e not in leases]
    pending.reverse()

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
    out = buf.view(num_tokens, k, -1).sum(dim=1).to(hidden_states.dtype)
    step = engine.prefetcher.step if engine.prefetcher is not None else None
    timeline.record("layer", f"MoE L{layer}", t_layer, time.perf_counter(), layer=layer, step=step, tokens=num_tokens)
    return out
