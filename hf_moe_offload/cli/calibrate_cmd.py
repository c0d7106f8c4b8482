"""`hf-moe-offload calibrate MODEL --text FILE...`: rank each expert's neurons by importance (for `expert_fraction`).

Runs the text through the offloaded model once and writes `MODEL/hf_moe_offload_neurons.npz`. A few hundred tokens
of text like the model's real inputs are enough. Without `--text`, a model folder that ships
`heldout_samples.json` (the bundled model) is calibrated on it; evaluate then on other text.
"""

from __future__ import annotations

import argparse
import json
import os

from .args import UsageError, add_output_args, emit, progress_enabled

__all__ = ["add_parser", "main"]


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="rank expert neurons for expert_fraction", description=__doc__)
    p.add_argument("model", help="model folder (or a model id already in the Hugging Face cache)")
    p.add_argument("--text", action="append", default=[], help="a text file to calibrate on (repeatable)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per calibration sequence (default 512)")
    add_output_args(p)
    p.set_defaults(func=main)


def _sequences(args: argparse.Namespace) -> list:
    import torch
    from transformers import AutoTokenizer

    from ..integration.plan import resolve_folder

    folder = resolve_folder(args.model, {})
    if not args.text:
        samples = os.path.join(folder, "heldout_samples.json")
        if not os.path.isfile(samples):
            raise UsageError("give the text to calibrate on with --text FILE (a few hundred tokens or more)")
        with open(samples, encoding="utf-8") as f:
            domains = json.load(f)["domains"]
        return [torch.tensor(d["input_ids"])[:, : args.tokens] for d in domains.values()]
    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    for path in args.text:
        with open(path, encoding="utf-8") as f:
            ids = tok(f.read(), return_tensors="pt").input_ids[0]
        out += [ids[i : i + args.tokens][None] for i in range(0, len(ids), args.tokens)]
    return out


def main(args: argparse.Namespace) -> int:
    if args.tokens < 8:
        raise UsageError(f"--tokens: expected at least 8, got {args.tokens}")
    for path in args.text:
        if not os.path.isfile(path):
            raise UsageError(f"--text: {path} is not a file")
    from ..integration.calibrate import calibrate_neurons

    info = calibrate_neurons(args.model, _sequences(args), progress=progress_enabled(args))
    table = "\n".join(f"{k:<14} {v}" for k, v in info.items())
    emit(args, info, table)
    return 0
