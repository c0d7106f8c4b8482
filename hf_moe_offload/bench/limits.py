"""Physical limits: the bandwidths that bound an offloaded decode step, and the bound itself.

```
checkpoint files --evict, read 16 MiB blocks--> disk bandwidth (cold; several samples, the fastest kept)
                 --read twice, time the 2nd----> page-cache bandwidth (warm)
pinned host buffer --copy_ to the GPU---------> host->device bandwidth (CUDA only; None without a GPU)

lower bound of a step = max(compute time, disk bytes / disk bandwidth, h2d bytes / h2d bandwidth)
```

A step cannot be faster than its computation, nor than the time its bytes take to arrive (DESIGN.md section 6).
Benchmarks report the bound next to the measured step time and their ratio (`efficiency` = bound / measured:
1.0 runs at the physical limit). The disk of a shared virtual machine drifts, so `measure_limits` keeps the
*fastest* of several cold samples: the bound then stays a lower bound. CUDA is touched only inside
`measure_h2d_bandwidth`, and only when `torch.cuda.is_available()`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .sysmem import measure_disk_bandwidth

__all__ = ["Limits", "lower_bound", "measure_h2d_bandwidth", "measure_limits"]

MiB = 1024**2


def measure_h2d_bandwidth(nbytes: int = 256 * MiB, repeats: int = 5, device: str = "cuda") -> float | None:
    """Pinned host -> device copy bandwidth in bytes/s (the fastest of `repeats` copies), or None without CUDA.

    Args:
        nbytes: bytes per copy (at least one expert's worth gives the bandwidth experts see).
        repeats: timed copies after one warm-up copy.
        device: the CUDA device.
    """
    import torch

    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return nbytes / best


@dataclass
class Limits:
    """Measured bandwidths in bytes/s (`h2d_Bps` is None without a GPU)."""

    disk_Bps: float
    page_cache_Bps: float
    h2d_Bps: float | None = None
    disk_samples_Bps: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        h2d = f", host->device (pinned) {self.h2d_Bps / 1e9:.1f} GB/s" if self.h2d_Bps else ""
        samples = ", ".join(f"{s / 1e9:.2f}" for s in self.disk_samples_Bps)
        return (
            f"disk (cold, page cache evicted) {self.disk_Bps / 1e9:.2f} GB/s [samples {samples}], "
            f"page cache {self.page_cache_Bps / 1e9:.2f} GB/s{h2d}"
        )


def measure_limits(
    path: str | Path,
    *,
    max_bytes: int = 512 * MiB,
    samples: int = 2,
    device: str = "cpu",
) -> Limits:
    """Measure the disk (cold), page-cache and (on CUDA) host->device bandwidths.

    Args:
        path: the checkpoint folder (the bandwidth its own files are read at).
        max_bytes: bytes read per sample.
        samples: cold samples; the fastest is kept.
        device: "cpu" or a CUDA device for the host->device measurement.
    """
    cold = [measure_disk_bandwidth(path, cold=True, max_bytes=max_bytes) for _ in range(max(1, samples))]
    warm = measure_disk_bandwidth(path, cold=False, max_bytes=max_bytes)
    h2d = measure_h2d_bandwidth(device=device) if str(device).startswith("cuda") else None
    return Limits(disk_Bps=max(cold), page_cache_Bps=warm, h2d_Bps=h2d, disk_samples_Bps=cold)


def lower_bound(
    compute_s: float | None,
    disk_bytes: float | None,
    disk_Bps: float,
    h2d_bytes: float | None = None,
    h2d_Bps: float | None = None,
) -> float | None:
    """`max(compute, disk bytes / disk bandwidth, h2d bytes / h2d bandwidth)` over the terms that are known.

    Returns None when no term is known.
    """
    terms = [compute_s] if compute_s is not None else []
    if disk_bytes is not None and disk_Bps:
        terms.append(disk_bytes / disk_Bps)
    if h2d_bytes and h2d_Bps:
        terms.append(h2d_bytes / h2d_Bps)
    return max(terms) if terms else None
