"""Record the routing of any MoE model while it runs, and replay a recorded routing onto another model.

Both are forward pre-hooks on the experts modules (found by the adapters), so they work on normal and offloaded
models alike, for every family whose experts take `(hidden_states, top_k_index, top_k_weights)`. The decode step
advances each time the first MoE layer is called. Replaying maps layers cyclically and experts by
`prefetch.trace.map_routing`, and requires the same number of tokens per step as recorded (same batch and prompt
length: drive `generate` with `min_new_tokens` so it does not stop early).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..adapters import describe_model
from ..prefetch.trace import RoutingTrace, map_routing

__all__ = ["record_routing", "replay_routing"]


def _split_args(args, kwargs):
    if len(args) >= 3:
        return args[0], args[1], args[2]
    return args[0], kwargs.get("top_k_index", args[1] if len(args) > 1 else None), kwargs.get("top_k_weights")


@contextmanager
def record_routing(model: nn.Module, meta: dict | None = None):
    """Record every MoE layer's routing while the block runs.

    Example:
        ```python
        with record_routing(model) as rec:
            model.generate(**inputs, max_new_tokens=32)
        rec.trace().save("trace.npz")
        ```
    """
    topo = describe_model(model)
    chunks: list[tuple] = []
    state = {"step": -1}
    handles = []

    def make_hook(layer: int):
        def hook(module, args, kwargs):
            _, idx, w = _split_args(args, kwargs)
            if layer == 0:
                state["step"] += 1
            chunks.append((state["step"], layer, idx.detach().cpu().numpy(), w.detach().float().cpu().numpy()))

        return hook

    for layer in topo.layers:
        handles.append(layer.module.register_forward_pre_hook(make_hook(layer.layer), with_kwargs=True))

    class _Recorder:
        def trace(self) -> RoutingTrace:
            first = topo.layers[0]
            info = {"model_type": getattr(model.config, "model_type", ""), **(meta or {})}
            return RoutingTrace.concat(topo.num_layers, first.num_experts, first.top_k, chunks, info)

    try:
        yield _Recorder()
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replay_routing(model: nn.Module, trace: RoutingTrace):
    """Force `model`'s experts to use the routing recorded in `trace` (its own routers still run, unused)."""
    topo = describe_model(model)
    state = {"step": -1}
    handles = []

    def make_hook(layer: int, num_experts: int, top_k: int):
        def hook(module, args, kwargs):
            hidden, idx, old_w = _split_args(args, kwargs)
            if layer == 0:
                state["step"] += 1
            step = state["step"]
            if step >= trace.num_steps:
                raise RuntimeError(f"replay: the trace has {trace.num_steps} steps; the model ran a step {step + 1}")
            rec_e, rec_w = trace.rows(step, layer % trace.num_layers)
            if len(rec_e) != idx.shape[0]:
                raise RuntimeError(
                    f"replay: step {step} of the trace routed {len(rec_e)} tokens but the model computes "
                    f"{idx.shape[0]}; use the batch size and prompt length of the recording"
                )
            e, w = map_routing(rec_e, rec_w, trace.num_experts, num_experts, top_k)
            new_idx = torch.from_numpy(e).to(idx.device, idx.dtype)
            new_w = torch.from_numpy(w).to(old_w.device, old_w.dtype)
            return (hidden, new_idx, new_w), {}

        return hook

    for layer in topo.layers:
        hook = make_hook(layer.layer, layer.num_experts, layer.top_k)
        handles.append(layer.module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
