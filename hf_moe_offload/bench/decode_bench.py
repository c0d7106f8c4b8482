"""Worker-process pieces shared by the benchmarks: step timing, checkpoint byte counts, the worker subprocess.

```
driver (scenario_bench) --spawn_worker(spec with entry "module:function")--> python -m hf_moe_offload.bench.decode_bench
    --worker SPEC  (optionally in a memory cgroup) --> entry(spec) --> one tagged JSON line --> driver
```
`StepTimer` is a no-op `LogitsProcessor` that timestamps every `generate()` step (eviction between steps runs
outside the timed region); `checkpoint_bytes` splits a checkpoint into expert and other bytes from its headers.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LogitsProcessor

from ..integration.plan import describe_checkpoint
from ..storage import checkpoint_files, read_header
from .sysmem import run_in_memory_cgroup

__all__ = [
    "RESULT_TAG",
    "StepTimer",
    "checkpoint_bytes",
    "spawn_worker",
    "accelerate_disk_bytes",
    "scalar_offload_stats",
]

RESULT_TAG = "DECODE_BENCH_RESULT "


class StepTimer(LogitsProcessor):
    """A no-op logits processor that timestamps every generation step.

    `generate()` calls it once per step, after the forward pass. The time between two calls is one step; an
    optional `between_steps` callback (e.g. page-cache eviction) runs outside the timed region.

    Args:
        between_steps: called after each step is timed, before the next one starts.
        per_step: called after each step, its result kept in `extras` (e.g. a snapshot of `offload_stats()`).
    """

    def __init__(self, between_steps: Callable[[], None] | None = None, per_step: Callable[[], object] | None = None):
        self.between_steps = between_steps
        self.per_step = per_step
        self.steps: list[float] = []
        self.extras: list[object] = []
        self.start()

    def start(self) -> None:
        self._mark = time.perf_counter()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(time.perf_counter() - self._mark)
        if self.per_step is not None:
            self.extras.append(self.per_step())
        if self.between_steps is not None:
            self.between_steps()
        self._mark = time.perf_counter()
        return scores


def checkpoint_bytes(model_dir: str | Path) -> dict[str, int]:
    """Bytes of a safetensors checkpoint (single file or sharded), split into expert weights (the keys the model's
    adapters map to experts, with their quantization scales) and the rest, from the headers:
    `{"total": ..., "expert": ..., "non_expert": ...}`.

    Raises:
        MissingShardError: no safetensors file, or a shard the index names is missing.
        CorruptCheckpointError: a malformed header or index.
        UnsupportedModelError: the checkpoint's model has no experts module hf_moe_offload knows.
    """
    expert_keys = set(describe_checkpoint(str(model_dir))[2])
    expert = other = 0
    for path in checkpoint_files(str(model_dir)):
        for key, info in read_header(path).tensors.items():
            if key in expert_keys:
                expert += info.nbytes
            else:
                other += info.nbytes
    return {"total": expert + other, "expert": expert, "non_expert": other}


def accelerate_disk_bytes(model) -> int:
    """Bytes of the parameters accelerate placed on "disk" (reloaded on every forward)."""
    prefixes = [name for name, device in getattr(model, "hf_device_map", {}).items() if device == "disk"]
    total = 0
    for name, param in model.named_parameters():
        if any(p == "" or name == p or name.startswith(p + ".") for p in prefixes):
            total += param.numel() * param.element_size()
    return total


def scalar_offload_stats(model) -> dict | None:
    """`model.offload_stats()` without its nested entries (None for a model that is not offloaded)."""
    stats = getattr(model, "offload_stats", None)
    if stats is None:
        return None
    return {k: v for k, v in dict(stats()).items() if isinstance(v, (int, float, str, bool)) or v is None}


def spawn_worker(spec: dict, *, cgroup_limit: int | None = None, timeout: float | None = None) -> dict:
    """Run `spec["entry"]` ("module:function", e.g. `scenario_worker:run_spec`) on `spec` in a fresh Python
    process (inside a memory cgroup when `cgroup_limit` is set); the function must return a JSON-able dict.

    Returns the worker's result, or `{"error": ...}` with the tail of its stderr when it failed or was skipped.
    """
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, "-m", "hf_moe_offload.bench.decode_bench", "--worker", json.dumps(spec)]
    extra = {}
    try:
        if cgroup_limit is None:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        else:
            run = run_in_memory_cgroup(cmd, cgroup_limit, env=env, timeout=timeout)
            proc = run.completed
            extra = {
                "cgroup_limit": run.limit_bytes,
                "cgroup_max_usage": run.max_usage_bytes,
                "cgroup_failcnt": run.failcnt,
                "cgroup_oom_kills": run.oom_kills,
            }
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return {**json.loads(line[len(RESULT_TAG) :]), **extra}
    tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
    return {"error": f"worker exited with {proc.returncode}: {tail}", **extra}


def _worker_main(raw: str) -> None:
    spec = json.loads(raw)
    module, _, function = spec["entry"].partition(":")
    print(RESULT_TAG + json.dumps(getattr(importlib.import_module(module), function)(spec)), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2])
    else:
        sys.exit("usage: python -m hf_moe_offload.bench.decode_bench --worker SPEC_JSON (started by spawn_worker)")
