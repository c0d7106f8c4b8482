"""`hf-moe-offload inspect PATH`: a checkpoint's MoE layout and whether hf_moe_offload supports it.

Builds the model on the meta device and reads only the safetensors headers, so it is instant for any size.
Prints a table, or with `--json` one JSON document (`path`, `model_type`, `architecture`, `supported`, and either
`reason` or the layout and topology). Exit status 1 when the checkpoint is not supported.
"""

from __future__ import annotations

import argparse

from ..config import format_bytes
from .args import add_output_args, emit

__all__ = ["add_parser", "main", "inspect_path"]


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's MoE layout and support", description=__doc__)
    p.add_argument("model", help="model folder (or a model id already in the Hugging Face cache)")
    add_output_args(p)
    p.set_defaults(func=main)


def inspect_path(path: str) -> dict:
    from transformers import AutoConfig

    from ..errors import OffloadError
    from ..integration.plan import describe_checkpoint, model_class, resolve_folder
    from ..storage import checkpoint_files, read_header

    folder = resolve_folder(path, {})
    config = AutoConfig.from_pretrained(folder)
    info = {"path": folder, "model_type": config.model_type, "architecture": model_class(config).__name__}
    try:
        topology, layout, keys = describe_checkpoint(folder)
    except OffloadError as e:
        info.update(supported=False, reason=f"{type(e).__name__}: {e}")
        return info
    files = checkpoint_files(folder)
    info.update(
        supported=True,
        layout="per_expert" if layout.per_expert_keys else "fused",
        files=len(files),
        checkpoint_bytes=sum(read_header(f).file_size for f in files),
        **topology.summary(),
    )
    return info


def main(args: argparse.Namespace) -> int:
    info = inspect_path(args.model)
    rows = []
    for k, v in info.items():
        shown = format_bytes(v) if k.endswith("bytes") and isinstance(v, int) else v
        rows.append(f"{k:<20} {shown}")
    emit(args, info, "\n".join(rows))
    return 0 if info.get("supported") else 1
