"""Predictors of the experts coming layers will use, behind a registry (`@register_predictor(name)`).

Every predictor sees the actual routing of each layer as it happens (`observe`) and, at each MoE layer, scores the
experts of the next layers (`predict` -> `{target layer: scores (E,)}`; higher = more likely; zeros = no opinion).
`predict` with `hidden=None` is asked at a decode-step boundary for the first layers of the next step.

* `gate_lookahead`: the routers of the next layers applied to the current layer's MoE input (the residual stream
  changes slowly from layer to layer); needs the router modules.
* `correlation` (Klotski): co-occurrence counts between the experts of consecutive layers, learned online and
  from a warm-up trace, saved and loaded as `.npz`.
* `history` (MoE-Infinity): the current request's per-layer activation counts, matched (cosine) against past
  requests' counts; also carries temporal locality across decode steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import CorruptCheckpointError
from ..registry import Registry
from .trace import RoutingTrace

__all__ = [
    "Predictor",
    "register_predictor",
    "make_predictor",
    "list_predictors",
    "GateLookahead",
    "CorrelationPredictor",
    "HistoryPredictor",
    "load_correlation_tables",
]


class Predictor(ABC):
    """Contract. `num_experts[l]` is the expert count of MoE layer `l`; `experts` arguments are sets of ids."""

    name: str = ""

    def __init__(self, num_experts: Sequence[int], top_k: int, **_: object):
        self.num_experts, self.top_k = list(num_experts), top_k
        self.num_layers = len(self.num_experts)

    def begin_request(self) -> None:
        """A new generate() call starts."""

    def observe(self, step: int, layer: int, experts: set[int]) -> None:
        """Layer `layer` of decode step `step` routed its tokens to `experts`."""

    @abstractmethod
    def predict(self, step: int, layer: int, hidden: torch.Tensor | None, targets: list[int]) -> dict[int, np.ndarray]:
        """Scores for the experts of each target layer, knowing layer `layer`'s MoE input `hidden (T, H)`."""


_PREDICTORS = Registry("predictor", "predictors", " (or 'none')")
register_predictor = _PREDICTORS.register
list_predictors = _PREDICTORS.names


def make_predictor(name: str, num_experts: Sequence[int], top_k: int, **kwargs) -> Predictor:
    """Instantiate a registered predictor (`UnknownNameError` lists the valid ones)."""
    return _PREDICTORS.get(name)(num_experts, top_k, **kwargs)


def _indices(res) -> torch.Tensor | None:
    """The integer top-k indices of a router's `(logits, weights, indices)` output, or None."""
    if isinstance(res, tuple) and len(res) >= 3 and torch.is_tensor(res[2]) and not torch.is_floating_point(res[2]):
        return res[2]
    return None


