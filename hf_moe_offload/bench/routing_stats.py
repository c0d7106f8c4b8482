"""Routing statistics of a recorded `RoutingTrace`: is a model's routing realistic enough to benchmark expert caching
and prefetching on, and how much can a cache or a predictor gain on it?

```
integration.tracing.record_routing(model, meta={"batch": B}) --> RoutingTrace --> routing_report --> format_report
                                                                  (prefetch.trace)    per layer:
    load balance:       expert_load -> normalized_entropy, busiest_expert_share; js_divergence between domains
    predictability:     next_layer_recall (the lookahead recorded with the trace), topk_recall
    temporal locality:  LRU hit rate of a per-layer cache, each sequence decoded token by token from a cold cache
                        (prefetch.trace.simulate_cache over trace.sequences(): the real eviction policy)
```
Recording, the trace and the cache simulation live below (`integration.tracing`, `prefetch.trace`,
`cache.policies`); this module only computes statistics. The array functions take numpy arrays, tensors or nested
lists. Expert ids `>= num_experts` (a token Switch dropped, a LongCat zero expert) are not routed slots and are
left out of the loads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..prefetch.trace import RoutingTrace, simulate_cache

__all__ = [
    "busiest_expert_share",
    "expert_load",
    "format_report",
    "js_divergence",
    "next_layer_recall",
    "normalized_entropy",
    "routing_report",
    "topk_recall",
]

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]


def _np(x: ArrayLike) -> np.ndarray:
    """Convert a tensor or nested sequence to a numpy array (CPU, detached)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------------------------------------------
# Load balance
# ----------------------------------------------------------------------------------------------------------------
def expert_load(topk_index: ArrayLike, num_experts: int) -> np.ndarray:
    """Number of routed token-slots per expert.

    Args:
        topk_index: expert indices of any shape (e.g. `[tokens, k]`); every entry is one routed slot.
        num_experts: number of experts `E`; indices must lie in `[0, E)`.

    Returns:
        int64 array `[E]` of counts summing to the number of slots.
    """
    idx = _np(topk_index).reshape(-1).astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= num_experts):
        raise ValueError(f"expert index out of range [0, {num_experts})")
    return np.bincount(idx, minlength=num_experts).astype(np.int64)


def _probs(load: ArrayLike) -> np.ndarray:
    p = _np(load).astype(np.float64).reshape(-1)
    total = p.sum()
    if total <= 0:
        raise ValueError("load is empty")
    return p / total


def normalized_entropy(load: ArrayLike) -> float:
    """Shannon entropy of the load distribution divided by `log(E)`.

    1.0 means perfectly uniform use of all `E` experts, 0.0 means every slot goes to one expert.

    Args:
        load: counts (or probabilities) per expert, shape `[E]` with `E >= 2`.
    """
    p = _probs(load)
    if p.size < 2:
        raise ValueError("need at least two experts")
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(p.size))


def busiest_expert_share(load: ArrayLike) -> float:
    """Fraction of routed slots that go to the most used expert (`1/E` if uniform, 1.0 if collapsed)."""
    return float(_probs(load).max())


def js_divergence(p: ArrayLike, q: ArrayLike) -> float:
    """Jensen-Shannon divergence between two load distributions, in bits (0 = identical, 1 = disjoint support).

    Args:
        p, q: counts or probabilities over the same experts.
    """
    a, b = _probs(p), _probs(q)
    if a.shape != b.shape:
        raise ValueError("distributions over different numbers of experts")
    m = 0.5 * (a + b)

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float((x[nz] * np.log2(x[nz] / m[nz])).sum())

    return 0.5 * kl(a) + 0.5 * kl(b)


