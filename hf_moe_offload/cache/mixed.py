"""Mixed precision on a miss: full-precision experts where they matter, quantized ones for the rest.

```
expert e of this layer call, importance w_e = its largest routing weight over the call's tokens
    resident at full precision            -> full  (costs nothing)
    w_e >= threshold                      -> full  (a miss reads the checkpoint's dense bytes)
    otherwise                             -> low   (resident, or a miss reads the packed bytes: 2-3.6x fewer)
```
Two `ExpertCache`s share one `OffloadStats`: `full` holds dense slots, `low` packed ones (int8 / int4). The
prefetcher works on `low` (a speculative load is cheap there). `for_call` gives the expert loop
(`execution.run_experts`) a view that routes each key to its tier and counts `low_precision_computes`.
"""

from __future__ import annotations

from .entries import Key, Lease
from .expert_cache import ExpertCache

__all__ = ["MixedPrecisionCaches"]


class _CallView:
    """The two caches as one, for one layer call whose per-expert importance is known."""

    def __init__(self, caches: MixedPrecisionCaches, importance: dict[int, float]):
        self._c, self._importance = caches, importance
        self.stats, self.timeline = caches.low.stats, caches.low.timeline

    def _full(self, key: Key) -> bool:
        if self._c.full.is_resident(key):
            return True
        return self._importance.get(key[1], 0.0) >= self._c.threshold

    def _count(self, key: Key, lease: Lease | None) -> Lease | None:
        if lease is not None and lease._cache is self._c.low:
            self.stats.add("low_precision_computes")
        return lease

    def acquire_resident(self, key: Key) -> Lease | None:
        cache = self._c.full if self._full(key) else self._c.low
        return self._count(key, cache.acquire_resident(key))

    def try_acquire(self, key: Key) -> Lease | None:
        cache = self._c.full if self._full(key) else self._c.low
        return self._count(key, cache.try_acquire(key))

    def acquire(self, key: Key, timeout: float | None = None) -> Lease:
        cache = self._c.full if self._full(key) else self._c.low
        return self._count(key, cache.acquire(key, timeout))


class MixedPrecisionCaches:
    """A full-precision cache and a quantized one, chosen per expert by routing weight.

    Args:
        full: the cache of dense experts.
        low: the cache of quantized experts (sharing `full`'s `OffloadStats`).
        threshold: routing weight at or above which a missing expert is loaded at full precision.
    """

    def __init__(self, full: ExpertCache, low: ExpertCache, threshold: float):
        if full.stats is not low.stats:
            raise ValueError("MixedPrecisionCaches: both caches must share one OffloadStats")
        self.full, self.low, self.threshold = full, low, threshold

    def for_call(self, importance: dict[int, float]) -> _CallView:
        """The view the expert loop uses for one layer call; `importance` maps expert id -> largest routing weight."""
        return _CallView(self, importance)

    def memory(self) -> dict[str, int]:
        full, low = self.full.memory(), self.low.memory()
        return {
            "host_slots": low["host_slots"],
            "host_allocated_bytes": low["host_allocated_bytes"] + full["host_allocated_bytes"],
            "full_precision_slots": full["host_slots"],
        }

    def close(self) -> None:
        self.full.close()
        self.low.close()