@register_predictor("gate_lookahead")
class GateLookahead(Predictor):
    """Apply layer `t`'s router to layer `l`'s MoE input; score = tokens routed to each expert."""

    def __init__(self, num_experts, top_k, routers: dict[int, Callable] | None = None, **kw):
        super().__init__(num_experts, top_k, **kw)
        self.routers = routers or {}

    @torch.no_grad()
    def predict(self, step, layer, hidden, targets):
        out = {}
        if hidden is None:
            return out
        for t in targets:
            router = self.routers.get(t)
            if router is None:
                continue
            idx = self.route(t, hidden)
            if idx is None:
                continue
            idx = idx.reshape(-1)
            counts = torch.bincount(idx[(idx >= 0) & (idx < self.num_experts[t])], minlength=self.num_experts[t])
            out[t] = counts.cpu().numpy().astype(np.float64)
        return out

    @torch.no_grad()
    def route(self, target: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Top-k experts `(T, k)` that layer `target`'s router picks for `hidden (T, H)`, or None."""
        router = self.routers.get(target)
        res = self._call(target, router, hidden) if router is not None else None
        if res is None:
            return None
        indices = _indices(res)
        if indices is not None:
            return indices
        logits = res[0] if isinstance(res, tuple) else res
        return logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices

    def _call(self, layer: int, router: Callable, hidden: torch.Tensor):
        """Call a router on `(T, H)` or, failing that, `(1, T, H)`; a router that takes neither (an extra argument,
        another layout) is dropped for good: a prediction must never break the forward.

        The router's `forward` is called, not the module: its forward hooks (transformers' output recorders that
        collect `router_logits`, user hooks, counters) never see a look-ahead call, so prediction leaves every
        output unchanged."""
        forward = getattr(router, "forward", router)
        for x in (hidden, hidden.unsqueeze(0)):
            try:
                res = forward(x)
            except Exception:  # noqa: BLE001 - any failure just means "no prediction from this router"
                continue
            first = res[0] if isinstance(res, tuple) else res
            if torch.is_tensor(first) and (
                first.shape[-1] == self.num_experts[layer]
                # more columns than routed experts (LongCat, ZAYA: zero / no-op experts): usable when the router
                # also returns its integer top-k indices (ids >= num_experts are dropped by `predict`)
                or (first.shape[-1] > self.num_experts[layer] and _indices(res) is not None)
            ):
                if not isinstance(res, tuple):
                    return res.reshape(-1, res.shape[-1])
                return tuple(r.reshape(-1, r.shape[-1]) if torch.is_tensor(r) else r for r in res)
        self.routers.pop(layer, None)
        return None


@register_predictor("correlation")
class CorrelationPredictor(Predictor):
    """`table[l][i, j]`: how often expert i of layer l and expert j of layer l+1 served the same step."""

    def __init__(self, num_experts, top_k, **kw):
        super().__init__(num_experts, top_k, **kw)
        self.tables = [np.zeros((self.num_experts[i], self.num_experts[i + 1])) for i in range(self.num_layers - 1)]
        self._current: dict[int, set[int]] = {}
        self._step = -1

    def observe(self, step, layer, experts):
        if step != self._step:
            self._current, self._step = {}, step
        self._current[layer] = set(experts)
        prev = self._current.get(layer - 1)
        if prev and layer >= 1:
            rows, cols = list(prev), list(experts)
            self.tables[layer - 1][np.ix_(rows, cols)] += 1

    def predict(self, step, layer, hidden, targets):
        out = {}
        current = self._current.get(layer) if step == self._step else None
        if not current:
            return out
        vec = np.zeros(self.num_experts[layer])
        vec[list(current)] = 1.0
        for t in range(layer + 1, max(targets, default=layer) + 1):
            table = self.tables[t - 1]
            rows = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
            vec = vec @ rows
            if t in targets:
                out[t] = vec.copy()
        return out

    def learn(self, trace: RoutingTrace) -> None:
        """Accumulate co-occurrences from a recorded trace (a warm-up run)."""
        for step in range(trace.num_steps):
            for layer in range(min(trace.num_layers, self.num_layers)):
                self.observe(-2 - step, layer, trace.expert_sets(layer)[step])
        self._current, self._step = {}, -1

    def save(self, path: str) -> None:
        np.savez_compressed(path, *self.tables)

    def load(self, path: str) -> None:
        """Replace the tables by the ones saved at `path` (`CorruptCheckpointError` if they do not fit)."""
        self.tables = load_correlation_tables(path, self.num_experts)


def load_correlation_tables(path: str, num_experts: Sequence[int]) -> list[np.ndarray]:
    """Read a correlation table saved by `CorrelationPredictor.save` and check it fits a model whose MoE layers
    have `num_experts` experts each.

    Raises:
        CorruptCheckpointError: the file is not a readable `.npz`, or its tables have other shapes, non-finite or
            negative counts.
    """
    expected = [(num_experts[i], num_experts[i + 1]) for i in range(len(num_experts) - 1)]
    fix = f"delete {path} (it is rebuilt by engine.save_correlation()) or load with another prefetch"
    try:
        with np.load(path, allow_pickle=False) as z:
            tables = [np.asarray(z[f"arr_{i}"], dtype=np.float64) for i in range(len(z.files))]
    except Exception as e:  # noqa: BLE001 - any failure to read means the side file is unusable
        raise CorruptCheckpointError(
            f"{path}: not a readable correlation table ({type(e).__name__}: {e}); {fix}"
        ) from None
    shapes = [t.shape for t in tables]
    if shapes != expected:
        raise CorruptCheckpointError(
            f"{path}: correlation tables of shapes {shapes} do not fit this model (expected {expected}); {fix}"
        )
    if any(not np.isfinite(t).all() or (t < 0).any() for t in tables):
        raise CorruptCheckpointError(f"{path}: correlation tables hold negative or non-finite counts; {fix}")
    return tables


@register_predictor("history")
class HistoryPredictor(Predictor):
    """Per-request activation counts, plus the counts of the most similar past requests."""

    def __init__(self, num_experts, top_k, max_requests: int = 64, neighbours: int = 3, **kw):
        super().__init__(num_experts, top_k, **kw)
        self.width = max(self.num_experts)
        self.current = np.zeros((self.num_layers, self.width))
        self.past: list[np.ndarray] = []
        self.max_requests, self.neighbours = max_requests, neighbours
        self._last: dict[int, set[int]] = {}

    def begin_request(self):
        if self.current.sum() > 0:
            self.past.append(self.current / np.linalg.norm(self.current))
            self.past = self.past[-self.max_requests :]
        self.current = np.zeros_like(self.current)
        self._last = {}

    def observe(self, step, layer, experts):
        self.current[layer, list(experts)] += 1
        self._last[layer] = set(experts)

    def predict(self, step, layer, hidden, targets):
        if not self.current.any() and not self.past:
            return {}
        mix = self.current / max(self.current.sum(axis=1, keepdims=True).max(), 1)
        if self.past and self.current.any():
            flat = self.current / np.linalg.norm(self.current)
            sims = np.array([float((p * flat).sum()) for p in self.past])
            for i in np.argsort(-sims)[: self.neighbours]:
                mix = mix + max(sims[i], 0) * self.past[i]
        out = {}
        for t in targets:
            scores = mix[t, : self.num_experts[t]].copy()
            for e in self._last.get(t, ()):  # temporal locality: what this layer used in the last step
                scores[e] += 1.0
            out[t] = scores
        return out
