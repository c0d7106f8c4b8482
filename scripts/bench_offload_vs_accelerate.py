"""Issue 2: batch-1 decode tokens/s of a MoE model in memory, with accelerate disk offload, and with hf_moe_offload.

Example:
    python scripts/bench_offload_vs_accelerate.py --model-dir /tmp/mixtral-1.6g --synthesize --reps 3

Synthesizes (with --synthesize, when the directory holds no checkpoint) a random Mixtral-shaped bf16 model in the
per-expert hub layout, measures the disk and page-cache bandwidth on it, runs every config in its own process,
interleaved, and prints a table and then one JSON line with every number. See hf_moe_offload/bench/decode_bench.py
for the configs and the measurement modes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import transformers  # noqa: E402

from hf_moe_offload.bench.decode_bench import checkpoint_bytes, run_benchmark  # noqa: E402
from hf_moe_offload.bench.decode_report import format_table, summarise  # noqa: E402
from hf_moe_offload.bench.synth import synthesize_mixtral  # noqa: E402
from hf_moe_offload.bench.sysmem import measure_disk_bandwidth  # noqa: E402

MiB = 1024**2
ROOT = Path(__file__).resolve().parents[1]


def library_fingerprint() -> str:
    """A short hash of the library's sources (bench excluded), to tell which version produced a figure."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "hf_moe_offload").rglob("*.py")):
        if "bench" not in path.relative_to(ROOT).parts:
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/mixtral-1.6g"))
    p.add_argument("--synthesize", action="store_true", help="write a random checkpoint if the dir has none")
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--intermediate-size", type=int, default=3584)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--layout", choices=("per_expert", "fused"), default="per_expert")
    p.add_argument("--configs", default="a,b25,c25,c50", help="comma-separated: a, b<pct> (accelerate), c<pct>")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--mode", choices=("ramlimit", "fadvise", "warm"), default="ramlimit")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--overhead-mib", type=int, default=768, help="memory above the budget in ramlimit mode")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the workers (0: torch's default)")
    p.add_argument("--sample", action="store_true", help="seeded sampling instead of greedy decoding")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker run")
    p.add_argument("--bandwidth-bytes", type=int, default=1024 * MiB, help="bytes read to measure bandwidth")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not any(args.model_dir.glob("*.safetensors")):
        if not args.synthesize:
            sys.exit(f"no checkpoint in {args.model_dir}; pass --synthesize to write a random one")
        synthesize_mixtral(
            args.model_dir,
            hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size,
            num_layers=args.num_layers,
            num_experts=args.num_experts,
            top_k=args.top_k,
            vocab_size=args.vocab_size,
            layout=args.layout,
        )
    sizes = checkpoint_bytes(args.model_dir)
    print(f"checkpoint {args.model_dir}: {sizes['total'] / 1e9:.3f} GB, experts {sizes['expert'] / 1e9:.3f} GB")
    # The virtual disk's speed drifts (its host may cache it): measure twice now and once at the end, and divide
    # by the fastest, so that the lower bound stays a lower bound.
    disk_bws = [measure_disk_bandwidth(args.model_dir, cold=True, max_bytes=args.bandwidth_bytes) for _ in range(2)]
    cache_bw = measure_disk_bandwidth(args.model_dir, cold=False, max_bytes=args.bandwidth_bytes)
    print(
        f"bandwidth: disk (cold, 16 MiB reads) {[round(b / 1e9, 2) for b in disk_bws]} GB/s, "
        f"page cache {cache_bw / 1e9:.2f} GB/s"
    )

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    fingerprint = library_fingerprint()
    start = time.time()
    runs = run_benchmark(
        args.model_dir,
        configs,
        reps=args.reps,
        mode=args.mode,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        overhead_bytes=args.overhead_mib * MiB,
        threads=args.threads or None,
        sample=args.sample,
        timeout=args.timeout,
    )
    disk_bws.append(measure_disk_bandwidth(args.model_dir, cold=True, max_bytes=args.bandwidth_bytes))
    disk_bw = max(disk_bws)
    bandwidth = cache_bw if args.mode == "warm" else disk_bw
    summary = summarise(runs, sizes, bandwidth=bandwidth, mode=args.mode)
    print()
    print(format_table(summary, disk_bw=disk_bw, cache_bw=cache_bw, mode=args.mode))
    record = {
        "bench": "offload_vs_accelerate",
        "model_dir": str(args.model_dir),
        "sizes": sizes,
        "mode": args.mode,
        "reps": args.reps,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "decoding": "sample" if args.sample else "greedy",
        "threads": args.threads or None,
        "overhead_bytes": args.overhead_mib * MiB,
        "disk_bw_bytes_s": disk_bw,
        "disk_bw_samples_bytes_s": disk_bws,
        "page_cache_bw_bytes_s": cache_bw,
        "wall_s": time.time() - start,
        "library_fingerprint": library_fingerprint(),
        "library_fingerprint_at_start": fingerprint,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "summary": summary,
        "runs": {name: [{k: v for k, v in r.items() if k != "device_map"} for r in rs] for name, rs in runs.items()},
    }
    if record["library_fingerprint"] != fingerprint:
        print(f"WARNING: the library sources changed during the run ({fingerprint} -> {record['library_fingerprint']})")
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
