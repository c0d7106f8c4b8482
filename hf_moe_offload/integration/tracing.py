"""Record the routing of any MoE model while it runs, and replay a recorded routing onto another model.

Both are forward pre-hooks on the experts modules (found by the adapters), so they work on normal and offloaded
models alike. A decode step starts when a layer runs again (decoder-only: layer 0; encoder-decoder: the first
decoder layer). Replaying maps layers cyclically and experts by `prefetch.trace.map_routing`, and requires the
recording's prompt length and a batch no larger than the recording's (a smaller batch follows the recording's first
sequences; drive `generate` with `min_new_tokens` so that it does not stop early).

```
experts module (args, kwargs) --decorated class: (hidden, top_k_index, top_k_weights) are its arguments-------+
                              --other families: their adapter's offloaded forward, run up to the engine call--+-->
(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) --> one RoutingTrace row per token
```
The recorder reads the routing exactly as offloading does. `@use_experts_implementation` classes take it as
arguments. Every other family (DBRX, Switch, NLLB-MoE, JetMoE, Llama 4, LongCat-Flash) turns its inputs into routing
inside the forward its adapter builds (`install_forward`); the recorder builds that forward on a copy of the adapter,
so nothing is installed, with a `run_experts` that catches the routing and stops before any expert runs. Switch
records a token dropped for capacity as expert `E`, LongCat-Flash its zero experts as `E..E+Z-1`; Llama 4 records
one row per routed (expert, token) pair (`k = 1`, rows ordered by expert).

The recorder also stores, for each layer, what the *next* layer's router picks from this layer's MoE input (gate
lookahead at record time). A replayed model's own routers are unrelated to the routing it is forced to follow, so
during a replay the offload engine's gate-lookahead predictor is fed these recorded predictions instead (mapped like
the routing): prefetching is then measured at real model sizes with learned routing and learned lookahead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..adapters import describe_model
from ..adapters.topology import ExpertsLayer
from ..prefetch.predictors import GateLookahead
from ..prefetch.trace import RoutingTrace, map_routing

__all__ = ["record_routing", "replay_routing"]

Routing = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden (T, H), top_k_index (T, k), top_k_weights (T, k)


def _split_args(args, kwargs):
    if len(args) >= 3:
        return args[0], args[1], args[2]
    return args[0], kwargs.get("top_k_index", args[1] if len(args) > 1 else None), kwargs.get("top_k_weights")


class _Caught(Exception):
    """Carries the routing out of an adapter's forward, which stops there (its experts never run)."""

    def __init__(self, routing: Routing):
        super().__init__("routing caught")
        self.routing = routing


def _catch(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, _expert) -> torch.Tensor:
    raise _Caught((hidden, top_k_index, top_k_weights))


def _routing_reader(layer: ExpertsLayer) -> Callable[[tuple, dict], Routing | None]:
    """`(args, kwargs)` of `layer.module`'s forward -> the routing it hands the engine (None: it routes no token)."""
    built: list[Callable] = []
    probe = copy.copy(layer.adapter)
    probe.set_forward = lambda _module, forward: built.append(forward)  # keep the forward, install nothing
    if not probe.install_forward(layer.module, _catch):
        return _split_args
    forward = built[0]

    def read(args: tuple, kwargs: dict) -> Routing | None:
        try:
            forward(*args, **kwargs)
        except _Caught as caught:
            return caught.routing
        return None

    return read


class _StepClock:
    """The decode step: a new one starts when a layer runs that already ran in the current one."""

    def __init__(self) -> None:
        self.step, self._last = -1, None

    def tick(self, layer: int) -> int:
        if self._last is None or layer <= self._last:
            self.step += 1
        self._last = layer
        return self.step


