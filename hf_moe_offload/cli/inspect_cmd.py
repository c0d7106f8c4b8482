"""`hf-moe-offload inspect PATH`: a checkpoint's MoE layout and whether hf_moe_offload supports it.

Builds the model on the meta device and reads only the safetensors headers, so it is instant for any size.
"""

from __future__ import annotations

import argparse
import json

from ..config import format_bytes

__all__ = ["add_parser", "main", "inspect_path"]


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's MoE layout and support", description=__doc__)
    p.add_argument("model", help="model folder")
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
    for k, v in info.items():
        shown = format_bytes(v) if k.endswith("bytes") and isinstance(v, int) else v
        print(f"{k:<20} {shown}")
    print(json.dumps(info))
    return 0 if info.get("supported") else 1
