"""Counters that `model.offload_stats()` reports. Updated under the cache lock; read as a snapshot dict."""

from __future__ import annotations

import threading
from collections import defaultdict

__all__ = ["OffloadStats"]

_COUNTERS = (
    "hits",  # expert found ready in the compute tier
    "misses",  # expert had to be loaded into the compute tier
    "host_hits",  # (CUDA) a device miss served from the host tier
    "evictions",  # experts dropped from any tier to make room
    "bytes_loaded",  # bytes read from the checkpoint files
    "bytes_loaded_full_precision",  # (mixed_precision) of those, the ones the full-precision tier read
    "bytes_h2d",  # bytes copied host -> device
    "loads",  # completed loads into the compute tier
    "load_errors",
    "demand_loads",  # loads a forward had to start itself (the expert was neither resident nor being prefetched)
    "prefetch_issued",  # speculative loads queued
    "prefetch_used",  # speculative loads that a computation then used
    "prefetch_wasted",  # speculative loads dropped without being used (cancelled or evicted)
    "prefetch_wasted_bytes",  # bytes read for prefetches never used
    "prefetch_cancelled",  # speculative loads cancelled before they started
    "tokens_generated",  # tokens generate() produced (one per sequence and step)
    "low_precision_computes",  # (mixed_precision) experts computed from their quantized copy
)


class OffloadStats:
    """Thread-safe counters plus per-layer hits/misses and accumulated stall time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._c = dict.fromkeys(_COUNTERS, 0)
            self._stall = 0.0
            self._load_seconds = 0.0
            self._layer_hits: dict[int, int] = defaultdict(int)
            self._layer_misses: dict[int, int] = defaultdict(int)
            self._forward_calls = 0

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] += n

    def hit(self, layer: int) -> None:
        with self._lock:
            self._c["hits"] += 1
            self._layer_hits[layer] += 1

    def miss(self, layer: int) -> None:
        with self._lock:
            self._c["misses"] += 1
            self._layer_misses[layer] += 1

    def stall(self, seconds: float) -> None:
        with self._lock:
            self._stall += seconds

    def load_time(self, seconds: float) -> None:
        with self._lock:
            self._load_seconds += seconds

    def forward(self) -> None:
        with self._lock:
            self._forward_calls += 1

    def hit_rate(self) -> float:
        """Hits / (hits + misses) so far, 0.0 before any access (cheaper than a full `snapshot`)."""
        with self._lock:
            total = self._c["hits"] + self._c["misses"]
            return self._c["hits"] / total if total else 0.0

    def stall_seconds(self) -> float:
        """Seconds the forward waited for experts so far (cheaper than a full `snapshot`)."""
        with self._lock:
            return self._stall

    def mean_load_seconds(self) -> float | None:
        """Average seconds one expert load took so far; None before the first load completed."""
        with self._lock:
            return self._load_seconds / self._c["loads"] if self._c["loads"] else None

    def snapshot(self) -> dict:
        with self._lock:
            out = dict(self._c)
            total = out["hits"] + out["misses"]
            out["hit_rate"] = out["hits"] / total if total else 0.0
            out["stall_seconds"] = self._stall
            out["load_seconds"] = self._load_seconds
            out["moe_forward_calls"] = self._forward_calls
            layers = sorted(set(self._layer_hits) | set(self._layer_misses))
            out["per_layer"] = {
                layer: {"hits": self._layer_hits[layer], "misses": self._layer_misses[layer]} for layer in layers
            }
            return out
