"""Expert-parallel offloading: under transformers' `DistributedConfig`, each rank offloads only the experts it owns.

transformers 5.23 runs expert parallelism (EP) as follows (`transformers/distributed/expert_parallel.py`):

```
ranks laid out row-major on the expert mesh (pp, dp_replicate, efsdp, ep): ep rank = global rank % ep_size
rank r owns experts [r * E / ep_size, (r + 1) * E / ep_size) of every MoE layer (`grouped_gemm` = Shard(0))
[Router] every rank routes its own tokens over all E experts (global ids)
   -> [Dispatch] AllReduceEP (the EP group shares one batch: ep_size == tp_size, at inference): every rank keeps
                 the whole batch, ids of other ranks' experts become the sentinel E_local with weight 0
                 AllToAllEP (otherwise, e.g. fsdp_size=2, ep_size=2): each (token, expert) pair goes to its owner
                 with an all-to-all; the owner gets local ids (top-1, unit weights)
   -> [Experts]  experts.forward(hidden, local ids, weights): our `hf_moe_offload` forward, ids >= E_local dropped
   -> [Combine]  all-reduce of the partial outputs, or the reverse all-to-all and the weighted sum on the sender
```
The experts module's `num_experts` is what transformers turns into the local count and the sentinel, and it does
so only while sharding the expert Parameters, which an offloaded load has already taken out. So the registration
hook of the load sets it instead (`localize_experts`), and everything the engine plans works in the rank's *local*
expert ids `0 .. E_local - 1`: the topology (`shard_topology`: local counts, routers seen through the owned columns
for look-ahead prediction), the byte layout (`shard_layout`: local id i reads global expert `start + i`), so the
budgets, slots, prefetches and statistics are the rank's own and a rank never reads another rank's expert bytes.

What cannot run yet is refused before anything loads, with `UnsupportedParallelismError`: tensor parallelism of the
experts (`tp_size > 1` without `ep_size`), pipeline parallelism (`pp_size > 1`) and DeepGEMM Mega MoE dispatch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..adapters import MoETopology, describe_model
from ..errors import OffloadStateError, UnsupportedParallelismError
from ..prefetch import load_correlation_tables
from ..scheduling.expert_parallel import check_divides
from ..storage import ExpertLayout

__all__ = [
    "ExpertShard",
    "expert_shard",
    "rank_device",
    "shard_topology",
    "shard_layout",
    "shard_correlation",
    "localize_experts",
    "local_topology",
]

_REFUSED_KWARGS = ("tp_plan", "tp_size", "device_mesh")
_WORKS = (
    "offloading runs with DistributedConfig(ep_size=N, fsdp_size=N) (experts split over the ranks, dense part "
    "FSDP-sharded), DistributedConfig(ep_size=N, tp_size=N) (experts split, dense part tensor-parallel), or with no "
    "distributed_config, one process per rank on its own (data parallel, see docs/distributed.md)"
)


@dataclass(frozen=True)
class ExpertShard:
    """The experts one rank owns under expert parallelism.

    Attributes:
        rank: the rank's index in its expert-parallel group (`global rank % size`).
        size: `ep_size`, the ranks that split the experts of every MoE layer between them.
    """

    rank: int
    size: int

    def owned(self, num_experts: int) -> range:
        """Global ids of this rank's experts in a layer of `num_experts` (contiguous, as `Shard(0)` splits them)."""
        per_rank = num_experts // self.size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)


def _refuse(setting: str, why: str) -> None:
    raise UnsupportedParallelismError(f"offload_config= with {setting}: {why}. Instead, {_WORKS}")


def expert_shard(kwargs: dict) -> ExpertShard | None:
    """The shard this process owns from `from_pretrained`'s `distributed_config=`, or None without expert parallelism.

    Args:
        kwargs: the `from_pretrained` keyword arguments.

    Raises:
        UnsupportedParallelismError: a layout offloading cannot run under yet (experts split by tensor parallelism,
            pipeline parallelism, Mega MoE dispatch), or a process not started by a launcher (no `RANK`).
    """
    for name in _REFUSED_KWARGS:
        if kwargs.get(name) is not None:
            _refuse(f"{name}={kwargs[name]!r}", "tensor parallelism would split every expert across the ranks")
    dc = kwargs.get("distributed_config")
    if dc is None:
        return None
    if isinstance(dc, dict):
        from transformers.distributed import DistributedConfig

        dc = DistributedConfig.from_dict(dc)
    if dc.pp_size > 1:
        _refuse(f"pp_size={dc.pp_size}", "pipeline parallelism is not supported with offloaded experts yet")
    if dc.ep_size == 1 and dc.tp_size > 1:
        _refuse(
            f"tp_size={dc.tp_size} and ep_size=1",
            "tensor parallelism splits every expert's weights across the ranks, which offloaded experts do not "
            "support yet",
        )
    if dc.ep_implementation == "deepgemm_megamoe":
        _refuse("ep_implementation='deepgemm_megamoe'", "Mega MoE computes the experts inside its own kernel")
    if dc.ep_size == 1:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
    elif "RANK" in os.environ:
        rank = int(os.environ["RANK"])
    else:
        _refuse(
            f"ep_size={dc.ep_size}",
            "this process has no rank: start one process per rank with `torchrun --nproc-per-node N script.py` "
            "(or `accelerate launch`), which sets RANK and WORLD_SIZE",
        )
    return ExpertShard(rank=rank % dc.ep_size, size=dc.ep_size)


def _single_device(device_map) -> torch.device | None:
    """The one device a `device_map` names (`"cuda:1"`, `1`, `{"": "cuda:1"}`), or None."""
    targets = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
    if len(targets) != 1:
        return None
    (target,) = targets
    try:
        return torch.device("cuda", target) if isinstance(target, int) else torch.device(target)
    except (RuntimeError, TypeError):  # "auto", "disk", None: no single device
        return None


