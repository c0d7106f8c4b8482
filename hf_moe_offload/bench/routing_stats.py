"""Routing statistics for top-k Mixture-of-Experts language models.

Tools to judge whether a model's expert routing is realistic enough to benchmark expert caching and prefetching
on, and how much a cache or a predictor can gain on it:

* :func:`record_routing` runs a model once with forward hooks and returns a :class:`RoutingTrace`: for every MoE
  layer, the top-k expert indices of every token and the hidden state entering the sparse MoE block.
* Load balance: :func:`expert_load`, :func:`normalized_entropy`, :func:`busiest_expert_share`,
  :func:`js_divergence` (between the loads of two prompt domains).
* Predictability: :func:`topk_recall` and :func:`next_layer_recall` (apply layer ``l + 1``'s router to layer
  ``l``'s MoE input, the signal a look-ahead prefetcher has one layer early).
* Temporal locality: :func:`lru_hits` / :func:`lru_hit_rate` simulate an LRU cache of ``C`` experts per layer
  while decoding token after token.
* :func:`routing_report` bundles all of them per layer; :func:`format_report` renders it as a text table.

The hooks assume the Hugging Face layout of Mixtral-style models (``model.model.layers[i].mlp`` is the sparse MoE
block and ``.mlp.gate`` its router returning ``(router_logits, top_k_weights, top_k_index)``), but every statistic
also works on plain arrays. This module depends on torch and numpy only.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "RoutingTrace",
    "busiest_expert_share",
    "expert_load",
    "format_report",
    "js_divergence",
    "lru_hit_rate",
    "lru_hits",
    "moe_layers",
    "next_layer_recall",
    "normalized_entropy",
    "predict_topk",
    "record_routing",
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
# Recording
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RoutingTrace:
    """Routing decisions of one forward pass.

    Attributes:
        topk_index: per MoE layer, an int64 array ``[batch, seq, k]`` of the experts chosen for each token.
        moe_inputs: per MoE layer, the hidden state entering the sparse MoE block, ``[batch, seq, hidden]``
            (for Mixtral: the post-attention-layernorm output). Empty if not recorded.
        num_experts: experts per layer.
    """

    topk_index: list[np.ndarray]
    moe_inputs: list[torch.Tensor] = field(default_factory=list)
    num_experts: int = 0

    @property
    def num_layers(self) -> int:
        """Number of MoE layers recorded."""
        return len(self.topk_index)

    @property
    def top_k(self) -> int:
        """Experts per token."""
        return int(self.topk_index[0].shape[-1]) if self.topk_index else 0

    def select(self, rows: Sequence[int] | slice) -> RoutingTrace:
        """A trace restricted to some batch rows (e.g. the sequences of one prompt domain)."""
        return RoutingTrace(
            topk_index=[t[rows] for t in self.topk_index],
            moe_inputs=[h[rows] for h in self.moe_inputs],
            num_experts=self.num_experts,
        )


def moe_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The sparse MoE blocks of a Hugging Face MoE causal LM, in depth order.

    Looks for ``model.model.layers[i].mlp`` (Mixtral, Qwen-MoE, ... layout) and keeps the blocks that have a
    ``gate`` (router) submodule.

    Raises:
        ValueError: if no such block is found.
    """
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError("model has no .model.layers; pass the MoE blocks explicitly")
    blocks = [layer.mlp for layer in layers if hasattr(getattr(layer, "mlp", None), "gate")]
    if not blocks:
        raise ValueError("no layer has an .mlp.gate router")
    return blocks


def _topk_index_from_router_output(out: Any, k: int | None) -> torch.Tensor:
    """Extract top-k indices from a router's output: a ``(logits, weights, index)`` tuple or bare logits."""
    if isinstance(out, tuple | list):
        if len(out) >= 3:
            return out[2]
        out = out[0]
    if k is None:
        raise ValueError("router returned bare logits: k is required")
    return torch.topk(out.float(), k, dim=-1).indices


