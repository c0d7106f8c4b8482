r"""Planning for expert parallelism: one rank's share of the experts, and the cost of dispatching tokens to them.

```
model shape (L layers, E experts, top-k) --+--> rank_shape: E / N experts per layer, the same bytes per expert
world size N, link (bandwidth, latency) --+--> rank_distinct: distinct experts of one rank when N ranks route B
                                           |    tokens each: E/N (1 - (1 - k/E)^(N B))
                                           +--> dispatch_seconds: per MoE layer an all-to-all out and one back,
                                                each 2 * (latency + B k H itemsize (N - 1)/N / bandwidth) per layer
per batch size B ----> planner.plan(rank shape, rank curve, extra_step_s=dispatch) --> a Plan for one rank
```
The plan is made for one rank of `DistributedConfig(ep_size=N, fsdp_size=N)`, the layout whose dispatch is an
all-to-all: each rank decodes its own `B` sequences and sends each (token, expert) pair to the expert's owner. On
average a rank's experts then receive `B k` pairs from the `N B` tokens of the whole job, so a rank computes as
much as one process at batch `B` does, over a quarter (N = 4) of the experts, with a quarter of the bytes to keep.
The dispatch is added to the step, not overlapped: an expert cannot start before its tokens arrive, and the
combine waits for the slowest owner. Dense weights are counted whole on each rank (FSDP shards them at rest but
gathers each layer to compute; that gather is not costed). Formulas and the measured defaults: docs/planner.md.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import parse_budget
from ..errors import OffloadConfigError, UnsupportedParallelismError
from .cost_model import DEFAULT_BATCHES, ModelShape, expected_distinct
from .planner import Plan, _distinct_at, plan
from .profile import HardwareProfile

__all__ = [
    "Link",
    "DEFAULT_LINK",
    "parse_bandwidth",
    "check_divides",
    "rank_shape",
    "rank_distinct",
    "dispatch_bytes",
    "dispatch_seconds",
    "plan_expert_parallel",
]


@dataclass(frozen=True)
class Link:
    """The network between the ranks, as one collective sees it: `t(bytes) = latency_s + bytes / bandwidth_Bps`.

    Attributes:
        bandwidth_Bps: bytes per second one rank sends.
        latency_s: fixed seconds of one collective.
    """

    bandwidth_Bps: float
    latency_s: float

    def __post_init__(self) -> None:
        if not self.bandwidth_Bps > 0:
            raise OffloadConfigError(f"link bandwidth: expected > 0 bytes/s, got {self.bandwidth_Bps}")
        if not self.latency_s >= 0:
            raise OffloadConfigError(f"link latency: expected >= 0 seconds, got {self.latency_s}")


# gloo all_to_all_single between 2 processes on 127.0.0.1 of the 2-core development machine
# (`python scripts/measure_link.py --ranks 2`: 85 us at 1 KiB, 4.2 GB/s at 16 MiB), rounded to 100 us and 4 GB/s.
DEFAULT_LINK = Link(bandwidth_Bps=4e9, latency_s=1e-4)

_BITS = re.compile(r"^([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:bit|bits|bps|bit/s)$")
_BIT_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_bandwidth(value: str | float, name: str = "--link-bandwidth") -> float:
    """Bytes per second from `"10Gbit"` (bits, decimal: 1.25e9 B/s), `"4GB"` / `"500MiB"` (bytes) or a number.

    Raises:
        OffloadConfigError: not a positive number with a known unit.
    """
    text = str(value).strip()
    bits = _BITS.match(text.lower())
    if bits:
        nbytes = float(bits.group(1)) * _BIT_SCALE[bits.group(2)] / 8
    else:
        try:
            nbytes = float(text)
        except ValueError:
            try:
                nbytes = parse_budget(text, name).nbytes
            except OffloadConfigError:
                nbytes = None
    if nbytes is None or not nbytes > 0:
        raise OffloadConfigError(f"{name}: expected a positive bandwidth such as 10Gbit, 4GB or 4e9, got {value!r}")
    return float(nbytes)


def check_divides(size: int, experts: Mapping[str, int], name: str = "ep_size") -> None:
    """Refuse a world size that does not split every MoE layer's experts evenly (transformers' `Shard(0)`).

    Args:
        size: the expert-parallel world size.
        experts: expert count of each MoE layer, keyed by how the message names the layer.
        name: how the message names `size` (`ep_size`, `--world-size`).

    Raises:
        UnsupportedParallelismError: `size` < 1, or it does not divide a layer's expert count.
    """
    if size < 1:
        raise UnsupportedParallelismError(f"{name}={size}: expected at least 1 rank")
    article = "an" if name.lstrip("-")[:1] in tuple("aeiou") else "a"
    for layer, count in experts.items():
        if count % size:
            raise UnsupportedParallelismError(
                f"{name}={size} must divide the experts of every MoE layer; MoE layer {layer} has {count}. "
                f"Choose {article} {name} that divides {count}"
            )


def rank_shape(shape: ModelShape, world_size: int) -> ModelShape:
    """The shape one rank plans: `E / N` experts per layer, the rest unchanged (see `check_divides`)."""
    check_divides(world_size, {str(i): shape.num_experts for i in range(shape.num_layers)})
    return dataclasses.replace(shape, num_experts=shape.num_experts // world_size)


def rank_distinct(batch: float, shape: ModelShape, world_size: int) -> float:
    """Distinct experts one rank uses in a layer when each of `world_size` ranks routes `batch` tokens uniformly:
    its share of the distinct experts of `N B` tokens, `E/N (1 - (1 - k/E)^(N B))`."""
    return expected_distinct(batch * world_size, shape.num_experts, shape.top_k) / world_size


def dispatch_bytes(tokens: float, top_k: float, hidden_size: int, itemsize: int, world_size: int) -> float:
    """Bytes one rank sends in one direction of one MoE layer's all-to-all: the hidden states of its `tokens * top_k`
    (token, expert) pairs whose expert another rank owns, `(N - 1) / N` of them under uniform routing."""
    return tokens * top_k * hidden_size * itemsize * (world_size - 1) / world_size


def dispatch_seconds(
    tokens: float,
    top_k: float,
    hidden_size: int,
    itemsize: int,
    world_size: int,
    num_layers: int,
    link: Link = DEFAULT_LINK,
) -> float:
    """Seconds one decode step spends dispatching tokens to their experts' owners and combining the results back.

    Per MoE layer two all-to-alls (out and back), each `link.latency_s + dispatch_bytes(...) / link.bandwidth_Bps`;
    0 for one rank.

    Args:
        tokens: tokens this rank routes per step (its batch, at decode).
        top_k: experts per token.
        hidden_size: elements of one hidden state.
        itemsize: bytes per element of the hidden states (the compute dtype).
        world_size: ranks that split the experts.
        num_layers: MoE layers.
        link: the network between the ranks.

    Example:
        ```python
        >>> dispatch_seconds(8, 2, 4096, 2, 2, 32, Link(1.25e9, 50e-6))  # 8 tokens, Mixtral-8x7B, 10 Gbit/s
        0.00655...
        ```
    """
    if world_size == 1:
        return 0.0
    one_way = link.latency_s + dispatch_bytes(tokens, top_k, hidden_size, itemsize, world_size) / link.bandwidth_Bps
    return num_layers * 2 * one_way


def plan_expert_parallel(
    profile: HardwareProfile,
    shape: ModelShape,
    memory_bytes: int,
    world_size: int,
    *,
    hidden_size: int,
    itemsize: int,
    link: Link = DEFAULT_LINK,
    distinct_curve: dict[int, list[float]] | None = None,
    **plan_kwargs: Any,
) -> Plan:
    """`planner.plan` for one rank of `world_size` expert-parallel ranks; `plan(...)` itself for one rank.

    Args:
        profile: the machine's (one rank's) `HardwareProfile`.
        shape: the whole model's shape.
        memory_bytes: host memory of one rank (dense weights, KV caches, its expert slots).
        world_size: ranks that split the experts (`ep_size`).
        hidden_size, itemsize: size of a hidden state and bytes per element, for the dispatch.
        link: the network between the ranks.
        distinct_curve: the whole model's measured distinct experts per layer against tokens per step
            (`distinct_from_trace` at `N * B`); a rank uses `1 / N` of them.
        plan_kwargs: the other arguments of `planner.plan` (`latency_limit_s`, `batch_candidates`, `seq_bytes`, ...).

    Returns:
        The rank's `Plan` (budgets are the rank's bytes, steps include the dispatch); for `world_size > 1`,
        `plan.inputs["expert_parallel"]` holds the world size, the link, the rank's and the model's expert bytes and
        the dispatch seconds of each batch size.

    Raises:
        UnsupportedParallelismError: `world_size` does not divide the experts per layer.
    """
    if world_size == 1:
        return plan(profile, shape, memory_bytes, distinct_curve=distinct_curve, **plan_kwargs)
    local = rank_shape(shape, world_size)
    batches = sorted(set(int(b) for b in plan_kwargs.pop("batch_candidates", DEFAULT_BATCHES)))
    curve = {}
    for b in batches:
        full = _distinct_at(distinct_curve, b * world_size, shape)
        curve[b] = [d / world_size for d in full] if full else [rank_distinct(b, shape, world_size)] * shape.num_layers

    def dispatch(batch: int) -> float:
        return dispatch_seconds(batch, shape.top_k, hidden_size, itemsize, world_size, shape.num_layers, link)

    result = plan(
        profile,
        local,
        memory_bytes,
        batch_candidates=batches,
        distinct_curve=curve,
        extra_step_s=dispatch,
        **plan_kwargs,
    )
    result.inputs["measured_distinct"] = distinct_curve is not None
    result.inputs["expert_parallel"] = {
        "world_size": world_size,
        "dispatch": "all_to_all",
        "link_bandwidth_Bps": link.bandwidth_Bps,
        "link_latency_s": link.latency_s,
        "hidden_size": hidden_size,
        "itemsize": itemsize,
        "rank_expert_bytes": local.total_expert_nbytes,
        "model_expert_bytes": shape.total_expert_nbytes,
        "experts_per_rank": local.num_experts,
        "dispatch_s": {b: dispatch(b) for b in batches},
    }
    return result
