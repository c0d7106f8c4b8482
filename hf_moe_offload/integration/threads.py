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
others = threads of other processes runnable at once (/proc/stat procs_running less this process's own threads in
         state R, the mean of 5 looks over 8 ms): what they want, not the CPU time they got beside us
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
_SAMPLES, _GAP_S = 5, 0.002  # 5 looks over 8 ms at each load and generate
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


def _procs_running() -> int:
    """Threads runnable on the whole machine right now (`procs_running` of /proc/stat)."""
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"procs_running"):
                return int(line.split()[1])
    raise OSError("no procs_running in /proc/stat")


def _own_running() -> int:
    """Threads of this process that are runnable right now (state R in /proc/self/task/*/stat)."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                n += f.read().rsplit(b")", 1)[1].split()[0] == b"R"
        except (OSError, IndexError):
            pass  # the thread ended
    return n


def busy_cores_of_others(samples: int = _SAMPLES, gap_s: float = _GAP_S) -> float:
    """Mean number of other processes' threads runnable at once over `samples` looks `gap_s` apart.

    Runnable threads, not CPU time: while this process computes it takes CPU time from the others, so their CPU time
    would understate what they want; a runnable thread wants a core whether it has one or not.
    """
    seen = []
    for i in range(samples):
        if i:
            time.sleep(gap_s)
        seen.append(max(0, _procs_running() - _own_running()))
    return sum(seen) / len(seen)


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
                why = f"{cores} usable cores, {others:.1f} threads of other processes runnable"
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
        try:
            return busy_cores_of_others()
        except OSError:  # no /proc (not Linux): assume the cores are ours
            return 0.0
