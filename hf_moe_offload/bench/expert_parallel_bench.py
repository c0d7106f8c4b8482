"""1 rank against N expert-parallel ranks of the same offloaded model, each process under the same memory limit:
the measurement behind `hf-moe-offload bench --world-size N` and `scripts/bench_expert_parallel.py`.

```
for rep (interleaved: the machine is shared):  for each budget B (a share or amount of ALL expert bytes):
    1 rank : from_pretrained(offload_config={host_budget: B})                                  [memory limit L]
    N ranks: from_pretrained(offload_config={host_budget: B's bytes, of the rank's 1/N},     [each: limit L]
                             distributed_config=DistributedConfig(tp_size=N, ep_size=N))
       every rank (rank_worker): the same prompt, `new_tokens` decoded, each step timed (StepTimer) with a
       snapshot of offload_stats() --> one tagged JSON line (decode_bench's worker entry)
       --> run_ranks: every rank's result + its peak memory (the cgroup's, else the process's VmHWM)
summarise: per (B, world size) medians over reps: tok/s, per-rank expert bytes, per-rank bytes read per decoded
token, peak memory per process  +  predict: `plan`'s batch-1 tok/s of one rank for each world size
```
Each of the N ranks owns `1/N` of the experts and is given the bytes of expert cache that the single process gets
(`rank_budget`: 50% of all experts is 100% of a rank's half at N = 2), so every process holds the same cache under
the same limit: the comparison is "N machines (or cgroups) of one size" against one. `tp_size=N, ep_size=N` keeps
one shared sequence (an all-reduce combines each MoE layer), so all runs decode the same stream and rank 0's step
times are the job's. The 1-rank run gets N times the torch threads of one rank, so both use the same cores.

The prediction is `plan_for_model(..., world_size=N)` at batch 1 for a process allowed the dense weights, the
1-rank budget and the KV cache. `plan` costs the all-to-all layout (`fsdp_size=N`, each rank its own sequence):
there a rank's experts see the routing of N tokens per step, here of 1, so the plan's N-rank figure is for N times
this run's expert work (docs/distributed.md, planning for N ranks).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..config import format_bytes, parse_budget
from ..scheduling.profile import HardwareProfile, evict_page_cache
from .decode_bench import RESULT_TAG
from .sysmem import CgroupUnavailableError, run_in_memory_cgroup

__all__ = [
    "WORKER_ENTRY",
    "rank_budget",
    "rank_worker",
    "run_ranks",
    "run_comparison",
    "model_summary",
    "plan_memory_bytes",
    "predict",
    "summarise",
    "format_table",
]

WORKER_ENTRY = "hf_moe_offload.bench.expert_parallel_bench:rank_worker"
_ROOT = str(Path(__file__).resolve().parents[2])


def rank_budget(budget: str | int, world_size: int) -> str | int:
    """The `host_budget` of one of `world_size` ranks that caches the bytes `budget` (of ALL experts) gives one
    process: an amount stays, a share is multiplied by `world_size` (at most 100% of the rank's own experts)."""
    parsed = parse_budget(budget, "--budgets")
    if parsed.nbytes is not None or world_size == 1:
        return budget
    return f"{min(100.0, world_size * parsed.fraction * 100):g}%"


def rank_worker(spec: dict) -> dict:
    """One rank (`RANK`, `WORLD_SIZE` and the rendezvous in the environment, as torchrun sets them): load, decode
    `spec["new_tokens"]` tokens after a `spec["prompt_len"]` prompt, report times, bytes read and memory."""
    import torch
    from transformers import AutoModelForCausalLM

    import hf_moe_offload  # noqa: F401 - `offload_config=` on from_pretrained

    from .decode_bench import StepTimer
    from .scenario_worker import prompt_ids
    from .sysmem import rss_breakdown

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    kwargs = {}
    if world > 1:
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(tp_size=world, ep_size=world)
    dtype = spec.get("dtype") or "auto"
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"],
        dtype=dtype if dtype == "auto" else getattr(torch, dtype),
        offload_config=spec["offload_config"],
        **kwargs,
    )
    load_s = time.perf_counter() - t0
    vocab = model.config.get_text_config().vocab_size
    ids = prompt_ids(spec["model_dir"], vocab, 1, spec["prompt_len"], spec.get("seed", 0))
    n = spec["new_tokens"]
    sampling = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0} if spec.get("sample") else {}
    torch.manual_seed(spec.get("seed", 0))  # the same draws on every rank: one shared sequence
    eos = model.generation_config.eos_token_id
    pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    timer = StepTimer(per_step=lambda: model.offload_stats()["bytes_loaded"])
    with torch.inference_mode():
        timer.start()
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            logits_processor=[timer],
            pad_token_id=pad,
            **sampling,
        )
    stats = model.offload_stats()
    decode = timer.steps[1:]
    out = {
        "rank": int(os.environ.get("RANK", "0")),
        "world_size": world,
        "load_s": load_s,
        "ttft_s": timer.steps[0],
        "decode_tok_s": len(decode) / sum(decode) if decode else None,
        "decode_bytes_per_token": (timer.extras[-1] - timer.extras[0]) / len(decode) if decode else None,
        "hit_rate": stats["hit_rate"],
        "bytes_loaded": stats["bytes_loaded"],
        "expert_bytes_total": stats["expert_bytes_total"],
        "host_slots": stats["host_slots"],
        "rss_hwm_bytes": rss_breakdown()["VmHWM"],
    }
    if world > 1:
        torch.distributed.destroy_process_group()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_rank(cmd: list[str], env: dict, rank: int, world: int, limit: int | None, timeout: float | None) -> dict:
    peak = oom = -1
    try:
        if limit is None:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        else:
            run = run_in_memory_cgroup(cmd, limit, env=env, timeout=timeout)
            proc, peak, oom = run.completed, run.max_usage_bytes, run.oom_kills
    except subprocess.TimeoutExpired:
        return {"rank": rank, "error": f"rank {rank} of {world} timed out after {timeout} s"}
    line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)), None)
    if proc.returncode != 0 or line is None:
        if oom > 0:
            return {"rank": rank, "error": f"rank {rank} of {world}: out of memory, killed by the {limit} B cgroup"}
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        return {"rank": rank, "error": f"rank {rank} of {world} exited with {proc.returncode}: {tail}"}
    result = json.loads(line[len(RESULT_TAG) :])
    result["cgroup_peak_bytes"] = peak if limit is not None else None
    result["peak_bytes"] = peak if peak > 0 else result["rss_hwm_bytes"]
    return result


