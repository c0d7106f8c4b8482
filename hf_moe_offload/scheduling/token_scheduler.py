r"""Token scheduler (ExpertFlow): put sequences that use the same experts in the same batch.

```
N sequences --router of the first MoE layer(s) on their prompts--> signatures (N, E) or (N, L, E) counts
            --> used = counts > 0 --> greedy grouping: seed = the sequence using most experts,
                                      then add the one adding fewest new experts (ties: most shared, lowest index)
            --> pairwise swaps between groups while they lower the total of distinct experts
            --> TokenSchedule: permutation, groups of <= G, distinct experts per group before / after
```
Each batch of a regrouped workload loads fewer distinct experts per step than the input order would, so more of a
batch's expert loads are shared (the engine loads each expert once per layer call, whatever its token count).
Groups have the same sizes as consecutive chunks of the input (all `G`, the last one shorter), so before and after
are compared at equal batch sizes. Everything is deterministic. The signature helper takes the router as a
callable (pure torch), so it works with any model family without importing transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["TokenSchedule", "group_sequences", "distinct_per_group", "routing_signature"]

_SWAP_WORK_LIMIT = 5 * 10**8  # element operations the swap refinement may spend


@dataclass
class TokenSchedule:
    """How to reorder a workload.

    Attributes:
        permutation: `permutation[i]` is the original index of the sequence placed at position `i`.
        groups: the original indices in each batch (consecutive slices of `permutation`).
        distinct_before: distinct experts (summed over layers) of each consecutive chunk of the input order.
        distinct_after: distinct experts of each group.
    """

    permutation: list[int]
    groups: list[list[int]]
    distinct_before: list[int]
    distinct_after: list[int]

    @property
    def reduction(self) -> float:
        """Relative drop of the total distinct experts (0.25 = a quarter fewer expert loads per step)."""
        before = sum(self.distinct_before)
        return 1.0 - sum(self.distinct_after) / before if before else 0.0

    def reorder(self, items: Sequence[Any]) -> list[Any]:
        """`items` (prompts, requests) in the scheduled order."""
        return [items[i] for i in self.permutation]

    def batches(self, items: Sequence[Any]) -> list[list[Any]]:
        """`items` split into the scheduled batches."""
        return [[items[i] for i in g] for g in self.groups]

    def to_dict(self) -> dict[str, Any]:
        return {
            "permutation": self.permutation,
            "groups": self.groups,
            "distinct_before": self.distinct_before,
            "distinct_after": self.distinct_after,
            "reduction": self.reduction,
        }


def _used(signatures) -> np.ndarray:
    sig = signatures.detach().cpu().numpy() if isinstance(signatures, torch.Tensor) else np.asarray(signatures)
    if sig.ndim not in (2, 3):
        raise ValueError(f"signatures: expected (N, E) or (N, L, E) expert counts, got shape {sig.shape}")
    return sig.reshape(sig.shape[0], -1) > 0


def distinct_per_group(signatures, groups: Sequence[Sequence[int]]) -> list[int]:
    """Distinct experts (summed over layers) that each group of sequences activates."""
    used = _used(signatures)
    return [int(used[list(g)].any(axis=0).sum()) if len(g) else 0 for g in groups]


def _greedy(used: np.ndarray, sizes: list[int]) -> list[list[int]]:
    weight = used.sum(axis=1)
    left = np.ones(len(used), dtype=bool)
    groups = []
    for size in sizes:
        idx = np.flatnonzero(left)
        seed = int(idx[np.argmax(weight[idx])])  # argmax keeps the lowest index among ties
        group, union = [seed], used[seed].copy()
        left[seed] = False
        while len(group) < size:
            idx = np.flatnonzero(left)
            new = (used[idx] & ~union).sum(axis=1)
            shared = (used[idx] & union).sum(axis=1)
            pick = int(idx[np.lexsort((idx, -shared, new))[0]])
            group.append(pick)
            union |= used[pick]
            left[pick] = False
        groups.append(group)
    return groups


def _refine(used: np.ndarray, groups: list[list[int]], max_passes: int) -> None:
    """Swap members between pairs of groups while a swap lowers the two groups' distinct experts."""
    u = used.astype(np.int32)
    counts = [u[g].sum(axis=0) for g in groups]
    for _ in range(max_passes):
        improved = False
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                ga, gb = groups[a], groups[b]
                for i_pos in range(len(ga)):
                    ui = u[ga[i_pos]]
                    base = (counts[a] > 0).sum() + (counts[b] > 0).sum()
                    uj = u[gb]  # (|b|, M): swap member i of a with each member j of b
                    new_a = ((counts[a] - ui)[None, :] + uj > 0).sum(axis=1)
                    new_b = ((counts[b] + ui)[None, :] - uj > 0).sum(axis=1)
                    delta = new_a + new_b - base
                    j_pos = int(np.argmin(delta))
                    if delta[j_pos] < 0:
                        j = gb[j_pos]
                        counts[a] += u[j] - ui
                        counts[b] += ui - u[j]
                        ga[i_pos], gb[j_pos] = j, ga[i_pos]
                        improved = True
        if not improved:
            return


