r"""The planner: a roofline cost model of one decode step, and the batch size and budgets it recommends.

```
model shape (L layers, E experts, top-k, bytes) --+
hardware profile (bandwidths, expert t(n) = a+bn) -+--> per batch size B:
routing (uniform, or a recorded trace) ------------+      distinct experts d(B) per layer -> tokens per expert B*k/d
memory budget, latency limit ----------------------+      cache slots C (memory left after dense weights and KV)
                                                          hit rate h(C) -> misses d*(1-h) -> transfer time
                                                          d*a + b*B*k + (dense(B)+o)/L     -> compute time
                                                          layer = lower_bound: max(compute, bytes / bandwidth)
                                                          step = sum over layers; tokens/s = B / step
                                                     --> the feasible B with the most tokens/s -> Plan
```
The engine already shares each expert load across a batch (`run_experts` loads an expert once for all its tokens),
so the batch size *is* the micro-batch of Klotski: loads are amortised over B sequences, and the planner finds
where the step turns from transfer-bound into compute-bound (`min_overlap_batch`). With an accelerator, the layer
cost is MoE-Lightning's hierarchical roofline: the max over disk reads, host -> device copies, CPU compute and
accelerator compute; a missed expert is computed on the CPU when that beats copying it (Fiddler,
`place_expert`). The hit rate comes from a mean-field model of LRU over `L * E` experts (`expected_lru_hit_rate`);
a measured hit rate or a measured distinct-experts curve (`distinct_from_trace`) replaces the model's guess.
`o` is the profile's measured fixed cost of a step (`step_overhead_s`: Python, kernel launches, the generate loop),
which dominates small models. Formulas and assumptions: docs/planner.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..config import format_bytes
from ..prefetch import RoutingTrace
from ..prefetch.trace import map_routing
from .profile import HardwareProfile

__all__ = [
    "ModelShape",
    "StepCost",
    "Plan",
    "plan",
    "estimate_step",
    "lower_bound",
    "expert_slots",
    "place_expert",
    "expected_distinct",
    "distinct_from_trace",
    "expected_lru_hit_rate",
    "DEFAULT_BATCHES",
]

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float64": 8}


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a model: `MoETopology.summary()` / `inspect_path` keys, plus embeddings."""

    num_layers: int
    num_experts: int
    top_k: int
    expert_nbytes: int
    other_nbytes: int
    embedding_nbytes: int = 0  # input embeddings: resident but not streamed per step (rows are gathered)

    @property
    def total_expert_nbytes(self) -> int:
        return self.num_layers * self.num_experts * self.expert_nbytes

    @classmethod
    def from_summary(cls, summary: dict[str, Any], embedding_nbytes: int = 0) -> ModelShape:
        return cls(
            int(summary["moe_layers"]),
            int(summary["experts_per_layer"]),
            int(summary["top_k"]),
            int(summary["bytes_per_expert"]),
            int(summary["other_bytes"]),
            embedding_nbytes,
        )