def run_ranks(world_size: int, spec: dict, *, limit_bytes: int | None = None, timeout: float | None = None) -> dict:
    """Start `world_size` processes of `rank_worker(spec)` (rendezvous on a free localhost port, gloo), each in its
    own memory cgroup of `limit_bytes` when given, and wait for all.

    Returns:
        `{"ranks": [each rank's result, with "peak_bytes"], "decode_tok_s", "ttft_s", "hit_rate"}` (rank 0's), or
        `{"error": the first rank's error, "ranks": [...]}` when a rank failed.

    Raises:
        CgroupUnavailableError: `limit_bytes` is set and memory cgroups cannot be created here.
    """
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "hf_moe_offload.bench.decode_bench",
        "--worker",
        json.dumps(spec | {"entry": WORKER_ENTRY}),
    ]
    threads = str(spec.get("threads") or os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    base = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": threads,
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }

    def start(rank: int) -> dict:
        env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        return _start_rank(cmd, env, rank, world_size, limit_bytes, timeout)

    with ThreadPoolExecutor(world_size) as pool:
        ranks = list(pool.map(start, range(world_size)))
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        return {"error": errors[0], "ranks": ranks}
    return {"ranks": ranks, **{k: ranks[0][k] for k in ("decode_tok_s", "ttft_s", "hit_rate")}}


def run_comparison(
    model_dir: str | Path,
    budgets: dict[str, dict],
    world_size: int,
    *,
    limits: dict[str, int | None],
    limit_required: bool = True,
    reps: int = 1,
    prompt_len: int = 16,
    new_tokens: int = 16,
    threads: int | None = 1,
    dtype: str = "auto",
    sample: bool = False,
    seed: int = 0,
    evict: bool = True,
    timeout: float | None = 1800,
    log: Callable[[str], None] | None = None,
) -> dict[tuple[str, int], list[dict]]:
    """Run 1 rank and `world_size` ranks at each budget, `reps` times, interleaved.

    Args:
        model_dir: the checkpoint folder.
        budgets: budget label -> the 1-rank run's `offload_config` (its `host_budget` a share or amount of all
            experts); the ranks get `rank_budget` of it.
        world_size: ranks of the expert-parallel runs (> 1; it must divide the experts per layer).
        limits: budget label -> memory limit of EACH process in bytes (None: no cgroup).
        limit_required: raise when the cgroup cannot be made; False runs without a limit instead (a safety limit).
        reps: repetitions of each (budget, world size).
        prompt_len, new_tokens: prompt tokens and tokens decoded (exactly).
        threads: torch threads of one rank (the 1-rank run gets `world_size` times as many); None: torch's default.
        dtype: "auto" (the checkpoint's) or a torch dtype name.
        sample, seed: seeded sampling instead of greedy decoding; the prompt's seed.
        evict: evict the checkpoint from the page cache before every run.
        timeout: seconds per run.
        log: one line per finished run (default: stderr).

    Returns:
        `{(budget label, world size): [run_ranks result per repetition]}`.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    runs: dict[tuple[str, int], list[dict]] = {(b, w): [] for b in budgets for w in (1, world_size)}
    for rep in range(reps):
        for label, config in budgets.items():
            for world in (1, world_size):
                per_rank = threads * (world_size // world) if threads else None
                offload = {**config, "host_budget": rank_budget(config["host_budget"], world), "device": "cpu"}
                if per_rank:
                    offload["threads"] = per_rank
                spec = dict(
                    model_dir=str(model_dir),
                    offload_config=offload,
                    prompt_len=prompt_len,
                    new_tokens=new_tokens,
                    threads=per_rank,
                    dtype=dtype,
                    sample=sample,
                    seed=seed,
                )
                if evict:
                    evict_page_cache(model_dir)
                try:
                    result = run_ranks(world, spec, limit_bytes=limits.get(label), timeout=timeout)
                except CgroupUnavailableError:
                    if limit_required:
                        raise
                    result = run_ranks(world, spec, limit_bytes=None, timeout=timeout)
                runs[(label, world)].append(result)
                status = result.get("error") or f"{result['decode_tok_s']:.2f} tok/s, hit rate {result['hit_rate']:.2f}"
                log(
                    f"[rep {rep + 1}/{reps}] {label} x {world} rank{'s' if world > 1 else ''}: {status.splitlines()[-1]}"
                )
    return runs


def model_summary(model_dir: str | Path) -> dict:
    """The checkpoint's `MoETopology.summary()` from its headers (what `plan_for_model` takes)."""
    from ..integration.plan import describe_checkpoint

    return describe_checkpoint(str(model_dir))[0].summary()


