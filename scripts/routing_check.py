#!/usr/bin/env python
"""Routing check of the shipped tiny MoE model (``models/moe-tiny``), with plain transformers (no offloading).

Runs the model once on the held-out windows shipped in ``heldout_samples.json`` (8 x 256 tokens of held-out State
of the Union speeches and 8 x 256 tokens of held-out Python stdlib source; see ``scripts/build_tiny_model.py``)
and records its routing (``hf_moe_offload.integration.tracing.record_routing``). It reports, per MoE layer (see
``hf_moe_offload.bench.routing_stats``):

* load entropy over experts (normalised to [0, 1]) and the share of routed token-slots on the busiest expert;
* recall of layer ``l + 1``'s top-k experts when its router is applied to layer ``l``'s MoE input;
* LRU hit rates with 2 and 4 cached experts per layer, decoding each sequence token by token from a cold cache
  (the cache's own LRU policy replayed on the trace: ``hf_moe_offload.prefetch.trace.simulate_cache``);
* Jensen-Shannon divergence between the two domains' expert loads.

Prints a table, writes ``<model>/routing_check.json`` and exits non-zero if a threshold fails::

    python scripts/routing_check.py [--model models/moe-tiny] [--min-recall 0.75] [--max-busiest 0.9]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

try:
    from hf_moe_offload.bench import routing_stats as rs
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_moe_offload.bench import routing_stats as rs
from hf_moe_offload.integration.tracing import record_routing  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "moe-tiny"
MAX_BUSIEST_SHARE = 0.9
MIN_MEAN_RECALL = 0.75


def load_samples(model_dir: str | Path) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """The held-out windows shipped with the model as one ``[rows, seq]`` batch, and the rows of each domain."""
    samples = json.loads((Path(model_dir) / "heldout_samples.json").read_text())
    rows: list[list[int]] = []
    domains: dict[str, list[int]] = {}
    for name, data in samples["domains"].items():
        domains[name] = list(range(len(rows), len(rows) + len(data["input_ids"])))
        rows.extend(data["input_ids"])
    return torch.tensor(rows, dtype=torch.long), domains


def run_routing_check(
    model_dir: str | Path = DEFAULT_MODEL, dtype: str = "auto", threads: int | None = None
) -> dict[str, Any]:
    """Load the model with plain transformers, trace its routing on the held-out samples and build the report."""
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    model.eval()
    input_ids, domains = load_samples(model_dir)
    t0 = time.perf_counter()
    with record_routing(model, meta={"batch": int(input_ids.shape[0])}) as rec, torch.no_grad():
        model(input_ids=input_ids)
    report = rs.routing_report(rec.trace(), capacities=(2, 4), domains=domains)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["model_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    report["domains"] = {name: len(rows) for name, rows in domains.items()}
    report["seq_len"] = int(input_ids.shape[1])
    return report


def check_thresholds(
    report: dict[str, Any], max_busiest: float = MAX_BUSIEST_SHARE, min_recall: float = MIN_MEAN_RECALL
) -> list[str]:
    """Human-readable failures of the routing thresholds (empty list: all pass)."""
    failures = []
    for row in report["layers"]:
        if row["busiest_share"] >= max_busiest:
            failures.append(
                f"layer {row['layer']}: expert {row['busiest_expert']} takes {row['busiest_share']:.1%} of slots"
            )
    mean_recall = report["summary"]["next_layer_recall"]["mean"]
    if mean_recall < min_recall:
        failures.append(f"mean next-layer recall {mean_recall:.3f} < {min_recall}")
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--dtype", default="auto", help="'auto' (as saved: bfloat16), 'float32', ...")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-busiest", type=float, default=MAX_BUSIEST_SHARE)
    p.add_argument("--min-recall", type=float, default=MIN_MEAN_RECALL)
    p.add_argument("--out", default=None, help="JSON output (default <model>/routing_check.json)")
    args = p.parse_args(argv)

    report = run_routing_check(args.model, args.dtype, args.threads)
    failures = check_thresholds(report, args.max_busiest, args.min_recall)
    report["thresholds"] = {"max_busiest_share": args.max_busiest, "min_mean_next_layer_recall": args.min_recall}
    report["passed"] = not failures
    out = Path(args.out) if args.out else Path(args.model) / "routing_check.json"
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"{report['num_layers']} MoE layers, {report['num_experts']} experts, top-{report['top_k']}, "
        f"{report['sequences']} sequences x {report['seq_len']} tokens "
        f"({', '.join(f'{n}: {c}' for n, c in report['domains'].items())}), dtype {report['model_dtype']}"
    )
    print(rs.format_report(report))
    base = report["summary"]["uniform_lru_baseline"]
    print("uniform-routing LRU baseline: " + ", ".join(f"{k}={v:.3f}" for k, v in base.items()))
    print(f"wrote {out}")
    for failure in failures:
        print(f"FAIL: {failure}")
    print("PASS" if not failures else "FAILED")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
