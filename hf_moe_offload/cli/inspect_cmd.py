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
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..errors import OffloadError
    from ..integration import inspect_checkpoint
    from ..integration.plan import meta_model, resolve_folder
    from ..storage import checkpoint_files, read_header

    folder = resolve_folder(path, {})
    config = AutoConfig.from_pretrained(folder)
    cls = AutoModelForCausalLM._model_mapping[type(config)]
    info = {"path": folder, "model_type": config.model_type, "architecture": cls.__name__}
    try:
        topology, layout, keys = inspect_checkpoint(meta_model(cls, config, {}), folder)
    except OffloadError as e:
        info.update(supported=False, reason=f"{type(e).__name__}: {e}")
        return info
    per_expert = any(".experts." in k and k.split(".experts.")[1].split(".")[0].isdigit() for k in keys)
    files = checkpoint_files(folder)
    info.update(
        supported=True,
        layout="per_expert" if per_expert else "fused",
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
