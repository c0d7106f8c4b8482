"""1 rank against 2 expert-parallel ranks, each process under the same RAM limit, on a Mixtral-shaped checkpoint.

```
synthesize a random Mixtral-shaped checkpoint (once)
for each repeat, interleaved:  1 rank : from_pretrained(offload_config={"host_budget": SHARE_1})       in a cgroup of R
                               2 ranks: from_pretrained(offload_config={"host_budget": SHARE_2},
                                        distributed_config=DistributedConfig(tp_size=2, ep_size=2))  each in a cgroup of R
    the same prompt, greedy decode of N tokens, timed per step (StepTimer); rank 0 reports
table (medians), beside `hf-moe-offload plan`'s prediction for each world size, + one JSON line
```
With `ep_size=2` each rank owns half of the experts, so `host_budget="100%"` (of its own experts) caches as many bytes
as `"50%"` of all experts does for the single process: the same expert cache per process, the same RAM limit per
process. `tp_size=2, ep_size=2` keeps one shared sequence (all-reduce dispatch), so both runs decode the same stream.

The prediction (`plan_for_model(..., world_size=N)`, batch 1) gives each process the bytes it is allowed for
weights and cache: the dense weights plus the 1-rank run's share of the experts (`--plan-memory` to change), with a
profile measured on the checkpoint without the fixed step cost (`--profile` to reuse one). `plan` costs all-to-all
dispatch, each rank its own sequence (`fsdp_size=N`); this bench runs `tp_size=N` (one shared sequence, all-reduce
dispatch): a rank's experts see the routing of 1 token per step here, of N tokens (one per rank) in the plan's
layout, so the plan's 2-rank figure is for twice the work of this run's.

python scripts/bench_expert_parallel.py --out /tmp/ep_bench --ram-limit 1400MiB

The ranks, their launch and the prediction live in `hf_moe_offload.bench.expert_parallel_bench`, which
`hf-moe-offload bench --world-size N` runs too; this script keeps its own checkpoint, flags and output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from hf_moe_offload.bench.expert_parallel_bench import model_summary, plan_memory_bytes, predict, run_ranks

GiB = 1 << 30


def _run(world: int, spec: dict, limit: int, timeout: float) -> dict:
    """Start `world` ranks, each in its own memory cgroup of `limit` bytes; rank 0's result plus every rank's peak."""
    result = run_ranks(world, spec, limit_bytes=limit, timeout=timeout)
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def _predict(model: str, world_sizes, memory: str | None, profile_path: str | None, budget: str) -> dict:
    """`plan`'s batch-1 tokens/s per rank (dispatch included) for each world size, and what it was given."""
    from hf_moe_offload.config import parse_budget
    from hf_moe_offload.scheduling.profile import HardwareProfile, measure_profile

    info = model_summary(model)
    nbytes = parse_budget(memory, "--plan-memory").nbytes if memory else plan_memory_bytes(info, budget)
    if profile_path:
        profile = HardwareProfile.load(profile_path)
    else:
        largest = max(
            (os.path.join(model, f) for f in os.listdir(model) if f.endswith(".safetensors")), key=os.path.getsize
        )
        profile = measure_profile(info["params"], info["dtype"], sample_file=largest)
    out: dict = {"plan_memory_bytes": nbytes, "disk_read_Bps": profile.disk_read_Bps}
    out.update(predict(model, info, list(world_sizes), nbytes, profile))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", default="/tmp/ep_bench", help="folder of the synthetic checkpoint")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3584)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--ram-limit", default="1400MiB", help="memory limit of EACH process (cgroup), e.g. 1400MiB")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--one-rank-budget", default="50%", help="host_budget of the 1-rank run (default 50%%)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--profile", help="HardwareProfile JSON for the prediction (default: measured on the checkpoint)")
    p.add_argument("--plan-memory", help="memory per process the prediction plans (default: dense + 1-rank budget)")
    args = p.parse_args()
    if args.worker:  # the ranks now run `expert_parallel_bench.rank_worker`; kept for old command lines
        from hf_moe_offload.bench.expert_parallel_bench import rank_worker

        spec = json.loads(args.worker)
        spec = {
            "model_dir": spec["model"],
            "offload_config": {"host_budget": spec["host_budget"]},
            "prompt_len": spec["prompt"],
            "new_tokens": spec["new_tokens"],
            "threads": spec["threads"],
            "dtype": "bfloat16",
        }
        print("RESULT " + json.dumps(rank_worker(spec)), flush=True)
        return None

    from hf_moe_offload.bench.synth import synthesize_mixtral
    from hf_moe_offload.config import parse_budget

    model = os.path.join(args.out, "model")
    if not os.path.isfile(os.path.join(model, "config.json")):
        synthesize_mixtral(
            model,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_layers=args.layers,
            num_experts=args.experts,
            layout="fused",
            progress=False,
        )
    limit = parse_budget(args.ram_limit, "--ram-limit").nbytes
    base = {"model_dir": model, "prompt_len": args.prompt, "new_tokens": args.new_tokens, "dtype": "bfloat16"}
    runs = {
        f"1 rank, {args.one_rank_budget} of the experts cached": (
            1,
            {**base, "offload_config": {"host_budget": args.one_rank_budget}, "threads": 2},
        ),
        "2 ranks (ep_size=2), 100% of own half": (
            2,
            {**base, "offload_config": {"host_budget": "100%"}, "threads": 1},
        ),
    }
    measured: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (world, spec) in runs.items():  # interleaved: the machine is shared and noisy
            measured[name].append(_run(world, spec, limit, args.timeout))
    predicted = _predict(model, [w for w, _ in runs.values()], args.plan_memory, args.profile, args.one_rank_budget)
    summary = {}
    print(
        f"per-process RAM limit {args.ram_limit}; {args.layers} layers x {args.experts} experts; medians of {args.repeats}"
    )
    print(
        f"{'configuration':42s} {'decode tok/s':>12s} {'TTFT s':>8s} {'hit rate':>9s} {'peak MiB/rank':>14s} "
        f"{'plan tok/s':>10s} {'plan hit':>8s}"
    )
    for name, rows in measured.items():
        row = {k: statistics.median(r[k] for r in rows) for k in ("decode_tok_s", "ttft_s", "hit_rate")}
        row["peak_bytes"] = max(rk["peak_bytes"] for r in rows for rk in r["ranks"])
        row["expert_bytes_per_rank"] = rows[0]["ranks"][0]["expert_bytes_total"]
        row["runs"] = [r["decode_tok_s"] for r in rows]
        row["predicted"] = predicted[runs[name][0]]
        summary[name] = row
        print(
            f"{name:42s} {row['decode_tok_s']:12.2f} {row['ttft_s']:8.2f} {row['hit_rate']:9.2f} "
            f"{row['peak_bytes'] / 2**20:14.0f} {row['predicted']['tokens_per_s']:10.2f} "
            f"{row['predicted']['hit_rate']:8.2f}"
        )
    print(
        f"plan: {predicted['plan_memory_bytes'] / 2**20:.0f} MiB per process, disk {predicted['disk_read_Bps'] / 1e9:.2f} GB/s"
    )
    record = {"ram_limit": limit, "layers": args.layers, "experts": args.experts, "results": summary}
    print(json.dumps({**record, "plan_memory_bytes": predicted["plan_memory_bytes"]}))


if __name__ == "__main__":
    main()