@torch.no_grad()
def record_routing(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    blocks: Sequence[torch.nn.Module] | None = None,
    attention_mask: torch.Tensor | None = None,
    keep_inputs: bool = True,
    top_k: int | None = None,
) -> RoutingTrace:
    """Run ``model`` on ``input_ids`` once and record every MoE layer's routing.

    A forward hook on each block's ``gate`` collects the top-k indices (the third element of the router's output
    tuple, or ``topk(logits)`` for routers returning bare logits); a forward pre-hook on each block collects its
    input hidden state. Hooks are removed afterwards, even on error.

    Args:
        model: a causal LM with MoE blocks (see :func:`moe_layers`).
        input_ids: ``[batch, seq]`` token ids.
        blocks: the MoE blocks to hook; default :func:`moe_layers` of ``model``.
        attention_mask: optional mask passed to the model.
        keep_inputs: also record the hidden states entering each block (needed for :func:`next_layer_recall`).
        top_k: experts per token; only needed for routers that return bare logits.

    Returns:
        A :class:`RoutingTrace` with one entry per block.
    """
    blocks = list(blocks) if blocks is not None else moe_layers(model)
    batch, seq = input_ids.shape
    indices: list[torch.Tensor | None] = [None] * len(blocks)
    inputs: list[torch.Tensor | None] = [None] * len(blocks)
    handles = []

    def gate_hook(i: int) -> Callable:
        def hook(_module: torch.nn.Module, _args: Any, out: Any) -> None:
            indices[i] = _topk_index_from_router_output(out, top_k).detach().to("cpu", torch.int64)

        return hook

    def input_hook(i: int) -> Callable:
        def hook(_module: torch.nn.Module, args: Any) -> None:
            inputs[i] = args[0].detach().to("cpu").clone()

        return hook

    try:
        for i, block in enumerate(blocks):
            handles.append(block.gate.register_forward_hook(gate_hook(i)))
            if keep_inputs:
                handles.append(block.register_forward_pre_hook(input_hook(i)))
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()

    if any(t is None for t in indices):
        raise RuntimeError("some router was not called during the forward pass")
    topk = [t.reshape(batch, seq, -1).numpy() for t in indices]  # type: ignore[union-attr]
    hidden = [h.reshape(batch, seq, -1) for h in inputs] if keep_inputs else []  # type: ignore[union-attr]
    num_experts = int(getattr(blocks[0].gate, "num_experts", 0) or blocks[0].gate.weight.shape[0])
    return RoutingTrace(topk_index=topk, moe_inputs=hidden, num_experts=num_experts)


# ----------------------------------------------------------------------------------------------------------------
# Load balance
# ----------------------------------------------------------------------------------------------------------------
def expert_load(topk_index: ArrayLike, num_experts: int) -> np.ndarray:
    """Number of routed token-slots per expert.

    Args:
        topk_index: expert indices of any shape (e.g. ``[tokens, k]``); every entry is one routed slot.
        num_experts: number of experts ``E``; indices must lie in ``[0, E)``.

    Returns:
        int64 array ``[E]`` of counts summing to the number of slots.
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
    """Shannon entropy of the load distribution divided by ``log(E)``.

    1.0 means perfectly uniform use of all ``E`` experts, 0.0 means every slot goes to one expert.

    Args:
        load: counts (or probabilities) per expert, shape ``[E]`` with ``E >= 2``.
    """
    p = _probs(load)
    if p.size < 2:
        raise ValueError("need at least two experts")
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(p.size))


def busiest_expert_share(load: ArrayLike) -> float:
    """Fraction of routed slots that go to the most used expert (``1/E`` if uniform, 1.0 if collapsed)."""
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
    """Mean over tokens of ``|predicted ∩ actual| / |actual|`` for top-k expert sets.

    Args:
        predicted: ``[..., k_pred]`` predicted expert indices per token.
        actual: ``[..., k]`` experts actually used; leading dimensions must match ``predicted``'s.

    Returns:
        Recall in ``[0, 1]``; 1.0 means every used expert was predicted.
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


@torch.no_grad()
def predict_topk(gate: torch.nn.Module, hidden: torch.Tensor, k: int | None = None) -> np.ndarray:
    """Top-k expert indices that ``gate`` would choose for ``hidden`` (``[..., H]``), as ``[..., k]``.

    Works for routers returning ``(logits, weights, index)`` and for routers returning bare logits (then ``k``
    is required).
    """
    lead = hidden.shape[:-1]
    param = next(gate.parameters(), None)
    x = hidden.reshape(-1, hidden.shape[-1])
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    idx = _topk_index_from_router_output(gate(x), k)
    return idx.detach().cpu().to(torch.int64).reshape(*lead, -1).numpy()


def next_layer_recall(trace: RoutingTrace, gates: Sequence[torch.nn.Module]) -> list[float]:
    """Per layer ``l < L - 1``: recall of layer ``l + 1``'s experts when its router sees layer ``l``'s MoE input.

    This is what a one-layer look-ahead prefetcher can know: while layer ``l`` runs, apply the next router to the
    current hidden state and fetch the experts it picks.

    Args:
        trace: a :class:`RoutingTrace` recorded with ``keep_inputs=True``.
        gates: the routers of all recorded layers, in order (``[block.gate for block in moe_layers(model)]``).

    Returns:
        ``L - 1`` recalls; element ``l`` scores the prediction of layer ``l + 1``.
    """
    if len(trace.moe_inputs) != trace.num_layers:
        raise ValueError("trace has no MoE inputs: record it with keep_inputs=True")
    if len(gates) != trace.num_layers:
        raise ValueError("need one gate per recorded layer")
    k = trace.top_k
    return [
        topk_recall(predict_topk(gates[i + 1], trace.moe_inputs[i], k), trace.topk_index[i + 1])
        for i in range(trace.num_layers - 1)
    ]


