"""`hf-moe-offload trace MODEL --prompt TEXT --out DIR`: the I/O / compute timeline of one generation.

```
from_pretrained(offload_config) --> cache.timeline.enabled --> generate (min = max new tokens)
    [--record-routing PATH: integration.tracing.record_routing, saved as a RoutingTrace for `bench --replay`]
    --> DIR/timeline.json (Perfetto / chrome://tracing), DIR/timeline.png, bubble fraction and overlap
    --> a summary for people, or one JSON document with `--json`
```
The PNG needs matplotlib (the `bench` extra); without it the command writes the JSON timeline only and says so
on stderr. Without `--prompt` / `--prompt-file` the prompts are `--prompt-len` seeded random ids (prompts need a
tokenizer in the model folder). `--batch N` generates N sequences at once (prompts cycled, left-padded): a routing recorded at
batch N replays at any batch up to N (`bench --replay`).
The JSON document holds `timeline_json`, `timeline_png` (null without matplotlib), `routing_trace`, the `timeline_metrics` keys
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
from .args import (
    DTYPES,
    UsageError,
    add_offload_args,
    add_output_args,
    check_positive,
    emit,
    note,
    offload_config_from_args,
    progress_enabled,
    quiet_transformers,
    read_prompts,
)

__all__ = ["add_parser", "main"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "trace",
        help="record and plot the I/O / compute timeline of one generation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model folder (or a model id already in the Hugging Face cache)")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable; needs a tokenizer in the model folder)")
    p.add_argument("--prompt-file", help="prompts, one per line (a literal \\n stands for a newline)")
    p.add_argument("--batch", type=int, default=0, help="sequences generated at once (default: one per prompt)")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt length without --prompt (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate, exactly (default 16)")
    p.add_argument("--out", default="hf_moe_offload_trace", help="output folder (default ./hf_moe_offload_trace)")
    p.add_argument("--record-routing", metavar="PATH", help="also save the run's routing (.npz) for bench --replay")
    p.add_argument("--png-steps", type=int, default=8, help="steps drawn in the PNG, prefill included (0: all)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: OffloadConfig's threads='auto': the cores other processes leave free)",
    )
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt (default 0)")
    add_output_args(p)
    add_offload_args(p)
    p.set_defaults(func=main)


def _check(args) -> list[str]:
    """Every value the user typed, before anything loads; returns the prompts."""
    prompts = read_prompts(args.prompt, args.prompt_file)
    check_positive(args.batch, "--batch", minimum=0)
    check_positive(args.prompt_len, "--prompt-len")
    check_positive(args.max_new_tokens, "--max-new-tokens")
    check_positive(args.png_steps, "--png-steps", minimum=0)
    check_positive(args.threads, "--threads", minimum=0)
    if args.record_routing and not os.path.isdir(os.path.dirname(os.path.abspath(args.record_routing))):
        raise UsageError(f"--record-routing: the folder of {args.record_routing} does not exist")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out: {args.out} exists and is not a folder")
    return prompts


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


class _StepProgress:
    """A `generate` streamer that only advances a tqdm bar on stderr, one step per generated token."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="trace", unit="tok", leave=False)
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.bar.update(1)
        self.prompt_seen = True

    def end(self) -> None:
        self.bar.close()


def _tokenizer(folder: str, prompts: list[str]):
    """The folder's tokenizer (left padding) when there are prompts, loaded before the model so a folder without
    one fails at once; None without prompts."""
    if not prompts:
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    except Exception as e:  # noqa: BLE001 - any failure means the folder has no usable tokenizer
        raise UsageError(
            f"prompts need a tokenizer in the model folder ({type(e).__name__}); "
            f"drop --prompt / --prompt-file for a random prompt of --prompt-len ids"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _inputs(args, model, prompts: list[str], tok):
    """`(input_ids, attention_mask, tokenizer or None)` for `--batch` sequences."""
    import torch

    batch = args.batch or max(1, len(prompts))
    if prompts:
        enc = tok([prompts[i % len(prompts)] for i in range(batch)], return_tensors="pt", padding=True)
        return enc.input_ids, enc.attention_mask, tok
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), generator=gen)
    return ids, torch.ones_like(ids), None


def main(args: argparse.Namespace) -> int:
    prompts = _check(args)
    cfg = offload_config_from_args(args, threads=args.threads or None)
    plot = _has_matplotlib()
    if not plot:
        note(
            "trace", "matplotlib is not installed: writing the JSON timeline only (pip install matplotlib for the PNG)"
        )

    import torch
    from transformers import AutoModelForCausalLM

    import hf_moe_offload

    from ..bench.timeline_export import plot_timeline, timeline_metrics, to_chrome_trace
    from ..integration.plan import resolve_folder
    from ..integration.tracing import record_routing

    hf_moe_offload.install()
    quiet_transformers(args)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    folder = resolve_folder(args.model, {})  # a wrong path or an uncached id fails here, at once
    tok = _tokenizer(folder, prompts)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, offload_config=cfg)
    ids, mask, tok = _inputs(args, model, prompts, tok)
    ids, mask = ids.to(model.device), mask.to(model.device)
    n = args.max_new_tokens
    timeline = model.offload_engine.cache.timeline
    timeline.clear()
    timeline.enabled = True
    meta = {"batch": int(ids.shape[0]), "prompt_len": int(ids.shape[1]), "new_tokens": n, "model": str(args.model)}
    recorder = record_routing(model, meta=meta) if args.record_routing else contextlib.nullcontext()
    eos = model.config.eos_token_id
    pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    streamer = _StepProgress(n) if progress_enabled(args) else None
    start = time.perf_counter()
    try:
        with recorder as rec, torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad,
                streamer=streamer,
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
    if plot:
        plot_timeline(events, png_path, title=title, max_steps=args.png_steps or None)
    else:
        png_path = None
    trace_path = None
    if args.record_routing:
        rec.trace().save(args.record_routing)
        trace_path = args.record_routing
    stats = {k: v for k, v in model.offload_stats().items() if k != "per_layer"}
    new = out[0, ids.shape[1] :]

    def pct(x) -> str:
        return "-" if x is None else f"{x:.1%}"

    table = "\n".join(
        [
            f"generated {len(new)} tokens in {seconds:.2f} s; {len(events)} timeline events over "
            f"{metrics['steps']} steps",
            f"  bubble fraction  {pct(bubble)}  (stall {metrics['stall_s']:.3f} s / MoE layers "
            f"{metrics['moe_layer_s']:.3f} s)",
            f"  I/O overlap      {pct(overlap)}  (under expert compute only: {pct(metrics['overlap_expert_compute'])})",
            f"  I/O              {metrics['io_loads']} loads, {format_bytes(metrics['io_bytes'])}, "
            f"{metrics['io_s']:.3f} s on {metrics['io_threads']} thread(s), {metrics['io_speculative']} speculative",
            f"  wrote {json_path} (open in https://ui.perfetto.dev)"
            + (f" and {png_path}" if png_path else "")
            + (f"; routing trace {trace_path}" if trace_path else ""),
        ]
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
    emit(args, record, table)
    return 0
