"""`RoutingTrace`: which experts every token used, per decode step and MoE layer, stored compactly.

One row per (call of a MoE layer, token): `step` (0 = prefill, then one per generated token), `layer`, `token`
(position within that call), `experts (k,) int16` and `weights (k,) float16`, and optionally `lookahead (k,)`: the
experts the next layer's router picked from this layer's input, so that a replay can emulate gate lookahead. Saved
as a compressed `.npz`. Traces are recorded from a model of any MoE family (`integration.tracing.record_routing`)
and feed predictor tests, benchmarks and routing statistics (`bench.routing_stats`), or are replayed onto a model
of another size (`integration.tracing.replay_routing`).

```
trace --sequences()--> one trace per sequence, one token per step (a teacher-forced pass, as if decoded)
trace --simulate_cache(capacity, policy)--> (hits, lookups) of the real eviction policy (`cache.policies.replay`)
```
Expert ids `>= num_experts` (a token Switch dropped for capacity, a LongCat zero expert) name no weights: the
simulation does not count them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ..cache.policies import EvictionPolicy, replay

__all__ = ["RoutingTrace", "map_routing", "simulate_cache"]


@dataclass
class RoutingTrace:
    num_layers: int
    num_experts: int
    top_k: int
    step: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    layer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    token: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    experts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int16))
    weights: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float16))
    meta: dict = field(default_factory=dict)
    # (N, k) int16: for a row of layer l, the top-k experts of layer l+1's router applied to this token's layer-l
    # MoE input (what gate lookahead predicted at record time); -1 where there is none (last layer)
    lookahead: np.ndarray | None = None

    @property
    def num_steps(self) -> int:
        return int(self.step.max()) + 1 if len(self.step) else 0

    def _select(self, step: int, layer: int) -> np.ndarray:
        sel = np.nonzero((self.step == step) & (self.layer == layer))[0]
        return sel[np.argsort(self.token[sel], kind="stable")]

    def rows(self, step: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """`(experts (T, k), weights (T, k))` of one layer call, tokens in order."""
        sel = self._select(step, layer)
        return self.experts[sel], self.weights[sel]

    def lookahead_rows(self, step: int, layer: int) -> np.ndarray | None:
        """The recorded lookahead of layer `layer + 1` made at `layer`, `(T, k)`, or None when not recorded."""
        if self.lookahead is None:
            return None
        rows = self.lookahead[self._select(step, layer)]
        return None if len(rows) == 0 or (rows < 0).any() else rows

    def expert_sets(self, layer: int) -> list[set[int]]:
        """The set of experts used by each step at `layer` (what a cache sees per step)."""
        out: list[set[int]] = [set() for _ in range(self.num_steps)]
        sel = self.layer == layer
        for s, row in zip(self.step[sel], self.experts[sel]):
            out[int(s)].update(int(e) for e in row)
        return out

    def sequences(self, batch: int | None = None) -> list[RoutingTrace]:
        """One trace per sequence, each of its tokens a step of its own, in order (decode order).

        Each layer call's tokens are split batch-major into `batch` equal runs (a prefill of `batch x P` tokens, a
        decode step of `batch`), so a teacher-forced forward over `batch` sequences reads as `batch` token-by-token
        decodes, and a recorded generation as its sequences' prompts then generated tokens.

        Args:
            batch: sequences per call; default `meta["batch"]` (set by the recorder's caller).

        Raises:
            ValueError: when the batch is unknown or a call's token count is not a multiple of it.
        """
        batch = int(batch or self.meta.get("batch") or 0)
        if batch < 1:
            raise ValueError("sequences: the trace does not record its batch size (meta['batch']); pass batch=")
        seq = np.zeros(len(self.step), np.int64)
        pos = np.zeros(len(self.step), np.int32)
        done = np.zeros(self.num_layers, np.int64)  # tokens of each sequence seen so far, per layer
        order = np.lexsort((self.token, self.layer, self.step))
        call = self.step[order].astype(np.int64) * self.num_layers + self.layer[order]
        for rows in np.split(order, np.flatnonzero(np.diff(call)) + 1) if len(order) else []:
            if len(rows) % batch:
                step, layer = int(self.step[rows[0]]), int(self.layer[rows[0]])
                raise ValueError(
                    f"sequences: step {step} of layer {layer} routed {len(rows)} tokens, not a "
                    f"multiple of the batch {batch}"
                )
            per, layer = len(rows) // batch, int(self.layer[rows[0]])
            seq[rows] = np.arange(len(rows)) // per
            pos[rows] = done[layer] + np.arange(len(rows)) % per
            done[layer] += per
        out = []
        for b in range(batch):
            sel = np.flatnonzero(seq == b)
            look = self.lookahead[sel] if self.lookahead is not None else None
            out.append(
                RoutingTrace(
                    self.num_layers,
                    self.num_experts,
                    self.top_k,
                    pos[sel],
                    self.layer[sel],
                    np.zeros(len(sel), np.int32),
                    self.experts[sel],
                    self.weights[sel],
                    {**self.meta, "batch": 1, "sequence": b},
                    look,
                )
            )
        return out

    def save(self, path: str) -> None:
        np.savez_compressed(
            path,
            step=self.step,
            layer=self.layer,
            token=self.token,
            experts=self.experts,
            weights=self.weights,
            dims=np.array([self.num_layers, self.num_experts, self.top_k], np.int64),
            meta=np.array(repr(self.meta)),
            **({"lookahead": self.lookahead} if self.lookahead is not None else {}),
        )

    @classmethod
    def load(cls, path: str) -> RoutingTrace:
        import ast

        with np.load(path, allow_pickle=False) as z:
            n_layers, n_experts, k = (int(x) for x in z["dims"])
            look = z["lookahead"] if "lookahead" in z.files else None
            return cls(
                n_layers,
                n_experts,
                k,
                z["step"],
                z["layer"],
                z["token"],
                z["experts"],
                z["weights"],
                ast.literal_eval(str(z["meta"])),
                look,
            )

    @classmethod
    def concat(cls, num_layers: int, num_experts: int, top_k: int, chunks: list[tuple], meta: dict) -> RoutingTrace:
        """Build from `(step, layer, experts (T, k), weights (T, k)[, lookahead (T, k)])` chunks."""
        if not chunks:
            return cls(num_layers, num_experts, top_k, meta=meta)
        steps, layers, tokens, experts, weights, looks = [], [], [], [], [], []
        for chunk in chunks:
            step, layer, e, w = chunk[:4]
            if len(chunk) > 4:
                looks.append(np.asarray(chunk[4], np.int16))
            n = len(e)
            steps.append(np.full(n, step, np.int32))
            layers.append(np.full(n, layer, np.int16))
            tokens.append(np.arange(n, dtype=np.int32))
            experts.append(np.asarray(e, np.int16))
            weights.append(np.asarray(w, np.float16))
        look = np.concatenate(looks) if looks and len(looks) == len(chunks) else None
        return cls(
            num_layers,
            num_experts,
            top_k,
            np.concatenate(steps),
            np.concatenate(layers),
            np.concatenate(tokens),
            np.concatenate(experts),
            np.concatenate(weights),
            meta,
            look,
        )


def simulate_cache(
    trace: RoutingTrace,
    capacity: int,
    policy: str | EvictionPolicy = "lru",
    layers: Iterable[int] | None = None,
    count_from: int = 0,
) -> tuple[int, int]:
    """Replay `trace` through a cache of `capacity` experts run by a real eviction policy (`cache.policies.replay`).

    The cache sees the layer calls in order (step, then layer), each asking for the distinct experts its tokens
    use, keyed `(layer, expert)` as in `ExpertCache`, from a cold start. To score a teacher-forced pass as
    token-by-token decoding, replay each of `trace.sequences()` (one token per call).

    Args:
        trace: the routing to replay.
        capacity: experts the cache holds (over all replayed layers); at least the distinct experts of one call.
        policy: a registered eviction policy name or instance (`"lru"`, `"lfu"`).
        layers: replay only these layers (one layer: a cache of that layer alone); default all.
        count_from: steps before this one warm the cache but are not counted (e.g. 1 skips the prefill).

    Returns:
        `(hits, lookups)`; the hit rate is `hits / lookups`. Sum both over traces before dividing.

    Example:
        ```python
        >>> hits, lookups = simulate_cache(trace, capacity=2, layers=[0])
        ```
    """
    rows = np.arange(len(trace.step)) if layers is None else np.flatnonzero(np.isin(trace.layer, list(layers)))
    rows = rows[np.lexsort((trace.layer[rows], trace.step[rows]))]
    call = trace.step[rows].astype(np.int64) * trace.num_layers + trace.layer[rows]
    requests, warmup = [], 0
    for group in np.split(rows, np.flatnonzero(np.diff(call)) + 1) if len(rows) else []:
        layer, experts = int(trace.layer[group[0]]), np.unique(trace.experts[group])
        requests.append([(layer, int(e)) for e in experts if 0 <= e < trace.num_experts])
        warmup += int(trace.step[group[0]] < count_from)
    return replay(policy, requests, capacity, count_from=warmup)


def map_routing(
    experts: np.ndarray, weights: np.ndarray, src_experts: int, dst_experts: int, dst_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Map recorded routing `(T, k_src)` onto a model with `dst_experts` experts and top-`dst_k`.

    Each recorded expert `e` owns the block of target experts `[e * D / S, (e + 1) * D / S)` (at least one);
    the target's `dst_k` slots are shared out among the recorded slots in order and filled from each block,
    so locality and co-occurrence carry over. Each recorded weight is split evenly over its slots.
    """
    t, k_src = experts.shape
    per = [dst_k // k_src + (1 if i < dst_k % k_src else 0) for i in range(k_src)]
    out_e = np.zeros((t, dst_k), np.int64)
    out_w = np.zeros((t, dst_k), np.float32)
    col = 0
    for i, n in enumerate(per):
        if n == 0:
            continue
        lo = experts[:, i].astype(np.int64) * dst_experts // src_experts
        hi = np.maximum((experts[:, i].astype(np.int64) + 1) * dst_experts // src_experts, lo + 1)
        for j in range(n):
            out_e[:, col] = lo + j % (hi - lo)
            out_w[:, col] = weights[:, i].astype(np.float32) / n
            col += 1
    s = out_w.sum(axis=1, keepdims=True)
    return out_e, out_w / np.where(s > 0, s, 1)
