r"""The one hardware measurement: `HardwareProfile`, the numbers the planner divides by and benchmarks' bounds.

```
checkpoint files --evict (fdatasync + fadvise DONTNEED)--> pread blocks (cold) ---> disk_read_Bps (best of samples)
                 \-- pread the same blocks again (warm) ----------------------> page_cache_read_Bps
one expert MLP at the model's shapes and dtype, n = 1 .. 256 tokens --> t(n) = a + b * n   (CPU, and the device)
torch copy of a large buffer --> memory bandwidth (dense weights and KV are streamed at this rate)
pinned host buffer --> device (CUDA only) --> h2d_Bps
```
An expert's compute time is modelled as `t(n) = a + b * n`: `a` is the cost of streaming its weights from memory
once (what a decode step with few tokens pays), `b` the arithmetic per token. The fit is a least-squares line
through timed runs of the canonical gated MLP (`gate_up` matmul, SiLU-and-multiply, `down` matmul) whose FLOPs
and bytes equal the model's expert. Every timing is the minimum (or the median) of several repeats, cycling over
enough copies of the weights that they do not stay in the CPU caches: on a shared machine the minimum estimates
what the hardware can do, the median what the neighbours leave over (see docs/planner.md).

The planner (`planner.plan`) and `hf-moe-offload bench` (its lower bound per step, the `limits` of its JSON line)
both read this profile: there is one read-bandwidth measurement (`measure_read_bandwidth`, with its eviction
`evict_page_cache`) and one host -> device measurement (`measure_h2d_bandwidth`). Cold reads evict first; a file
that a live `mmap` maps stays cached whatever we advise (`DONTNEED` skips mapped pages), so measure files no other process
maps, or pass the bandwidth yourself. This module never initialises CUDA unless asked for a CUDA profile.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "LinearFit",
    "HardwareProfile",
    "measure_profile",
    "measure_read_bandwidth",
    "measure_h2d_bandwidth",
    "evict_page_cache",
    "list_files",
    "canonical_dims",
]

_VERSION = 1
_TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_MiB = 2**20


@dataclass
class LinearFit:
    """`t(n) = a + b * n` seconds for one expert on `n` tokens, with the points it was fitted to."""

    a: float
    b: float
    points: list[tuple[int, float]] = field(default_factory=list)

    def __call__(self, n: float) -> float:
        return 0.0 if n <= 0 else self.a + self.b * n

    @classmethod
    def fit(cls, points: list[tuple[int, float]]) -> LinearFit:
        """Least squares on relative error (weights `1 / t`), so small token counts are not swamped; `a, b >= 0`."""
        n = np.array([p[0] for p in points], dtype=np.float64)
        t = np.array([p[1] for p in points], dtype=np.float64)
        if len(points) == 1:
            return cls(float(t[0]), 0.0, list(points))
        b, a = np.polyfit(n, t, 1, w=1.0 / np.maximum(t, 1e-12))
        if b < 0:
            a, b = float(t.min()), 0.0
        elif a < 0:
            a, b = 0.0, float(np.sum(n * t) / np.sum(n * n))
        return cls(float(a), float(b), [(int(x), float(y)) for x, y in points])


@dataclass
class HardwareProfile:
    """What this machine does with one model's experts.

    Attributes:
        expert_nbytes: bytes of one expert (all its weights) at `dtype`.
        hidden_size, intermediate_size: the canonical gated MLP that was timed (same FLOPs and bytes as the expert).
        dtype: the compute dtype, e.g. `"bfloat16"`.
        disk_read_Bps: cold read bandwidth (page cache evicted), bytes per second: the fastest of
            `disk_samples_Bps` (the median with `meta["statistic"] == "median"`).
        page_cache_read_Bps: warm read bandwidth of the same bytes, or None if not measured.
        disk_samples_Bps: every cold sample (empty when the bandwidth was given).
        cpu_mem_Bps: host memory bandwidth (a large tensor copy, bytes read per second).
        cpu_fit: expert time on the CPU against its token count.
        h2d_Bps: pinned host -> device copy bandwidth, None without an accelerator.
        device: the accelerator measured (e.g. `"cuda:0 NVIDIA H100"`), None for CPU only.
        device_mem_Bps: accelerator memory bandwidth, or None.
        device_fit: expert time on the accelerator, or None.
        meta: how it was measured (threads, torch version, sources).
        step_overhead_s: time of one batch-1 decode step that the roofline terms (expert FLOPs, dense weights
            streamed, bytes read) miss: Python, kernel launches, the router and expert loop, the generate loop.
            Measured on the model itself by `hf-moe-offload plan` (calibration); 0 when not measured. On a tiny
            model it is most of the step.
    """

    expert_nbytes: int
    hidden_size: int
    intermediate_size: int
    dtype: str
    disk_read_Bps: float
    cpu_mem_Bps: float
    cpu_fit: LinearFit
    page_cache_read_Bps: float | None = None
    h2d_Bps: float | None = None
    device: str | None = None
    device_mem_Bps: float | None = None
    device_fit: LinearFit | None = None
    disk_samples_Bps: list[float] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    step_overhead_s: float = 0.0

    @property
    def has_device(self) -> bool:
        return self.device_fit is not None and self.h2d_Bps is not None

    def add_disk_sample(self, Bps: float) -> None:
        """Record one more cold sample (a shared disk drifts) and recombine `disk_read_Bps` from all of them."""
        self.disk_samples_Bps.append(float(Bps))
        self.disk_read_Bps = _combine(self.disk_samples_Bps, self.meta.get("statistic", "min"))

    def describe(self) -> str:
        """The bandwidths in one line, e.g. `disk (cold, page cache evicted) 0.44 GB/s [samples 0.43, 0.44], ...`."""
        samples = ", ".join(f"{s / 1e9:.2f}" for s in self.disk_samples_Bps)
        samples = f" [samples {samples}]" if samples else ""
        warm = f", page cache {self.page_cache_read_Bps / 1e9:.2f} GB/s" if self.page_cache_read_Bps else ""
        h2d = f", host->device (pinned) {self.h2d_Bps / 1e9:.1f} GB/s" if self.h2d_Bps else ""
        readers = self.meta.get("read_threads", 1)
        readers = f", {readers} readers" if readers > 1 else ""
        return f"disk (cold, page cache evicted{readers}) {self.disk_read_Bps / 1e9:.2f} GB/s{samples}{warm}{h2d}"

    def cpu_expert_seconds(self, n_tokens: float) -> float:
        return self.cpu_fit(n_tokens)

    def device_expert_seconds(self, n_tokens: float) -> float:
        if self.device_fit is None:
            raise ValueError("this profile has no accelerator timings; measure it with device='cuda'")
        return self.device_fit(n_tokens)

    def flops_per_second(self, on_device: bool = False) -> float:
        """Matmul rate implied by the per-token slope: `2 * params` FLOPs per token per expert in `b` seconds."""
        fit = self.device_fit if on_device else self.cpu_fit
        flops = 2.0 * 3 * self.hidden_size * self.intermediate_size
        return flops / max(fit.b, 1e-15)

    def to_dict(self) -> dict[str, Any]:
        return {"version": _VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareProfile:
        data = dict(data)
        version = data.pop("version", _VERSION)
        if version != _VERSION:
            raise ValueError(f"hardware profile version {version} is not supported (expected {_VERSION}); re-measure")
        for key in ("cpu_fit", "device_fit"):
            if data.get(key) is not None:
                fit = data[key]
                data[key] = LinearFit(fit["a"], fit["b"], [tuple(p) for p in fit.get("points", [])])
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HardwareProfile:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def canonical_dims(expert_shapes: dict[str, Any] | tuple[int, int]) -> tuple[int, int]:
    """`(hidden, intermediate)` of the gated MLP with the same FLOPs and bytes as an expert.

    Args:
        expert_shapes: `{name: shape of one expert's slice}` (what `MoETopology.summary()["params"]` holds), or
            `(hidden, intermediate)` directly. The hidden size is the dimension every 2-D weight shares (`[2I, H]`
            and `[H, I]`, or transposed); the intermediate size is `params / (3 * hidden)`.
    """
    if isinstance(expert_shapes, (tuple, list)):
        return int(expert_shapes[0]), int(expert_shapes[1])
    mats = [tuple(int(d) for d in s) for s in expert_shapes.values() if len(s) == 2]
    if not mats:
        raise ValueError(f"expected 2-D expert weight shapes, got {expert_shapes!r}")
    common = set(mats[0]).intersection(*map(set, mats[1:]))
    if not common:
        raise ValueError(f"expert weights {expert_shapes!r} share no dimension; pass (hidden, intermediate) instead")
    hidden = min(common)
    params = sum(math.prod(s) for s in mats)
    return hidden, max(1, round(params / (3 * hidden)))


def list_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The files of `paths`: a file, a directory (every file under it, sorted), or several of them.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    if isinstance(paths, (str, os.PathLike)):
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


def evict_page_cache(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> int:
    """Drop the clean page-cache pages of files (every file under a directory) with `posix_fadvise(DONTNEED)`.

    Dirty pages are written back first (`fdatasync`), so freshly written files are evicted too. Pages that a live
    `mmap` maps (in any process) are NOT evicted: a mapped file reads back at page-cache speed after this call,
    which is why a benchmark of mmap-based offloading needs a memory cgroup (`bench.sysmem.run_in_memory_cgroup`).

    Args:
        paths: a file, a directory, or several of them.

    Returns:
        The number of bytes covered (the total size of the files).
    """
    total = 0
    for path in list_files(paths):
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


def measure_read_bandwidth(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    block: int = 16 * _MiB,
    max_bytes: int = 256 * _MiB,
    seed: int | None = None,
    threads: int = 1,
) -> tuple[float, float]:
    """`(cold, warm)` read bandwidth of files in bytes/s: `pread` of `block`-sized pieces into reused buffers.

    The pieces sit at random block-aligned offsets of the files (an expert cache reads experts in no particular
    order; a fresh region on each call also dodges caches below the page cache, such as a VM host's), at most
    `max_bytes` of them. The first pass follows `evict_page_cache` (the disk), the warm figure is the faster of two
    passes over the same pieces (the page cache); the files are evicted again afterwards. Pages of a file that
    some process maps stay cached whatever we advise.

    Args:
        paths: a file, a directory (every file under it, e.g. a checkpoint folder), or several of them.
        block: bytes per read call.
        max_bytes: bytes read per pass.
        seed: for the order of the pieces.
        threads: readers at once, each taking every `threads`-th piece into its own buffer (an expert cache reads
            with `io_threads` at once, and a disk may serve several reads faster than one).
    """
    files = list_files(paths)
    sizes = [os.path.getsize(f) for f in files]
    block = max(4096, min(block, max(sizes, default=0) or 4096))
    pieces = [(i, offset) for i, size in enumerate(sizes) for offset in range(0, max(size, 1), block)]
    random.Random(seed).shuffle(pieces)
    pieces = pieces[: max(1, max_bytes // block)]
    threads = max(1, min(threads, len(pieces)))
    bufs = [memoryview(bytearray(block)) for _ in range(threads)]
    fds = [os.open(f, os.O_RDONLY) for f in files]
    try:

        def read_share(r: int) -> int:
            done, buf = 0, bufs[r]
            for i, offset in pieces[r::threads]:
                want, got = min(block, sizes[i] - offset), 0
                while got < want:
                    n = os.preadv(fds[i], [buf[got:want]], offset + got)
                    if n <= 0:
                        break
                    got += n
                done += got
            return done

        def one_pass() -> float:
            t0 = time.perf_counter()
            if threads == 1:
                done = read_share(0)
            else:
                with ThreadPoolExecutor(threads) as pool:
                    done = sum(pool.map(read_share, range(threads)))
            return done / max(time.perf_counter() - t0, 1e-9)

        evict_page_cache(files)
        cold = one_pass()
        warm = max(one_pass(), one_pass())
        evict_page_cache(files)
        return cold, warm
    finally:
        for fd in fds:
            os.close(fd)


def _combine(samples: list[float], statistic: str) -> float:
    """Cold samples -> one bandwidth: the fastest (`"min"` time: what the disk can do) or the median."""
    return float(max(samples) if statistic == "min" else statistics.median(samples))


def _scratch_file(folder: str | None, nbytes: int) -> str:
    fd, path = tempfile.mkstemp(prefix="hf_moe_offload_profile_", dir=folder)
    chunk = os.urandom(min(nbytes, 4 * _MiB))
    with os.fdopen(fd, "wb") as f:
        for _ in range(max(1, nbytes // len(chunk))):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int, statistic: str, budget_s: float = 1.0) -> float:
    """Min or median of `repeats` timed runs after one warm-up; stops early (after two) once `budget_s` is spent."""
    fn()
    _sync(device)
    times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 2 and sum(times) > budget_s:
            break
    return min(times) if statistic == "min" else float(np.median(times))


def _expert_fit(
    hidden: int, inter: int, dtype: torch.dtype, device: torch.device, counts, repeats: int, statistic: str
) -> LinearFit:
    nbytes = 3 * hidden * inter * torch.empty((), dtype=dtype).element_size()
    copies = 1 if device.type == "cuda" else max(2, min(8, math.ceil(64 * _MiB / nbytes)))
    weights = [
        (
            torch.randn(2 * inter, hidden, device=device).to(dtype) * 0.02,
            torch.randn(hidden, inter, device=device).to(dtype) * 0.02,
        )
        for _ in range(copies)
    ]
    points = []
    for n in counts:
        x, turn = torch.randn(n, hidden, device=device).to(dtype), itertools.count()

        def run(x=x, turn=turn) -> None:
            gate_up, down = weights[next(turn) % copies]
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
            F.linear(F.silu(gate) * up, down)

        with torch.inference_mode():
            points.append((n, _time(run, device, repeats, statistic)))
        if len(points) >= 3 and points[-1][1] > 0.5:  # a huge expert: enough points for a line
            break
    return LinearFit.fit(points)


def _mem_bandwidth(device: torch.device, nbytes: int, repeats: int, statistic: str) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return nbytes / _time(lambda: dst.copy_(src), device, repeats, statistic)


def measure_h2d_bandwidth(
    device: str | torch.device = "cuda", nbytes: int = 256 * _MiB, repeats: int = 5, statistic: str = "min"
) -> float | None:
    """Pinned host -> device copy bandwidth in bytes/s, or None without CUDA (CUDA is not touched then).

    Args:
        device: the CUDA device.
        nbytes: bytes per copy (at least one expert's worth gives the bandwidth experts see).
        repeats: timed copies after one warm-up copy.
        statistic: `"min"` (the fastest copy) or `"median"`.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / _time(lambda: dst.copy_(src, non_blocking=True), device, repeats, statistic)


def measure_profile(
    expert_shapes: dict[str, Any] | tuple[int, int],
    dtype: torch.dtype | str = torch.bfloat16,
    sample_file: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    *,
    disk_read_Bps: float | None = None,
    page_cache_read_Bps: float | None = None,
    token_counts: tuple[int, ...] = _TOKEN_COUNTS,
    repeats: int = 5,
    statistic: str = "min",
    scratch_dir: str | None = None,
    scratch_bytes: int = 64 * _MiB,
    read_bytes: int = 256 * _MiB,
    read_block: int | None = None,
    disk_samples: int = 1,
    read_threads: int = 1,
) -> HardwareProfile:
    """Time this machine at one model's expert shapes.

    Args:
        expert_shapes: one expert's weight shapes (`MoETopology.summary()["params"]`) or `(hidden, intermediate)`.
        dtype: the compute dtype (`torch.bfloat16` or `"bfloat16"`).
        sample_file: a file on the disk the experts will be read from (e.g. the model's largest safetensors file),
            or a folder (every file under it), to time cold and warm reads (`measure_read_bandwidth`).
        device: `"cpu"`, or `"cuda[:N]"` to time the accelerator (expert compute, memory, host -> device copies)
            as well as the CPU.
        disk_read_Bps: a known cold read bandwidth; skips the disk measurement.
        page_cache_read_Bps: a known warm read bandwidth.
        token_counts: token counts the expert is timed at.
        repeats: timed runs per point.
        statistic: `"min"` (what the hardware can do: the planner's bound) or `"median"` (what it does now, with
            the neighbours' load: a closer prediction on a busy shared machine).
        scratch_dir: with neither `sample_file` nor `disk_read_Bps`, a scratch file of `scratch_bytes` is written
            here (default: the temp directory, which may be RAM-backed: prefer a `sample_file`).
        read_bytes: bytes read per pass of `measure_read_bandwidth` (at most `scratch_bytes` for a scratch file).
        read_block: bytes per read call; default one expert (1 to 64 MiB).
        disk_samples: cold samples taken; `disk_read_Bps` is the fastest (`statistic="min"`) or their median.
        read_threads: readers at once in `measure_read_bandwidth` (the bench uses the cache's `io_threads`).

    Returns:
        The `HardwareProfile`.

    Example:
        ```python
        >>> profile = measure_profile({"gate_up_proj": [7168, 1024], "down_proj": [1024, 3584]}, "bfloat16",
        ...                           sample_file="model/model-00001-of-00003.safetensors")
        >>> profile.save("profile.json")
        ```
    """
    if statistic not in ("min", "median"):
        raise ValueError(f"statistic: expected 'min' or 'median', got {statistic!r}")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    hidden, inter = canonical_dims(expert_shapes)
    expert_nbytes = 3 * hidden * inter * torch.empty((), dtype=dtype).element_size()
    meta: dict[str, Any] = {
        "statistic": statistic,
        "threads": torch.get_num_threads(),
        "read_threads": read_threads,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if disk_samples < 1:
        raise ValueError(f"disk_samples: expected at least 1, got {disk_samples}")
    samples: list[float] = []
    if disk_read_Bps is None:
        source = os.fspath(sample_file) if sample_file is not None else _scratch_file(scratch_dir, scratch_bytes)
        block = read_block or min(max(expert_nbytes, _MiB), 64 * _MiB)
        try:
            reads = [
                measure_read_bandwidth(source, block=block, max_bytes=read_bytes, threads=read_threads)
                for _ in range(disk_samples)
            ]
        finally:
            if sample_file is None:
                os.unlink(source)
        samples = [cold for cold, _ in reads]
        disk_read_Bps = _combine(samples, statistic)
        page_cache_read_Bps = page_cache_read_Bps or max(warm for _, warm in reads)
        where = f"scratch file in {scratch_dir or tempfile.gettempdir()}"
        meta["disk_source"] = source if sample_file is not None else where
    else:
        meta["disk_source"] = "given"
    cpu = torch.device("cpu")
    mem_bytes = max(64 * _MiB, min(256 * _MiB, 4 * expert_nbytes))
    profile = HardwareProfile(
        expert_nbytes=expert_nbytes,
        hidden_size=hidden,
        intermediate_size=inter,
        dtype=str(dtype).replace("torch.", ""),
        disk_read_Bps=float(disk_read_Bps),
        page_cache_read_Bps=page_cache_read_Bps,
        disk_samples_Bps=samples,
        cpu_mem_Bps=_mem_bandwidth(cpu, mem_bytes, repeats, statistic),
        cpu_fit=_expert_fit(hidden, inter, dtype, cpu, token_counts, repeats, statistic),
        meta=meta,
    )
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        dev = torch.device("cuda", index)
        profile.device = f"{dev} {torch.cuda.get_device_name(dev)}"
        profile.h2d_Bps = measure_h2d_bandwidth(dev, max(expert_nbytes, 16 * _MiB), repeats, statistic)
        profile.device_mem_Bps = _mem_bandwidth(dev, max(256 * _MiB, 4 * expert_nbytes), repeats, statistic)
        profile.device_fit = _expert_fit(hidden, inter, dtype, dev, token_counts, repeats, statistic)
    return profile
