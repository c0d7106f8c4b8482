"""`hf-moe-offload bench MODEL|--synth PRESET --world-size N` (N > 1): the offloaded model as 1 rank and as N
expert-parallel ranks, each process under the same memory limit.

```
check_world_size (no model loaded: N divides the experts per layer of the folder's headers or of the preset,
                  and the flags that only mean something for one process are refused)
  --> MODEL | --synth (as bench) --> limits (measure_profile, as bench) --> for each budget B of --budgets:
      1 rank at host_budget B, N ranks (DistributedConfig(tp_size=N, ep_size=N)) at B's bytes each
      (bench.expert_parallel_bench.run_comparison, --reps interleaved, each process in a memory cgroup of
      dense + B + --overhead with --ramlimit)
  --> rows (world size, per-rank expert bytes, per-rank bytes read per token, tok/s, peak memory, plan's tok/s)
  --> a table, or `--json`: one document (docs/benchmarks.md, "Expert parallel")
```
Only this library runs: `--baselines` (memory, accelerate, llama.cpp run one process), `--ablate`, `--replay`,
`--in-process` and an accelerator `--device` are refused in one line rather than measured for one side only. The
scenario is batch-1 decoding (`--prompt-len`, `--max-new-tokens`); `--scenario` and `--batches` are not used.
`--cache cold` evicts the checkpoint before every run (not every step). Exit status as bench's.
"""

from __future__ import annotations

import argparse
import time

from ..config import format_bytes, parse_budget
from .args import UsageError, emit, note, write_json_out

__all__ = ["check_world_size", "run_expert_parallel"]


def _experts_per_layer(args: argparse.Namespace) -> dict[str, int]:
    """Experts of each MoE layer, from the checkpoint's headers (meta model) or the preset's config."""
    if args.synth:
        from ..bench.presets import preset_config

        config = preset_config(args.synth)
        count = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
        return {"0": int(count)}  # every layer alike: named as `plan` names the first
    from ..integration.plan import describe_checkpoint, resolve_folder

    topology = describe_checkpoint(resolve_folder(args.model, {}))[0]
    return {layer.module_name: layer.num_experts for layer in topology.layers}


def check_world_size(args: argparse.Namespace) -> None:
    """`--world-size` and the flags it cannot go with, before anything loads.

    Raises:
        UsageError: N < 1, or a flag that runs one process only (`--baselines`, `--ablate`, ...).
        UnsupportedParallelismError: N does not divide the experts of a MoE layer.
    """
    world = args.world_size
    if world < 1:
        raise UsageError(f"--world-size: expected an integer >= 1, got {world}")
    if world == 1:
        return
    why = f"--world-size {world} compares this library on 1 rank and on {world} ranks only"
    if args.baselines not in (None, "none"):
        raise UsageError(f"--baselines {args.baselines}: {why}; drop --baselines, or run them with --world-size 1")
    if args.ablate:
        raise UsageError(f"--ablate: {why}; drop --ablate, or use --world-size 1")
    if args.replay:
        raise UsageError(f"--replay: {why}, on their own routing; drop --replay, or use --world-size 1")
    if args.in_process:
        raise UsageError(f"--in-process: --world-size {world} starts {world} processes; drop --in-process")
    if (getattr(args, "offload_device", None) or "cpu") not in ("cpu", "auto"):
        raise UsageError(f"--device {args.offload_device}: the {world} ranks run on CPU (gloo); drop --device")
    from ..scheduling.expert_parallel import check_divides

    check_divides(world, _experts_per_layer(args), "--world-size")


