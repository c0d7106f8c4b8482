"""Honest memory and page-cache measurements for benchmarks on Linux.

On a machine with more RAM than the model, "offloaded" weights are read back from the page cache at memory
speed and a benchmark flatters whatever it measures. These helpers let a benchmark say which case it measured:

* `page_cache_resident_bytes` counts a file's cached bytes (`mincore` on a fresh mapping), e.g. to check that a
  reader using `pread` into its own buffers does not leave a second copy of the experts in the page cache.
* `rss_breakdown` splits resident memory into anonymous, file-backed and shared bytes (`/proc/<pid>/status`:
  psutil reports only their sum): safetensors weights loaded by transformers stay memory-mapped, so plain RSS
  mixes the two. `PeakRssSampler` tracks their peaks, which the kernel does not keep separately.
* `run_in_memory_cgroup` runs a command under a memory cgroup limit, the user's real situation (less RAM than the
  model): the kernel then reclaims page cache and mapped file pages of the group under the limit. Both cgroup
  versions work: v1 (`memory.limit_in_bytes`, a `memory` hierarchy in the mount table) and v2 (`memory.max`, the
  unified hierarchy most distributions now mount alone); `find_memory_cgroup` picks the one that holds the memory
  controller.
* `process_io` reads the bytes a process really fetched from storage (psutil's I/O counters).

Evicting files from the page cache (`evict_page_cache`) and the disk, page-cache and host -> device bandwidths
(the denominators of "physical limit") belong to the one hardware measurement, `scheduling.profile`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ..scheduling.profile import list_files

__all__ = [
    "CgroupRunResult",
    "CgroupUnavailableError",
    "PeakRssSampler",
    "cgroup_version",
    "find_memory_cgroup",
    "group_usage",
    "page_cache_resident_bytes",
    "process_io",
    "quantile",
    "rss_breakdown",
    "run_in_memory_cgroup",
]

_PAGE = os.sysconf("SC_PAGE_SIZE")
_STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmSwap")


class CgroupUnavailableError(RuntimeError):
    """No writable memory cgroup (v1 or v2) is available to this process."""


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return libc


def _resident_bytes(libc: ctypes.CDLL, path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap failed for {path}")
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore failed for {path}")
            resident = sum(1 for v in bytes(vec) if v & 1)
        finally:
            libc.munmap(addr, size)
        return min(resident * _PAGE, size)
    finally:
        os.close(fd)


def page_cache_resident_bytes(paths: str | Path | Iterable[str | Path]) -> int:
    """How many bytes of files are in the page cache, from `mincore` on a fresh read-only mapping.

    The mapping is never touched, so measuring does not load anything. Linux reports page-cache residency of
    file mappings only to processes that own the file or may write it (or root).

    Args:
        paths: a file, a directory (every file under it), or several of them.

    Returns:
        The resident bytes, in whole pages, capped at each file's size.
    """
    libc = _libc()
    return sum(_resident_bytes(libc, path) for path in list_files(paths))


def rss_breakdown(pid: int | None = None) -> dict[str, int]:
    """Resident memory of a process, split by kind, in bytes, from `/proc/<pid>/status`.

    Args:
        pid: the process; this one when None.

    Returns:
        A dict with `VmRSS`, `VmHWM` (peak RSS), `RssAnon` (heap, tensors the process allocated), `RssFile`
        (mapped files, e.g. mmapped safetensors), `RssShmem` and `VmSwap`; absent fields read 0.
    """
    out = dict.fromkeys(_STATUS_FIELDS, 0)
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in out:
                out[name] = int(value.split()[0]) * 1024  # the kernel writes kB
    return out


def process_io(pid: int | None = None) -> dict[str, int]:
    """I/O counters of a process (all its threads), in bytes and calls: psutil's `Process.io_counters()`.

    `read_bytes` counts what the process made the kernel fetch from storage (page-cache misses, read() and mmap
    faults alike): the bytes that physically came from disk. `read_chars` counts bytes returned by read()-like
    calls, page-cache hits included, and misses mmap access.

    Args:
        pid: the process; this one when None.

    Returns:
        A dict such as `{"read_bytes": ..., "write_bytes": ..., "read_chars": ..., ...}`; empty when the kernel
        has no task I/O accounting or the process may not be read.
    """
    try:
        return psutil.Process(pid).io_counters()._asdict()
    except (psutil.Error, AttributeError, OSError):  # no task I/O accounting, or not ours to read
        return {}


@dataclass
class PeakRssSampler:
    """Samples `rss_breakdown` in a background thread and keeps the peak of each field.

    The kernel keeps only the peak of the total (`VmHWM`); this tells a peak of anonymous memory (what a budget
    must bound) from one of mapped file pages (which the kernel can drop).

    Args:
        pid: the process to sample; this one when None.
        interval_s: seconds between samples.

    Example:
        ```python
        >>> with PeakRssSampler() as peak:
        ...     model = AutoModelForCausalLM.from_pretrained(path)
        >>> peak.peak["RssAnon"]
        ```
    """

    pid: int | None = None
    interval_s: float = 0.05
    peak: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_STATUS_FIELDS, 0))
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def sample(self) -> dict[str, int]:
        now = rss_breakdown(self.pid)
        for key, value in now.items():
            self.peak[key] = max(self.peak[key], value)
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakRssSampler:
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="PeakRssSampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def _mount_table() -> list[tuple[str, str, str]]:
    """`(fstype, mountpoint, options)` of every mount, from psutil (the kernel's mount table)."""
    return [(p.fstype, p.mountpoint, p.opts) for p in psutil.disk_partitions(all=True)]


def _own_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """This process's group `(in the v1 memory hierarchy, in the v2 hierarchy)` from `/proc/<pid>/cgroup` text."""
    v1 = v2 = None
    for line in proc_cgroup.splitlines():
        if not line.strip():
            continue
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            v1 = path
        elif hierarchy == "0" and controllers == "":
            v2 = path
    return v1, v2


def cgroup_version(group: Path) -> int:
    """2 for a group of the unified hierarchy (it has `cgroup.controllers`), 1 for a v1 memory group."""
    return 2 if (Path(group) / "cgroup.controllers").exists() else 1


def _v2_parent(group: Path) -> Path:
    """The v2 group under which children get a memory controller: `group` once `memory` is in its
    `cgroup.subtree_control` (enabled here when it is not yet).

    cgroup v2 lets a group enable controllers for its children only while it holds no process itself. When this
    process is the only one in its group (a delegated `systemd-run --scope`, a container's own root group), it
    moves itself into a leaf child `hf_moe_offload-self` first, as systemd does for delegated groups.
    """
    available = (group / "cgroup.controllers").read_text().split()
    if "memory" not in available:
        raise CgroupUnavailableError(
            f"cgroup v2: the memory controller is not available in {group} (cgroup.controllers: "
            f"{' '.join(available) or 'empty'}); enable it in the parent's cgroup.subtree_control or run as root"
        )
    control = group / "cgroup.subtree_control"
    if "memory" in control.read_text().split():
        return group
    try:
        procs = (group / "cgroup.procs").read_text().split()
        if procs == [str(os.getpid())]:
            leaf = group / "hf_moe_offload-self"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
        control.write_text("+memory")
    except OSError as err:  # EBUSY: other processes live in the group ("no internal processes"); EACCES: not ours
        raise CgroupUnavailableError(
            f"cgroup v2: cannot enable the memory controller for children of {group} ({err.strerror or err}); run "
            f"the benchmark alone in a delegated group, e.g. `systemd-run --user --scope -p Delegate=yes "
            f"hf-moe-offload bench ...`, or as root"
        ) from err
    return group


def find_memory_cgroup(*, mounts: list[tuple[str, str, str]] | None = None, proc_cgroup: str | None = None) -> Path:
    """The memory cgroup under which `run_in_memory_cgroup` creates its groups: this process's own group in the
    v1 `memory` hierarchy when one is mounted (the controller then lives there), else in the v2 unified hierarchy.

    Args:
        mounts: `(fstype, mountpoint, options)` rows instead of the machine's mount table (tests).
        proc_cgroup: the text of `/proc/self/cgroup` instead of the real one (tests).

    Returns:
        The group's directory; `cgroup_version(path)` tells which interface its files follow.

    Raises:
        CgroupUnavailableError: no memory controller is mounted, or this process may not create groups in it.
    """
    mounts = _mount_table() if mounts is None else mounts
    if proc_cgroup is None:
        with open("/proc/self/cgroup") as f:
            proc_cgroup = f.read()
    own_v1, own_v2 = _own_paths(proc_cgroup)
    v1 = [m for fstype, m, opts in mounts if fstype == "cgroup" and "memory" in opts.split(",")]
    v2 = [m for fstype, m, _ in mounts if fstype == "cgroup2"]
    if v1:
        group = Path(v1[0]) / (own_v1 or "/").lstrip("/")
        if not (group / "memory.limit_in_bytes").exists() or not os.access(group, os.W_OK):
            raise CgroupUnavailableError(
                f"cgroup v1: the memory group {group} is missing or not writable by uid {os.getuid()}; run as root "
                f"or delegate it"
            )
        return group
    if not v2:
        raise CgroupUnavailableError(
            "no memory cgroup is mounted (no cgroup v1 memory hierarchy, no cgroup2 in the mount table); "
            "`--ramlimit` needs one"
        )
    group = Path(v2[0]) / (own_v2 or "/").lstrip("/")
    if not (group / "cgroup.controllers").exists() or not os.access(group, os.W_OK):
        raise CgroupUnavailableError(
            f"cgroup v2: the group {group} is missing or not writable by uid {os.getuid()}; run as root or in a "
            f"delegated group (systemd-run --user --scope -p Delegate=yes ...)"
        )
    return _v2_parent(group)


@dataclass
class CgroupRunResult:
    """What `run_in_memory_cgroup` returns.

    Args:
        completed: the finished process (return code, and output when captured).
        limit_bytes: the limit that applied.
        max_usage_bytes: the group's peak charge, page cache included (v1 `memory.max_usage_in_bytes`, v2
            `memory.peak`; -1 on a v2 kernel older than 5.19, which keeps no peak).
        failcnt: how many times the group hit its limit (v1 `memory.failcnt`, v2 `max` of `memory.events`).
        oom_kills: processes the kernel OOM-killed in the group (`oom_kill`; -1 when the kernel does not report it).
        cgroup_version: 1 or 2.
    """

    completed: subprocess.CompletedProcess
    limit_bytes: int
    max_usage_bytes: int
    failcnt: int
    oom_kills: int
    cgroup_version: int = 1


# The files of each interface: the limit written, the peak read back.
_LIMIT_FILE = {1: "memory.limit_in_bytes", 2: "memory.max"}
_PEAK_FILE = {1: "memory.max_usage_in_bytes", 2: "memory.peak"}


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1


def _read_keyed(path: Path, key: str) -> int:
    """The value of `key` in a flat-keyed cgroup file (`memory.events`, `memory.oom_control`); -1 if absent."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return -1


def group_usage(group: Path, version: int | None = None) -> tuple[int, int, int]:
    """`(peak bytes, times the limit was hit, OOM kills)` of a memory group, -1 for what the kernel does not
    report (see `CgroupRunResult`)."""
    version = cgroup_version(group) if version is None else version
    peak = _read_int(group / _PEAK_FILE[version])
    if version == 1:
        return peak, _read_int(group / "memory.failcnt"), _read_keyed(group / "memory.oom_control", "oom_kill")
    events = group / "memory.events"
    return peak, _read_keyed(events, "max"), _read_keyed(events, "oom_kill")


def run_in_memory_cgroup(
    cmd: Sequence[str],
    limit_bytes: int,
    *,
    timeout: float | None = None,
    capture_output: bool = True,
    text: bool = True,
    **popen_kwargs,
) -> CgroupRunResult:
    """Run `cmd` in a fresh child of this process's memory cgroup (v1 or v2), limited to `limit_bytes`.

    The child group's limit covers anonymous memory and page cache (mapped or not) charged to it, so a model
    larger than the limit has to be read from disk again, as on a machine with that much RAM. There is no swap
    limit (v1 `memsw`, v2 `memory.swap.max` are left alone): on a machine with swap, anonymous memory may still be
    swapped out. The group is removed afterwards.

    Args:
        cmd: the command and its arguments.
        limit_bytes: the memory limit in bytes.
        timeout: seconds before the command is killed (`subprocess.TimeoutExpired` is raised).
        capture_output, text, **popen_kwargs: as for `subprocess.run`.

    Returns:
        A `CgroupRunResult` with the completed process and the group's peak usage.

    Raises:
        CgroupUnavailableError: memory groups cannot be created here.
    """
    if limit_bytes <= 0:
        raise ValueError(f"limit_bytes must be > 0, got {limit_bytes}")
    parent = find_memory_cgroup()
    version = cgroup_version(parent)
    group = parent / f"hf_moe_offload-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / _LIMIT_FILE[version]).write_text(str(limit_bytes))
    except OSError as err:
        raise CgroupUnavailableError(f"cannot create a memory cgroup under {group.parent}: {err}") from err
    procs = str(group / "cgroup.procs")

    def enter_group() -> None:  # runs in the child between fork and exec
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    try:
        completed = subprocess.run(
            list(cmd),
            timeout=timeout,
            capture_output=capture_output,
            text=text,
            preexec_fn=enter_group,
            **popen_kwargs,
        )
        peak, failcnt, oom_kills = group_usage(group, version)
        return CgroupRunResult(
            completed=completed,
            limit_bytes=limit_bytes,
            max_usage_bytes=peak,
            failcnt=failcnt,
            oom_kills=oom_kills,
            cgroup_version=version,
        )
    finally:
        _remove_group(group)


def _remove_group(group: Path, attempts: int = 50) -> None:
    for _ in range(attempts):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY while the last task is still exiting
            time.sleep(0.1)
    raise RuntimeError(f"could not remove the memory cgroup {group}; remove it with `rmdir {group}`")


def quantile(values: list[float], q: float) -> float | None:
    """The `q` quantile of `values` (linear interpolation between neighbours), None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
