r"""The cost model of one decode step: distinct experts, cache hit rate, expert placement, roofline per layer.

```
model shape (L layers, E experts, top-k, bytes) --+
hardware profile (bandwidths, expert t(n) = a+bn) -+--> at batch size B with C compute-tier slots (estimate_step):
routing (uniform, or a recorded trace) ------------+      distinct experts d(B) per layer -> tokens per expert B*k/d
                                                          hit rate h(C) -> misses d*(1-h) -> transfer time
                                                          d*a + b*B*k + (dense(B)+o)/L     -> compute time
                                                          layer = lower_bound: max(compute, bytes / bandwidth)
                                                          step = sum over layers; tokens/s = B / step -> StepCost
```
With an accelerator, the layer cost is MoE-Lightning's hierarchical roofline: the max over disk reads, host ->
device copies, CPU compute and accelerator compute; a missed expert is computed on the CPU when that beats copying
it (Fiddler, `place_expert`). The hit rate comes from a mean-field model of LRU over `L * E` experts
(`expected_lru_hit_rate`); a measured hit rate or a measured distinct-experts curve (`distinct_from_trace`)
replaces the model's guess. `o` is the profile's measured fixed cost of a step (`step_overhead_s`: Python, kernel
launches, the generate loop), which dominates small models. The planner (planner.py) costs every candidate batch
size with `estimate_step`. Formulas and assumptions: docs/planner.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..prefetch import RoutingTrace
from ..prefetch.trace import map_routing
from .profile import HardwareProfile

__all__ = [
    "ModelShape",
    "StepCost",
    "estimate_step",
    "lower_bound",
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
