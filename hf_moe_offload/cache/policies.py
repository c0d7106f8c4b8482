"""Eviction policies behind a registry: `@register_policy("lru")`, and `replay` to measure one offline.

A policy only orders keys; the cache decides which keys may be evicted (resident, loaded, not in use) and asks the
policy to choose among them. Keys are `(layer, expert)` tuples. `replay` drives a policy with the same calls as
`ExpertCache`, without weights or threads: the hit rate a policy would get on a recorded routing
(`prefetch.trace.simulate_cache`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable

from ..registry import Registry

__all__ = [
    "EvictionPolicy",
    "register_policy",
    "make_policy",
    "list_policies",
    "LRUPolicy",
    "LFUPolicy",
    "replay",
]


class EvictionPolicy(ABC):
    """Contract: the cache calls `on_insert` when a key becomes resident, `on_access` on every use, `on_remove`
    when it leaves, and `choose_victim` with the keys it may evict (never empty)."""

    name: str = ""

    @abstractmethod
    def on_insert(self, key: Hashable) -> None: ...

    @abstractmethod
    def on_access(self, key: Hashable) -> None: ...

    @abstractmethod
    def on_remove(self, key: Hashable) -> None: ...

    @abstractmethod
    def choose_victim(self, candidates: Iterable[Hashable]) -> Hashable: ...


_POLICIES = Registry("eviction policy", "policies")
register_policy = _POLICIES.register
list_policies = _POLICIES.names


def make_policy(name: str) -> EvictionPolicy:
    """Instantiate the policy registered as `name` (`UnknownNameError` lists the valid ones)."""
    return _POLICIES.get(name)()


@register_policy("lru")
class LRUPolicy(EvictionPolicy):
    """Evict the least recently used expert."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def on_insert(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def choose_victim(self, candidates: Iterable[Hashable]) -> Hashable:
        allowed = set(candidates)
        for key in self._order:
            if key in allowed:
                return key
        return next(iter(allowed))


@register_policy("lfu")
class LFUPolicy(LRUPolicy):
    """Evict the expert used least often since the model was loaded (ties: least recently used)."""

    def __init__(self) -> None:
        super().__init__()
        self._count: Counter[Hashable] = Counter()

    def on_access(self, key: Hashable) -> None:
        self._count[key] += 1
        super().on_access(key)

    def choose_victim(self, candidates: Iterable[Hashable]) -> Hashable:
        allowed = set(candidates)
        rank = {key: i for i, key in enumerate(self._order) if key in allowed}
        return min(allowed, key=lambda k: (self._count[k], rank.get(k, -1)))


def replay(
    policy: EvictionPolicy | str, requests: Iterable[Iterable[Hashable]], capacity: int, count_from: int = 0
) -> tuple[int, int]:
    """Serve `requests` in order from a cache of `capacity` keys run by `policy`; count the hits.

    A request is the keys one call uses together (the experts of one MoE layer call), pinned until the call ends,
    as in `ExpertCache`: keys already resident are hits (`on_access`); then each missing key takes a free slot or
    evicts `choose_victim` of the resident keys the request does not use (`on_remove`), and becomes resident
    (`on_insert`, `on_access`). Duplicate keys within a request count once. The cache starts empty.

    Args:
        policy: an `EvictionPolicy` instance or a registered name (`"lru"`, `"lfu"`, ...).
        requests: per call, the keys it uses.
        capacity: keys the cache holds; at least the largest request.
        count_from: requests before this index warm the cache but are not counted (steady-state rates).

    Returns:
        `(hits, lookups)`: resident keys found, and keys requested (distinct per request), over the counted requests.

    Raises:
        ValueError: when `capacity < 1` or a request uses more than `capacity` distinct keys.

    Example:
        ```python
        >>> replay("lru", [[0, 1], [1, 2], [2, 0]], capacity=2)  # hit 1, evict 0, hit 2, evict 1
        (2, 6)
        ```
    """
    if capacity < 1:
        raise ValueError(f"replay: capacity must be at least 1, got {capacity}")
    policy = make_policy(policy) if isinstance(policy, str) else policy
    resident: set[Hashable] = set()
    hits = lookups = 0
    for i, request in enumerate(requests):
        keys = list(dict.fromkeys(request))
        if len(keys) > capacity:
            raise ValueError(
                f"replay: request {i} uses {len(keys)} keys but the cache holds {capacity}; a call's keys must fit "
                f"together: raise capacity to at least {len(keys)}"
            )
        used, missing = set(keys), [k for k in keys if k not in resident]
        for key in keys:
            if key in resident:
                policy.on_access(key)
        for key in missing:
            if len(resident) >= capacity:
                victim = policy.choose_victim([k for k in resident if k not in used])
                resident.remove(victim)
                policy.on_remove(victim)
            resident.add(key)
            policy.on_insert(key)
            policy.on_access(key)
        if i >= count_from:
            hits += len(keys) - len(missing)
            lookups += len(keys)
    return hits, lookups
