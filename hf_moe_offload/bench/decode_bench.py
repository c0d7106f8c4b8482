"""Batch-1 decode speed of a MoE model: in memory, accelerate disk offload, and hf_moe_offload.

```
driver:  checkpoint bytes ─> disk / page-cache bandwidth ─> for rep: for config: [evict] ─> worker subprocess
worker:  load ─> generate(prompt, N tokens, StepTimer) ─> one JSON line      (optionally in a memory cgroup)
driver:  medians, ratios vs accelerate, physical lower bound per step ─> table + one JSON line
```

Configs are named by kind and expert budget: `a` (the whole model in memory), `b25` (accelerate,
`device_map="auto"`, `max_memory={"cpu": non-expert bytes + 25% of expert bytes}`, `offload_folder`) and `c25`
(hf_moe_offload with `offload_config={"host_budget": "25%"}`). Each run is a fresh subprocess, repetitions are
interleaved (a, b25, c25, c50, a, ...) because the machine is shared, and medians are reported.

Modes, stated next to every figure (DESIGN.md section 8):

* `ramlimit`: each worker runs in a cgroup v1 memory group of its budget + a fixed overhead (the whole model +
  overhead for `a`), so page cache and mapped file pages beyond the budget are reclaimed, as on a small machine.
* `fadvise`: the checkpoint and accelerate's offload folder are evicted before every decode step (outside the
  timed region). Pages that a live mmap maps are not evicted, so a method that keeps its files mapped stays warm
  in this mode; the `disk_read_bytes` of each run (from `/proc/self/io`) show what really came from disk.
* `warm`: nothing is evicted; every byte comes from the page cache.

Decode speed counts the steps after the first (prefill) one: a `LogitsProcessor` timestamps each step.
The lower bound of a step is the bytes it had to move divided by the bandwidth of where they come from: for
accelerate, every parameter placed on "disk" (it reloads them on every forward); for hf_moe_offload, the
`bytes_loaded` that `model.offload_stats()` reports per step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LogitsProcessor

from hf_moe_offload.bench.sysmem import (
    PeakRssSampler,
    evict_page_cache,
    page_cache_resident_bytes,
    process_io,
    rss_breakdown,
    run_in_memory_cgroup,
)

__all__ = [
    "RESULT_TAG",
    "StepTimer",
    "checkpoint_bytes",
    "config_budget",
    "run_benchmark",
    "run_worker",
    "spawn_worker",
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
    """Bytes of a safetensors checkpoint, split into experts (keys with `.experts.`) and the rest, from headers.

    Args:
        model_dir: a directory with `*.safetensors` files.

    Returns:
        `{"total": ..., "expert": ..., "non_expert": ...}` in bytes.
    """
    expert = other = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for path in files:
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            nbytes = info["data_offsets"][1] - info["data_offsets"][0]
            if ".experts." in key:
                expert += nbytes
            else:
                other += nbytes
    return {"total": expert + other, "expert": expert, "non_expert": other}


def config_budget(name: str, sizes: dict[str, int]) -> tuple[str, int | None, int]:
    """Parse a config name (`a`, `b25`, `c50`, `c50n` = prefetch off) into (kind, expert percent, budget in bytes).

    The budget is what the config may hold in memory: the whole model for `a`, otherwise the non-expert bytes
    plus the given percent of the expert bytes.
    """
    if name[:1] == "c" and name[-1:].isalpha():  # c25n: this library with prefetching off
        name = name[:-1]
    kind, pct = name[:1], name[1:]
    if not name or kind not in "abc" or (kind == "a") != (pct == "") or (pct and not pct.isdigit()):
        raise ValueError(f"config names are 'a', 'b<percent>' or 'c<percent>' (e.g. b25, c50), got {name!r}")
    if kind == "a":
        return kind, None, sizes["total"]
    percent = int(pct)
    return kind, percent, sizes["non_expert"] + sizes["expert"] * percent // 100


def _disk_bytes(model) -> int:
    """Bytes of the parameters accelerate placed on "disk" (reloaded on every forward)."""
    prefixes = [name for name, device in getattr(model, "hf_device_map", {}).items() if device == "disk"]
    total = 0
    for name, param in model.named_parameters():
        if any(p == "" or name == p or name.startswith(p + ".") for p in prefixes):
            total += param.numel() * param.element_size()
    return total


def _load(spec: dict):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.bfloat16}
    if spec["kind"] == "b":
        kwargs.update(device_map="auto", max_memory={"cpu": spec["budget"]}, offload_folder=spec["offload_folder"])
    elif spec["kind"] == "c":
        import hf_moe_offload

        if not hasattr(hf_moe_offload, "OffloadConfig"):
            raise ImportError("hf_moe_offload has no OffloadConfig yet: the library core has not landed")
        kwargs["offload_config"] = {"host_budget": f"{spec['percent']}%"}
        if spec["name"].endswith("n"):
            kwargs["offload_config"]["prefetch"] = "none"
    return AutoModelForCausalLM.from_pretrained(spec["model_dir"], **kwargs)


def _offload_stats(model) -> dict | None:
    stats = getattr(model, "offload_stats", None)
    if stats is None:
        return None
    return {k: v for k, v in dict(stats()).items() if isinstance(v, (int, float, str, bool)) or v is None}


def run_worker(spec: dict) -> dict:
    """Load one config and time one greedy generation; runs inside the worker subprocess.

    Args:
        spec: `kind`, `percent`, `budget`, `model_dir`, `offload_folder`, `mode`, `prompt_len`, `new_tokens`,
            `threads`, `sample`, `seed` (as written by `run_benchmark`).

    Returns:
        A JSON-able dict of timings, memory and (for hf_moe_offload) offload statistics.
    """
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    evict_paths = [spec["model_dir"]] + ([spec["offload_folder"]] if spec["kind"] == "b" else [])
    with PeakRssSampler() as peak:
        start = time.perf_counter()
        model = _load(spec)
        load_s = time.perf_counter() - start
        rss_loaded = rss_breakdown()
        vocab = model.config.vocab_size
        prompt = torch.randint(0, vocab, (1, spec["prompt_len"]), generator=torch.Generator().manual_seed(spec["seed"]))

        def evict() -> None:
            evict_page_cache([p for p in evict_paths if os.path.exists(p)])

        has_stats = _offload_stats(model) is not None
        timer = StepTimer(
            between_steps=evict if spec["mode"] == "fadvise" else None,
            per_step=lambda: {"io": process_io(), "stats": _offload_stats(model) if has_stats else None},
        )
        if spec["mode"] == "fadvise":
            evict()
        n = spec["new_tokens"]
        sampling = {"top_k": 0, "top_p": 1.0, "temperature": 1.0} if spec.get("sample") else {}
        torch.manual_seed(spec["seed"])
        timer.start()
        with torch.inference_mode():
            out = model.generate(
                prompt,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=bool(spec.get("sample")),
                logits_processor=[timer],
                pad_token_id=model.config.eos_token_id or 0,
                **sampling,
            )
    decode = timer.steps[1:]
    result = {
        "load_s": load_s,
        "prefill_s": timer.steps[0],
        "decode_steps_s": decode,
        "decode_tok_s": len(decode) / sum(decode) if decode else None,
        "tokens": out[0, spec["prompt_len"] :].tolist(),
        "rss_after_load": rss_loaded,
        "rss_after_generate": rss_breakdown(),
        "rss_peak": peak.peak,
        "disk_bytes": _disk_bytes(model) if spec["kind"] == "b" else 0,
        "resident_param_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta),
        "checkpoint_page_cache_bytes": page_cache_resident_bytes(spec["model_dir"]),
        "device_map": {k: str(v) for k, v in getattr(model, "hf_device_map", {}).items()},
    }
    # extras[i] is taken after step i, so consecutive differences are the decode steps (2..N).
    result.update(_deltas("decode_read_bytes", [e["io"].get("read_bytes") for e in timer.extras]))
    result.update(_deltas("decode_rchar", [e["io"].get("rchar") for e in timer.extras]))
    if has_stats:
        result["offload_stats"] = _offload_stats(model)
        result.update(_deltas("decode_bytes_loaded", [(e["stats"] or {}).get("bytes_loaded") for e in timer.extras]))
    return result


def _deltas(name: str, values: list) -> dict[str, list]:
    if len(values) < 2 or not all(isinstance(v, (int, float)) for v in values):
        return {}
    return {name: [b - a for a, b in zip(values[:-1], values[1:], strict=True)]}


def spawn_worker(spec: dict, *, cgroup_limit: int | None = None, timeout: float | None = None) -> dict:
    """Run `run_worker(spec)` in a fresh Python process (inside a memory cgroup when `cgroup_limit` is set).

    A spec with an `entry` ("module:function") runs that function on the spec instead (the `bench` command's
    scenario worker); it must return a JSON-able dict.

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
    if spec.get("entry"):  # another benchmark's worker ("module:function"), reusing this process machinery
        import importlib

        module, _, function = spec["entry"].partition(":")
        print(RESULT_TAG + json.dumps(getattr(importlib.import_module(module), function)(spec)), flush=True)
        return
    try:
        result = run_worker(spec)
    except ImportError as err:
        if spec["kind"] != "c":
            raise
        result = {"skipped": f"hf_moe_offload is not usable yet ({err})"}
    print(RESULT_TAG + json.dumps(result), flush=True)


