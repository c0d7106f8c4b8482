"""`hf-moe-offload run`: generate from a prompt (or a file of prompts) with offloading, streaming the text."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .args import add_offload_args, offload_config_from_args

__all__ = ["add_parser", "main"]


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="generate text with an offloaded model", description=__doc__)
    p.add_argument("model", help="model folder (or a model id already in the Hugging Face cache)")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--prompts-file", help="file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.8, top-p 0.95) instead of greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--json", action="store_true", help="print only the final JSON line (no streaming)")
    add_offload_args(p)
    p.set_defaults(func=main)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise SystemExit("run: give --prompt TEXT or --prompts-file FILE")
    return prompts


def main(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    import hf_moe_offload  # noqa: F401  (installs the hooks)

    torch.manual_seed(args.seed)
    cfg = offload_config_from_args(args)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, offload_config=cfg)
    tok = AutoTokenizer.from_pretrained(args.model)
    load_s = time.perf_counter() - t0
    results = []
    for prompt in _prompts(args):
        enc = tok(prompt, return_tensors="pt")
        streamer = None if args.json else TextStreamer(tok, skip_special_tokens=True)
        if streamer is not None:
            print(f"\n>>> {prompt}", flush=True)
        t1 = time.perf_counter()
        kw = dict(do_sample=True, temperature=0.8, top_p=0.95) if args.sample else dict(do_sample=False)
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, streamer=streamer, **kw)
        new = out[0, enc.input_ids.shape[1] :]
        results.append(
            {
                "prompt": prompt,
                "text": tok.decode(new, skip_special_tokens=True),
                "new_tokens": len(new),
                "seconds": time.perf_counter() - t1,
            }
        )
    stats = {k: v for k, v in model.offload_stats().items() if k != "per_layer"}
    if not args.json:
        print("\noffload stats:", file=sys.stderr)
        for k in ("hits", "misses", "hit_rate", "evictions", "bytes_loaded", "stall_seconds", "host_slots"):
            v = stats[k]
            print(f"  {k:<14} {v:.3f}" if isinstance(v, float) else f"  {k:<14} {v}", file=sys.stderr)
    print(json.dumps({"load_seconds": load_s, "results": results, "offload_stats": stats}))
    return 0
