"""`hf-moe-offload bench`: latency and throughput of an offloaded MoE model against the in-memory model,
accelerate's disk offload at the same memory budget, and this library with features switched off one by one;
with `--world-size N`, the model on 1 rank against N expert-parallel ranks (cli.bench_expert_parallel).

```
MODEL | --synth PRESET (real per-layer shapes, depth scaled to --max-disk, cached)   [--replay TRACE.npz]
  --> limits: disk (cold), page cache, host->device bandwidths (scheduling.profile.measure_profile, as `plan` uses)
  --> configs: memory, accelerate@B, offload@B, offload@B-<ablation>  for each budget B of --budgets
  --> points:  latency (batch 1: TTFT, p50/p90 decode step), throughput@N (tokens/s at batch N)
  --> reps x configs, interleaved, each a fresh worker process (bench.scenario_bench / scenario_worker)
  --> medians, x accelerate, x memory, lower bound per step (bench.scenario_report) --> tables, or `--json`
```
Page cache: `--cache cold` (default) evicts the checkpoint (and accelerate's offload folder) before every point and
every decode step, outside the timed region; `--cache warm` never evicts; `--ramlimit` runs each worker in a memory
cgroup (v1 or v2) of its budget + `--overhead`: the honest small-machine case, where the kernel must drop the
checkpoint's pages (and any mmap of them) to stay under the limit. `--json` prints one JSON document whose keys are
documented in docs/benchmarks.md (`--json-out FILE` writes it to a file as well). Exit status 0 when every run
produced results, 1 when some failed, 2 on bad input or a typed library error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from ..config import OffloadConfig, format_bytes, parse_budget
from ..errors import OffloadConfigError
from .args import (
    DTYPES,
    UsageError,
    add_offload_args,
    add_output_args,
    check_file,
    check_positive,
    emit,
    note,
    progress_enabled,
    write_json_out,
)

__all__ = ["add_parser", "main"]

_BLOCK = 16 * 1024**2  # bytes per read when timing the disk


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="latency/throughput vs memory and accelerate, with ablations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", help="model folder (or give --synth)")
    g = p.add_argument_group("model")
    g.add_argument("--synth", help="random model with real per-layer shapes: mixtral-8x7b, qwen3-30b-a3b, olmoe-1b-7b")
    g.add_argument("--max-disk", default="4GiB", help="largest synthesized checkpoint; sets its depth (default 4GiB)")
    g.add_argument("--synth-layers", type=int, help="force this many decoder layers for --synth")
    g.add_argument("--synth-dir", help="cache folder for synthesized models (default ~/.cache/hf_moe_offload/synth)")
    g.add_argument("--replay", help="routing trace (.npz from `trace --record-routing`) that every model follows")
    g = p.add_argument_group("what to measure")
    g.add_argument("--scenario", default="latency,throughput", help="comma-separated: latency, throughput")
    g.add_argument("--batches", default="1,8,32", help="batch sizes of the throughput scenario (default 1,8,32)")
    g.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence (default 32)")
    g.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per sequence, exactly (default 16)")
    g.add_argument("--new-tokens", dest="max_new_tokens", type=int, help=argparse.SUPPRESS)  # the 0.1 name
    g.add_argument("--budgets", default="25,50", help="expert budgets: percents of expert bytes or amounts (2GiB)")
    g.add_argument(
        "--baselines",
        default=None,
        help="comma-separated: memory, accelerate, llamacpp (bf16, q8_0 and q4_k_m GGUFs; or llamacpp-q8_0 for one: "
        "needs the llamacpp extra, teacher-forces every contender) or none (default memory,accelerate; none with "
        "--world-size N > 1, which refuses any other)",
    )
    g.add_argument(
        "--ablate",
        default="",
        help="features to switch off one at a time: prefetch, io_mode, "
        "io_threads, or FIELD=VALUE of OffloadConfig (e.g. policy=lfu), several joined by + (threads=1+io_mode=direct)",
    )
    g = p.add_argument_group("how")
    g.add_argument("--cache", choices=("cold", "warm"), default="cold", help="page cache evicted every step, or not")
    g.add_argument("--ramlimit", action="store_true", help="run each worker in a memory cgroup of budget + overhead")
    g.add_argument("--overhead", default="768MiB", help="memory above the budget with --ramlimit (default 768MiB)")
    g.add_argument(
        "--memory-limit",
        help="with --ramlimit: one memory cgroup of this size for every worker, whatever its budget (in place of "
        "budget + --overhead): a budget sweep under one fixed limit, e.g. 3.5GiB",
    )
    g.add_argument(
        "--safety-limit",
        default="80%",
        help="without --ramlimit, a memory cgroup per worker so a runaway "
        "baseline dies alone: an amount, a share of available RAM (default 80%%), or none",
    )
    g.add_argument("--reps", type=int, default=3, help="interleaved repetitions per configuration (default 3)")
    g.add_argument("--threads", type=int, default=1, help="torch threads per worker; 0 = torch's default (default 1)")
    g.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (default: the checkpoint's)")
    g.add_argument("--sample", action="store_true", help="seeded sampling instead of greedy decoding")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompts and of sampling (default 0)")
    g.add_argument("--timeout", type=float, default=1800, help="seconds per worker run (default 1800)")
    g.add_argument("--bandwidth-bytes", default="512MiB", help="bytes read per bandwidth sample (default 512MiB)")
    g.add_argument("--in-process", action="store_true", help="run in this process (tests, debugging; no cgroup)")
    g.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="N > 1: the offloaded model as 1 rank and as N expert-parallel ranks (DistributedConfig(tp_size=N, "
        "ep_size=N)), each process under the same limit with --ramlimit, beside plan's prediction (default 1)",
    )
    g.add_argument("--json-out", help="also write the JSON record to this file")
    add_output_args(p)
    add_offload_args(p)
    p.set_defaults(func=main)


def _offload_overrides(args: argparse.Namespace, device: str) -> dict:
    values = {f.name: getattr(args, f"offload_{f.name}", None) for f in dataclasses.fields(OffloadConfig)}
    values = {k: v for k, v in values.items() if v is not None}
    if args.threads:  # every contender computes on the same threads
        values["threads"] = args.threads
    values.pop("device", None)
    tier = "device_budget" if device.startswith("cuda") else "host_budget"
    if tier in values:
        raise OffloadConfigError(
            f"bench: the {tier} of each configuration comes from --budgets; drop --{tier.replace('_', '-')}"
        )
    return values


def _resolve_model(args: argparse.Namespace) -> tuple[str, dict | None]:
    if args.model:
        from ..integration.plan import resolve_folder

        return os.path.abspath(resolve_folder(args.model, {})), None
    from ..bench.presets import synthesize_preset

    max_disk = parse_budget(args.max_disk, "--max-disk").nbytes
    if max_disk is None:
        raise OffloadConfigError(f"--max-disk: expected an amount such as 4GiB, got {args.max_disk!r}")
    folder, info = synthesize_preset(
        args.synth,
        max_disk=max_disk,
        num_layers=args.synth_layers,
        root=args.synth_dir,
        progress=progress_enabled(args),
    )
    return str(folder), info


def _replay_points(points: list[dict], path: str) -> tuple[list[dict], list[str]]:
    """Fit the points to a recorded trace: its prompt length, at most its steps, batches up to the recorded one."""
    from ..prefetch.trace import RoutingTrace

    trace = RoutingTrace.load(path)
    batch = int(trace.meta.get("batch", 1))
    prompt_len = int(trace.meta.get("prompt_len") or len(trace.rows(0, 0)[0]) // batch)
    kept, notes = [], []
    for point in points:
        if point["batch"] > batch:  # a smaller batch follows the recording's first sequences
            notes.append(f"{point['key']}: skipped, the trace was recorded at batch {batch}")
            continue
        kept.append(dict(point, prompt_len=prompt_len, new_tokens=min(point["new_tokens"], trace.num_steps)))
    if not kept:
        raise OffloadConfigError(f"--replay: every scenario point's batch exceeds the trace's batch size {batch}")
    return kept, notes


def _safety_bytes(value: str) -> int | None:
    import psutil

    if value.strip().lower() == "none":
        return None
    budget = parse_budget(value, "--safety-limit")
    return budget.nbytes if budget.nbytes is not None else int(budget.fraction * psutil.virtual_memory().available)


def _memory_fits(sizes: dict, overhead: int) -> bool:
    import psutil

    return sizes["total"] + overhead < 0.9 * psutil.virtual_memory().available


def _read_threads(overrides: dict) -> int:
    """Readers at once when the disk is timed: as many as the offloaded model's loader threads (`io_threads`)."""
    return int(overrides.get("io_threads") or OffloadConfig().io_threads)