def _spec(name: str, sizes: dict[str, int], model_dir: Path, **kwargs) -> dict:
    kind, percent, budget = config_budget(name, sizes)
    folder = tempfile.mkdtemp(prefix=f"accelerate-offload-{name}-") if kind == "b" else None
    return dict(
        name=name, kind=kind, percent=percent, budget=budget, model_dir=str(model_dir), offload_folder=folder, **kwargs
    )


def run_benchmark(
    model_dir: str | Path,
    configs: list[str],
    *,
    reps: int = 3,
    mode: str = "ramlimit",
    prompt_len: int = 32,
    new_tokens: int = 16,
    overhead_bytes: int = 768 * 1024**2,
    threads: int | None = 1,
    sample: bool = False,
    timeout: float | None = 1800,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, list[dict]]:
    """Run every config `reps` times, interleaved, each in a fresh worker process.

    Args:
        model_dir: the checkpoint directory.
        configs: config names, e.g. `["a", "b25", "c25", "c50"]` (see `config_budget`).
        reps: repetitions of each config.
        mode: "ramlimit", "fadvise" or "warm" (see the module docstring). Outside "warm", the checkpoint is
            evicted from the page cache before every run.
        prompt_len: random prompt tokens (the same prompt for every run).
        new_tokens: tokens generated per run; the first (prefill) step is not counted in decode speed.
        overhead_bytes: memory on top of the budget in "ramlimit" mode (Python, torch, activations).
        threads: `torch.set_num_threads` in the workers (None: torch's default). 1 by default: on a small shared
            machine, OpenMP threads that wait for a core another process holds made 2-thread decode steps 4-10x
            slower than 1-thread ones (0.4-0.7 s vs 0.06 s per step on the dev box under load).
        sample: sample (seeded, no top-k/top-p) instead of greedy decoding. A random model's greedy output tends
            to repeat one token, so routing repeats and expert caches look better than on real text; sampling
            gives near-uniform random tokens and routing (the pessimistic case).
        timeout: seconds per worker.
        seed: the prompt's seed.
        log: where progress lines go.

    Returns:
        `{config name: [one result dict per repetition]}`.
    """
    if mode not in ("ramlimit", "fadvise", "warm"):
        raise ValueError(f"mode must be 'ramlimit', 'fadvise' or 'warm', got {mode!r}")
    sizes = checkpoint_bytes(model_dir)
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for rep in range(reps):
        for name in configs:
            spec = _spec(
                name,
                sizes,
                Path(model_dir),
                mode=mode,
                prompt_len=prompt_len,
                new_tokens=new_tokens,
                threads=threads,
                sample=sample,
                seed=seed,
            )
            try:
                if mode != "warm":
                    evict_page_cache(model_dir)
                limit = spec["budget"] + overhead_bytes if mode == "ramlimit" else None
                result = spawn_worker(spec, cgroup_limit=limit, timeout=timeout)
            finally:
                if spec["offload_folder"]:
                    shutil.rmtree(spec["offload_folder"], ignore_errors=True)
            runs[name].append(result)
            speed = result.get("decode_tok_s")
            status = f"{speed:.3f} tok/s" if speed else result.get("skipped") or result.get("error")
            log(f"[rep {rep + 1}/{reps}] {name:>5}: {status}")
    return runs


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2])
    else:
        sys.exit(
            "usage: python -m hf_moe_offload.bench.decode_bench --worker SPEC_JSON (the driver is "
            "scripts/bench_offload_vs_accelerate.py)"
        )
