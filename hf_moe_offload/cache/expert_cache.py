"""One expert cache shared by every MoE layer of a model.

```
 checkpoint files --pread--> [host tier: pinned slots] --copy stream--> [device tier: slots]   (CUDA)
 checkpoint files --pread--> [host tier: slots]                                                 (CPU only)
```
All experts of a model have the same size, so each tier is a pool of fixed-size slots (allocated on first use,
never more than the budget allows): no fragmentation, and moving an expert is one contiguous copy. The compute
tier is the device tier when CUDA is used, the host tier otherwise. An expert in use (pinned by a `Lease`) or still
loading is never evicted; among the rest the eviction policy chooses. Weights are read-only, so an evicted expert
is dropped, never written back. Loads run on a thread pool; on CUDA the host->device copy runs on a side stream
and the compute stream waits on its event, so the compute thread never blocks on a copy. The per-expert records
(`Entry`, `Tier`, `Lease`) are in entries.py; this module decides, under one lock, what they hold.

Prefetching (`prefetch`) reserves a slot and queues a *speculative* load behind every demand load
(`PriorityLoader`); it never evicts a pinned, loading or *protected* expert (those predicted for the current or
next layer), nor one used during the last decode step (`keep_recent` layer calls): when the cache is no bigger
than a step's working set, wrong predictions would otherwise evict experts the next step reuses, and the cache
would thrash. A demand request for a queued speculative load promotes it; a wrong one is cancelled before it
starts (`cancel_speculative`). Counters tell prefetches used from prefetches wasted.

A load that fails (`ExpertLoadError`, `CheckpointChangedError` from the store) frees its slot and forgets the
expert, so a later request reads it again; the error reaches every caller waiting on it. No caller waits longer
than `load_timeout` for one expert: the loader's watchdog fails a load that is not done by then with
`ExpertLoadTimeoutError`, forgets the expert and, since a blocked read cannot be interrupted, keeps its slot out of
the pool until the read returns (then frees it), so no two reads ever share a slot.
"""

from __future__ import annotations

import threading
import time

import torch

from ..errors import ExpertLoadTimeoutError
from ..storage import ExpertStore
from .entries import Entry, Key, Lease, Tier
from .loader import QUEUED, PriorityLoader
from .slots import SlotPool
from .stats import OffloadStats
from .timeline import Timeline

__all__ = ["ExpertCache", "DEFAULT_LOAD_TIMEOUT"]

DEFAULT_LOAD_TIMEOUT = 600.0  # seconds; reading one expert takes milliseconds, a stalled disk or mount forever


