"""Honest memory, page-cache and disk measurements for benchmarks on Linux.

On a machine with more RAM than the model, "offloaded" weights are read back from the page cache at memory
speed and a benchmark flatters whatever it measures. These helpers let a benchmark say which case it measured:

* `evict_page_cache` drops a file's clean pages (`posix_fadvise(DONTNEED)`); pages that a live mmap maps stay.
* `page_cache_resident_bytes` counts a file's cached bytes (`mincore` on a fresh mapping), e.g. to check that a
  reader using `pread` into its own buffers does not leave a second copy of the experts in the page cache.
* `rss_breakdown` splits resident memory into anonymous, file-backed and shared bytes (`/proc/<pid>/status`):
  safetensors weights loaded by transformers stay memory-mapped, so plain RSS mixes the two.
  `PeakRssSampler` tracks their peaks, which the kernel does not keep separately.
* `run_in_memory_cgroup` runs a command under a cgroup v1 memory limit, the user's real situation (less RAM than
  the model): the kernel then reclaims page cache and mapped file pages of the group under the limit.
* `process_io` reads the bytes a process really fetched from storage (`/proc/<pid>/io`).
* `measure_disk_bandwidth` reads files cold (after eviction) or warm: the denominators of "physical limit".
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

__all__ = [
    "CgroupRunResult",
    "CgroupUnavailableError",
    "PeakRssSampler",
    "evict_page_cache",
    "find_memory_cgroup",
    "measure_disk_bandwidth",
    "page_cache_resident_bytes",
    "process_io",
    "rss_breakdown",
    "run_in_memory_cgroup",
]

MiB = 1024**2
_PAGE = os.sysconf("SC_PAGE_SIZE")
_STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmSwap")


class CgroupUnavailableError(RuntimeError):
    """No writable cgroup v1 memory controller is available to this process."""


def _files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
    return out


def evict_page_cache(paths: str | Path | Iterable[str | Path]) -> int:
    """Drop the clean page-cache pages of files (every file under a directory) with `posix_fadvise(DONTNEED)`.

    Dirty pages are written back first (`fdatasync`), so freshly written files are evicted too. Pages that a live
    `mmap` maps (in any process) are NOT evicted: a mapped file reads back at page-cache speed after this call,
    which is why a benchmark of mmap-based offloading needs a memory cgroup (`run_in_memory_cgroup`) instead.

    Args:
        paths: a file, a directory, or several of them.

    Returns:
        The number of bytes covered (the total size of the files).
    """
    total = 0
    for path in _files(paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                os.fdatasync(fd)
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


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
    return sum(_resident_bytes(libc, path) for path in _files(paths))


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
    """I/O counters of a process (all its threads) from `/proc/<pid>/io`, in bytes.

    `read_bytes` counts what the process made the kernel fetch from storage (page-cache misses, read() and mmap
    faults alike): the bytes that physically came from disk. `rchar` counts bytes returned by read()-like calls,
    page-cache hits included, and misses mmap access.

    Args:
        pid: the process; this one when None.

    Returns:
        A dict such as `{"rchar": ..., "read_bytes": ..., "write_bytes": ...}`; empty when the kernel has no task
        I/O accounting.
    """
    try:
        with open(f"/proc/{pid or 'self'}/io") as f:
            return {name: int(value) for name, value in (line.split(":") for line in f if ":" in line)}
    except OSError:
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


def find_memory_cgroup() -> Path:
    """The directory of this process's cgroup in the v1 memory hierarchy, if it is writable.

    Raises:
        CgroupUnavailableError: no v1 memory controller is mounted, or this process may not create groups in it.
    """
    mount = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fstype, _, options = post.split()[:3]
            if fstype == "cgroup" and "memory" in options.split(","):
                mount = Path(pre.split()[4])
                break
    if mount is None:
        raise CgroupUnavailableError(
            "no cgroup v1 memory controller is mounted (checked /proc/self/mountinfo); the 'RAM limit' mode needs one"
        )
    own = "/"
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                own = path
    group = mount / own.lstrip("/")
    if not (group / "memory.limit_in_bytes").exists() or not os.access(group, os.W_OK):
        raise CgroupUnavailableError(
            f"the memory cgroup {group} is missing or not writable by uid {os.getuid()}; run as root or delegate it"
        )
    return group


@dataclass
class CgroupRunResult:
    """What `run_in_memory_cgroup` returns.

    Args:
        completed: the finished process (return code, and output when captured).
        limit_bytes: the limit that applied.
        max_usage_bytes: `memory.max_usage_in_bytes`: the group's peak charge, page cache included.
        failcnt: how many times the group hit its limit (reclaim was forced).
        oom_kills: processes the kernel OOM-killed in the group (-1 when the kernel does not report it).
    """

    completed: subprocess.CompletedProcess
    limit_bytes: int
    max_usage_bytes: int
    failcnt: int
    oom_kills: int


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1


def _oom_kills(group: Path) -> int:
    try:
        for line in (group / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def run_in_memory_cgroup(
    cmd: Sequence[str],
    limit_bytes: int,
    *,
    timeout: float | None = None,
    capture_output: bool = True,
    text: bool = True,
    **popen_kwargs,
) -> CgroupRunResult:
    """Run `cmd` in a fresh child of this process's cgroup v1 memory group, limited to `limit_bytes`.

    The child group's limit covers anonymous memory and page cache (mapped or not) charged to it, so a model
    larger than the limit has to be read from disk again, as on a machine with that much RAM. There is no swap
    limit (`memsw`): on a machine with swap, anonymous memory may still be swapped out. The group is removed
    afterwards.

    Args:
        cmd: the command and its arguments.
        limit_bytes: the memory limit in bytes.
        timeout: seconds before the command is killed (`subprocess.TimeoutExpired` is raised).
        capture_output, text, **popen_kwargs: as for `subprocess.run`.

    Returns:
        A `CgroupRunResult` with the completed process and the group's peak usage.

    Raises:
        CgroupUnavailableError: cgroup v1 memory groups cannot be created here.
    """
    if limit_bytes <= 0:
        raise ValueError(f"limit_bytes must be > 0, got {limit_bytes}")
    group = find_memory_cgroup() / f"hf_moe_offload-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
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
        return CgroupRunResult(
            completed=completed,
            limit_bytes=limit_bytes,
            max_usage_bytes=_read_int(group / "memory.max_usage_in_bytes"),
            failcnt=_read_int(group / "memory.failcnt"),
            oom_kills=_oom_kills(group),
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


def measure_disk_bandwidth(
    paths: str | Path | Iterable[str | Path],
    *,
    block: int = 16 * MiB,
    cold: bool = True,
    max_bytes: int | None = None,
) -> float:
    """Read files sequentially in `block`-sized `readinto` calls and return the bandwidth in bytes/s.

    Args:
        paths: a file, a directory (every file under it), or several of them.
        block: bytes per read call.
        cold: evict the files from the page cache first (disk bandwidth); when False, read them twice and time
            the second pass (page-cache bandwidth, if they fit in memory).
        max_bytes: stop after this many bytes.

    Returns:
        Bytes read per second.
    """
    files = _files(paths)
    buf = bytearray(block)
    view = memoryview(buf)

    def read_all() -> tuple[int, float]:
        done, start = 0, time.perf_counter()
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while max_bytes is None or done < max_bytes:
                    n = f.readinto(view)
                    if not n:
                        break
                    done += n
        return done, time.perf_counter() - start

    if cold:
        evict_page_cache(files)
    else:
        read_all()
    done, seconds = read_all()
    if cold:
        evict_page_cache(files)
    return done / max(seconds, 1e-9)
