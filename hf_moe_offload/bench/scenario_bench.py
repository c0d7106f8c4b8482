"""The driver of `hf-moe-offload bench`: which configurations and scenario points to run, interleaved, in fresh
worker processes.

```
budgets x {accelerate, offload, offload with one feature off (ablations)} + memory  ──> configs
scenarios (latency: batch 1; throughput: batch sizes) x prompt length x new tokens  ──> points
for rep: for config: [evict page cache] ──> decode_bench.spawn_worker(entry=scenario_worker.run_spec)
                                               (in a memory cgroup of budget + overhead with --ramlimit)
```

Configurations are named `memory`, `accelerate@25%`, `offload@25%`, `offload@25%-prefetch` (an ablation from
`ABLATIONS`) or `offload@25%[io_threads=1]` (any `OffloadConfig` field). A budget is a share of the expert bytes
(`25%`) or an amount (`2GiB`); every configuration at a budget may hold the non-expert weights plus that many
expert bytes: accelerate gets it as `max_memory`, this library as `host_budget` (`device_budget` on CUDA).
Repetitions are interleaved (memory, accelerate, offload, memory, ...) because the machine is shared.

The `llamacpp` baseline (`llamacpp-bf16@25%`, `llamacpp-q8_0@25%`, `llamacpp-q4_k_m@25%`; `--baselines llamacpp` for
all three or `llamacpp-q8_0` for one) runs llama.cpp on GGUF files made from the same checkpoint (`bench.gguf`,
cached next to it) in the same kind of worker, memory cgroup included. With it, every contender is teacher-forced
(`forced`): the driver draws the prompt and the next ids once, every worker is fed them, and each reports its top-1
predictions, so step times compare the same work and top-1 agreement with the in-memory model is measured.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..config import OffloadConfig, parse_budget
from ..errors import OffloadConfigError
from ..scheduling.profile import evict_page_cache
from .decode_bench import spawn_worker
from .gguf import GGUF_TYPES
from .sysmem import CgroupUnavailableError

__all__ = ["ABLATIONS", "BenchConfig", "forced_ids", "make_configs", "make_points", "run_scenarios", "WORKER_ENTRY"]

WORKER_ENTRY = "hf_moe_offload.bench.scenario_worker:run_spec"

# Ablation name -> (OffloadConfig fields that switch the feature off, what it means).
ABLATIONS: dict[str, tuple[dict, str]] = {
    "prefetch": ({"prefetch": "none"}, "no prefetching (demand loads only)"),
    "io_mode": ({"io_mode": "cached"}, "expert reads stay in the page cache (no fadvise)"),
    "io_threads": ({"io_threads": 1}, "one I/O thread"),
}


@dataclass
class BenchConfig:
    """One configuration: `kind` is "memory", "accelerate", "offload" or "llamacpp"; `budget` a share or amount of
    experts (`extra["gguf_type"]`: the llamacpp GGUF type)."""

    name: str
    kind: str
    budget: str | None = None
    offload_config: dict | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def budget_bytes(self, sizes: dict[str, int]) -> int:
        """Memory this configuration may use for weights: everything for "memory", else non-expert + budget."""
        if self.kind == "memory":
            return sizes["total"]
        return sizes["non_expert"] + parse_budget(self.budget, "--budgets").resolve(sizes["expert"])


def _budget_label(value: str) -> str:
    value = value.strip()
    return f"{value}%" if value.replace(".", "", 1).isdigit() else value


def _ablation(item: str) -> tuple[str, dict, str]:
    item = item.strip()
    if "+" in item:  # several changes at once: threads=1+io_mode=direct
        parts = [_ablation(part) for part in item.split("+")]
        return (
            "".join(p[0] for p in parts),
            {k: v for p in parts for k, v in p[1].items()},
            ", ".join(p[2] for p in parts),
        )
    if "=" in item:
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        typed: object = value.strip()
        for number in (int, float):  # expert_fraction=0.5, io_threads=4
            try:
                typed = number(value)
                break
            except ValueError:
                pass
        return f"[{key}={value.strip()}]", {key: typed}, f"{key}={value.strip()}"
    if item not in ABLATIONS:
        raise OffloadConfigError(
            f"--ablate: unknown feature {item!r}; use one of {', '.join(ABLATIONS)} or FIELD=VALUE "
            f"(an OffloadConfig field such as prefetch=none)"
        )
    return f"-{item}", *ABLATIONS[item]


def make_configs(
    budgets: list[str],
    *,
    baselines: list[str] = ("memory", "accelerate"),
    ablations: list[str] = (),
    offload: dict | None = None,
    device: str = "cpu",
) -> list[BenchConfig]:
    """The configurations to run, memory first, then per budget: accelerate, offload, its ablations.

    Args:
        budgets: shares (`"25"`, `"25%"`) or amounts (`"2GiB"`) of expert bytes.
        baselines: any of "memory", "accelerate", "llamacpp" (every GGUF type) or "llamacpp-<type>" (one of
            `gguf.GGUF_TYPES`: bf16, q8_0, q4_k_m).
        ablations: names from `ABLATIONS` or `FIELD=VALUE` overrides of `OffloadConfig`, several joined by `+`
            (`threads=1+io_mode=direct`).
        offload: `OffloadConfig` fields applied to every offload configuration.
        device: "cpu" or "cuda[:N]": on CUDA the budget is the `device_budget`.

    Raises:
        OffloadConfigError: an unknown baseline, ablation or invalid config value.
    """
    gguf_types = [t for t in GGUF_TYPES if "llamacpp" in baselines or f"llamacpp-{t}" in baselines]
    unknown = sorted(set(baselines) - {"memory", "accelerate", "llamacpp"} - {f"llamacpp-{t}" for t in GGUF_TYPES})
    if unknown:
        raise OffloadConfigError(
            f"--baselines: unknown {unknown}; use memory, accelerate, llamacpp, "
            f"{', '.join('llamacpp-' + t for t in GGUF_TYPES)} or none"
        )
    configs = [BenchConfig("memory", "memory", note="the whole model in memory")] if "memory" in baselines else []
    tier = "device_budget" if device.startswith("cuda") else "host_budget"
    for raw in budgets:
        budget = _budget_label(raw)
        parse_budget(budget, "--budgets")
        if "accelerate" in baselines:
            configs.append(
                BenchConfig(
                    f"accelerate@{budget}", "accelerate", budget, note="device_map=auto, max_memory, offload_folder"
                )
            )
        for t in gguf_types:
            configs.append(
                BenchConfig(
                    f"llamacpp-{t}@{budget}",
                    "llamacpp",
                    budget,
                    note=f"llama.cpp, {t} GGUF, mmap",
                    extra={"gguf_type": t},
                )
            )
        base = {**(offload or {}), tier: budget, "device": device}
        OffloadConfig.from_dict(base)
        configs.append(BenchConfig(f"offload@{budget}", "offload", budget, base, note="hf_moe_offload"))
        for item in ablations:
            suffix, override, note = _ablation(item)
            cfg = {**base, **override}
            OffloadConfig.from_dict(cfg)
            configs.append(BenchConfig(f"offload@{budget}{suffix}", "offload", budget, cfg, note=note))
    return configs


def make_points(scenarios: list[str], batches: list[int], prompt_len: int, new_tokens: int) -> list[dict]:
    """Scenario points: `latency` (batch 1) and `throughput@B` for each batch size."""
    unknown = sorted(set(scenarios) - {"latency", "throughput"})
    if unknown:
        raise OffloadConfigError(f"--scenario: unknown {unknown}; use latency, throughput")
    points = []
    if "latency" in scenarios:
        points.append(dict(key="latency", scenario="latency", batch=1, prompt_len=prompt_len, new_tokens=new_tokens))
    if "throughput" in scenarios:
        for b in batches:
            points.append(
                dict(
                    key=f"throughput@{b}", scenario="throughput", batch=b, prompt_len=prompt_len, new_tokens=new_tokens
                )
            )
    return points


def _run_in_process(spec: dict) -> dict:
    import torch

    from .scenario_worker import run_spec

    threads = torch.get_num_threads()
    try:
        return run_spec(spec)
    except Exception as e:  # noqa: BLE001 - reported like a failed worker
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        torch.set_num_threads(threads)


def run_scenarios(
    model_dir: str | Path,
    configs: list[BenchConfig],
    points: list[dict],
    sizes: dict[str, int],
    *,
    reps: int = 3,
    mode: str = "cold",
    overhead_bytes: int = 768 * 1024**2,
    limit_bytes: int | None = None,
    threads: int | None = 1,
    dtype: str = "auto",
    device: str = "cpu",
    sample: bool = False,
    seed: int = 0,
    replay: str | None = None,
    timeout: float | None = 1800,
    in_process: bool = False,
    safety_bytes: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    forced: bool | None = None,
) -> dict[str, list[dict]]:
    """Run every configuration `reps` times, interleaved; each run loads the model once and times every point.

    Args:
        model_dir: the checkpoint folder.
        configs: from `make_configs`.
        points: from `make_points`.
        sizes: `decode_bench.checkpoint_bytes(model_dir)`.
        reps: repetitions per configuration.
        mode: "cold" (page cache evicted before every point and decode step), "warm" (never evicted) or
            "ramlimit" (evicted before every run, which runs in a memory cgroup of its budget + `overhead_bytes`).
        overhead_bytes: memory above the budget in "ramlimit" mode (Python, torch, activations, KV cache).
        limit_bytes: in "ramlimit" mode, one cgroup limit for every worker in place of budget + `overhead_bytes`
            (a budget sweep under one fixed limit).
        threads: torch threads in each worker (None: torch's default).
        dtype: "auto" (the checkpoint's) or a torch dtype name.
        device: "cpu" or "cuda[:N]".
        sample: seeded sampling instead of greedy decoding.
        seed: prompt and sampling seed.
        replay: a routing trace (`.npz`) every model follows.
        timeout: seconds per worker.
        in_process: run in this process (tests, debugging): no fresh process per run, no cgroup.
        safety_bytes: outside "ramlimit" mode, each worker still runs in a memory cgroup this large (when one is
            available), so that a baseline whose memory runs away is killed alone rather than by the system's
            OOM killer (accelerate's disk offload at batch 32 grew to 22 GB on a 3.4 GB model). None: no limit.
        progress: a tqdm bar over the runs.
        log: where one line per finished run goes (default: above the progress bar).
        forced: teacher-force every contender with the same ids (`forced_ids`); None: when a llamacpp configuration
            runs. Its GGUF files are made first (`gguf.ensure_ggufs`, cached next to the checkpoint).

    Returns:
        `{config name: [one worker result per repetition]}`.
    """
    if mode not in ("cold", "warm", "ramlimit"):
        raise OffloadConfigError(f"mode: expected cold, warm or ramlimit, got {mode!r}")
    if in_process and mode == "ramlimit":
        raise OffloadConfigError("--in-process cannot run in a memory cgroup; drop --ramlimit or --in-process")
    runs: dict[str, list[dict]] = {c.name: [] for c in configs}
    ggufs = _prepare_ggufs(model_dir, configs, log or (lambda line: print(line, file=sys.stderr)))
    if forced is None:
        forced = bool(ggufs)
    ids = forced_ids(model_dir, points, seed) if forced else None
    bar = tqdm(total=reps * len(configs), desc="bench", unit="run", file=sys.stderr, disable=not progress)
    write = log or bar.write
    try:
        for rep in range(reps):
            for cfg in configs:
                bar.set_postfix_str(f"rep {rep + 1}/{reps} {cfg.name}")
                budget = cfg.budget_bytes(sizes)
                folder = tempfile.mkdtemp(prefix="hf-moe-offload-accelerate-") if cfg.kind == "accelerate" else None
                scratch = tempfile.mkdtemp(prefix="hf-moe-offload-bench-")
                spec = dict(
                    entry=WORKER_ENTRY,
                    name=cfg.name,
                    kind=cfg.kind,
                    model_dir=str(model_dir),
                    budget_bytes=budget,
                    offload_config=cfg.offload_config,
                    offload_folder=folder,
                    mode=mode,
                    points=points,
                    threads=threads,
                    dtype=dtype,
                    device=device,
                    sample=sample,
                    seed=seed,
                    replay=replay,
                    partial_path=os.path.join(scratch, "partial.json"),
                    forced_ids=ids,
                    gguf=ggufs.get(cfg.extra.get("gguf_type")) if cfg.kind == "llamacpp" else None,
                )
                try:
                    if mode != "warm":
                        evict_page_cache([model_dir, spec["gguf"]] if spec["gguf"] else model_dir)
                    if in_process:
                        result = _run_in_process(spec)
                    else:
                        limit = (limit_bytes or budget + overhead_bytes) if mode == "ramlimit" else safety_bytes
                        result = _spawn(spec, limit, timeout)
                        _merge_partial(result, spec, points)
                finally:
                    for path in (folder, scratch):
                        if path:
                            shutil.rmtree(path, ignore_errors=True)
                runs[cfg.name].append(result)
                write(f"[rep {rep + 1}/{reps}] {cfg.name:<28} {_status(result)}")
                bar.update(1)
    finally:
        bar.close()
    return runs


def _prepare_ggufs(model_dir, configs: list[BenchConfig], log: Callable[[str], None]) -> dict[str, str]:
    types = [c.extra["gguf_type"] for c in configs if c.kind == "llamacpp"]
    if not types:
        return {}
    from .gguf import ensure_ggufs

    return {t: str(p) for t, p in ensure_ggufs(model_dir, list(dict.fromkeys(types)), log=log).items()}


def forced_ids(model_dir: str | Path, points: list[dict], seed: int = 0) -> dict[str, list[list[int]]]:
    """The ids every contender is fed, per point: `(batch, prompt_len + new_tokens)`, from `prompt_ids` (the
    tokenized paragraph when the folder has a tokenizer, else seeded random ids), drawn once by the driver."""
    from .scenario_worker import prompt_ids

    with open(Path(model_dir) / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return {
        p["key"]: prompt_ids(
            str(model_dir), vocab, p["batch"], p["prompt_len"] + p["new_tokens"], seed + p["batch"]
        ).tolist()
        for p in points
    }


def _spawn(spec: dict, limit: int | None, timeout: float | None) -> dict:
    try:
        result = spawn_worker(spec, cgroup_limit=limit, timeout=timeout)
    except CgroupUnavailableError:  # only the safety limit can be missing: ramlimit checked the cgroup up front
        result = spawn_worker(spec, cgroup_limit=None, timeout=timeout)
    if "error" in result and result.get("cgroup_oom_kills"):
        result["error"] = f"out of memory: killed by the {limit / 2**30:.2f} GiB memory cgroup"
    return result


def _merge_partial(result: dict, spec: dict, points: list[dict]) -> None:
    """A worker that died keeps the points it finished; the others get its error."""
    if "error" not in result:
        return
    if os.path.isfile(spec["partial_path"]):
        with open(spec["partial_path"], encoding="utf-8") as f:
            result.update(json.load(f))
    done = result.setdefault("points", {})
    for point in points:
        done.setdefault(point["key"], {"error": result["error"]})


def _status(result: dict) -> str:
    if "error" in result:
        return f"error: {result['error'].splitlines()[-1] if result['error'] else ''}"
    parts = []
    for key, point in result.get("points", {}).items():
        if "error" in point:
            parts.append(f"{key}: error")
        elif key == "latency":
            parts.append(f"latency p50 {1e3 * point['step_p50_s']:.1f} ms" if point["step_p50_s"] else "latency -")
        else:
            parts.append(f"{key} {point['tok_s']:.2f} tok/s")
    return ", ".join(parts) + f" (load {result.get('load_s', 0):.1f} s)"
