"""`hf-moe-offload plan MODEL --host-memory 8GiB [--latency 0.5] [--profile profile.json]`: batch size and budgets.

```
MODEL --inspect_path (headers + meta model)--> topology summary; AutoConfig --> KV bytes per token, embeddings
      --largest safetensors file--> measure_profile (or --profile JSON) --> HardwareProfile
      --> scheduling.plan_for_model(memory, latency, context) --> a table for people, or `--json` for scripts
```
`--host-memory` (and `--device-memory`) is ALL the memory the run may use: dense weights, KV cache and expert
slots; the plan splits it and reports the expert part as `host_budget` (`device_budget`), the `OffloadConfig`
fields of the same names that `run --host-budget` takes. `plan_for_model` is what `mode="auto"` calls too, so both
reserve the same bytes. The JSON document holds the `Plan.to_dict()` keys (`batch_size`, `feasible`, `tokens_per_s`, `step_s`,
`serial_step_s`, `bubble_fraction`, `hit_rate`, `placement`, `host_budget_bytes`, `device_budget_bytes`,
`transfer_s`, `compute_s`, `min_overlap_batch`, `candidates`, `inputs`) plus `model`, `profile` (the measured
numbers) and `offload_config` (the budgets as an `OffloadConfig` dict for `run` or `from_pretrained`).
`--world-size N` plans one rank of N expert-parallel ranks (`scheduling.expert_parallel`): its 1/N of the experts,
`--host-memory` and the budgets per rank, and each step plus the token dispatch over `--link-bandwidth` /
`--link-latency`; the JSON then adds `expert_parallel` (per-rank bytes, dispatch seconds, step with it).
Exit status 0 when a plan satisfies the constraints, 1 when none does, 2 on a typed library error.
"""

from __future__ import annotations

import argparse
import os
import time

from ..config import format_bytes, parse_budget
from ..errors import OffloadConfigError, UnsupportedModelError
from .args import UsageError, add_output_args, check_file, check_positive, emit, note, quiet_transformers

__all__ = ["add_parser", "main"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="recommend batch size and budgets from a cost model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model folder (or a model id already in the Hugging Face cache)")
    p.add_argument(
        "--host-memory",
        help="all the host memory the run may use (dense weights, KV cache, expert slots), e.g. 8GiB",
    )
    p.add_argument("--memory", dest="host_memory", help=argparse.SUPPRESS)  # the 0.1 name
    p.add_argument("--latency", type=float, help="longest acceptable decode step in seconds")
    p.add_argument("--profile", help="hardware profile JSON to use instead of measuring")
    p.add_argument("--save-profile", help="write the measured profile to this JSON file")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: plan for an accelerator")
    p.add_argument("--device-memory", help="all the accelerator memory the run may use (default: what is free)")
    p.add_argument(
        "--context", type=int, default=512, help="tokens per sequence (prompt + generated) for the KV (default 512)"
    )
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128,256", help="comma-separated batch sizes to cost")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "float16", "float32", "float64"),
        help="compute dtype (default: the checkpoint's)",
    )
    p.add_argument(
        "--statistic",
        choices=("min", "median"),
        default="min",
        help="timings kept: min (what the hardware can do) or median (what it does under current load)",
    )
    p.add_argument("--disk-bandwidth", help="cold read bandwidth to assume (e.g. 440MB) instead of measuring it")
    p.add_argument(
        "--read-from",
        choices=("disk", "page_cache"),
        default="disk",
        help="experts come from the disk (default) or from a page cache that holds the checkpoint",
    )
    p.add_argument("--hit-rate", type=float, help="a measured cache hit rate to use instead of the LRU model")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument(
        "--no-step-overhead",
        dest="step_overhead",
        action="store_false",
        help="skip the short offloaded decode that measures the fixed cost of a step (Python, kernel launches)",
    )
    p.add_argument(
        "--replay", help="routing trace (.npz from `trace --record-routing`): measured distinct experts per batch"
    )
    p.add_argument("--trace", dest="replay", help=argparse.SUPPRESS)  # the 0.1 name
    p.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="plan one rank of N expert-parallel ranks (DistributedConfig(ep_size=N, fsdp_size=N)): its 1/N of the "
        "experts, --host-memory per rank, token dispatch added to each step (default 1)",
    )
    p.add_argument(
        "--link-bandwidth",
        default=None,
        help="bytes/s one rank sends to the others, e.g. 10Gbit or 4GB (default 4GB: gloo on one machine, "
        "scripts/measure_link.py)",
    )
    p.add_argument(
        "--link-latency",
        type=float,
        default=None,
        help="seconds of one all-to-all besides its bytes (default 1e-4: gloo on one machine)",
    )
    add_output_args(p)
    p.set_defaults(func=main)