def rank_device(device: torch.device, kwargs: dict) -> torch.device:
    """The accelerator this process computes experts on when `device` names none (`"cuda"`): the one `device_map`
    names (an evaluation harness places each data-parallel rank so), else, in a job of several processes
    (`distributed_config`, or `WORLD_SIZE > 1` under torchrun / accelerate launch), the one of `LOCAL_RANK`, as
    transformers binds it; a CPU device or an explicit index is kept."""
    if device.type == "cpu" or device.index is not None:
        return device
    named = _single_device(kwargs.get("device_map"))
    if named is not None and named.type == device.type:
        return named
    if kwargs.get("distributed_config") is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device(device.type, int(os.environ.get("LOCAL_RANK", "0")))
    return device


class _OwnedColumns:
    """A router seen through the logit columns of one rank's experts, so look-ahead predicts local ids."""

    def __init__(self, router: nn.Module, owned: range):
        self.router, self.owned = router, owned

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        res = getattr(self.router, "forward", self.router)(hidden)
        logits = res[0] if isinstance(res, tuple) else res
        return logits[..., self.owned.start : self.owned.stop]

    __call__ = forward


def _check_divisible(topology: MoETopology, shard: ExpertShard) -> None:
    check_divides(shard.size, {f"{layer.layer} ({layer.module_name})": layer.num_experts for layer in topology.layers})


def shard_topology(topology: MoETopology, shard: ExpertShard | None) -> MoETopology:
    """`topology` as one rank sees it: each layer's local expert count, routers restricted to the owned columns.

    Raises:
        UnsupportedParallelismError: `shard.size` does not divide a layer's expert count.
    """
    if shard is None:
        return topology
    _check_divisible(topology, shard)
    layers = []
    for layer in topology.layers:
        owned = shard.owned(layer.num_experts)
        router = _OwnedColumns(layer.router, owned) if layer.router is not None else None
        layers.append(dataclasses.replace(layer, num_experts=len(owned), router=router))
    return dataclasses.replace(topology, layers=layers)


def shard_layout(layout: ExpertLayout, topology: MoETopology, shard: ExpertShard | None) -> ExpertLayout:
    """The byte ranges of one rank's experts under local ids: local expert i of a layer reads global `start + i`.

    Args:
        layout: the checkpoint's full layout (global ids).
        topology: the full topology (global expert counts) `layout` was built from.
        shard: the rank's shard; None returns `layout`.
    """
    if shard is None:
        return layout
    _check_divisible(topology, shard)
    pieces = {}
    for layer in topology.layers:
        for i, e in enumerate(shard.owned(layer.num_experts)):
            pieces[(layer.layer, i)] = layout.pieces[(layer.layer, e)]
    return dataclasses.replace(layout, pieces=pieces)


def shard_correlation(path: str, num_experts: list[int], shard: ExpertShard | None) -> list[np.ndarray]:
    """The saved correlation tables (learned by one process, over every expert) restricted to this rank's experts:
    table l, `(E_l, E_{l+1})` counts, keeps the rows and columns of the owned experts.

    Args:
        path: the side file.
        num_experts: the experts of each MoE layer this rank sees (its local counts under `shard`).
        shard: the rank's shard; None reads the tables as they are.
    """
    if shard is None:
        return load_correlation_tables(path, num_experts)
    tables = load_correlation_tables(path, [n * shard.size for n in num_experts])
    out = []
    for table, rows, cols in zip(tables, num_experts, num_experts[1:]):
        r, c = shard.owned(rows * shard.size), shard.owned(cols * shard.size)
        out.append(np.ascontiguousarray(table[r.start : r.stop, c.start : c.stop]))
    return out


def localize_experts(module: nn.Module, shard: ExpertShard | None) -> None:
    """Give an experts module, as it is built, the local expert count transformers' EP dispatch reads.

    transformers sets `num_experts` to the local count while it shards the expert Parameters (`MoEParamShard`); an
    offloaded module has none left to shard, so this does it at registration, before the model is distributed.
    """
    if shard is None or not isinstance(getattr(module, "num_experts", None), int):
        return
    module.num_experts = module.num_experts // shard.size
    module._is_expert_parallel = True


def local_topology(model: nn.Module, shard: ExpertShard | None) -> MoETopology:
    """The loaded model's topology in this rank's local expert ids, checked against the mesh transformers built.

    Raises:
        OffloadStateError: the experts modules or the expert-parallel rank differ from what was planned.
    """
    topology = describe_model(model)
    if shard is None:
        return topology
    mesh_manager = getattr(model, "_mesh_manager", None)
    if mesh_manager is None:
        raise OffloadStateError(
            f"expert parallelism (ep_size={shard.size}) was planned but the model has no device mesh; this is a bug, "
            f"please report it"
        )
    ep_rank = mesh_manager.get_mesh("ep").get_local_rank()
    if ep_rank != shard.rank:
        raise OffloadStateError(
            f"expert-parallel rank {ep_rank} of the loaded model differs from the planned {shard.rank}; this is a "
            f"bug, please report it"
        )
    local = shard_topology(topology, shard)
    for full, layer in zip(topology.layers, local.layers):
        got = getattr(layer.module, "num_experts", None)
        if got != layer.num_experts:
            raise OffloadStateError(
                f"{layer.module_name}.num_experts is {got}, expected the {layer.num_experts} local experts of "
                f"{full.num_experts}: its experts were built outside the offloaded load's reach, so transformers' "
                f"expert-parallel dispatch would send it wrong ids; this is a bug, please report it"
            )
    return local
