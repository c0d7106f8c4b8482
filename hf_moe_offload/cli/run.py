"""`hf-moe-offload run MODEL --prompt TEXT`: generate with an offloaded model, streaming the text.

Prompts come from `--prompt` (repeatable) and `--prompt-file` (one per line); `--chat` wraps each in the
tokenizer's chat template first. Decoding follows the model's `generation_config` (greedy or sampling,
temperature, top-p, top-k) unless a flag overrides it; `--temperature`, `--top-p` or `--top-k` alone imply
`--sample`. Without `--json` the text streams to stdout, followed by a table of offload statistics; with
`--json` stdout holds one JSON document: `load_seconds`, `results` (`prompt`, `prompt_tokens`, `text`,
`new_tokens`, `seconds` per prompt) and `offload_stats`.
"""

from __future__ import annotations

import argparse
import time

from .args import (
    DTYPES,
    UsageError,
    add_offload_args,
    add_output_args,
    check_positive,
    emit,
    offload_config_from_args,
    quiet_transformers,
    read_prompts,
)

__all__ = ["add_parser", "main"]

_STATS = ("hits", "misses", "hit_rate", "evictions", "bytes_loaded", "stall_seconds", "host_slots")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="generate text with an offloaded model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model folder (or a model id already in the Hugging Face cache)")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--prompt-file", help="prompts, one per line (a literal \\n stands for a newline)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template (instruct models)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate at most (default 48)")
    g = p.add_argument_group("decoding (default: the model's generation_config)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--sample", dest="do_sample", action="store_const", const=True, help="sample")
    mode.add_argument("--greedy", dest="do_sample", action="store_const", const=False, help="greedy decoding")
    g.add_argument("--temperature", type=float, help="sampling temperature (implies --sample)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (implies --sample)")
    g.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (implies --sample)")
    g.add_argument("--seed", type=int, default=0, help="torch seed for sampling (default 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: OffloadConfig's threads='auto': the cores other processes leave free)",
    )
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (default: the checkpoint's)")
    add_output_args(p)
    add_offload_args(p)
    p.set_defaults(func=main)


def _generate_kwargs(args: argparse.Namespace) -> dict:
    """Only what the user set: `generate` takes the rest from the model's `generation_config`."""
    check_positive(args.max_new_tokens, "--max-new-tokens")
    kw: dict = {"max_new_tokens": args.max_new_tokens}
    if args.temperature is not None and args.temperature <= 0:
        raise UsageError(f"--temperature: expected a value > 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p: expected a value in (0, 1], got {args.top_p}")
    check_positive(args.top_k, "--top-k")
    knobs = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    knobs = {k: v for k, v in knobs.items() if v is not None}
    if knobs and args.do_sample is False:
        raise UsageError(f"--greedy ignores {', '.join('--' + k.replace('_', '-') for k in knobs)}; drop one")
    if args.do_sample is not None or knobs:
        kw["do_sample"] = bool(args.do_sample or knobs)
    return {**kw, **knobs}


def _encode(tok, prompt: str, chat: bool):
    if not chat:
        return tok(prompt, return_tensors="pt")
    messages = [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def _stats_table(stats: dict) -> str:
    rows = ["", "offload stats:"]
    for k in _STATS:
        v = stats.get(k)
        rows.append(f"  {k:<14} {v:.3f}" if isinstance(v, float) else f"  {k:<14} {v}")
    return "\n".join(rows)


def main(args: argparse.Namespace) -> int:
    # Everything the user typed is checked before anything heavy is imported or loaded.
    prompts = read_prompts(args.prompt, args.prompt_file)
    if not prompts:
        raise UsageError("give --prompt TEXT (repeatable) or --prompt-file FILE")
    gen_kwargs = _generate_kwargs(args)
    check_positive(args.threads, "--threads", minimum=0)
    cfg = offload_config_from_args(args, threads=args.threads or None)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    import hf_moe_offload
    from hf_moe_offload.integration.plan import resolve_folder

    hf_moe_offload.install()
    quiet_transformers(args)
    folder = resolve_folder(args.model, {})  # a wrong path or an uncached id fails here, at once
    tok = AutoTokenizer.from_pretrained(folder)
    if args.chat and not getattr(tok, "chat_template", None):
        raise UsageError(f"--chat: the tokenizer of {args.model} has no chat template; drop --chat")
    torch.manual_seed(args.seed)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, offload_config=cfg)
    load_s = time.perf_counter() - t0
    if model.generation_config.pad_token_id is None and tok.eos_token_id is not None:
        gen_kwargs.setdefault("pad_token_id", tok.eos_token_id)
    results = []
    out = args.stdout
    for prompt in prompts:
        enc = _encode(tok, prompt, args.chat)
        streamer = None
        if not args.json:
            out.write(f"\n>>> {prompt}\n")
            out.flush()
            streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        t1 = time.perf_counter()
        with torch.inference_mode():
            generated = model.generate(**enc, streamer=streamer, **gen_kwargs)
        new = generated[0, enc["input_ids"].shape[1] :]
        results.append(
            {
                "prompt": prompt,
                "prompt_tokens": int(enc["input_ids"].shape[1]),
                "text": tok.decode(new, skip_special_tokens=True),
                "new_tokens": len(new),
                "seconds": time.perf_counter() - t1,
            }
        )
    stats = {k: v for k, v in model.offload_stats().items() if k != "per_layer"}
    emit(args, {"load_seconds": load_s, "results": results, "offload_stats": stats}, _stats_table(stats))
    return 0
