r"""The planner: the batch size and budgets to run at, chosen with the cost model of a decode step (cost_model.py).

```
memory budget, device memory ---> per batch size B: cache slots C (memory left after dense weights and KV caches)
hardware profile, model shape --> estimate_step(B, C): step time, tokens/s, transfer and compute per layer
latency limit ------------------> infeasible when C < top-k or the step exceeds the limit
                                 --> the feasible B with the most tokens/s -> Plan
```
The engine already shares each expert load across a batch (`run_experts` loads an expert once for all its tokens),
so the batch size *is* the micro-batch of Klotski: loads are amortised over B sequences, and the planner finds
where the step turns from transfer-bound into compute-bound (`min_overlap_batch`). A measured distinct-experts curve
is interpolated to each candidate batch (`_distinct_at`). Formulas and assumptions: docs/planner.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..config import format_bytes
from .cost_model import DEFAULT_BATCHES, ModelShape, StepCost, estimate_step, expected_distinct
from .profile import HardwareProfile

__all__ = ["expert_slots", "Plan", "plan"]


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