# ----------------------------------------------------------------------------------------------------------------
# Temporal locality
# ----------------------------------------------------------------------------------------------------------------
def lru_hits(topk_sequence: ArrayLike, capacity: int) -> tuple[int, int]:
    """Simulate an LRU cache of ``capacity`` experts over one sequence of per-token expert sets.

    Tokens are processed in order, as in token-by-token decoding, starting from an empty cache. For each token,
    every expert of its set that is already cached is a hit and the others are misses; then all experts of the set
    become the most recently used (so ``capacity >= k`` is required: a token's experts must fit together) and the
    least recently used ones beyond ``capacity`` are evicted.

    Args:
        topk_sequence: ``[tokens, k]`` expert indices (duplicates within a token count once).
        capacity: cached experts, ``>= k``.

    Returns:
        ``(hits, lookups)`` where ``lookups`` is the number of distinct (token, expert) pairs.
    """
    seq = _np(topk_sequence)
    if seq.ndim != 2:
        raise ValueError("expected [tokens, k]")
    k = seq.shape[1]
    if capacity < k:
        raise ValueError(f"capacity {capacity} < experts per token {k}")
    cache: OrderedDict[int, None] = OrderedDict()
    hits = lookups = 0
    for row in seq.tolist():
        experts = list(dict.fromkeys(int(e) for e in row))
        lookups += len(experts)
        hits += sum(e in cache for e in experts)
        for e in experts:
            cache[e] = None
            cache.move_to_end(e)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits, lookups


def lru_hit_rate(topk_sequences: ArrayLike | Iterable[ArrayLike], capacity: int) -> float:
    """LRU hit rate over one sequence ``[tokens, k]`` or several (``[batch, tokens, k]``, or a list of ``[T_i, k]``).

    Each sequence is decoded independently with a cold cache (see :func:`lru_hits`); hits and lookups are summed
    over sequences before dividing.
    """
    try:
        arr: np.ndarray | None = _np(topk_sequences)  # type: ignore[arg-type]
    except (ValueError, TypeError):  # ragged: sequences of different lengths
        arr = None
    seqs: Iterable[ArrayLike]
    if arr is not None and arr.dtype != object and arr.ndim in (2, 3):
        seqs = [arr] if arr.ndim == 2 else list(arr)
    else:
        seqs = list(topk_sequences)  # type: ignore[arg-type]
    hits = lookups = 0
    for s in seqs:
        h, n = lru_hits(s, capacity)
        hits += h
        lookups += n
    if lookups == 0:
        raise ValueError("no lookups")
    return hits / lookups


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def routing_report(
    trace: RoutingTrace,
    gates: Sequence[torch.nn.Module] | None = None,
    *,
    capacities: Sequence[int] = (2, 4),
    domains: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """All routing statistics of a trace, per layer and summarised.

    Args:
        trace: the routing of a batch of sequences.
        gates: routers of the traced layers; if given (and the trace has MoE inputs), next-layer recall is added.
        capacities: LRU cache sizes (experts per layer) to simulate.
        domains: optional named groups of batch rows (e.g. ``{"speech": [0..7], "code": [8..15]}``); adds each
            group's busiest-expert share and the Jensen-Shannon divergence between the first two groups' loads.

    Returns:
        A JSON-serialisable dict: ``num_layers``, ``num_experts``, ``top_k``, ``tokens``, ``layers`` (one dict
        per layer), and ``summary`` (min/max/mean of the per-layer values).
    """
    E, k = trace.num_experts, trace.top_k
    recalls = next_layer_recall(trace, gates) if gates is not None and trace.moe_inputs else None
    names = list(domains) if domains else []
    layers = []
    for layer, idx in enumerate(trace.topk_index):
        load = expert_load(idx, E)
        row: dict[str, Any] = {
            "layer": layer,
            "load_entropy": normalized_entropy(load),
            "busiest_share": busiest_expert_share(load),
            "busiest_expert": int(load.argmax()),
            "load": load.tolist(),
        }
        for c in capacities:
            row[f"lru_hit_c{c}"] = lru_hit_rate(idx, c)
        if recalls is not None:
            row["next_layer_recall"] = recalls[layer] if layer < len(recalls) else None
        if domains:
            loads = {n: expert_load(idx[list(rows)], E) for n, rows in domains.items()}
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
        "sequences": int(trace.topk_index[0].shape[0]) if trace.topk_index else 0,
        "tokens": int(trace.topk_index[0].shape[0] * trace.topk_index[0].shape[1]) if trace.topk_index else 0,
        "layers": layers,
        "summary": summary,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """Render :func:`routing_report`'s output as a fixed-width text table (one row per layer plus a mean row)."""
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
        mean.append(fmt(s["next_layer_recall"]["mean"]))
    mean += [fmt(s[f"lru_hit_c{c}"]["mean"]) for c in caps]
    if has_js:
        mean.append(fmt(s["domain_js_bits"]["mean"]))
    rows.append(mean)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
