"""torch's intra-op threads sized to the cores this process can have (`OffloadConfig.threads`).

torch starts one intra-op thread per core, and its OpenMP workers spin at every barrier. When other processes run
on those cores too (a tokenizer, a data loader, another job on a shared machine), each barrier waits for a thread
the kernel has descheduled, and a decode step gets many times slower: 48 tokens of the shipped model took 17 s with
torch's default threads and 1.1 s with one thread while one busy process per core ran beside it (docs/benchmarks.md,
"threads and I/O mode"). Our own I/O threads block in `pread` and take no core while they wait, so they are not
counted.

The rule of `threads="auto"` (the default), applied when the model loads and when each `generate` starts:

```
cores  = CPUs this process may run on (affinity mask, capped by a cgroup `cpu.max` quota)
others = cores that other processes kept busy since the last check (/proc/stat busy time less this process's own
         CPU time, over wall time; a fresh 50 ms sample when the last check is older than 2 s)
torch.set_num_threads(clamp(round(cores - others), 1, cores))
```

An int fixes the count. The user's own choice wins: with `OMP_NUM_THREADS` or `MKL_NUM_THREADS` set, or after a
`torch.set_num_threads` call this module did not make, "auto" leaves torch's threads alone (and says so at INFO).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time

import psutil
import torch

__all__ = ["ThreadSizer", "usable_cores", "busy_cores_of_others"]

logger = logging.getLogger("hf_moe_offload")

_USER_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_STALE_S = 2.0  # an older baseline averages over idle time: sample afresh
_SAMPLE_S = 0.05
_lock = threading.Lock()
_last_set: int | None = None  # what this module last passed to torch.set_num_threads


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 `cpu.max` quota when one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _sample() -> tuple[float, float, float]:
    """(wall time, CPU seconds busy on the whole machine, CPU seconds of this process)."""
    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    return time.monotonic(), busy, time.process_time()


def busy_cores_of_others(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Average number of cores other processes kept busy between two `_sample()`s."""
    wall = after[0] - before[0]
    if wall <= 0:
        return 0.0
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, others / wall)


def _user_chose() -> str | None:
    """Why torch's thread count is the user's to keep, or None."""
    for name in _USER_ENV:
        if os.environ.get(name):
            return f"{name}={os.environ[name]} is set"
    now = torch.get_num_threads()
    if _last_set is not None:
        return None if now == _last_set else f"torch.set_num_threads({now}) was called"
    defaults = {usable_cores(), os.cpu_count(), psutil.cpu_count(logical=False)}
    return None if now in defaults else f"torch.set_num_threads({now}) was called"


class ThreadSizer:
    """Applies `OffloadConfig.threads` to torch's intra-op pool (see the module docstring).

    Args:
        threads: "auto" or a fixed count (>= 1).
    """

    def __init__(self, threads: int | str):
        self.threads = threads
        self._baseline: tuple[float, float, float] | None = None
        self._others = 0.0
        self.last_decision: dict | None = None

    def apply(self) -> int:
        """Set torch's intra-op threads for the work about to start; returns the count in force."""
        global _last_set
        with _lock:
            if self.threads != "auto":
                n, why = int(self.threads), "fixed by OffloadConfig.threads"
            elif (chose := _user_chose()) is not None:
                n, why = torch.get_num_threads(), f"left alone: {chose}"
            else:
                cores, others = usable_cores(), self._others_busy()
                n = min(cores, max(1, round(cores - others)))
                why = f"{cores} usable cores, {others:.1f} kept busy by other processes"
            if not why.startswith("left"):
                if n != torch.get_num_threads():
                    torch.set_num_threads(n)
                _last_set = n
            decision = {"threads": n, "why": why}
            if decision != self.last_decision:
                logger.info("torch intra-op threads=%d (%s)", n, why)
            self.last_decision = decision
            return n

    def _others_busy(self) -> float:
        now = _sample()
        if self._baseline is None or now[0] - self._baseline[0] > _STALE_S:
            time.sleep(_SAMPLE_S)
            before, now = now, _sample()
        elif now[0] - self._baseline[0] < _SAMPLE_S:  # back-to-back calls: too short a window to tell
            return self._others
        else:
            before = self._baseline
        self._baseline = now
        self._others = busy_cores_of_others(before, now)
        return self._others
