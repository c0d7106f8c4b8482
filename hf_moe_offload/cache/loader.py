"""`PriorityLoader`: I/O threads that serve demand loads before speculative ones, and can cancel the latter.

```
submit(entry, priority)  ->  heap of (priority, seq, entry)  ->  worker threads -> run(entry)
priority 0 = demand (a computation waits on it); 1, 2, ... = speculative (prefetch, by distance)
```
A demand request for an entry still queued as speculative promotes it (a second heap item; the stale one is
skipped). A queued speculative load can be cancelled until a worker starts it; a started read is never waited for
by anyone who did not ask for it. At most `max_speculative_running` speculative reads run at once, so a demand
miss finds a free thread (or waits for at most the reads already started).

A watchdog thread bounds how long anyone waits: a job that is a demand load (queued or running) or has started
running gets a deadline `timeout` seconds later, and a job still unfinished at its deadline is reported once to
`on_timeout(entry, running)`; a queued one is cancelled first (no worker will start it), a running one cannot be
interrupted (a blocked `pread` returns when the kernel lets it), so the caller must not reuse its buffer before
`run` returns.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable

__all__ = ["PriorityLoader", "QUEUED", "RUNNING", "DONE", "CANCELLED"]

QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"


class PriorityLoader:
    """Worker threads over a priority queue.

    Entries are objects with writable `job_state`, `priority` and `deadline` attributes (the loader sets them).

    Args:
        threads: number of worker threads.
        run: called on a worker with the entry to load; must not raise (it reports errors itself).
        max_speculative_running: cap on concurrently running speculative jobs.
        timeout: seconds a demand or running job may take before `on_timeout` is called (None: no bound). Can be
            changed later through the `timeout` attribute; it applies to jobs that become due afterwards.
        on_timeout: `on_timeout(entry, running)`, called on the watchdog thread, not holding the loader's lock.
    """

    def __init__(
        self,
        threads: int,
        run: Callable,
        max_speculative_running: int | None = None,
        timeout: float | None = None,
        on_timeout: Callable | None = None,
    ):
        self._run = run
        self._heap: list = []
        self._seq = itertools.count()
        lock = threading.Lock()
        self._cv = threading.Condition(lock)  # workers wait on it
        self._watch_cv = threading.Condition(lock)  # the watchdog waits on it (a notify must not wake the other)
        self._closed = False
        self.max_spec = max(1, threads - 1) if max_speculative_running is None else max_speculative_running
        self._spec_running = 0
        self.timeout, self._on_timeout = timeout, on_timeout
        self._watched: set = set()  # jobs with a deadline
        self._wake_at = math.inf  # when the watchdog wakes next
        self._threads = [
            threading.Thread(target=self._worker, name=f"hf_moe_offload_io_{i}", daemon=True) for i in range(threads)
        ]
        self._threads.append(threading.Thread(target=self._watchdog, name="hf_moe_offload_watchdog", daemon=True))
        for t in self._threads:
            t.start()

    def submit(self, entry, priority: int) -> None:
        with self._cv:
            entry.job_state = QUEUED
            entry.priority = priority
            entry.deadline = None
            if priority == 0:
                self._watch(entry)
            heapq.heappush(self._heap, (priority, next(self._seq), entry))
            self._cv.notify()

    def promote(self, entry) -> None:
        """Make a queued entry a demand load."""
        with self._cv:
            if entry.job_state == QUEUED and entry.priority > 0:
                entry.priority = 0
                self._watch(entry)
                heapq.heappush(self._heap, (0, next(self._seq), entry))
                self._cv.notify()

    def cancel(self, entry) -> bool:
        """Cancel a queued job; True when it had not started (it never will)."""
        with self._cv:
            if entry.job_state == QUEUED:
                entry.job_state = CANCELLED
                self._watched.discard(entry)
                return True
            return False

    def _watch(self, entry) -> None:
        """Give `entry` a deadline unless it has one (lock held)."""
        if self.timeout is None or entry.deadline is not None:
            return
        entry.deadline = time.monotonic() + self.timeout
        self._watched.add(entry)
        if entry.deadline < self._wake_at:
            self._watch_cv.notify()

    def _next(self):
        while True:
            while self._heap and (
                self._heap[0][2].job_state != QUEUED or self._heap[0][0] != self._heap[0][2].priority
            ):
                heapq.heappop(self._heap)  # cancelled, started, or superseded by a promotion
            if self._closed:
                return None
            if self._heap:
                priority, _, entry = self._heap[0]
                if priority == 0 or self._spec_running < self.max_spec:
                    heapq.heappop(self._heap)
                    entry.job_state = RUNNING
                    self._watch(entry)
                    if priority > 0:
                        self._spec_running += 1
                    return entry
            self._cv.wait()

    def _worker(self) -> None:
        while True:
            with self._cv:
                entry = self._next()
            if entry is None:
                return
            speculative = entry.priority > 0
            try:
                self._run(entry)
            finally:
                with self._cv:
                    entry.job_state = DONE
                    self._watched.discard(entry)
                    if speculative:
                        self._spec_running -= 1
                    self._cv.notify_all()

    def _watchdog(self) -> None:
        while True:
            with self._cv:
                due = self._due()
            if due is None:
                return
            for entry, running in due:
                if self._on_timeout is not None:
                    self._on_timeout(entry, running)

    def _due(self) -> list | None:
        """Wait until some watched job passes its deadline; take those jobs off the watch (lock held). None: closed."""
        while not self._closed:
            now = time.monotonic()
            due = [e for e in self._watched if e.deadline <= now]
            if due:
                self._watched.difference_update(due)
                out = []
                for e in due:
                    out.append((e, e.job_state == RUNNING))
                    if e.job_state == QUEUED:
                        e.job_state = CANCELLED
                return out
            self._wake_at = min((e.deadline for e in self._watched), default=math.inf)
            self._watch_cv.wait(None if self._wake_at == math.inf else self._wake_at - now)
            self._wake_at = math.inf
        return None

    @property
    def pending(self) -> int:
        with self._cv:
            return sum(1 for _, _, e in self._heap if e.job_state == QUEUED)

    def shutdown(self) -> None:
        with self._cv:
            self._closed = True
            for _, _, e in self._heap:
                if e.job_state == QUEUED:
                    e.job_state = CANCELLED
            self._cv.notify_all()
            self._watch_cv.notify_all()
        for t in self._threads:
            t.join(timeout=30)