def _bytes(value: str, name: str) -> int:
    budget = parse_budget(value, name)
    if budget.nbytes is None:
        raise OffloadConfigError(f"{name}: expected an amount such as 8GiB, got a share ({value!r})")
    return budget.nbytes


def _largest_file(folder: str) -> str:
    from ..storage import checkpoint_files

    return max(checkpoint_files(folder), key=os.path.getsize)


def _measure_step_overhead(
    folder: str, profile, shape, dtype: str, config, memory: int, device: str, statistic: str
) -> float:
    """`HardwareProfile.step_overhead_s`: a short greedy decode of the model offloaded with every expert resident
    (or, when they do not fit in half the free RAM, the budget `--host-memory` leaves), one step's time (the
    fastest with `--statistic min`, else the median) less the time the engine waited for loads, less what the
    roofline terms predict for a step with every expert resident. The dense weights are loaded: on a large model
    this takes as long as loading it to run."""
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    import hf_moe_offload

    from ..scheduling.cost_model import estimate_step
    from ..scheduling.model_plan import COMPUTE_ITEMSIZE, kv_bytes_per_token

    hf_moe_offload.install()
    prompt_len, steps = 8, 12
    # Every expert resident when they fit in half the free RAM (no loads to subtract), else what --host-memory leaves.
    everything = shape.total_expert_nbytes
    if everything + shape.other_nbytes < 0.5 * psutil.virtual_memory().available:
        budget = everything
    else:
        budget = min(everything, max(0, memory - shape.other_nbytes))
    cfg = {"host_budget": max(budget, shape.top_k * shape.expert_nbytes), "device": device}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), offload_config=cfg)
    try:
        marks: list[tuple[float, float]] = []

        class Clock:  # a generate streamer: (time, seconds the engine stalled so far) after each step
            def put(self, value) -> None:
                marks.append((time.perf_counter(), model.offload_engine.stats.snapshot()["stall_seconds"]))

            def end(self) -> None:
                pass

        ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            for streamer in (None, Clock()):  # the first run warms the cache and the allocator
                model.generate(
                    ids.to(model.device),
                    attention_mask=torch.ones_like(ids).to(model.device),
                    max_new_tokens=steps,
                    min_new_tokens=steps,
                    do_sample=False,
                    pad_token_id=0,
                    streamer=streamer,
                )
    finally:
        model.offload_engine.close()
    # marks[0]: the prompt; marks[1]: after prefill; then one per decode step.
    per_step = sorted((t1 - t0) - (s1 - s0) for (t0, s0), (t1, s1) in zip(marks[1:], marks[2:]))
    measured = per_step[0] if statistic == "min" else per_step[len(per_step) // 2]
    seq_bytes = (prompt_len + steps) * kv_bytes_per_token(config, COMPUTE_ITEMSIZE[dtype])
    n = shape.num_layers * shape.num_experts
    profile.step_overhead_s = 0.0
    roofline = estimate_step(profile, shape, 1, n, hit_rate=1.0, seq_bytes=seq_bytes).step_s
    return max(0.0, measured - roofline)


def _batches(value: str) -> list[int]:
    try:
        batches = [int(b) for b in value.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batches: expected comma-separated integers such as 1,8,32, got {value!r}") from None
    if not batches or min(batches) < 1:
        raise UsageError(f"--batches: expected batch sizes >= 1, got {value!r}")
    return batches


def _expert_parallel_record(result) -> dict:
    """The JSON `expert_parallel` block: per-rank bytes, the chosen batch's dispatch and step with and without it."""
    ep = dict(result.inputs["expert_parallel"])
    dispatch = ep.pop("dispatch_s")
    world = ep["world_size"]
    return {
        **ep,
        "distributed_config": {"ep_size": world, "fsdp_size": world},
        "dispatch_s": dispatch[result.batch_size],
        "experts_step_s": result.step_s - dispatch[result.batch_size],
        "step_s": result.step_s,
        "job_tokens_per_s": world * result.tokens_per_s,
        "candidates": [
            {"batch_size": c.batch_size, "dispatch_s": dispatch[c.batch_size], "step_s": c.step_s}
            for c in result.candidates
        ],
    }


def _expert_parallel_lines(result) -> list[str]:
    """The table's lines on expert parallelism (none for one rank)."""
    if "expert_parallel" not in result.inputs:
        return []
    ep = _expert_parallel_record(result)
    world, hidden, dispatch_ms = ep["world_size"], ep["hidden_size"], 1e3 * ep["dispatch_s"]
    return [
        f"expert parallel over {world} ranks (DistributedConfig(ep_size={world}, fsdp_size={world})), per rank: "
        f"{ep['experts_per_rank']} experts per layer, {format_bytes(ep['rank_expert_bytes'])} of "
        f"{format_bytes(ep['model_expert_bytes'])} of experts; --host-memory, budgets, steps and tok/s above are "
        f"one rank's",
        f"token dispatch: all-to-all out and back per MoE layer (hidden {hidden}, {ep['itemsize']} B per element) "
        f"over {ep['link_bandwidth_Bps'] / 1e9:.2f} GB/s + {1e6 * ep['link_latency_s']:.0f} us per collective: "
        + ", ".join(f"batch {c['batch_size']} {1e3 * c['dispatch_s']:.2f} ms" for c in ep["candidates"]),
        f"at batch {result.batch_size}: step {1e3 * ep['step_s']:.1f} ms = experts and dense "
        f"{1e3 * ep['experts_step_s']:.1f} ms + dispatch {dispatch_ms:.2f} ms; all {world} ranks together "
        f"{ep['job_tokens_per_s']:.2f} tok/s",
    ]


def main(args: argparse.Namespace) -> int:
    if args.host_memory is None:
        raise UsageError("give --host-memory AMOUNT (all the memory the run may use, e.g. 8GiB)")
    memory = _bytes(args.host_memory, "--host-memory")
    batches = _batches(args.batches)
    check_positive(args.context, "--context")
    check_positive(args.threads, "--threads", minimum=0)
    check_file(args.profile, "--profile")
    check_file(args.replay, "--replay")
    if args.hit_rate is not None and not 0 <= args.hit_rate <= 1:
        raise UsageError(f"--hit-rate: expected a value in [0, 1], got {args.hit_rate}")
    device_memory = _bytes(args.device_memory, "--device-memory") if args.device_memory else None
    disk = float(_bytes(args.disk_bandwidth, "--disk-bandwidth")) if args.disk_bandwidth else None
    check_positive(args.world_size, "--world-size")

    from transformers import AutoConfig

    from ..prefetch import RoutingTrace
    from ..scheduling.cost_model import distinct_from_trace
    from ..scheduling.expert_parallel import DEFAULT_LINK, Link, check_divides, parse_bandwidth
    from ..scheduling.model_plan import plan_for_model, shape_for_model
    from ..scheduling.profile import HardwareProfile, measure_profile
    from .inspect_cmd import inspect_path

    quiet_transformers(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    info = inspect_path(args.model)
    if not info.get("supported"):
        raise UnsupportedModelError(f"{info['path']} is not supported: {info.get('reason')}")
    dtype = info["dtype"] if args.dtype == "auto" else args.dtype
    config = AutoConfig.from_pretrained(info["path"])
    shape, kv_per_token = shape_for_model(info, config, dtype)
    seq_bytes = args.context * kv_per_token
    world = args.world_size
    check_divides(world, {str(i): shape.num_experts for i in range(shape.num_layers)}, "--world-size")
    link = Link(
        parse_bandwidth(args.link_bandwidth) if args.link_bandwidth else DEFAULT_LINK.bandwidth_Bps,
        DEFAULT_LINK.latency_s if args.link_latency is None else args.link_latency,
    )

    if args.profile:
        profile = HardwareProfile.load(args.profile)
        if profile.expert_nbytes != shape.expert_nbytes:
            note(
                "plan",
                f"note: the profile was measured for experts of {format_bytes(profile.expert_nbytes)}, this "
                f"model's weigh {format_bytes(shape.expert_nbytes)}; compute times will be off",
            )
    else:
        profile = measure_profile(
            info["params"],
            dtype,
            sample_file=_largest_file(info["path"]),
            device=args.device,
            disk_read_Bps=disk,
            statistic=args.statistic,
        )
    if args.step_overhead and not args.profile:
        profile.step_overhead_s = _measure_step_overhead(
            info["path"], profile, shape, dtype, config, memory, args.device, args.statistic
        )
    if args.save_profile:
        profile.save(args.save_profile)

    if args.device != "cpu":
        if not profile.has_device:
            raise OffloadConfigError(f"--device {args.device}: the profile has no accelerator timings; re-measure")
        if device_memory is None:
            import torch

            device_memory = torch.cuda.mem_get_info(args.device)[0]
    curve = None
    if args.replay:  # mapped to this model's experts, and its layers cyclically, as `bench --replay` does
        curve = distinct_from_trace(  # with N ranks, the whole model's at the N * B tokens of a step
            RoutingTrace.load(args.replay),
            sorted({world * b for b in batches}),
            num_experts=shape.num_experts,
            top_k=shape.top_k,
        )
        curve = {b: [v[i % len(v)] for i in range(shape.num_layers)] for b, v in curve.items()}
    result = plan_for_model(
        profile,
        info,
        memory,
        model_config=config,
        dtype=dtype,
        context=args.context,
        device_memory_bytes=device_memory,
        latency_limit_s=args.latency,
        batch_candidates=batches,
        distinct_curve=curve,
        hit_rate=args.hit_rate,
        read_from=args.read_from,
        world_size=world,
        link=link,
    )

    table = "\n".join(
        [
            f"model {info['path']}: {shape.num_layers} MoE layers x {shape.num_experts} experts (top-{shape.top_k}) "
            f"of {format_bytes(shape.expert_nbytes)}, dense {format_bytes(shape.other_nbytes)}, {dtype}",
            f"profile: disk {profile.disk_read_Bps / 1e9:.2f} GB/s, memory {profile.cpu_mem_Bps / 1e9:.1f} GB/s, "
            f"expert t(n) = {1e3 * profile.cpu_fit.a:.2f} ms + {1e3 * profile.cpu_fit.b:.3f} ms * n on CPU"
            + (f", h2d {profile.h2d_Bps / 1e9:.1f} GB/s" if profile.h2d_Bps else "")
            + f", fixed cost of a step {1e3 * profile.step_overhead_s:.2f} ms",
            f"context {args.context} tokens: KV {format_bytes(seq_bytes)} per sequence",
            str(result),
        ]
        + _expert_parallel_lines(result)
    )
    record = result.to_dict()
    record["model"] = info["path"]
    record["profile"] = {k: v for k, v in profile.to_dict().items() if k not in ("cpu_fit", "device_fit", "meta")}
    record["profile"]["cpu_fit"] = {"a": profile.cpu_fit.a, "b": profile.cpu_fit.b}
    record["offload_config"] = {"host_budget": result.host_budget_bytes, "device": args.device}
    if device_memory is not None:
        record["offload_config"]["device_budget"] = result.device_budget_bytes
    if world > 1:
        record["expert_parallel"] = _expert_parallel_record(result)
    emit(args, record, table)
    return 0 if result.feasible else 1
