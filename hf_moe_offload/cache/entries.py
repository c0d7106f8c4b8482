"""The expert cache's bookkeeping: one `Entry` per expert in a tier, the `Tier` that holds them, and `Lease`.

```
Tier = SlotPool (fixed-size slots) + EvictionPolicy + {(layer, expert): Entry}
Entry: slot, pins, future (done = loaded or failed), speculative / used, loader job state
Lease: one pin on an Entry of the compute tier -> wait() -> {weight name: tensor view of the slot}
```
An entry is evictable when nothing pins it and its load is done; a speculative entry whose job is still queued can
be cancelled instead. These are plain records: `ExpertCache` (expert_cache.py) changes them, under its lock, and
`PriorityLoader` (loader.py) owns the `job_state`, `priority` and `deadline` fields.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch

from ..storage import slot_views
from .loader import QUEUED
from .policies import EvictionPolicy
from .slots import SlotPool

if TYPE_CHECKING:
    from .expert_cache import ExpertCache

__all__ = ["Key", "Entry", "Tier", "Lease"]

Key = tuple[int, int]


class Entry:
    """One expert in one tier: its slot, its pins and the future of its load."""

    __slots__ = (
        "key",
        "slot",
        "pins",
        "future",
        "event",
        "speculative",
        "used",
        "job_state",
        "priority",
        "deadline",
        "last_used",
        "abandoned",
    )

    def __init__(self, key: Key, slot: int, speculative: bool = False):
        self.key, self.slot, self.pins = key, slot, 0
        self.future: Future = Future()
        self.event = None
        self.speculative, self.used = speculative, False
        self.job_state, self.priority, self.deadline = None, 0, None
        self.last_used = 0
        self.abandoned = False  # timed out while its read ran: the slot is freed when the read returns

    @property
    def loaded(self) -> bool:
        """The load finished without an error (what `ExpertCache.resident` / `is_resident` report)."""
        return self.future.done() and self.future.exception() is None


class Tier:
    """A slot pool, its eviction policy and the entries that occupy its slots."""

    def __init__(self, pool: SlotPool, policy: EvictionPolicy):
        self.pool, self.policy = pool, policy
        self.entries: dict[Key, Entry] = {}

    def evictable(self, protected: frozenset = frozenset()) -> list[Key]:
        return [k for k, e in self.entries.items() if e.pins == 0 and e.future.done() and k not in protected]

    def cancellable(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.pins == 0 and e.speculative and e.job_state == QUEUED]

    def can_reserve(self, protected: frozenset = frozenset(), demand: bool = True) -> bool:
        if self.pool.num_free > 0 or self.evictable(protected):
            return True
        return demand and bool(self.evictable() or self.cancellable())


class Lease:
    """A pin on one expert in the compute tier: `wait()` returns its weights, `release()` unpins it."""

    def __init__(self, cache: ExpertCache, entry: Entry, hit: bool):
        self._cache, self._entry, self.hit = cache, entry, hit
        self._released = False

    @property
    def key(self) -> Key:
        return self._entry.key

    @property
    def future(self) -> Future:
        return self._entry.future

    def ready(self) -> bool:
        return self._entry.future.done()

    def wait(self) -> dict[str, torch.Tensor]:
        """Block until loaded (the time counts as stall), then return `{weight name: per-expert tensor}`."""
        fut = self._entry.future
        if not fut.done():
            t0 = time.perf_counter()
            fut.result()
            self._cache.stats.stall(time.perf_counter() - t0)
        else:
            fut.result()  # re-raise a failed load
        if self._entry.event is not None:
            torch.cuda.current_stream(self._cache.device).wait_event(self._entry.event)
        layer = self._entry.key[0]
        return slot_views(self._cache.compute.pool.buffer(self._entry.slot), self._cache.layout, layer)

    def release(self) -> None:
        if not self._released:
            self._released = True
            cache = self._cache
            if cache.device.type == "cuda":  # kernels reading this slot may still be queued on the compute stream
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(cache.device))
                cache.compute.pool.release_events[self._entry.slot] = event
            cache._unpin(cache.compute, self._entry)