@contextmanager
def record_routing(model: nn.Module, meta: dict | None = None):
    """Record every MoE layer's routing while the block runs, for every family the adapters know.

    Args:
        model: a normal or offloaded MoE model.
        meta: stored in the trace's `meta` (with `model_type`); give `{"batch": B}` for per-sequence statistics
            (`RoutingTrace.sequences`) and batched replays.

    Example:
        ```python
        with record_routing(model, meta={"batch": 1}) as rec:
            model.generate(**inputs, max_new_tokens=32)
        rec.trace().save("trace.npz")
        ```
    """
    topo = describe_model(model)
    chunks: list[tuple] = []
    clock = _StepClock()
    handles = []
    nxt = {layer.layer: topo.layers[layer.layer + 1] for layer in topo.layers[:-1]}
    lookahead = GateLookahead(
        [layer.num_experts for layer in topo.layers],
        topo.max_top_k,
        routers={layer.layer: layer.router for layer in topo.layers if layer.router is not None},
    )

    def make_hook(layer: int, read: Callable[[tuple, dict], Routing | None]):
        @torch.no_grad()
        def hook(module, args, kwargs):
            routing = read(args, kwargs)
            if routing is None:
                return
            hidden, idx, w = routing
            step = clock.tick(layer)
            look = np.full(tuple(idx.shape), -1, np.int16)
            if layer in nxt:
                res = lookahead.route(layer + 1, hidden.detach())
                if res is not None and res.shape[0] == idx.shape[0]:
                    look[:, : res.shape[1]] = res[:, : idx.shape[1]].cpu().numpy()
            chunks.append((step, layer, idx.detach().cpu().numpy(), w.detach().float().cpu().numpy(), look))

        return hook

    for layer in topo.layers:
        hook = make_hook(layer.layer, _routing_reader(layer))
        handles.append(layer.module.register_forward_pre_hook(hook, with_kwargs=True))

    class _Recorder:
        def trace(self) -> RoutingTrace:
            first = topo.layers[0]
            top_k = chunks[0][2].shape[1] if chunks else first.top_k  # as routed (Llama 4: one pair per row)
            info = {"model_type": getattr(model.config, "model_type", ""), **(meta or {})}
            return RoutingTrace.concat(topo.num_layers, first.num_experts, top_k, chunks, info)

    try:
        yield _Recorder()
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replay_routing(model: nn.Module, trace: RoutingTrace):
    """Force `model`'s experts to use the routing recorded in `trace` (its own routers still run, unused)."""
    topo = describe_model(model)
    clock = _StepClock()
    handles = []
    rec_batch = int(trace.meta.get("batch") or 0)  # sequences per step in the recording, when it says
    predictor = _active_lookahead(model)
    saved_routers = dict(predictor.routers) if predictor is not None else None
    if predictor is not None and trace.lookahead is not None:
        predictor.routers = {
            layer.layer: _ReplayedRouter(trace, clock, layer.layer, layer.num_experts, layer.top_k)
            for layer in topo.layers
            if layer.layer > 0
        }

    def make_hook(layer: int, num_experts: int, top_k: int):
        def hook(module, args, kwargs):
            hidden, idx, old_w = _split_args(args, kwargs)
            step = clock.tick(layer)
            if step >= trace.num_steps:
                raise RuntimeError(f"replay: the trace has {trace.num_steps} steps; the model ran a step {step + 1}")
            rec_e, rec_w = trace.rows(step, layer % trace.num_layers)
            n = idx.shape[0]
            per_seq = len(rec_e) // rec_batch if rec_batch and len(rec_e) % rec_batch == 0 else 0
            if len(rec_e) != n and not (per_seq and n % per_seq == 0 and n < len(rec_e)):
                raise RuntimeError(
                    f"replay: step {step} of the trace routed {len(rec_e)} tokens but the model computes {n}; "
                    f"use the prompt length of the recording and a batch no larger than the recording's"
                )
            # tokens are flattened batch-major, so the first n rows are the recording's first sequences
            rec_e, rec_w = rec_e[:n], rec_w[:n]
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
        if predictor is not None:
            predictor.routers = saved_routers


def _active_lookahead(model: nn.Module):
    engine = getattr(model, "offload_engine", None)
    prefetcher = getattr(engine, "prefetcher", None)
    for p in getattr(prefetcher, "predictors", []):
        if isinstance(p, GateLookahead):
            return p
    return None


class _ReplayedRouter:
    """Stands in for layer `target`'s router during a replay: returns the recorded lookahead, mapped."""

    def __init__(self, trace: RoutingTrace, clock: _StepClock, target: int, num_experts: int, top_k: int):
        self.trace, self.clock, self.target = trace, clock, target
        self.num_experts, self.top_k = num_experts, top_k

    def __call__(self, hidden: torch.Tensor):
        src = self.target % self.trace.num_layers - 1  # the recorded layer whose lookahead predicts `target`
        rows = self.trace.lookahead_rows(self.clock.step, src) if src >= 0 else None
        if rows is None:
            raise LookupError("no recorded lookahead for this layer")  # the predictor then drops this router
        rows = rows[: len(hidden)]  # a smaller batch follows the recording's first sequences
        e, _ = map_routing(rows, np.ones(rows.shape, np.float32), self.trace.num_experts, self.num_experts, self.top_k)
        logits = torch.zeros(len(e), self.num_experts)
        return logits, None, torch.from_numpy(e)
