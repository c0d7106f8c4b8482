"""Budgets against the machine: what each memory tier can give the experts, and budgets fitted to it.

```
tier limit  = min(memory available now, max_memory=[tier]) x 90%  -  the model's other weights on that tier
              (host: also the loaders' staging buffers when experts are quantized on load, `staging_bytes`)
share budget ("50%", the default)  --above the limit-->  shrunk to the limit (logged at INFO)
byte budget  ("40GiB")             --above the limit-->  BudgetTooLargeError (says the limit and how to fix it)
```
Memory available now is `psutil.virtual_memory().available` for the host, lowered by the cgroup's limit (v2
`memory.max`, v1 `memory.limit_in_bytes`) when one applies, and `torch.cuda.mem_get_info` for a CUDA device. The
10% headroom is for activations, the KV cache and the interpreter. The model's other weights (embeddings,
attention, routers: `MoETopology.other_nbytes`) live on the compute device, so they count against the host on CPU
and against the GPU on CUDA.

accelerate's `max_memory=` means the total a device may use; with `offload_config` its `"cpu"` entry and the
compute device's entry lower the host and device limits above (they never raise them). Other keys (`"disk"`,
other GPUs) have no meaning for offloaded experts and are refused, so no setting is silently ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from ..config import Budget, format_bytes, parse_budget
from ..errors import BudgetTooLargeError, OffloadConfigError

__all__ = ["TierLimit", "HEADROOM", "available_host_bytes", "tier_limits", "fit_budget", "parse_max_memory"]

logger = logging.getLogger("hf_moe_offload")

HEADROOM = 0.9  # share of the available memory budgets may plan for; the rest is for activations and the KV cache
_NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a huge page-aligned number


@dataclass(frozen=True)
class TierLimit:
    """The most bytes of experts one tier may hold, and where that figure comes from (named in messages)."""

    nbytes: int
    source: str


def _cgroup_dirs() -> list[tuple[Path, str, str]]:
    """(folder, limit file, usage file) of this process's memory cgroup: v2 and v1, by /proc/self/cgroup, then the
    mount roots (what a container sees as its own cgroup)."""
    found = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            found.append((Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max", "memory.current"))
        elif "memory" in controllers.split(","):
            v1 = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            found.append((v1, "memory.limit_in_bytes", "memory.usage_in_bytes"))
    found.append((Path("/sys/fs/cgroup"), "memory.max", "memory.current"))
    found.append((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"))
    return found


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup still allows (limit - usage), or None when no memory limit applies."""
    for folder, limit_file, usage_file in _cgroup_dirs():
        try:
            limit = (folder / limit_file).read_text().strip()
            usage = int((folder / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= _NO_LIMIT:
            continue
        return max(0, int(limit) - usage)
    return None


def available_host_bytes() -> tuple[int, str]:
    """RAM this process can still use, and how it was measured."""
    available = psutil.virtual_memory().available
    room = _cgroup_room()
    if room is not None and room < available:
        return room, "left under the cgroup memory limit"
    return available, "available RAM, psutil"


def parse_max_memory(max_memory: dict | None, device: torch.device) -> dict[str, int]:
    """accelerate's `max_memory=` as `{"host": bytes, "device": bytes}` (only the tiers it names).

    Raises:
        OffloadConfigError: a key other than "cpu" and the compute device, or a value that is not bytes.
    """
    if max_memory is None:
        return {}
    if not isinstance(max_memory, dict):
        raise OffloadConfigError(f"max_memory: expected a dict such as {{'cpu': '30GiB'}}, got {max_memory!r}")
    out: dict[str, int] = {}
    index = device.index or 0
    compute = {index, str(index), f"cuda:{index}", "cuda"} if device.type == "cuda" else set()
    for key, value in max_memory.items():
        tier = "host" if key == "cpu" else "device" if key in compute else None
        if tier is None:
            allowed = "'cpu'" + (f" and {index} (the compute device)" if compute else "")
            raise OffloadConfigError(
                f"max_memory: key {key!r} has no meaning with offload_config=; experts are read from the checkpoint "
                f"and computed on {device}. Allowed keys: {allowed}; remove {key!r}"
            )
        budget = value if isinstance(value, Budget) else parse_budget(value, f"max_memory[{key!r}]")
        if budget.nbytes is None:
            raise OffloadConfigError(f"max_memory[{key!r}]: expected bytes such as '30GiB', got {value!r}")
        out[tier] = budget.nbytes
    return out


def tier_limits(
    device: torch.device, other_nbytes: int, max_memory: dict[str, int], staging_nbytes: int = 0
) -> dict[str, TierLimit]:
    """The limit of the host tier, and of the device tier on CUDA (see the module docstring); `staging_nbytes` of
    host memory the loaders need besides the slots (quantizing on load) come off the host limit as well."""
    limits = {}
    tiers = {"host": available_host_bytes()}
    if device.type == "cuda":
        tiers["device"] = (torch.cuda.mem_get_info(device)[0], f"free memory on {device}")
    for tier, (nbytes, source) in tiers.items():
        if tier in max_memory and max_memory[tier] < nbytes:
            key = "'cpu'" if tier == "host" else str(device.index or 0)
            nbytes, source = max_memory[tier], f"max_memory[{key}]"
        other = other_nbytes if (tier == "device") == (device.type == "cuda") else 0
        staging = staging_nbytes if tier == "host" else 0
        usable = max(0, int(nbytes * HEADROOM) - other - staging)
        detail = f"{HEADROOM:.0%} of {format_bytes(nbytes)} ({source})"
        if other:
            detail += f" minus {format_bytes(other)} of the model's other weights"
        if staging:
            detail += f" minus {format_bytes(staging)} of staging buffers for quantizing on load (a sidecar needs none)"
        limits[tier] = TierLimit(usable, detail)
    return limits


def fit_budget(name: str, budget: Budget, total_expert_nbytes: int, limit: TierLimit | None) -> int:
    """Bytes of `budget` for a model with `total_expert_nbytes` of experts, fitted to `limit`.

    A share above the limit is shrunk to it; bytes above the limit are refused.

    Raises:
        BudgetTooLargeError: `budget` is a byte count larger than the limit.
    """
    nbytes = budget.resolve(total_expert_nbytes)
    if limit is None or nbytes <= limit.nbytes:
        return nbytes
    if budget.nbytes is not None:
        raise BudgetTooLargeError(
            f"{name}={budget} is more than this machine can give the experts: {format_bytes(limit.nbytes)} "
            f"= {limit.source}. Lower {name} to at most {limit.nbytes} bytes, or give a share such as "
            f"'50%', which is shrunk to fit"
        )
    logger.info(
        "%s=%s is %s, more than the limit of %s = %s; using %s",
        name,
        budget,
        format_bytes(nbytes),
        format_bytes(limit.nbytes),
        limit.source,
        format_bytes(limit.nbytes),
    )
    return limit.nbytes
