"""Data-parallel batch generation: every rank offloads a whole model on its own and generates a share of the prompts.

```
torchrun --nproc-per-node N script.py          (or accelerate launch; one process per rank, RANK / WORLD_SIZE set)
  every rank: from_pretrained(path, offload_config=cfg)        no distributed_config: nothing is exchanged per layer
  rank r:     prompts[rank_share(len(prompts), r, N)] -> generate_many -> its new tokens
  all ranks:  gather_outputs -> every prompt's new tokens, in the input order
  rank 0:     gather_offload_stats -> one report: each rank's offload_stats() and their sums
```
Each rank reads every expert it needs from its own disk (or the shared one) into its own cache, so N machines each
holding the checkpoint run N times the prompts; use expert parallelism (distributed.py) when a machine cannot hold its
share of the experts' bytes. The collectives go through `torch.distributed` (gloo on CPU, NCCL on GPU) and are
object collectives: the outputs and reports are small next to a forward pass. Without an initialised process group
every function acts as a world of one, so the same script runs as one plain process.
"""

from __future__ import annotations

import torch

from .batching import generate_many

__all__ = ["rank_share", "gather_outputs", "generate_many_distributed", "gather_offload_stats"]

# Per-rank figures that a sum over ranks would not mean anything for (the hit rate is recomputed from the sums).
_NOT_SUMMED = frozenset(
    {
        "hit_rate",
        "prefetch_precision",
        "prefetch_recall",
        "prefetch_precision_cold",
        "prefetch_break_even",
        "bytes_per_expert",
    }
)


def _rank_world(group=None) -> tuple[int, int]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def rank_share(n: int, rank: int, world_size: int) -> range:
    """Indices of the `n` items that `rank` of `world_size` takes: contiguous, sizes differing by at most one.

    Example:
        ```python
        >>> [list(rank_share(5, r, 2)) for r in range(2)]
        [[0, 1], [2, 3, 4]]
        ```
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank_share: expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def gather_outputs(local: list, group=None) -> list:
    """Every rank's `local` results concatenated in rank order (so in input order with `rank_share`), on all ranks."""
    _, world = _rank_world(group)
    if world == 1:
        return list(local)
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, list(local), group=group)
    return [item for part in parts for item in part]


def generate_many_distributed(model, tokenizer, prompts: list[str], group=None, **kwargs) -> list[torch.Tensor]:
    """`generate_many` over the ranks of `group`: each rank generates its `rank_share` of `prompts`.

    Args:
        model, tokenizer, prompts: as for `generate_many`; every rank passes the same `prompts`.
        group: the process group (default: the world).
        **kwargs: `batch_size`, `schedule` and `generate` arguments, as for `generate_many`.

    Returns:
        The new tokens of every prompt (1-D CPU tensors), in the input order, on every rank.

    Example:
        ```python
        # torchrun --nproc-per-node 2 batch.py
        torch.distributed.init_process_group("gloo")
        model = AutoModelForCausalLM.from_pretrained(path, offload_config={"host_budget": "8GiB"})
        outs = generate_many_distributed(model, tok, prompts, batch_size=16, max_new_tokens=64, do_sample=False)
        report = gather_offload_stats(model)  # rank 0: one dict, other ranks: None
        ```
    """
    rank, world = _rank_world(group)
    mine = [prompts[i] for i in rank_share(len(prompts), rank, world)]
    outputs, _ = generate_many(model, tokenizer, mine, **kwargs) if mine else ([], None)
    return gather_outputs(outputs, group)


def gather_offload_stats(model, group=None, dst: int = 0) -> dict | None:
    """One report of every rank's `model.offload_stats()`, on rank `dst` (None on the others).

    Returns:
        `{"world_size": N, "ranks": [stats of rank 0, ...], "total": sums over the ranks}`: `total` sums every numeric
        figure but the per-rank ratios (`hit_rate` is recomputed from the summed hits and misses).
    """
    rank, world = _rank_world(group)
    stats = model.offload_stats()
    if world == 1:
        ranks = [stats]
    else:
        ranks = [None] * world if rank == dst else None
        torch.distributed.gather_object(stats, ranks, dst=dst, group=group)
        if rank != dst:
            return None
    total: dict = {}
    for s in ranks:
        for key, value in s.items():
            if key not in _NOT_SUMMED and isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    lookups = total.get("hits", 0) + total.get("misses", 0)
    total["hit_rate"] = total.get("hits", 0) / lookups if lookups else 0.0
    return {"world_size": world, "ranks": ranks, "total": total}