def run_expert_parallel(
    args: argparse.Namespace, budgets: list[str], overrides: dict, overhead: int, sample_bytes: int
) -> int:
    """Run the comparison of `check_world_size`-checked `args`; `budgets`, `overrides` (OffloadConfig fields for
    every run), `overhead` and `sample_bytes` as `bench` validated them. Returns the exit status."""
    from transformers import AutoConfig

    from ..bench.decode_bench import checkpoint_bytes
    from ..bench.expert_parallel_bench import (
        format_table,
        model_summary,
        plan_memory_bytes,
        predict,
        run_comparison,
        summarise,
    )
    from ..bench.scenario_bench import make_configs
    from ..bench.scenario_report import limits_record, versions_record
    from ..bench.sysmem import CgroupUnavailableError, find_memory_cgroup
    from ..scheduling.model_plan import shape_for_model
    from .bench_cmd import _measure_limits, _read_threads, _resolve_model, _safety_bytes

    start, world = time.time(), args.world_size
    if args.ramlimit:
        try:
            find_memory_cgroup()
        except CgroupUnavailableError as err:
            raise UsageError(f"--ramlimit: {err}") from None
    safety = None if args.ramlimit else _safety_bytes(args.safety_limit)
    model_dir, synth = _resolve_model(args)
    sizes = checkpoint_bytes(model_dir)
    configs = make_configs(budgets, baselines=[], offload=overrides, device="cpu")
    note("bench", f"model {model_dir}: {format_bytes(sizes['total'])}, experts {format_bytes(sizes['expert'])}")
    limits = _measure_limits(model_dir, args.dtype, "cpu", sample_bytes, _read_threads(overrides))
    note("bench", f"limits: {limits.describe()}")
    fixed = parse_budget(args.memory_limit, "--memory-limit").nbytes if args.memory_limit else None
    ram = {c.budget: (fixed or c.budget_bytes(sizes) + overhead if args.ramlimit else safety) for c in configs}
    runs = run_comparison(
        model_dir,
        {c.budget: dict(c.offload_config) for c in configs},
        world,
        limits=ram,
        limit_required=args.ramlimit,
        reps=args.reps,
        prompt_len=args.prompt_len,
        new_tokens=args.max_new_tokens,
        threads=args.threads or None,
        dtype=args.dtype,
        sample=args.sample,
        seed=args.seed,
        evict=args.cache == "cold" or args.ramlimit,
        timeout=args.timeout,
        log=lambda line: note("bench", line),
    )
    summary = model_summary(model_dir)
    dtype = None if args.dtype == "auto" else args.dtype
    context = args.prompt_len + args.max_new_tokens
    kv = context * shape_for_model(summary, AutoConfig.from_pretrained(model_dir), dtype)[1] + (1 << 20)
    predicted = {
        c.budget: predict(
            model_dir,
            summary,
            [1, world],
            plan_memory_bytes(summary, c.budget, kv),
            limits,
            context=context,
            dtype=dtype,
        )
        for c in configs
    }
    rows = summarise(runs, limits=ram, predicted=predicted)
    record = {
        "bench": "hf_moe_offload",
        "kind": "expert_parallel",
        "model": model_dir,
        "synth": synth,
        "sizes": sizes,
        "world_sizes": [1, world],
        "distributed_config": {"tp_size": world, "ep_size": world},
        "mode": "ramlimit" if args.ramlimit else args.cache,
        "reps": args.reps,
        "threads_per_rank": args.threads or None,
        "dtype": args.dtype,
        "decoding": "sample" if args.sample else "greedy",
        "seed": args.seed,
        "prompt_len": args.prompt_len,
        "new_tokens": args.max_new_tokens,
        "overhead_bytes": overhead if args.ramlimit and fixed is None else None,
        "memory_limit_bytes": fixed,
        "safety_limit_bytes": safety,
        "limits": limits_record(limits),
        "results": rows,
        "wall_s": time.time() - start,
        "versions": versions_record(),
    }
    write_json_out(args, record)
    limit_line = (
        f"each process in a memory cgroup of {format_bytes(fixed)}"
        if fixed
        else f"each process in a memory cgroup of dense + budget + {format_bytes(overhead)}"
        if args.ramlimit
        else "no memory limit (--ramlimit for one)"
    )
    table = "\n".join(
        [
            f"1 rank against {world} expert-parallel ranks (DistributedConfig(tp_size={world}, ep_size={world})), "
            f"batch 1, {args.max_new_tokens} tokens after {args.prompt_len}; {limit_line}; medians of {args.reps}",
            format_table(rows),
            "plan tok/s: `plan --world-size` for one rank at batch 1 (all-to-all layout: N tokens per step per rank)",
        ]
    )
    emit(args, record, table)
    return 1 if any(r["runs_ok"] < r["runs"] for r in rows) else 0
