#!/usr/bin/env python
"""How much the token scheduler (ExpertFlow-style grouping) saves on a recorded routing trace.

Takes a trace recorded at batch N (`hf-moe-offload trace MODEL --batch N --record-routing r.npz`), shuffles the
sequences (a mixed workload), and compares the distinct experts per layer and decode step of micro-batches of
`--group` consecutive sequences against micro-batches chosen by `scheduling.token_scheduler.group_sequences`
from the prefill routing. Fewer distinct experts per step means fewer expert loads per step.

    python scripts/measure_token_scheduler.py r.npz --group 8 --shuffles 5
"""

from __future__ import annotations

import argparse

import numpy as np

from hf_moe_offload.prefetch.trace import RoutingTrace
from hf_moe_offload.scheduling.token_scheduler import group_sequences


def prefill_signature(trace: RoutingTrace) -> np.ndarray:
    """`(sequences, layers, experts)` counts of the prefill tokens routed to each expert."""
    batch, length = int(trace.meta["batch"]), int(trace.meta["prompt_len"])
    sig = np.zeros((batch, trace.num_layers, trace.num_experts))
    for layer in range(trace.num_layers):
        experts = trace.rows(0, layer)[0].reshape(batch, length, -1)
        for b in range(batch):
            np.add.at(sig[b, layer], experts[b].ravel(), 1)
    return sig


def decode_distinct(trace: RoutingTrace, groups: list[list[int]]) -> float:
    """Mean distinct experts per (decode step, layer, group)."""
    counts = []
    for step in range(1, trace.num_steps):
        for layer in range(trace.num_layers):
            experts = trace.rows(step, layer)[0]
            counts += [len(np.unique(experts[g])) for g in groups]
    return float(np.mean(counts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace")
    p.add_argument("--group", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--shuffles", type=int, default=5)
    args = p.parse_args(argv)
    trace = RoutingTrace.load(args.trace)
    sig = prefill_signature(trace)
    rng = np.random.default_rng(0)
    plain, grouped = [], []
    for _ in range(args.shuffles):
        perm = rng.permutation(len(sig))
        sched = group_sequences(sig[perm], group_size=args.group)
        plain.append(decode_distinct(trace, [list(perm[i : i + args.group]) for i in range(0, len(perm), args.group)]))
        grouped.append(decode_distinct(trace, [[perm[i] for i in g] for g in sched.groups]))
    a, b = float(np.mean(plain)), float(np.mean(grouped))
    print(
        f"groups of {args.group}: distinct experts per layer and decode step {a:.2f} in arrival order, "
        f"{b:.2f} grouped by routing ({100 * (b / a - 1):+.1f}%)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