# ----------------------------------------------------------------------------------------------------------------
# Predictability
# ----------------------------------------------------------------------------------------------------------------
def topk_recall(predicted: ArrayLike, actual: ArrayLike) -> float:
    """Mean over tokens of `|predicted ∩ actual| / |actual|` for top-k expert sets.

    Args:
        predicted: `[..., k_pred]` predicted expert indices per token.
        actual: `[..., k]` experts actually used; leading dimensions must match `predicted`'s.

    Returns:
        Recall in `[0, 1]`; 1.0 means every used expert was predicted.
    """
    pred = _np(predicted)
    act = _np(actual)
    pred = pred.reshape(-1, pred.shape[-1])
    act = act.reshape(-1, act.shape[-1])
    if pred.shape[0] != act.shape[0]:
        raise ValueError("predicted and actual cover different numbers of tokens")
    if act.shape[0] == 0:
        raise ValueError("no tokens")
    hits = (act[:, :, None] == pred[:, None, :]).any(axis=-1).sum(axis=-1)
    return float(hits.mean() / act.shape[-1])


def _layer_rows(trace: RoutingTrace, layer: int) -> np.ndarray:
    """Row indices of `layer`, in (step, token) order."""
    rows = np.flatnonzero(trace.layer == layer)
    return rows[np.lexsort((trace.token[rows], trace.step[rows]))]


def next_layer_recall(trace: RoutingTrace) -> list[float | None]:
    """Per layer `l < L - 1`: recall of layer `l + 1`'s experts by layer `l + 1`'s router applied to layer `l`'s MoE
    input, the lookahead the recorder stored with the trace.

    This is what a one-layer look-ahead prefetcher can know: while layer `l` runs, apply the next router to the
    current hidden state and fetch the experts it picks.

    Returns:
        `L - 1` recalls; element `l` scores the prediction of layer `l + 1`, None where the trace has no lookahead
        for it (no router at `l + 1`, or layers `l` and `l + 1` saw different tokens, e.g. encoder then decoder).

    Raises:
        ValueError: when the trace has no lookahead at all.
    """
    if trace.lookahead is None:
        raise ValueError("trace has no lookahead: record it with integration.tracing.record_routing")
    out: list[float | None] = []
    for layer in range(trace.num_layers - 1):
        here, there = _layer_rows(trace, layer), _layer_rows(trace, layer + 1)
        same = len(here) == len(there) and np.array_equal(trace.step[here], trace.step[there])
        look = trace.lookahead[here]
        out.append(topk_recall(look, trace.experts[there]) if same and len(here) and (look >= 0).all() else None)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def _layer_load(traces: Sequence[RoutingTrace], layer: int) -> np.ndarray:
    """`expert_load` of `layer` over `traces`, counting only ids that name an expert with weights."""
    experts = np.concatenate([t.experts[t.layer == layer].reshape(-1) for t in traces])
    num_experts = traces[0].num_experts
    return expert_load(experts[(experts >= 0) & (experts < num_experts)], num_experts)


def _lru_hit_rate(sequences: Sequence[RoutingTrace], layer: int, capacity: int) -> float:
    """Hit rate of an LRU cache of `capacity` experts of `layer`, each sequence from cold, summed then divided."""
    counts = [simulate_cache(s, capacity, "lru", layers=[layer]) for s in sequences]
    lookups = sum(n for _, n in counts)
    if lookups == 0:
        raise ValueError(f"layer {layer} routed no token to an expert")
    return sum(h for h, _ in counts) / lookups