class ExpertCache:
    """The shared cache.

    Args:
        store: reads experts from the checkpoint.
        device: where experts are computed (`cpu` or a CUDA device).
        host_slots: experts held in host RAM (pinned when `device` is CUDA).
        device_slots: experts held on the CUDA device (ignored on CPU).
        policy_factory: makes one eviction policy per tier.
        io_threads: loader threads.
        stats: counters to update.
        load_timeout: seconds a caller waits for one expert (its read, or a free slot) before
            `ExpertLoadTimeoutError`; None waits forever. Settable later as `cache.load_timeout`.
        bytes_counter: an `OffloadStats` counter that also receives this cache's bytes read (beside
            `bytes_loaded`): mixed precision's full-precision cache counts into `bytes_loaded_full_precision`.
    """

    def __init__(
        self,
        store: ExpertStore,
        *,
        device: torch.device,
        host_slots: int,
        device_slots: int,
        policy_factory,
        io_threads: int,
        stats: OffloadStats,
        load_timeout: float | None = DEFAULT_LOAD_TIMEOUT,
        bytes_counter: str | None = None,
    ):
        self.store, self.layout, self.device, self.stats = store, store.layout, device, stats
        self._bytes_counters = ("bytes_loaded",) + ((bytes_counter,) if bytes_counter else ())
        self._lock = threading.Condition()
        cuda = device.type == "cuda"
        nbytes = self.layout.slot_nbytes
        self.host = Tier(SlotPool("host", host_slots, nbytes, torch.device("cpu"), pin_memory=cuda), policy_factory())
        if cuda:
            self.compute = Tier(SlotPool("device", device_slots, nbytes, device), policy_factory())
            self._copy_stream = torch.cuda.Stream(device)
            self._staging = threading.local()
        else:
            self.compute = self.host
        self.timeline = Timeline()
        self._tick = 0  # MoE layer calls so far (`advance_tick`); ages experts for speculative eviction
        self._recent_window = 0  # speculative loads never evict experts used within this many layer calls
        self._loader = PriorityLoader(io_threads, self._load, on_timeout=self._timed_out)
        self.load_timeout = load_timeout
        self._protected: frozenset = frozenset()
        self._closed = False

    # -- queries -------------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Experts the compute tier holds at once."""
        return self.compute.pool.n_slots

    def resident(self) -> set[Key]:
        """The experts loaded in the compute tier (not those still loading or failed)."""
        with self._lock:
            return {k for k, e in self.compute.entries.items() if e.loaded}

    def is_resident(self, key: Key) -> bool:
        """`key in self.resident()` without building the set: one lookup, for per-expert checks on the hot path."""
        with self._lock:
            e = self.compute.entries.get(key)
            return e is not None and e.loaded

    @property
    def load_timeout(self) -> float | None:
        """Seconds a caller waits for one expert before `ExpertLoadTimeoutError` (None: no bound); a new value
        applies to loads requested after it is set."""
        return self._loader.timeout

    @load_timeout.setter
    def load_timeout(self, seconds: float | None) -> None:
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0):
            raise ValueError(f"load_timeout: expected a positive number of seconds or None, got {seconds!r}")
        self._loader.timeout = None if seconds is None else float(seconds)

    def memory(self) -> dict[str, int]:
        out = {"host_slots": self.host.pool.n_slots, "host_allocated_bytes": self.host.pool.allocated_bytes}
        if self.compute is not self.host:
            out.update(device_slots=self.compute.pool.n_slots, device_allocated_bytes=self.compute.pool.allocated_bytes)
        return out

    # -- the prefetcher's controls ---------------------------------------------------------------------------------
    def advance_tick(self) -> None:
        """One MoE layer call started: ages every expert by one tick (for `keep_recent`)."""
        with self._lock:
            self._tick += 1

    def keep_recent(self, ticks: int) -> None:
        """Speculative loads never evict an expert used within the last `ticks` layer calls (e.g. one decode step)."""
        if isinstance(ticks, bool) or not isinstance(ticks, int) or ticks < 0:
            raise ValueError(f"keep_recent: expected a non-negative int, got {ticks!r}")
        with self._lock:
            self._recent_window = ticks

    # -- acquiring -----------------------------------------------------------------------------------------------
    def acquire_resident(self, key: Key) -> Lease | None:
        """Pin `key` if it is already in the compute tier (ready or loading); None otherwise."""
        with self._lock:
            e = self.compute.entries.get(key)
            if e is None:
                return None
            hit = e.future.done()
            self._pin(self.compute, e, hit)
            if e.speculative and not e.used:
                e.used = True
                self.stats.add("prefetch_used")
                if e.job_state == QUEUED:
                    self._loader.promote(e)
            return Lease(self, e, hit)

    def try_acquire(self, key: Key) -> Lease | None:
        """Pin `key`, starting its load if needed; None when no slot can be freed right now."""
        with self._lock:
            lease = self.acquire_resident(key)
            if lease is not None:
                return lease
            if not self.compute.can_reserve():
                return None
            e = self._reserve(self.compute, key)
            if e is None:
                return None
            self._pin(self.compute, e, hit=False)
            self._loader.submit(e, 0)
            self.stats.add("demand_loads")
        return Lease(self, e, hit=False)

    def prefetch(self, key: Key, priority: int = 1, evict: bool = True) -> bool:
        """Start a speculative load of `key` into a free slot, or in place of an expert that is not protected, not
        in use and not used within the last `keep_recent` layer calls (with `evict`); True if queued."""
        with self._lock:
            if self._closed or key in self.compute.entries:
                return False
            if self.compute.pool.num_free == 0:
                if not evict:
                    return False
                victims = [
                    k
                    for k in self.compute.evictable(self._protected)
                    if self._tick - self.compute.entries[k].last_used > self._recent_window
                ]
                if not victims:  # every candidate served the last decode step: it will likely be needed again
                    return False
                victim = self.compute.entries[self.compute.policy.choose_victim(victims)]
                self.stats.add("evictions")
                self._discard(self.compute, victim)
            e = self._reserve(self.compute, key, speculative=True)
            self.stats.add("prefetch_issued")
            self._loader.submit(e, max(1, priority))
            return True

    def protect(self, keys) -> None:
        """Experts not to evict for speculative loads (predicted for the current or next layer)."""
        with self._lock:
            self._protected = frozenset(keys)

    def cancel_speculative(self, layer: int, keep: set[int]) -> int:
        """Cancel the queued speculative loads of `layer` whose expert is not in `keep`; returns how many."""
        n = 0
        with self._lock:
            for e in list(self.compute.entries.values()):
                if e.key[0] == layer and e.key[1] not in keep and e.pins == 0 and e.speculative:
                    if self._loader.cancel(e):
                        self._discard(self.compute, e)
                        self.stats.add("prefetch_cancelled")
                        n += 1
        return n

    def acquire(self, key: Key, timeout: float | None = None) -> Lease:
        """Like `try_acquire` but waits for a slot to be released (by another thread), at most `timeout` seconds
        (default: `load_timeout`), then raises `ExpertLoadTimeoutError`."""
        timeout = self.load_timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            lease = self.try_acquire(key)
            if lease is not None:
                return lease
            with self._lock:
                if not self.compute.can_reserve() and not self._lock.wait(
                    timeout=None if deadline is None else max(0.0, deadline - time.monotonic())
                ):
                    raise ExpertLoadTimeoutError(
                        f"no cache slot freed within {timeout:g}s for expert {key[1]} of MoE layer {key[0]}: every "
                        f"one of the {self.capacity} slots is in use or held by a read that has not returned. Raise "
                        f"the budget or lower the concurrency, or check the disk if reads hang"
                    )

    # -- internals (call with the lock held unless noted) ----------------------------------------------------------
    def _pin(self, tier: Tier, e: Entry, hit: bool) -> None:
        e.pins += 1
        e.last_used = self._tick
        tier.policy.on_access(e.key)
        if tier is self.compute:
            (self.stats.hit if hit else self.stats.miss)(e.key[0])

    def _unpin(self, tier: Tier, e: Entry) -> None:
        with self._lock:
            e.pins -= 1
            self._lock.notify_all()

    def _discard(self, tier: Tier, e: Entry) -> None:
        """Remove an entry (lock held): count a never-used prefetch as wasted, free its slot."""
        del tier.entries[e.key]
        tier.policy.on_remove(e.key)
        if e.speculative and not e.used:
            self.stats.add("prefetch_wasted")
            if e.future.done():
                self.stats.add("prefetch_wasted_bytes", self.layout.slot_nbytes)
        if not e.future.done():
            e.future.cancel()
        tier.pool.give(e.slot)

    def _reserve(self, tier: Tier, key: Key, speculative: bool = False) -> Entry | None:
        """A new entry for `key` in a free or freed slot; None when the only candidates all started meanwhile."""
        slot = tier.pool.take()
        if slot is None:
            candidates = tier.evictable(self._protected) or tier.evictable()
            if candidates:
                old = tier.entries[tier.policy.choose_victim(candidates)]
                self.stats.add("evictions")
            else:  # a demand load takes the slot of a speculative load that has not started
                # `cancel` decides under the loader's lock: a load a worker started meanwhile keeps its slot
                old = next((c for c in tier.cancellable() if self._loader.cancel(c)), None)
                if old is None:
                    return None
                self.stats.add("prefetch_cancelled")
            self._discard(tier, old)
            slot = tier.pool.take()
        e = Entry(key, slot, speculative)
        tier.entries[key] = e
        tier.policy.on_insert(key)
        return e

    def _drop(self, tier: Tier, e: Entry) -> None:
        with self._lock:
            if tier.entries.get(e.key) is e:
                del tier.entries[e.key]
                tier.policy.on_remove(e.key)
                tier.pool.give(e.slot)
            self._lock.notify_all()

    def _load(self, e: Entry) -> None:
        """Runs on an I/O thread: fill the compute-tier slot of `e` (not holding the lock)."""
        t0 = time.perf_counter()
        layer, expert = e.key
        error = None
        try:
            if self.compute is self.host:
                n = self.store.read_into(layer, expert, self.host.pool.buffer(e.slot))
                self._count_bytes(n)
                self.timeline.record(
                    "io",
                    f"read L{layer}E{expert}",
                    t0,
                    time.perf_counter(),
                    layer=layer,
                    expert=expert,
                    bytes=n,
                    tier="disk->host",
                    speculative=e.speculative,
                )
            else:
                self._load_to_device(e)
            self.stats.add("loads")
            self.stats.load_time(time.perf_counter() - t0)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting compute thread
            error = exc
        with self._lock:  # the watchdog (`_timed_out`) decides under this lock too
            if e.abandoned:  # its waiters were failed already; the slot is safe to reuse now the read returned
                if not self._closed:
                    self.compute.pool.give(e.slot)
                self._lock.notify_all()
                return
            if error is not None:
                self.stats.add("load_errors")
                self._drop(self.compute, e)
            if e.future.set_running_or_notify_cancel():
                if error is None:
                    e.future.set_result(None)
                else:
                    e.future.set_exception(error)

    def _count_bytes(self, n: int) -> None:
        """Bytes read for one load: into `bytes_loaded`, and the cache's own counter when it has one."""
        for name in self._bytes_counters:
            self.stats.add(name, n)

    def _timed_out(self, e: Entry, running: bool) -> None:
        """The loader's watchdog: `e` was not loaded within `load_timeout`. Fail its waiters and forget the expert
        (a later request reads it again); a slot whose read still runs is freed by `_load` when the read returns."""
        with self._lock:
            if self._closed or e.future.done() or self.compute.entries.get(e.key) is not e:
                return  # finished, failed or discarded meanwhile
            del self.compute.entries[e.key]
            self.compute.policy.on_remove(e.key)
            if running:
                e.abandoned = True
            else:  # cancelled by the watchdog while queued: no worker will touch the slot
                self.compute.pool.give(e.slot)
            self.stats.add("load_errors")
            layer, expert = e.key
            what = "its read has not returned" if running else "it is still queued behind other reads"
            if e.future.set_running_or_notify_cancel():
                e.future.set_exception(
                    ExpertLoadTimeoutError(
                        f"expert {expert} of MoE layer {layer} was not loaded within load_timeout="
                        f"{self.load_timeout:g}s ({what}): the disk or file system may be stalled. A later request "
                        f"reads the expert again; raise `model.offload_engine.cache.load_timeout` if reads are "
                        f"merely slow"
                    )
                )
            self._lock.notify_all()

    def _load_to_device(self, e: Entry) -> None:
        layer, expert = e.key
        host_entry, src, owner = None, None, False
        with self._lock:
            if self.host.pool.n_slots:
                host_entry = self.host.entries.get(e.key)
                if host_entry is None and self.host.can_reserve():
                    host_entry = self._reserve(self.host, e.key)
                    owner = host_entry is not None
                if host_entry is not None:
                    self._pin(self.host, host_entry, hit=False)
        try:
            if host_entry is not None:
                src = self.host.pool.buffer(host_entry.slot)
                if owner:
                    try:
                        self._count_bytes(self.store.read_into(layer, expert, src))
                    except BaseException as exc:
                        self._drop(self.host, host_entry)
                        host_entry.future.set_exception(exc)
                        raise
                    host_entry.future.set_result(None)
                else:
                    host_entry.future.result()
                    self.stats.add("host_hits")
            else:  # no host slot available: stage through a per-thread pinned buffer
                src = getattr(self._staging, "buf", None)
                if src is None:
                    src = torch.empty(self.layout.slot_nbytes, dtype=torch.uint8, pin_memory=True)
                    self._staging.buf = src
                self._count_bytes(self.store.read_into(layer, expert, src))
            dst = self.compute.pool.buffer(e.slot)
            reuse = self.compute.pool.release_events[e.slot]
            with torch.cuda.stream(self._copy_stream):
                if reuse is not None:  # do not overwrite an expert that queued kernels still read
                    self._copy_stream.wait_event(reuse)
                dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._copy_stream)
            e.event = event
            self.stats.add("bytes_h2d", self.layout.slot_nbytes)
            t_copy = time.perf_counter()
            event.synchronize()
            self.timeline.record(
                "io",
                f"h2d L{layer}E{expert}",
                t_copy,
                time.perf_counter(),
                layer=layer,
                expert=expert,
                bytes=self.layout.slot_nbytes,
                tier="host->device",
                speculative=e.speculative,
            )  # this I/O thread waits, so the host slot / staging buffer can be reused safely
        finally:
            if host_entry is not None:
                self._unpin(self.host, host_entry)

    def close(self) -> None:
        """Stop the loader threads, close the checkpoint files and free every slot buffer (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._loader.shutdown()
        self.store.close()
        with self._lock:
            for tier in (self.host, self.compute):
                tier.entries.clear()
                tier.pool.free_buffers()
