"""`prepare_experts`: write a checkpoint's experts quantized, once, into a sidecar folder (`storage.sidecar`).

A later `from_pretrained(..., offload_config={"expert_dtype": "int4"})` finds the sidecar next to the model (or at
`sidecar=`) and reads each missed expert's packed bytes straight into its slot. The checkpoint is never modified.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from ..config import OffloadConfig
from ..errors import OffloadConfigError
from ..storage import ExpertStore
from ..storage.sidecar import write_sidecar
from .plan import describe_checkpoint, resolve_folder
from .tiers import default_sidecar, neurons_record, plan_slot_layout

__all__ = ["prepare_experts"]


def prepare_experts(
    path: str, expert_dtype: str, output: str | None = None, progress: bool = False, expert_fraction: float = 1.0
) -> dict:
    """Quantize every expert of the checkpoint at `path` to `expert_dtype` and write the sidecar.

    Args:
        path: model folder (or a cached model id).
        expert_dtype: `"int8"` or `"int4"`.
        output: sidecar folder (default: `<model>/hf_moe_offload_experts/<expert_dtype>`); must not be the model
            folder itself.
        progress: show a tqdm bar on stderr.
        expert_fraction: keep only this share of each expert's neurons (needs `calibrate` first).

    Returns:
        `{"sidecar", "manifest", "expert_dtype", "experts", "bytes_written", "checkpoint_expert_bytes", "seconds"}`.

    Raises:
        OffloadConfigError: an `expert_dtype` that is not a quantized one, or `output` is the model folder.
    """
    cfg = OffloadConfig(expert_dtype=expert_dtype, expert_fraction=expert_fraction)  # its messages for bad values
    if expert_dtype not in ("int8", "int4"):
        raise OffloadConfigError(
            f"expert_dtype: prepare writes quantized experts: 'int8' or 'int4', got {expert_dtype!r}"
        )
    folder = resolve_folder(path, {})
    out = os.fspath(output) if output is not None else default_sidecar(folder, expert_dtype, cfg.expert_fraction)
    if os.path.realpath(out) == os.path.realpath(folder):
        raise OffloadConfigError(f"output: {out} is the model folder; the sidecar needs a folder of its own")
    topology, layout, _ = describe_checkpoint(folder)
    slots = plan_slot_layout(
        dataclasses.replace(cfg, sidecar="none"), folder, topology, layout, torch.device("cpu"), sharded=False
    )
    num_experts = {layer.layer: layer.num_experts for layer in topology.layers}
    t0 = time.perf_counter()
    store = ExpertStore(layout, "cached")
    bar = None
    try:
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(num_experts.values()), desc=f"prepare {expert_dtype}", unit="expert")
        manifest = write_sidecar(
            out,
            store,
            slots.layout,
            expert_dtype,
            num_experts,
            bar.update if bar else None,
            neurons_record(folder, cfg.expert_fraction),
        )
    finally:
        store.close()
        if bar is not None:
            bar.close()
    written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    return {
        "sidecar": out,
        "manifest": manifest,
        "expert_dtype": expert_dtype,
        "experts": sum(num_experts.values()),
        "bytes_written": written,
        "checkpoint_expert_bytes": topology.total_expert_nbytes,
        "seconds": round(time.perf_counter() - t0, 3),
    }
