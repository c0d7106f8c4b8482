"""`Prefetcher`: turns predictions into speculative loads, and measures how good they were.

```
MoE layer l starts (its routing is known)
  1. score the predictions made for l (precision / recall) and cancel queued prefetches of l that were wrong
  2. predictors observe l's experts
  3. protect l's experts and what was predicted for l+1 from speculative eviction
  4. predict l+1 .. l+depth, issue prefetches (priority = distance), as many as the measured I/O rate allows
decode step ends (LogitsProcessor) -> predict layers 0 .. depth-1 of the next step, issue prefetches
```
For large batches (throughput mode) and prefill the next layer needs many experts: they are prefetched hottest
first (most tokens predicted), never into slots holding the current layer's or the predicted next layer's experts,
so loads of layer l+1 overlap the compute of layer l.

A speculative load evicts an expert (or takes disk bandwidth from demand loads) for a prediction's chance of being
used. Every prediction is scored against the routing that follows, issued or not, so its precision is known without
spending any I/O: speculative loads are issued only while that precision beats the cache's hit rate (once at least
`min_evidence` predicted experts were scored). On a model whose predictions are poor (random routers) prefetching
thus stays off instead of polluting a small cache, and it switches itself back on if predictions improve. The number of speculative loads per layer adapts to the measured expert load time and
the measured time between MoE layers, so prefetches do not pile up behind each other and delay demand loads.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch

from ..cache import ExpertCache
from .predictors import Predictor

__all__ = ["Prefetcher"]


class Prefetcher:
    """Args:
    cache: the shared expert cache.
    predictors: combined by summing their normalised scores.
    num_experts: experts per MoE layer.
    top_k: experts per token.
    depth: how many layers ahead to prefetch.
    io_threads: loader threads (for the adaptive per-layer allowance).
    """

    def __init__(
        self,
        cache: ExpertCache,
        predictors: list[Predictor],
        num_experts: list[int],
        top_k: int,
        depth: int = 1,
        io_threads: int = 2,
    ):
        self.cache, self.predictors = cache, predictors
        self.num_experts, self.top_k, self.depth = list(num_experts), top_k, depth
        self.num_layers = len(self.num_experts)
        self.io_threads = io_threads
        self.step, self._last_layer = 0, -1
        self._predicted: dict[tuple[int, int], set[int]] = {}  # (step, layer) -> predicted experts
        self._tp = defaultdict(int)
        self._npred = defaultdict(int)
        self._nactual = defaultdict(int)
        self._layer_gap, self._last_time = None, None
        self._last_size = 1
        self.min_evidence = 16
        cache.keep_recent(self.num_layers)  # a full decode step

    # -- events --------------------------------------------------------------------------------------------------
    def begin_request(self) -> None:
        for p in self.predictors:
            p.begin_request()
        self.step, self._last_layer = 0, -1

    def on_layer(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor) -> None:
        now = time.perf_counter()
        self.cache.advance_tick()
        if layer <= self._last_layer:  # a new forward pass without a step-boundary call (plain forward)
            self.step += 1
        if self._last_time is not None and layer == self._last_layer + 1:
            gap = now - self._last_time
            self._layer_gap = gap if self._layer_gap is None else 0.8 * self._layer_gap + 0.2 * gap
        self._last_layer, self._last_time = layer, now
        n = self.num_experts[layer]
        actual = set(torch.unique(top_k_index[top_k_index < n]).tolist())
        self._last_size = len(actual)
        self._score(layer, actual)
        self.cache.cancel_speculative(layer, actual)
        for p in self.predictors:
            p.observe(self.step, layer, actual)
        targets = [t for t in range(layer + 1, layer + 1 + self.depth) if t < self.num_layers]
        nxt = self._predicted.get((self.step, layer + 1), set())
        self.cache.protect({(layer, e) for e in actual} | {(layer + 1, e) for e in nxt})
        self._issue(layer, hidden, targets, size=len(actual))

    def on_step_end(self) -> None:
        """A decode step ended: prefetch the first layers of the next one."""
        self.step += 1
        self._last_layer = -1
        targets = list(range(min(self.depth, self.num_layers)))
        self._issue(-1, None, targets, size=self._last_size)

    # -- internals -----------------------------------------------------------------------------------------------
    def _allowance(self) -> int:
        """Speculative loads per layer that the I/O rate can finish before the next layers need them."""
        per_load = self.cache.stats.mean_load_seconds()
        if per_load is None or self._layer_gap is None:
            return self.top_k * self.depth
        return max(1, int(self.io_threads * self.depth * self._layer_gap / max(per_load, 1e-6)) + 1)

    def _issue(self, layer: int, hidden, targets: list[int], size: int) -> None:
        if not targets:
            return
        scores: dict[int, np.ndarray] = {}
        for p in self.predictors:
            for t, s in p.predict(self.step, layer, hidden, targets).items():
                total = s.sum()
                if total > 0:
                    scores[t] = scores.get(t, 0) + s / total
        allowance = self._allowance() if self._worth_it() else 0
        for t in targets:
            s = scores.get(t)
            if s is None:
                continue
            chosen = [int(e) for e in np.argsort(-s, kind="stable")[:size] if s[e] > 0]
            self._predicted[(self.step, t)] = set(chosen)
            for e in chosen:
                if allowance <= 0:
                    break
                if self.cache.prefetch((t, e), priority=t - layer):
                    allowance -= 1

    def _worth_it(self) -> bool:
        """Whether speculative loads pay: the scored predictions' precision beats the cache's hit rate."""
        npred = sum(self._npred.values())
        if npred < self.min_evidence:
            return True
        return sum(self._tp.values()) / npred > self.cache.stats.hit_rate()

    def _score(self, layer: int, actual: set[int]) -> None:
        predicted = self._predicted.pop((self.step, layer), None)
        if predicted is None:
            return
        self._tp[layer] += len(predicted & actual)
        self._npred[layer] += len(predicted)
        self._nactual[layer] += len(actual)

    def metrics(self) -> dict:
        """Per-layer and overall precision / recall of the predictions that were scored."""
        per_layer = {}
        for layer in sorted(self._npred):
            tp, npred, nact = self._tp[layer], self._npred[layer], self._nactual[layer]
            per_layer[layer] = {"precision": tp / npred if npred else 0.0, "recall": tp / nact if nact else 0.0}
        tp, npred, nact = sum(self._tp.values()), sum(self._npred.values()), sum(self._nactual.values())
        return {
            "prefetch_precision": tp / npred if npred else 0.0,
            "prefetch_recall": tp / nact if nact else 0.0,
            "prefetch_per_layer": per_layer,
        }

    def reset_metrics(self) -> None:
        self._tp.clear(), self._npred.clear(), self._nactual.clear()