def _measure_limits(model_dir: str, dtype: str, device: str, nbytes: int, read_threads: int = 1):
    """The machine's `HardwareProfile` at the model's expert shapes, its files read in 16 MiB blocks by
    `read_threads` readers at once, two cold samples: its bandwidths are the denominators of the bench's lower
    bounds."""
    from ..scheduling.profile import measure_profile
    from .inspect_cmd import inspect_path

    info = inspect_path(model_dir)
    if not info.get("supported"):
        raise OffloadConfigError(f"bench: {model_dir} is not supported: {info.get('reason')}")
    return measure_profile(
        info["params"],
        info["dtype"] if dtype == "auto" else dtype,
        sample_file=model_dir,
        device=device,
        read_block=_BLOCK,
        read_bytes=nbytes,
        disk_samples=2,
        read_threads=read_threads,
    )


def _check(args: argparse.Namespace) -> tuple[list[int], int, int]:
    """Every value the user typed that needs no model: `(batches, overhead bytes, bandwidth sample bytes)`."""
    if args.memory_limit is not None:
        if not args.ramlimit:
            raise UsageError("--memory-limit applies with --ramlimit; add --ramlimit")
        if parse_budget(args.memory_limit, "--memory-limit").nbytes is None:
            raise UsageError(f"--memory-limit: expected an amount such as 3.5GiB, got {args.memory_limit!r}")
    if bool(args.model) == bool(args.synth):
        raise UsageError("give a model folder or --synth PRESET (not both)")
    try:
        batches = [int(b) for b in _csv(args.batches)]
    except ValueError:
        raise UsageError(f"--batches: expected comma-separated integers such as 1,8,32, got {args.batches!r}") from None
    if not batches or min(batches) < 1:
        raise UsageError(f"--batches: expected batch sizes >= 1, got {args.batches!r}")
    for value, flag in ((args.prompt_len, "--prompt-len"), (args.max_new_tokens, "--max-new-tokens")):
        check_positive(value, flag)
    check_positive(args.reps, "--reps")
    check_positive(args.threads, "--threads", minimum=0)
    check_positive(args.synth_layers, "--synth-layers")
    if args.timeout <= 0:
        raise UsageError(f"--timeout: expected seconds > 0, got {args.timeout}")
    check_file(args.replay, "--replay")
    overhead = parse_budget(args.overhead, "--overhead").nbytes or 0
    sample_bytes = parse_budget(args.bandwidth_bytes, "--bandwidth-bytes").nbytes
    if sample_bytes is None:
        raise UsageError(f"--bandwidth-bytes: expected an amount such as 512MiB, got {args.bandwidth_bytes!r}")
    if args.synth:
        parse_budget(args.max_disk, "--max-disk")
    if args.safety_limit.strip().lower() != "none":
        parse_budget(args.safety_limit, "--safety-limit")
    from .bench_expert_parallel import check_world_size

    check_world_size(args)
    return batches, overhead, sample_bytes