def expected_distinct(batch: float, num_experts: int, top_k: int) -> float:
    """Distinct experts one layer uses for `batch` tokens routed uniformly: `E * (1 - (1 - k/E)^B)`."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def distinct_from_trace(
    trace: RoutingTrace,
    batch_sizes=DEFAULT_BATCHES,
    samples: int = 64,
    seed: int = 0,
    skip_prefill: bool = True,
    num_experts: int | None = None,
    top_k: int | None = None,
) -> dict[int, list[float]]:
    """Measured distinct experts per layer against batch size, from the decode steps of a trace.

    A batch of `B` is `B` sequences of one recorded step (a trace recorded at batch >= B), else the sequences of
    several random steps (a trace of one sequence: B steps ~ B independent sequences). With `num_experts` /
    `top_k` of another model the routing is first mapped to it (`prefetch.trace.map_routing`, as a replay does).
    Returns `{B: [mean distinct experts of layer l]}`.
    """
    rng = np.random.default_rng(seed)
    experts, k = num_experts or trace.num_experts, top_k or trace.top_k
    out: dict[int, list[float]] = {b: [] for b in batch_sizes}
    first = 1 if skip_prefill and trace.num_steps > 1 else 0
    for layer in range(trace.num_layers):
        steps = []  # one (sequences, experts) bool matrix per decode step
        for step in range(first, trace.num_steps):
            e, w = trace.rows(step, layer)
            if (experts, k) != (trace.num_experts, trace.top_k):
                e, _ = map_routing(e, w, trace.num_experts, experts, k)
            used = np.zeros((len(e), experts), dtype=bool)
            used[np.arange(len(e))[:, None], e] = True
            steps.append(used)
        for b in batch_sizes:
            draws = []
            for _ in range(samples):
                picked = rng.choice(len(steps), min(len(steps), -(-b // len(steps[0]))), replace=False)
                rows = np.concatenate([steps[i] for i in picked])
                draws.append(rows[rng.choice(len(rows), min(b, len(rows)), replace=False)].any(0).sum())
            out[b].append(float(np.mean(draws)))
    return out


def expected_lru_hit_rate(capacity: int, num_layers: int, num_experts: int, distinct: float) -> float:
    """Expected LRU hit rate of a shared cache of `capacity` experts over `L * E` when each layer uses `distinct`
    uniformly random experts per step (the independent-reference model, in its mean-field form).

    An expert last used `j` steps ago is still resident when fewer than `capacity` other experts were used since,
    about `N (1 - (1 - p)^j)` with `N = L E` and `p = distinct / E`; `j` is geometric in `p`, so the hit rate is
    `1 - (1 - p)^j_max`. It is about `C / N` when each step touches few experts, and 0 when one step's working
    set `L * distinct` exceeds the cache (LRU on a cyclic scan).

    A model, not a measurement: the hit rate the cache's own LRU policy gets on a recorded routing is
    `prefetch.trace.simulate_cache(trace, capacity)` (hits, lookups), which `tests/scheduling/test_scheduling.py` checks this
    model against.
    """
    total = num_layers * num_experts
    if capacity >= total:
        return 1.0
    p = min(1.0, distinct / num_experts)
    if p >= 1.0 or capacity <= 0:
        return 0.0
    j_max = math.floor(math.log(1.0 - capacity / total) / math.log(1.0 - p) + 1e-9)
    return 1.0 - (1.0 - p) ** j_max if j_max > 0 else 0.0


def place_expert(n_tokens: float, profile: HardwareProfile, transfer_s: float | None = None) -> str:
    """Where to compute a missed expert with `n_tokens` tokens: `"cpu"` when `cpu(n) < copy + device(n)`.

    Args:
        n_tokens: tokens routed to the expert.
        profile: the measured profile (a profile without an accelerator always answers `"cpu"`).
        transfer_s: the copy it would need; default one expert over `profile.h2d_Bps`.
    """
    if not profile.has_device:
        return "cpu"
    copy = profile.expert_nbytes / profile.h2d_Bps if transfer_s is None else transfer_s
    return "cpu" if profile.cpu_expert_seconds(n_tokens) < copy + profile.device_expert_seconds(n_tokens) else "device"


@dataclass
class StepCost:
    """The predicted cost of one decode step at one batch size."""

    batch_size: int
    feasible: bool
    reason: str
    compute_slots: int
    host_slots: int
    hit_rate: float
    placement: str
    distinct: list[float]
    transfer_s: list[float]  # per layer: max over the links (disk, host -> device)
    compute_s: list[float]  # per layer: max over the processors, dense share included
    step_s: float  # sum over layers of max(transfer, compute): loads overlap compute
    serial_step_s: float  # sum of everything: no overlap at all
    tokens_per_s: float
    bubble_fraction: float  # share of the step the processors wait for transfers
    memory: dict[str, int] = field(default_factory=dict)


def lower_bound(
    compute_s: float | None,
    read_bytes: float | None,
    read_Bps: float | None,
    h2d_bytes: float | None = None,
    h2d_Bps: float | None = None,
) -> float | None:
    """The roofline: `max(compute, read bytes / read bandwidth, h2d bytes / h2d bandwidth)` over the known terms.

    A step (or one layer of it) cannot be faster than its computation, nor than the time its bytes take to arrive
    (docs/planner.md). `estimate_step` costs each layer with it; `hf-moe-offload bench` divides it by the
    measured step (`efficiency`). Returns None when no term is known.
    """
    terms = [compute_s] if compute_s is not None else []
    if read_bytes is not None and read_Bps:
        terms.append(read_bytes / read_Bps)
    if h2d_bytes and h2d_Bps:
        terms.append(h2d_bytes / h2d_Bps)
    return max(terms) if terms else None


def _dense_step_s(shape: ModelShape, profile: HardwareProfile, batch: int, seq_bytes: int, on_device: bool) -> float:
    """Non-expert time of one step: stream the dense weights once, their FLOPs per token, and read each KV cache."""
    mem = profile.device_mem_Bps if on_device else profile.cpu_mem_Bps
    streamed = max(0, shape.other_nbytes - shape.embedding_nbytes)
    params = streamed / _ITEMSIZE.get(profile.dtype, 2)
    return streamed / mem + batch * 2 * params / profile.flops_per_second(on_device) + batch * seq_bytes / mem


def estimate_step(
    profile: HardwareProfile,
    shape: ModelShape,
    batch: int,
    compute_slots: int,
    host_slots: int = 0,
    *,
    distinct: list[float] | None = None,
    hit_rate: float | None = None,
    seq_bytes: int = 0,
    read_Bps: float | None = None,
    on_device: bool | None = None,
) -> StepCost:
    """Cost of one decode step of `batch` sequences (see the module docstring; feasibility is left to `plan`).

    Args:
        compute_slots: experts the compute tier holds (host slots on CPU, device slots with an accelerator).
        host_slots: experts the host tier holds (with an accelerator).
        distinct: distinct experts per layer at this batch; default `expected_distinct` (uniform routing).
        hit_rate: a measured compute-tier hit rate; default `expected_lru_hit_rate`.
        seq_bytes: KV cache bytes per sequence (read once per step by attention).
        read_Bps: expert read bandwidth; default `profile.disk_read_Bps`.
        on_device: cost the accelerator path; default whenever `profile` has accelerator timings.
    """
    L, E, k, nbytes = shape.num_layers, shape.num_experts, shape.top_k, shape.expert_nbytes
    distinct = list(distinct) if distinct is not None else [expected_distinct(batch, E, k)] * L
    read_Bps = read_Bps or profile.disk_read_Bps
    mean_d = sum(distinct) / L
    on_device = profile.has_device if on_device is None else on_device and profile.has_device
    h = expected_lru_hit_rate(compute_slots, L, E, mean_d) if hit_rate is None else hit_rate
    # The measured fixed cost of a step (Python, launches: see HardwareProfile.step_overhead_s), spread over layers.
    dense = (_dense_step_s(shape, profile, batch, seq_bytes, on_device) + profile.step_overhead_s) / L
    cpu, placement = profile.cpu_fit, "cpu"
    transfer, compute, layers, serial = [], [], [], 0.0
    for d in distinct:
        n_bar = batch * k / d if d > 0 else 0.0
        if not on_device:
            read_bytes, h2d_bytes = d * (1 - h) * nbytes, 0.0
            t_proc = d * cpu.a + cpu.b * batch * k + dense
            serial += read_bytes / read_Bps + t_proc
        else:
            dev = profile.device_fit
            h_host = max(h, expected_lru_hit_rate(host_slots, L, E, mean_d)) if hit_rate is None else h
            missed = d * (1 - h)
            read_bytes = d * (1 - h_host) * nbytes
            placement = place_expert(n_bar, profile)
            if placement == "device":
                h2d_bytes, cpu_s = missed * nbytes, 0.0
                dev_s = d * dev.a + dev.b * batch * k + dense
            else:
                h2d_bytes, cpu_s = 0.0, missed * cpu(n_bar)
                dev_s = d * h * dev(n_bar) + dense
            t_proc = max(dev_s, cpu_s)
            serial += read_bytes / read_Bps + h2d_bytes / profile.h2d_Bps + dev_s + cpu_s
        transfer.append(lower_bound(0.0, read_bytes, read_Bps, h2d_bytes, profile.h2d_Bps))
        compute.append(t_proc)
        layers.append(lower_bound(t_proc, read_bytes, read_Bps, h2d_bytes, profile.h2d_Bps))
    step = sum(layers)
    return StepCost(
        batch_size=batch,
        feasible=True,
        reason="",
        compute_slots=compute_slots,
        host_slots=host_slots,
        hit_rate=h,
        placement=placement,
        distinct=distinct,
        transfer_s=transfer,
        compute_s=compute,
        step_s=step,
        serial_step_s=serial,
        tokens_per_s=batch / step if step > 0 else math.inf,
        bubble_fraction=1.0 - sum(compute) / step if step > 0 else 0.0,
    )


def expert_slots(
    shape: ModelShape,
    batch: int,
    seq_bytes: int,
    memory_bytes: int,
    device_memory_bytes: int | None = None,
    reserve_bytes: int = 0,
) -> tuple[int, int]:
    """`(host slots, device slots)`: the experts each tier holds once the run's other bytes are reserved.

    The tier that computes (the host without `device_memory_bytes`, else the accelerator) first keeps the dense
    weights (`shape.other_nbytes`, embeddings included), `batch` KV caches of `seq_bytes` and `reserve_bytes`;
    the other tier keeps `reserve_bytes`. Slots are whole experts, 0 to all `L * E` of them.
    """
    nbytes, n_experts = shape.expert_nbytes, shape.num_layers * shape.num_experts
    held = shape.other_nbytes + batch * seq_bytes + reserve_bytes
    if device_memory_bytes is None:
        host_cache, device_cache = memory_bytes - held, 0
    else:  # dense weights and KV caches live on the accelerator
        host_cache, device_cache = memory_bytes - reserve_bytes, device_memory_bytes - held
    return max(0, min(host_cache // nbytes, n_experts)), max(0, min(device_cache // nbytes, n_experts))


def _distinct_at(curve: dict[int, list[float]] | None, batch: int, shape: ModelShape) -> list[float] | None:
    """A measured curve at `batch`: exact, interpolated in log B, or its nearest end scaled by the uniform model."""
    if not curve:
        return None
    if batch in curve:
        return list(curve[batch])
    keys = sorted(curve)
    lo = max((b for b in keys if b < batch), default=None)
    hi = min((b for b in keys if b > batch), default=None)
    if lo is not None and hi is not None:
        w = (math.log(batch) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return [(1 - w) * a + w * b for a, b in zip(curve[lo], curve[hi])]
    end, E, k = (lo if hi is None else hi), shape.num_experts, shape.top_k
    ratio = expected_distinct(batch, E, k) / expected_distinct(end, E, k)
    return [min(E, d * ratio) for d in curve[end]]


@dataclass
class Plan:
    """The recommendation: batch size, budgets, placement, and the predicted step it gives."""

    batch_size: int
    feasible: bool
    reason: str
    tokens_per_s: float
    step_s: float
    serial_step_s: float
    bubble_fraction: float
    hit_rate: float
    placement: str
    host_budget_bytes: int
    device_budget_bytes: int
    transfer_s: list[float]
    compute_s: list[float]
    min_overlap_batch: int | None  # smallest batch whose compute covers its transfers (Klotski's inequality)
    candidates: list[StepCost]
    inputs: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "candidates"}
        keys = ("batch_size", "feasible", "reason", "tokens_per_s", "step_s", "hit_rate", "bubble_fraction")
        out["candidates"] = [{k: getattr(c, k) for k in keys} for c in self.candidates]
        return out

    def __str__(self) -> str:
        head = f"{'batch':>6} {'distinct':>8} {'slots':>6} {'hit':>5} {'xfer ms/L':>9} {'comp ms/L':>9} "
        head += f"{'step ms':>9} {'tok/s':>9} {'bubble':>6} {'memory':>10}  note"
        lines = [head]
        for c in self.candidates:
            mark = "<- plan" if c.batch_size == self.batch_size else c.reason
            L = len(c.transfer_s)
            lines.append(
                f"{c.batch_size:>6} {sum(c.distinct) / L:>8.2f} {c.compute_slots:>6} {c.hit_rate:>5.2f} "
                f"{1e3 * sum(c.transfer_s) / L:>9.2f} {1e3 * sum(c.compute_s) / L:>9.2f} {1e3 * c.step_s:>9.1f} "
                f"{c.tokens_per_s:>9.2f} {c.bubble_fraction:>6.2f} {format_bytes(sum(c.memory.values())):>10}  {mark}"
            )
        verdict = "plan" if self.feasible else f"NO FEASIBLE PLAN ({self.reason}); closest"
        lines.append(
            f"{verdict}: batch {self.batch_size}, {self.tokens_per_s:.2f} tok/s predicted, step {1e3 * self.step_s:.1f} ms "
            f"(no overlap: {1e3 * self.serial_step_s:.1f} ms), host_budget {format_bytes(self.host_budget_bytes)}, "
            f"device_budget {format_bytes(self.device_budget_bytes)}, placement of missed experts: {self.placement}"
        )
        if self.min_overlap_batch is not None:
            lines.append(f"compute hides the transfers from batch {self.min_overlap_batch} on")
        return "\n".join(lines)


def plan(
    profile: HardwareProfile,
    topology_summary: dict[str, Any] | ModelShape,
    memory_budget_bytes: int,
    latency_limit_s: float | None = None,
    batch_candidates=DEFAULT_BATCHES,
    *,
    seq_bytes: int = 0,
    device_memory_bytes: int | None = None,
    reserve_bytes: int = 0,
    distinct_curve: dict[int, list[float]] | None = None,
    hit_rate: float | None = None,
    read_from: str = "disk",
    extra_step_s: Callable[[int], float] | None = None,
) -> Plan:
    """Choose the batch size with the most predicted tokens/s under a memory budget and a per-step latency limit.

    Args:
        profile: the machine's `HardwareProfile`.
        topology_summary: `MoETopology.summary()` / `inspect_path(...)`, or a `ModelShape`.
        memory_budget_bytes: host memory the process may use: dense weights (CPU only), KV caches and expert slots.
        latency_limit_s: longest acceptable decode step (the time between two tokens of one sequence).
        batch_candidates: batch sizes to cost.
        seq_bytes: KV cache (and activation) bytes per sequence at the planned context length.
        device_memory_bytes: accelerator memory for dense weights, KV caches and device slots; with an accelerator
            in `profile` the host budget then holds only host slots. None plans for the CPU alone.
        reserve_bytes: memory kept free in each tier (allocator slack, activations).
        distinct_curve: measured distinct experts per layer against batch (`distinct_from_trace`).
        hit_rate: a measured compute-tier hit rate to use instead of the LRU model.
        read_from: `"disk"` (cold reads) or `"page_cache"` (the checkpoint stays cached in RAM).
        extra_step_s: seconds added to each step at batch B, not overlapped (`expert_parallel`'s token dispatch).

    Returns:
        A `Plan`; `plan.feasible` is False (with the closest candidate and the reason) when nothing fits.

    Example:
        ```python
        >>> p = plan(HardwareProfile.load("profile.json"), inspect_path("model"), 8 << 30, latency_limit_s=0.5)
        >>> print(p)  # the table; p.to_dict() for scripts
        ```
    """
    shape = topology_summary if isinstance(topology_summary, ModelShape) else ModelShape.from_summary(topology_summary)
    if read_from not in ("disk", "page_cache"):
        raise ValueError(f"read_from: expected 'disk' or 'page_cache', got {read_from!r}")
    read_Bps = profile.page_cache_read_Bps if read_from == "page_cache" else profile.disk_read_Bps
    on_device = device_memory_bytes is not None and profile.has_device
    nbytes, candidates = shape.expert_nbytes, []
    for batch in sorted(set(int(b) for b in batch_candidates)):
        host_slots, device_slots = expert_slots(
            shape, batch, seq_bytes, memory_budget_bytes, device_memory_bytes if on_device else None, reserve_bytes
        )
        compute_slots = device_slots if on_device else host_slots
        cost = estimate_step(
            profile,
            shape,
            batch,
            compute_slots,
            host_slots if on_device else 0,
            distinct=_distinct_at(distinct_curve, batch, shape),
            hit_rate=hit_rate,
            seq_bytes=seq_bytes,
            read_Bps=read_Bps,
            on_device=on_device,
        )
        if extra_step_s is not None:  # processors and links both wait for it: on the step and in the bubble
            extra = extra_step_s(batch)
            cost.step_s, cost.serial_step_s = cost.step_s + extra, cost.serial_step_s + extra
            cost.tokens_per_s = batch / cost.step_s if cost.step_s > 0 else math.inf
            cost.bubble_fraction = 1.0 - sum(cost.compute_s) / cost.step_s if cost.step_s > 0 else 0.0
        cost.memory = {
            "dense": shape.other_nbytes,
            "sequences": batch * seq_bytes,
            "host_slots": host_slots * nbytes,
            "device_slots": device_slots * nbytes,
        }
        if compute_slots < shape.top_k:
            cost.feasible, cost.reason = False, f"memory: {compute_slots} slots < top_k {shape.top_k}"
        elif latency_limit_s is not None and cost.step_s > latency_limit_s:
            cost.feasible, cost.reason = False, f"latency: {cost.step_s:.3g} s > {latency_limit_s:g} s"
        candidates.append(cost)
    if not candidates:
        raise ValueError("batch_candidates is empty")
    feasible = [c for c in candidates if c.feasible]
    fits = [c for c in candidates if not c.reason.startswith("memory")]
    if feasible:
        best = max(feasible, key=lambda c: (c.tokens_per_s, -c.batch_size))
    else:
        best = min(fits, key=lambda c: c.step_s) if fits else candidates[0]
    overlap = None  # Klotski's inequality: from this batch on, every (memory-feasible) batch hides its transfers
    for c in reversed(fits):
        if sum(c.compute_s) < sum(c.transfer_s):
            break
        overlap = c.batch_size
    return Plan(
        batch_size=best.batch_size,
        feasible=bool(feasible),
        reason="" if feasible else best.reason,
        tokens_per_s=best.tokens_per_s,
        step_s=best.step_s,
        serial_step_s=best.serial_step_s,
        bubble_fraction=best.bubble_fraction,
        hit_rate=best.hit_rate,
        placement=best.placement,
        host_budget_bytes=best.memory["host_slots"],
        device_budget_bytes=best.memory["device_slots"],
        transfer_s=best.transfer_s,
        compute_s=best.compute_s,
        min_overlap_batch=overlap,
        candidates=candidates,
        inputs={
            "model": asdict(shape),
            "memory_budget_bytes": memory_budget_bytes,
            "latency_limit_s": latency_limit_s,
            "seq_bytes": seq_bytes,
            "device_memory_bytes": device_memory_bytes,
            "read_from": read_from,
            "read_Bps": read_Bps,
            "hit_rate": hit_rate,
            "measured_distinct": distinct_curve is not None,
        },
    )