def plan_memory_bytes(summary: dict, budget: str | int, kv_bytes: int = 1 << 20) -> int:
    """Memory one process of the comparison is planned with: dense weights + `budget` of all experts + KV."""
    return summary["other_bytes"] + parse_budget(budget, "--budgets").resolve(summary["expert_bytes"]) + kv_bytes


def predict(
    model_dir: str | Path,
    summary: dict,
    world_sizes: list[int],
    memory_bytes: int,
    profile: HardwareProfile,
    *,
    context: int = 64,
    dtype: str | None = None,
) -> dict[int, dict]:
    """`plan`'s batch-1 figures of one rank for each world size: `{world: {"tokens_per_s", "hit_rate", "step_s"}}`
    (dispatch included for N > 1)."""
    from transformers import AutoConfig

    from ..scheduling.model_plan import plan_for_model

    config = AutoConfig.from_pretrained(str(model_dir))
    out = {}
    for world in world_sizes:
        p = plan_for_model(
            profile,
            summary,
            memory_bytes,
            model_config=config,
            dtype=dtype,
            context=context,
            batch_candidates=[1],
            world_size=world,
        )
        out[world] = {"tokens_per_s": p.tokens_per_s, "hit_rate": p.hit_rate, "step_s": p.step_s}
    return out


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(
    runs: dict[tuple[str, int], list[dict]],
    *,
    limits: dict[str, int | None] | None = None,
    predicted: dict[str, dict[int, dict]] | None = None,
) -> list[dict]:
    """One row per (budget, world size), in run order; the keys are documented in docs/benchmarks.md."""
    rows = []
    for (label, world), results in runs.items():
        ok = [r for r in results if "error" not in r]
        ranks = [rk for r in ok for rk in r["ranks"]]
        plan = (predicted or {}).get(label, {}).get(world, {})
        rows.append(
            {
                "budget": label,
                "world_size": world,
                "host_budget": rank_budget(label, world),
                "limit_bytes": (limits or {}).get(label),
                "runs": len(results),
                "runs_ok": len(ok),
                "errors": [r["error"] for r in results if "error" in r],
                "decode_tok_s": _median(r["decode_tok_s"] for r in ok),
                "decode_tok_s_runs": [r["decode_tok_s"] for r in ok],
                "ttft_s": _median(r["ttft_s"] for r in ok),
                "hit_rate": _median(statistics.fmean(rk["hit_rate"] for rk in r["ranks"]) for r in ok),
                "expert_bytes_per_rank": ranks[0]["expert_bytes_total"] if ranks else None,
                "bytes_read_per_token_per_rank": _median(
                    _mean(rk["decode_bytes_per_token"] for rk in r["ranks"]) for r in ok
                ),
                "peak_bytes_per_rank": max((rk["peak_bytes"] for rk in ranks), default=None),
                "predicted_tok_s": plan.get("tokens_per_s"),
                "predicted_hit_rate": plan.get("hit_rate"),
            }
        )
    return rows


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _fmt(value, spec: str) -> str:
    return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))


def _bytes(value, width: int) -> str:
    return (format_bytes(value) if value is not None else "-").rjust(width)


def format_table(rows: list[dict]) -> str:
    """The rows of `summarise` as a table for people."""
    head = (
        f"{'budget':>8} {'ranks':>5} {'experts/rank':>12} {'read/token/rank':>15} {'decode tok/s':>12} "
        f"{'TTFT s':>7} {'hit rate':>8} {'peak/rank':>10} {'plan tok/s':>10} {'runs ok':>7}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['budget']:>8} {r['world_size']:>5} {_bytes(r['expert_bytes_per_rank'], 12)} "
            f"{_bytes(r['bytes_read_per_token_per_rank'], 15)} {_fmt(r['decode_tok_s'], '12.2f')} "
            f"{_fmt(r['ttft_s'], '7.2f')} {_fmt(r['hit_rate'], '8.2f')} {_bytes(r['peak_bytes_per_rank'], 10)} "
            f"{_fmt(r['predicted_tok_s'], '10.2f')} {r['runs_ok']:>3}/{r['runs']:<3}"
        )
    return "\n".join(lines)
