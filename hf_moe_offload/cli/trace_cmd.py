"""`hf-moe-offload trace MODEL --prompt TEXT --out DIR`: the I/O / compute timeline of one generation.

```
from_pretrained(offload_config) --> cache.timeline.enabled --> generate (min = max new tokens)
    [--record-routing PATH: integration.tracing.record_routing, saved as a RoutingTrace for `bench --replay`]
    --> DIR/timeline.json (Perfetto / chrome://tracing), DIR/timeline.png, bubble fraction and overlap
    --> a summary for people, then one JSON line
```
Without a tokenizer in the model folder (or without `--prompt` / `--prompt-file`) the prompts are `--prompt-len`
seeded random ids. `--batch N` generates N sequences at once (prompts cycled, left-padded): a routing recorded at
batch N replays at any batch up to N (`bench --replay`).
The JSON line holds `timeline_json`, `timeline_png`, `routing_trace`, the `timeline_metrics` keys
(`bubble_fraction`, `overlap`, `overlap_expert_compute`, `stall_s`, `moe_layer_s`, `compute_s`, `io_s`,
`io_loads`, `io_bytes`, `io_speculative`, `io_threads`, `steps`, `step_s`, `span_s`), `events`, `prompt_tokens`,
`new_tokens`, `text` and `offload_stats`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

from ..config import format_bytes
from .args import add_offload_args, offload_config_from_args

__all__ = ["add_parser", "main"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "trace",
        help="record and plot the I/O / compute timeline of one generation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model folder (or a model id already in the Hugging Face cache)")
    p.add_argument("--prompt", help="prompt text (needs a tokenizer in the model folder)")
    p.add_argument("--prompt-file", help="prompts, one per line (a literal \\n stands for a newline)")
    p.add_argument("--batch", type=int, default=0, help="sequences generated at once (default: one per prompt)")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt length without --prompt (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate, exactly (default 16)")
    p.add_argument("--out", default="hf_moe_offload_trace", help="output folder (default ./hf_moe_offload_trace)")
    p.add_argument("--record-routing", metavar="PATH", help="also save the run's routing (.npz) for bench --replay")
    p.add_argument("--png-steps", type=int, default=8, help="steps drawn in the PNG, prefill included (0: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--seed", type=int, default=0)
    add_offload_args(p)
    p.set_defaults(func=main)


def _prompts(args) -> list[str]:
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        if not prompts:
            raise SystemExit(f"trace: {args.prompt_file} holds no prompt")
        return prompts
    return [args.prompt] if args.prompt else []


def _inputs(args, model):
    """`(input_ids, attention_mask, tokenizer or None)` for `--batch` sequences."""
    import torch

    prompts = _prompts(args)
    batch = args.batch or max(1, len(prompts))
    if batch < 1:
        raise SystemExit(f"trace: --batch must be at least 1, got {args.batch}")
    if prompts:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model.offload_engine.folder, padding_side="left")
        except Exception as e:  # noqa: BLE001 - any failure means the folder has no usable tokenizer
            raise SystemExit(
                f"trace: prompts need a tokenizer in the model folder ({type(e).__name__}); "
                f"use --prompt-len for a random prompt"
            ) from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok([prompts[i % len(prompts)] for i in range(batch)], return_tensors="pt", padding=True)
        return enc.input_ids, enc.attention_mask, tok
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), generator=gen)
    return ids, torch.ones_like(ids), None


def main(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    import hf_moe_offload  # noqa: F401  (installs the hooks)

    from ..bench.timeline_export import plot_timeline, timeline_metrics, to_chrome_trace
    from ..integration.tracing import record_routing

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = offload_config_from_args(args)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, offload_config=cfg)
    ids, mask, tok = _inputs(args, model)
    ids, mask = ids.to(model.device), mask.to(model.device)
    n = args.max_new_tokens
    timeline = model.offload_engine.cache.timeline
    timeline.clear()
    timeline.enabled = True
    meta = {"batch": int(ids.shape[0]), "prompt_len": int(ids.shape[1]), "new_tokens": n, "model": str(args.model)}
    recorder = record_routing(model, meta=meta) if args.record_routing else contextlib.nullcontext()
    eos = model.config.eos_token_id
    pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    start = time.perf_counter()
    try:
        with recorder as rec, torch.inference_mode():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad
            )
    finally:
        timeline.enabled = False
    seconds = time.perf_counter() - start
    events = timeline.events()
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, "timeline.json"), os.path.join(args.out, "timeline.png")
    metrics = timeline_metrics(events)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(to_chrome_trace(events, meta={**meta, "offload_config": cfg.to_dict()}), f)
    name = os.path.basename(os.path.normpath(str(args.model)))
    bubble = metrics["bubble_fraction"]
    overlap = metrics["overlap"]
    title = (
        f"{name}: {n} new tokens, host budget {cfg.host_budget}, prefetch {cfg.prefetch}, "
        f"{cfg.io_threads} I/O threads | bubble fraction "
        f"{'-' if bubble is None else f'{bubble:.1%}'}, I/O overlap {'-' if overlap is None else f'{overlap:.1%}'}"
    )
    plot_timeline(events, png_path, title=title, max_steps=args.png_steps or None)
    trace_path = None
    if args.record_routing:
        rec.trace().save(args.record_routing)
        trace_path = args.record_routing
    stats = {k: v for k, v in model.offload_stats().items() if k != "per_layer"}
    new = out[0, ids.shape[1] :]

    def pct(x) -> str:
        return "-" if x is None else f"{x:.1%}"

    print(
        f"generated {len(new)} tokens in {seconds:.2f} s; {len(events)} timeline events over {metrics['steps']} steps"
    )
    print(
        f"  bubble fraction  {pct(bubble)}  (stall {metrics['stall_s']:.3f} s / MoE layers {metrics['moe_layer_s']:.3f} s)"
    )
    print(f"  I/O overlap      {pct(overlap)}  (under expert compute only: {pct(metrics['overlap_expert_compute'])})")
    print(
        f"  I/O              {metrics['io_loads']} loads, {format_bytes(metrics['io_bytes'])}, {metrics['io_s']:.3f} s "
        f"on {metrics['io_threads']} thread(s), {metrics['io_speculative']} speculative"
    )
    print(
        f"  wrote {json_path} (open in https://ui.perfetto.dev) and {png_path}"
        + (f"; routing trace {trace_path}" if trace_path else "")
    )
    record = {
        "timeline_json": json_path,
        "timeline_png": png_path,
        "routing_trace": trace_path,
        **metrics,
        "events": len(events),
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": len(new),
        "seconds": seconds,
        "text": tok.decode(new, skip_special_tokens=True) if tok is not None else None,
        "offload_stats": stats,
    }
    print(json.dumps(record))
    return 0
