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
spending any I/O. What a prefetch would load is a predicted expert that is not resident, so the decision uses the
precision of those predictions alone (`cold` below: an expert that stays resident is easy to predict and costs
nothing), estimated as `(right + 1) / (scored + 2)` (Laplace's rule: 0.5 before any evidence, the measured share
soon after), separately for each number of experts a layer routes to (a prefill's layers use nearly all experts and
are easy to predict; batch-1 decode's use top-k). Speculative loads are issued only while that estimate beats both
* the cache's hit rate: below it, the expert a prefetch evicts is likelier to be used than the one it loads;
* the break-even precision `1 - compute / load` (`_break_even`), where `load` is the mean time one expert load
  takes and `compute` the time between two MoE layers less the forward's stalls: a right prefetch can hide at most
  `compute` of its load behind the computation, a wrong one holds the disk and an I/O thread for all of `load`
  when the disk is the bottleneck (two loads may share the disk, but a demand load then waits behind the wrong
  one). So a compute-bound model (load <= compute) prefetches on any useful prediction, and an I/O-bound one only
  on near-certain ones; otherwise bytes read per token would grow with the budget (more
  slots, more room to speculate; measured in docs/benchmarks.md, "Budget sweep under one memory limit").
On a model whose predictions are poor (random routers) prefetching thus stays off instead of polluting a small cache
or the disk, and it switches itself back on if predictions improve. The number of speculative loads per layer adapts
to the measured expert load time and the measured time between MoE layers, so prefetches do not pile up behind each
other and delay demand loads.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from ..cache import ExpertCache
from .predictors import Predictor

__all__ = ["Prefetcher"]


@dataclass
class _Evidence:
    """What decides prefetching for layers that route to one number of experts (batch-1 decode routes to top-k,
    a prefill to nearly all): scored cold predictions, and the compute time between two such MoE layers."""

    right: int = 0
    scored: int = 0
    compute_gap: float | None = None  # moving average, seconds

    def add_gap(self, seconds: float) -> None:
        self.compute_gap = seconds if self.compute_gap is None else 0.8 * self.compute_gap + 0.2 * seconds


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
        # (step, layer) -> (experts predicted per layer, those of them not resident when predicted)
        self._cold: dict[tuple[int, int], tuple[int, set[int]]] = {}
        self._tp = defaultdict(int)
        self._npred = defaultdict(int)
        self._nactual = defaultdict(int)
        self._evidence: dict[int, _Evidence] = defaultdict(_Evidence)  # per experts predicted per layer
        self._layer_gap, self._last_time, self._last_stall = None, None, 0.0
        self._last_size = 1
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
        stall = self.cache.stats.stall_seconds()
        if self._last_time is not None and layer == self._last_layer + 1:
            gap = now - self._last_time
            self._layer_gap = gap if self._layer_gap is None else 0.8 * self._layer_gap + 0.2 * gap
            self._evidence[self._last_size].add_gap(max(0.0, gap - (stall - self._last_stall)))
        self._last_layer, self._last_time, self._last_stall = layer, now, stall
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
        allowance = self._allowance() if self._worth_it(size) else 0
        for t in targets:
            s = scores.get(t)
            if s is None:
                continue
            chosen = [int(e) for e in np.argsort(-s, kind="stable")[:size] if s[e] > 0]
            self._predicted[(self.step, t)] = set(chosen)
            self._cold[(self.step, t)] = (size, {e for e in chosen if not self.cache.is_resident((t, e))})
            for e in chosen:
                if allowance <= 0:
                    break
                if self.cache.prefetch((t, e), priority=t - layer):
                    allowance -= 1

    def _worth_it(self, size: int) -> bool:
        """Whether speculative loads of `size` experts per layer pay: the precision of such predictions beats the
        cache's hit rate and the break-even precision of the disk time they cost (module docstring)."""
        ev = self._evidence[size]
        return (ev.right + 1) / (ev.scored + 2) > max(self.cache.stats.hit_rate(), self._break_even(size))

    def _break_even(self, size: int) -> float:
        """`1 - compute / load`, at least 0, for layers that route to `size` experts: the precision below which wrong
        prefetches cost the disk more time than right ones hide (0 until a load and a gap were measured)."""
        per_load, compute = self.cache.stats.mean_load_seconds(), self._evidence[size].compute_gap
        if per_load is None or compute is None:
            return 0.0
        return max(0.0, 1.0 - compute / max(per_load, 1e-9))

    def _score(self, layer: int, actual: set[int]) -> None:
        predicted = self._predicted.pop((self.step, layer), None)
        if predicted is None:
            return
        size, cold = self._cold.pop((self.step, layer), (0, set()))
        self._evidence[size].right += len(cold & actual)
        self._evidence[size].scored += len(cold)
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
        right, scored = sum(e.right for e in self._evidence.values()), sum(e.scored for e in self._evidence.values())
        return {
            "prefetch_precision": tp / npred if npred else 0.0,
            "prefetch_recall": tp / nact if nact else 0.0,
            "prefetch_precision_cold": right / scored if scored else 0.0,
            "prefetch_break_even": self._break_even(self._last_size),
            "prefetch_per_layer": per_layer,
        }

    def reset_metrics(self) -> None:
        self._tp.clear(), self._npred.clear(), self._nactual.clear()
        self._evidence.clear()
