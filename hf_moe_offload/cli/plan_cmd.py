"""`hf-moe-offload plan MODEL --memory 8GiB [--latency 0.5] [--profile profile.json]`: batch size and budgets.

```
MODEL --inspect_path (headers + meta model)--> topology summary; AutoConfig --> KV bytes per token, embeddings
      --largest safetensors file--> measure_profile (or --profile JSON) --> HardwareProfile
      --> scheduling.plan_for_model(memory, latency, context) --> table for people, one JSON line for scripts
```
`plan_for_model` is what `mode="auto"` calls too, so both reserve the same bytes (dense weights, KV cache).
The JSON line holds the `Plan.to_dict()` keys (`batch_size`, `feasible`, `tokens_per_s`, `step_s`,
`serial_step_s`, `bubble_fraction`, `hit_rate`, `placement`, `host_budget_bytes`, `device_budget_bytes`,
`transfer_s`, `compute_s`, `min_overlap_batch`, `candidates`, `inputs`) plus `model`, `profile` (the measured
numbers) and `offload_config` (the budgets as an `OffloadConfig` dict for `run` or `from_pretrained`).
Exit status 0 when a plan satisfies the constraints, 1 when none does, 2 on a typed library error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..config import format_bytes, parse_budget
from ..errors import OffloadConfigError
from ..scheduling.model_plan import COMPUTE_ITEMSIZE, DEFAULT_CONTEXT

__all__ = ["add_parser", "main"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="recommend batch size and budgets from a cost model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model folder (or a model id already in the Hugging Face cache)")
    p.add_argument("--memory", required=True, help="host memory the run may use, e.g. 8GiB")
    p.add_argument("--latency", type=float, help="longest acceptable decode step in seconds")
    p.add_argument("--profile", help="hardware profile JSON to use instead of measuring")
    p.add_argument("--save-profile", help="write the measured profile to this JSON file")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: plan for an accelerator")
    p.add_argument("--device-memory", help="accelerator memory for weights, KV and expert slots (default: free)")
    p.add_argument(
        "--context", type=int, default=DEFAULT_CONTEXT, help="tokens per sequence (prompt + generated) for the KV"
    )
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128,256", help="comma-separated batch sizes to cost")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (the checkpoint's), bfloat16, float16...")
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
    p.add_argument("--trace", help="routing trace (.npz) for a measured distinct-experts-vs-batch curve")
    p.set_defaults(func=main)


def _bytes(value: str, name: str) -> int:
    budget = parse_budget(value, name)
    if budget.nbytes is None:
        raise OffloadConfigError(f"{name}: expected an amount such as 8GiB, got a share ({value!r})")
    return budget.nbytes


def _largest_file(folder: str) -> str:
    from ..storage import checkpoint_files

    return max(checkpoint_files(folder), key=os.path.getsize)


def main(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from ..prefetch import RoutingTrace
    from ..scheduling.model_plan import plan_for_model, shape_for_model
    from ..scheduling.planner import distinct_from_trace
    from ..scheduling.profile import HardwareProfile, measure_profile
    from .inspect_cmd import inspect_path

    info = inspect_path(args.model)
    if not info.get("supported"):
        print(f"plan: {info['path']} is not supported: {info.get('reason')}", file=sys.stderr)
        return 1
    memory = _bytes(args.memory, "--memory")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    dtype = info["dtype"] if args.dtype == "auto" else args.dtype
    if dtype not in COMPUTE_ITEMSIZE:
        raise OffloadConfigError(f"--dtype: expected one of auto, {', '.join(COMPUTE_ITEMSIZE)}, got {dtype!r}")
    config = AutoConfig.from_pretrained(info["path"])
    shape, kv_per_token = shape_for_model(info, config, dtype)
    seq_bytes = args.context * kv_per_token

    if args.profile:
        profile = HardwareProfile.load(args.profile)
        if profile.expert_nbytes != shape.expert_nbytes:
            print(
                f"plan: note: the profile was measured for experts of {format_bytes(profile.expert_nbytes)}, this "
                f"model's weigh {format_bytes(shape.expert_nbytes)}; compute times will be off",
                file=sys.stderr,
            )
    else:
        disk = float(_bytes(args.disk_bandwidth, "--disk-bandwidth")) if args.disk_bandwidth else None
        profile = measure_profile(
            info["params"],
            dtype,
            sample_file=_largest_file(info["path"]),
            device=args.device,
            disk_read_Bps=disk,
            statistic=args.statistic,
        )
    if args.save_profile:
        profile.save(args.save_profile)

    device_memory = None
    if args.device != "cpu":
        if not profile.has_device:
            raise OffloadConfigError(f"--device {args.device}: the profile has no accelerator timings; re-measure")
        if args.device_memory:
            device_memory = _bytes(args.device_memory, "--device-memory")
        else:
            import torch

            device_memory = torch.cuda.mem_get_info(args.device)[0]
    curve = None
    if args.trace:  # mapped to this model's experts, and its layers cyclically, as `bench --replay` does
        curve = distinct_from_trace(
            RoutingTrace.load(args.trace), batches, num_experts=shape.num_experts, top_k=shape.top_k
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
    )

    print(
        f"model {info['path']}: {shape.num_layers} MoE layers x {shape.num_experts} experts (top-{shape.top_k}) "
        f"of {format_bytes(shape.expert_nbytes)}, dense {format_bytes(shape.other_nbytes)}, {dtype}"
    )
    print(
        f"profile: disk {profile.disk_read_Bps / 1e9:.2f} GB/s, memory {profile.cpu_mem_Bps / 1e9:.1f} GB/s, "
        f"expert t(n) = {1e3 * profile.cpu_fit.a:.2f} ms + {1e3 * profile.cpu_fit.b:.3f} ms * n on CPU"
        + (f", h2d {profile.h2d_Bps / 1e9:.1f} GB/s" if profile.h2d_Bps else "")
    )
    print(f"context {args.context} tokens: KV {format_bytes(seq_bytes)} per sequence")
    print(result)
    record = result.to_dict()
    record["model"] = info["path"]
    record["profile"] = {k: v for k, v in profile.to_dict().items() if k not in ("cpu_fit", "device_fit", "meta")}
    record["profile"]["cpu_fit"] = {"a": profile.cpu_fit.a, "b": profile.cpu_fit.b}
    record["offload_config"] = {"host_budget": result.host_budget_bytes, "device": args.device}
    if device_memory is not None:
        record["offload_config"]["device_budget"] = result.device_budget_bytes
    print(json.dumps(record))
    return 0 if result.feasible else 1