def group_sequences(signatures, group_size: int, *, refine: bool = True, max_passes: int = 4) -> TokenSchedule:
    """Group sequences into batches of at most `group_size` that each activate few distinct experts.

    Args:
        signatures: `(N, E)` or `(N, L, E)` counts of each sequence's tokens per expert (only `> 0` matters), e.g.
            from `routing_signature` on the prompts or from a prefill routing trace.
        group_size: the batch size G.
        refine: improve the greedy grouping by pairwise swaps (skipped when it would cost too much).
        max_passes: swap passes over all pairs of groups.

    Returns:
        A `TokenSchedule` (a permutation of `range(N)` and its groups).

    Example:
        ```python
        >>> sched = group_sequences(routing_signature(router, hidden, num_experts=8, top_k=2), group_size=16)
        >>> for batch in sched.batches(prompts):
        ...     model.generate(**tok(batch, return_tensors="pt", padding=True))
        ```
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
    used = _used(signatures)
    n = len(used)
    chunks = [list(range(s, min(s + group_size, n))) for s in range(0, n, group_size)]
    groups = _greedy(used, [len(c) for c in chunks]) if n else []
    work = len(groups) ** 2 * group_size**2 * used.shape[1] * max_passes
    if refine and len(groups) > 1 and work <= _SWAP_WORK_LIMIT:
        _refine(used, groups, max_passes)
    groups = [sorted(g) for g in groups]
    groups.sort(key=lambda g: g[0])
    return TokenSchedule(
        permutation=[i for g in groups for i in g],
        groups=groups,
        distinct_before=distinct_per_group(used, chunks),
        distinct_after=distinct_per_group(used, groups),
    )


def routing_signature(
    router_fn: Callable[[torch.Tensor], Any],
    hidden: torch.Tensor | Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(N, E)` int64 counts of the experts each sequence's tokens are routed to by `router_fn`.

    Args:
        router_fn: `x (T, H) -> logits (T, E)`, or a tuple whose last item is `top_k_index (T, k)` (what
            transformers' routers return: `(logits, weights, indices)`).
        hidden: `(N, T, H)` hidden states entering the MoE layer, or a list of `(T_i, H)`.
        num_experts: E.
        top_k: k (used when the router returns logits).
        attention_mask: `(N, T)`, 0 for padding tokens (ignored ones); only with a 3-D `hidden`.
    """
    rows = []
    for i, x in enumerate(hidden):
        if attention_mask is not None:
            x = x[attention_mask[i].bool()]
        with torch.no_grad():
            out = router_fn(x)
        index = out[-1] if isinstance(out, (tuple, list)) else torch.topk(out, top_k, dim=-1).indices
        index = index.reshape(-1)
        rows.append(torch.bincount(index[(index >= 0) & (index < num_experts)].cpu(), minlength=num_experts))
    return torch.stack(rows) if rows else torch.zeros(0, num_experts, dtype=torch.int64)