def routing_report(
    trace: RoutingTrace,
    *,
    capacities: Sequence[int] = (2, 4),
    domains: Mapping[str, Sequence[int]] | None = None,
    batch: int | None = None,
) -> dict[str, Any]:
    """All routing statistics of a trace, per layer and summarised.

    Args:
        trace: the routing of a batch of sequences (a teacher-forced pass or a generation).
        capacities: per-layer LRU cache sizes (experts) to simulate, each sequence decoded token by token.
        domains: optional named groups of sequences (batch rows, e.g. `{"speech": [0..7], "code": [8..15]}`);
            adds each group's busiest-expert share and the Jensen-Shannon divergence between the first two groups.
        batch: sequences in the trace; default `trace.meta["batch"]`.

    Returns:
        A JSON-serialisable dict: `num_layers`, `num_experts`, `top_k`, `sequences`, `tokens`, `layers` (one dict
        per layer: `load_entropy`, `busiest_share`, `busiest_expert`, `load`, `lru_hit_c{C}`, `next_layer_recall`
        when the trace has lookahead, `domain_*` with domains), and `summary` (min/max/mean of the per-layer values).
    """
    E, k = trace.num_experts, trace.top_k
    sequences = trace.sequences(batch)
    recalls = next_layer_recall(trace) if trace.lookahead is not None else None
    names = list(domains) if domains else []
    layers = []
    for layer in range(trace.num_layers):
        load = _layer_load([trace], layer)
        row: dict[str, Any] = {
            "layer": layer,
            "load_entropy": normalized_entropy(load),
            "busiest_share": busiest_expert_share(load),
            "busiest_expert": int(load.argmax()),
            "load": load.tolist(),
        }
        for c in capacities:
            row[f"lru_hit_c{c}"] = _lru_hit_rate(sequences, layer, c)
        if recalls is not None:
            row["next_layer_recall"] = recalls[layer] if layer < len(recalls) else None
        if domains:
            loads = {n: _layer_load([sequences[r] for r in rows], layer) for n, rows in domains.items()}
            row["domain_busiest_share"] = {n: busiest_expert_share(v) for n, v in loads.items()}
            if len(names) >= 2:
                row["domain_js_bits"] = js_divergence(loads[names[0]], loads[names[1]])
        layers.append(row)

    def stats(key: str) -> dict[str, float] | None:
        vals = [r[key] for r in layers if r.get(key) is not None]
        if not vals:
            return None
        return {"min": float(min(vals)), "max": float(max(vals)), "mean": float(np.mean(vals))}

    keys = ["load_entropy", "busiest_share"] + [f"lru_hit_c{c}" for c in capacities]
    if recalls is not None:
        keys.append("next_layer_recall")
    if domains and len(names) >= 2:
        keys.append("domain_js_bits")
    summary = {key: stats(key) for key in keys}
    summary["uniform_lru_baseline"] = {f"c{c}": c / E for c in capacities}
    return {
        "num_layers": trace.num_layers,
        "num_experts": E,
        "top_k": k,
        "sequences": len(sequences),
        "tokens": int((trace.layer == 0).sum()),
        "layers": layers,
        "summary": summary,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """Render `routing_report`'s output as a fixed-width text table (one row per layer plus a mean row)."""
    layers = report["layers"]
    caps = sorted(int(key[len("lru_hit_c") :]) for key in layers[0] if key.startswith("lru_hit_c"))
    has_recall = "next_layer_recall" in layers[0]
    has_js = "domain_js_bits" in layers[0]
    head = ["layer", "entropy", "busiest", "(expert)"]
    if has_recall:
        head.append("recall(l+1)")
    head += [f"LRU@{c}" for c in caps]
    if has_js:
        head.append("JS(domains)")
    rows = [head]

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    for r in layers:
        row = [str(r["layer"]), fmt(r["load_entropy"]), fmt(r["busiest_share"]), f"#{r['busiest_expert']}"]
        if has_recall:
            row.append(fmt(r["next_layer_recall"]))
        row += [fmt(r[f"lru_hit_c{c}"]) for c in caps]
        if has_js:
            row.append(fmt(r["domain_js_bits"]))
        rows.append(row)
    s = report["summary"]
    mean = ["mean", fmt(s["load_entropy"]["mean"]), fmt(s["busiest_share"]["mean"]), ""]
    if has_recall:
        mean.append(fmt((s["next_layer_recall"] or {}).get("mean")))
    mean += [fmt(s[f"lru_hit_c{c}"]["mean"]) for c in caps]
    if has_js:
        mean.append(fmt(s["domain_js_bits"]["mean"]))
    rows.append(mean)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
