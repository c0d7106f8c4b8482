#!/usr/bin/env python
"""`pipeline(prompts, batch_size=N)` on the shipped model: routing-grouped batches against plain batching.

Prompts are slices of the shipped model's held-out speech and code samples, shuffled (a mixed workload). One
offloaded model serves both configurations, interleaved over `--rounds` (the machine is noisy); each run starts
from a cold cache (every slot dropped, a fresh engine per round is too slow to matter here: a new model per run).
Reports per configuration the median wall time, expert bytes loaded and misses, then one JSON line.

    python scripts/measure_pipeline_grouping.py --prompts 48 --batch 8 --new-tokens 16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import hf_moe_offload  # noqa: F401  (installs the hooks)

MODEL = Path(__file__).resolve().parents[1] / "models" / "moe-tiny"


def prompts(n: int, chars: int, seed: int) -> list[str]:
    samples = json.loads((MODEL / "heldout_samples.json").read_text())["domains"]
    texts = [t for d in samples.values() for t in d["text"]]
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        t = rng.choice(texts)
        start = rng.randrange(0, max(1, len(t) - chars))
        out.append(t[start : start + chars])
    return out


def run(grouped: bool, items: list[str], args) -> dict:
    model = AutoModelForCausalLM.from_pretrained(MODEL, offload_config={"host_budget": args.budget})
    tok = AutoTokenizer.from_pretrained(MODEL)
    tok.padding_side = "left"
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    t0 = time.perf_counter()
    out = pipe(
        items,
        batch_size=args.batch,
        group_by_routing=grouped,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        return_full_text=False,
    )
    wall = time.perf_counter() - t0
    s = model.offload_stats()
    model.offload_engine.close()
    return {
        "wall_s": wall,
        "bytes_loaded": s["bytes_loaded"],
        "misses": s["misses"],
        "texts": [o[0]["generated_text"] for o in out],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--chars", type=int, default=80)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--budget", default="25%")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    items = prompts(args.prompts, args.chars, seed=0)
    results = {"plain": [], "grouped": []}
    for _ in range(args.rounds):
        for name in ("plain", "grouped"):
            results[name].append(run(name == "grouped", items, args))
    reference = results["plain"][0]["texts"]
    differ = max(sum(a != b for a, b in zip(r["texts"], reference)) for rs in results.values() for r in rs)
    summary = {
        name: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "bytes_loaded", "misses")}
        for name, rs in results.items()
    }
    print(
        f"{args.prompts} prompts, batch {args.batch}, {args.new_tokens} new tokens, host_budget {args.budget}, "
        f"medians of {args.rounds} interleaved rounds; outputs that differ from the first plain run: at most {differ} "
        f"(bf16: a prompt's batch mates change its padding and so the rounding of its logits)"
    )
    print(f"{'batching':<10}{'wall s':>9}{'MB loaded':>11}{'misses':>8}")
    for name, s in summary.items():
        print(f"{name:<10}{s['wall_s']:>9.2f}{s['bytes_loaded'] / 1e6:>11.1f}{s['misses']:>8.0f}")
    ratio = summary["plain"]["wall_s"] / summary["grouped"]["wall_s"]
    print(f"grouped is {ratio:.2f}x plain batching")
    print(json.dumps({"args": vars(args), "outputs_differing": differ, "summary": summary, "speedup": ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