def main(args: argparse.Namespace) -> int:
    batches, overhead, sample_bytes = _check(args)

    import torch

    from ..bench.decode_bench import checkpoint_bytes
    from ..bench.scenario_bench import make_configs, make_points, run_scenarios
    from ..bench.scenario_report import format_tables, limits_record, summarise, summarise_configs, versions_record
    from ..scheduling.profile import measure_read_bandwidth

    start = time.time()
    device = args.offload_device or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and args.world_size == 1 else "cpu"
    overrides = _offload_overrides(args, device)
    budgets, ablations = _csv(args.budgets), _csv(args.ablate)
    default_baselines = "memory,accelerate" if args.world_size == 1 else "none"
    baselines = [b for b in _csv(args.baselines or default_baselines) if b != "none"]
    # Validate budgets, baselines, ablations and scenarios before a model is synthesized or measured.
    make_configs(budgets, baselines=baselines, ablations=ablations, offload=overrides, device=device)
    if args.world_size > 1:  # 1 rank against N ranks: its own driver (baselines and ablations refused in _check)
        from .bench_expert_parallel import run_expert_parallel

        return run_expert_parallel(args, budgets, overrides, overhead, sample_bytes)
    points = make_points(_csv(args.scenario), batches, args.prompt_len, args.max_new_tokens)
    if args.replay:
        points, notes = _replay_points(points, args.replay)
        for message in notes:
            note("bench", message)
    mode = "ramlimit" if args.ramlimit else args.cache
    if mode == "ramlimit" and not args.in_process:
        from ..bench.sysmem import CgroupUnavailableError, find_memory_cgroup

        try:
            find_memory_cgroup()  # no usable cgroup (v1 or v2): fail now, not after the model is ready
        except CgroupUnavailableError as err:
            raise UsageError(f"--ramlimit: {err}") from None
    safety = _safety_bytes(args.safety_limit) if mode != "ramlimit" and not args.in_process else None
    fixed_limit = parse_budget(args.memory_limit, "--memory-limit").nbytes if args.memory_limit else None

    model_dir, synth = _resolve_model(args)
    sizes = checkpoint_bytes(model_dir)
    if "memory" in baselines and not _memory_fits(sizes, overhead):
        note("bench", f"the memory baseline is skipped: {format_bytes(sizes['total'])} does not fit in free RAM")
        baselines.remove("memory")
    configs = make_configs(budgets, baselines=baselines, ablations=ablations, offload=overrides, device=device)
    note(
        "bench",
        f"model {model_dir}: {format_bytes(sizes['total'])}, experts {format_bytes(sizes['expert'])}"
        + (f" (synthetic {synth['preset']}, {synth['layers']} of {synth['real_layers']} layers)" if synth else ""),
    )
    readers = _read_threads(overrides)
    limits = _measure_limits(model_dir, args.dtype, device, sample_bytes, readers)
    note("bench", f"limits: {limits.describe()}")
    runs = run_scenarios(
        model_dir,
        configs,
        points,
        sizes,
        reps=args.reps,
        mode=mode,
        overhead_bytes=overhead,
        limit_bytes=fixed_limit,
        threads=args.threads or None,
        dtype=args.dtype,
        device=device,
        sample=args.sample,
        seed=args.seed,
        replay=args.replay,
        timeout=args.timeout,
        in_process=args.in_process,
        safety_bytes=safety,
        progress=progress_enabled(args),
    )
    # The shared disk drifts: one more sample after the runs, and the fastest one is the denominator.
    limits.add_disk_sample(measure_read_bandwidth(model_dir, block=_BLOCK, max_bytes=sample_bytes, threads=readers)[0])
    results = summarise(runs, configs, points, limits, mode)
    config_info = summarise_configs(runs, configs, sizes)

    record = {
        "bench": "hf_moe_offload",
        "model": model_dir,
        "synth": synth,
        "sizes": sizes,
        "mode": mode,
        "reps": args.reps,
        "threads": args.threads or None,
        "dtype": args.dtype,
        "device": device,
        "decoding": "sample" if args.sample else "greedy",
        "seed": args.seed,
        "replay": args.replay,
        "overhead_bytes": overhead if mode == "ramlimit" and fixed_limit is None else None,
        "memory_limit_bytes": fixed_limit,
        "safety_limit_bytes": safety,
        "points": points,
        "limits": limits_record(limits),
        "configs": config_info,
        "results": results,
        "wall_s": time.time() - start,
        "versions": versions_record(),
    }
    write_json_out(args, record)
    emit(args, record, format_tables(results, points, config_info, limits=limits, mode=mode))
    failed = any(s["runs_ok"] < s["runs"] for table in results.values() for s in table.values())
    return 1 if failed else 0
