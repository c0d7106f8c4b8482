"""Eviction policies behind a registry: `@register_policy("lru")`.

A policy only orders keys; the cache decides which keys may be evicted (resident, loaded, not in use) and asks the
policy to choose among them. Keys are `(layer, expert)` tuples.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable

from ..registry import Registry

__all__ = ["EvictionPolicy", "register_policy", "make_policy", "list_policies", "LRUPolicy", "LFUPolicy"]


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
