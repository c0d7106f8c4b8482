"""`PriorityLoader`: I/O threads that serve demand loads before speculative ones, and can cancel the latter.

```
submit(entry, priority)  ->  heap of (priority, seq, entry)  ->  worker threads -> run(entry)
priority 0 = demand (a computation waits on it); 1, 2, ... = speculative (prefetch, by distance)
```
A demand request for an entry still queued as speculative promotes it (a second heap item; the stale one is
skipped). A queued speculative load can be cancelled until a worker starts it; a started read is never waited for
by anyone who did not ask for it. At most `max_speculative_running` speculative reads run at once, so a demand
miss finds a free thread (or waits for at most the reads already started).
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable

__all__ = ["PriorityLoader", "QUEUED", "RUNNING", "DONE", "CANCELLED"]

QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"


class PriorityLoader:
    """Worker threads over a priority queue.

    Args:
        threads: number of worker threads.
        run: called on a worker with the entry to load; must not raise (it reports errors itself).
        max_speculative_running: cap on concurrently running speculative jobs.
    """

    def __init__(self, threads: int, run: Callable, max_speculative_running: int | None = None):
        self._run = run
        self._heap: list = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self.max_spec = max(1, threads - 1) if max_speculative_running is None else max_speculative_running
        self._spec_running = 0
        self._threads = [
            threading.Thread(target=self._worker, name=f"hf_moe_offload_io_{i}", daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, entry, priority: int) -> None:
        with self._cv:
            entry.job_state = QUEUED
            entry.priority = priority
            heapq.heappush(self._heap, (priority, next(self._seq), entry))
            self._cv.notify()

    def promote(self, entry) -> None:
        """Make a queued entry a demand load."""
        with self._cv:
            if entry.job_state == QUEUED and entry.priority > 0:
                entry.priority = 0
                heapq.heappush(self._heap, (0, next(self._seq), entry))
                self._cv.notify()

    def cancel(self, entry) -> bool:
        """Cancel a queued job; True when it had not started (it never will)."""
        with self._cv:
            if entry.job_state == QUEUED:
                entry.job_state = CANCELLED
                return True
            return False

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
                    if speculative:
                        self._spec_running -= 1
                    self._cv.notify_all()

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
        for t in self._threads:
            t.join(timeout=30)
