"""Checkpoint key -> offloaded expert weight, using transformers' own conversion mapping.

A checkpoint stores an expert weight either per expert (as on the hub: `...block_sparse_moe.experts.3.w1.weight`,
joined by `MergeModulelist(dim=0)` and, for gate and up, `Concatenate(dim=1)`) or already fused (as transformers 5
saves it: `...mlp.experts.gate_up_proj` of shape `[E, 2I, H]`); families with one module per expert (Switch, NLLB-MoE)
name each expert's key through their adapter's `expert_keys`. We ask transformers' `rename_source_key` which
model parameter each key feeds, and describe the answer as a `KeyTarget`: which layer and weight, which expert (or
`None` for a fused tensor that holds all experts), which part of a concatenation it is, and whether the assembled
weight's rows are then reordered by an `Interleave` (Inkling 2 stores gate and up rows alternating in
`w13_weight`). Byte ranges are worked out later from the safetensors headers (storage/layout.py); nothing here reads
tensor data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    Interleave,
    MergeModulelist,
    WeightConverter,
    WeightRenaming,
    rename_source_key,
)

from ..errors import UnsupportedLayoutError
from .topology import MoETopology

__all__ = ["Interleaving", "KeyTarget", "resolve_expert_keys"]

_EXPERT_INDEX = re.compile(r"(?:^|\.)experts\.(\d+)\.")


@dataclass(frozen=True)
class Interleaving:
    """transformers' `Interleave` applied to one expert's assembled weight (the op's dim less the expert dim).

    `dim` of size n is split into `[n / 2, 2]` and the two axes swapped, so rows `0, 2, 4, ...` come first and
    `1, 3, 5, ...` follow (gate rows, then up rows); `inverse` splits into `[2, n / 2]` instead (the reverse).

    Attributes:
        dim: dim of one expert's weight that is reordered.
        inverse: whether the op is transformers' `Interleave(inverse=True)`.
    """

    dim: int
    inverse: bool = False

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """`w` (one expert's weight, in the checkpoint's row order) in the model's row order, as a new tensor."""
        shape = list(w.shape)
        n = shape[self.dim]
        shape[self.dim : self.dim + 1] = [2, n // 2] if self.inverse else [n // 2, 2]
        return w.reshape(shape).transpose(self.dim, self.dim + 1).reshape(w.shape).contiguous()


@dataclass(frozen=True)
class KeyTarget:
    """Where one checkpoint tensor goes.

    Attributes:
        layer: MoE layer ordinal.
        param: offloaded weight name, e.g. `"gate_up_proj"`.
        expert: expert index for a per-expert key; `None` when the tensor is fused (`[E, ...]`, slice by expert).
        part: position among the tensors concatenated (dim 0 of one expert's weight) to form `param`.
        num_parts: how many tensors are concatenated (1 when none).
        interleave: how the concatenated weight's rows are then reordered; None when they are not.
    """

    layer: int
    param: str
    expert: int | None
    part: int
    num_parts: int
    interleave: Interleaving | None = None


# Ops that dequantize experts stored with scales, and pass a lone weight through unchanged (transformers 5.24,
# Inkling2Loop): an unquantized checkpoint holds only the first source, which is then the one part.
_DEQUANTIZE_OR_PASS = ("Inkling2LoopDequantizeExperts",)


def _check_ops(converter: WeightConverter, model_type: str, pattern: str) -> tuple[int, Interleaving | None]:
    """Validate that the converter only stacks experts, concatenates on dim 1 and, last, interleaves a dim past the
    expert dim; return the number of parts and the interleaving."""
    ops, interleave, num_parts = converter.operations, None, len(converter.source_patterns)
    for i, op in enumerate(ops):
        if type(op).__name__ in _DEQUANTIZE_OR_PASS and i == 0:
            if pattern != converter.source_patterns[0]:
                raise UnsupportedLayoutError(
                    f"{model_type}: the checkpoint's expert weights are quantized ({pattern!r} holds scales) and need "
                    f"{type(op).__name__}; hf_moe_offload reads unquantized experts of this model only. Load it "
                    f"normally once and save_pretrained it, then offload the saved copy."
                )
            num_parts = 1
        elif isinstance(op, Interleave) and op.dim >= 1 and i == len(ops) - 1:
            interleave = Interleaving(op.dim - 1, op.inverse)
        elif not ((isinstance(op, MergeModulelist) and op.dim == 0) or (isinstance(op, Concatenate) and op.dim == 1)):
            raise UnsupportedLayoutError(
                f"{model_type}: the checkpoint's expert weights need the conversion {ops}, but the expert store "
                f"reads experts by byte range and supports only stacking experts (MergeModulelist(0)), gate/up "
                f"concatenation (Concatenate(1)) and a final row interleave past the expert dim (Interleave(dim>=1)). "
                f"Re-save the model with transformers>=5 (fused layout) to offload it."
            )
    return num_parts, interleave


def resolve_expert_keys(model: nn.Module, checkpoint_keys: list[str], topology: MoETopology) -> dict[str, KeyTarget]:
    """Map the checkpoint keys that hold offloaded expert weights to their `KeyTarget`.

    Keys of other weights are left out of the result. `model` may be on the meta device.
    """
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)

    targets: dict[str, tuple[int, str]] = {}
    per_module: dict[str, KeyTarget] = {}  # experts stored one module per expert: no conversion involved
    for layer in topology.layers:
        keys = layer.adapter.expert_keys(layer.module)
        for p in layer.params:
            if keys is None:
                targets[layer.param_key(p.name)] = (layer.layer, p.name)
                continue
            for e, suffix in enumerate(keys[p.name]):
                per_module[layer.param_key(suffix)] = KeyTarget(layer.layer, p.name, e, 0, 1)
    meta_state = dict.fromkeys(model.state_dict().keys(), True)
    meta_state.update(dict.fromkeys(targets, True))
    meta_state.update(dict.fromkeys(per_module, True))
    prefix = getattr(model, "base_model_prefix", None)

    out: dict[str, KeyTarget] = {}
    for key in checkpoint_keys:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if renamed in per_module:
            out[key] = per_module[renamed]
            continue
        if renamed not in targets:
            continue
        layer, param = targets[renamed]
        m = _EXPERT_INDEX.search(key)
        expert = int(m.group(1)) if m and pattern is not None else None
        if pattern is None:
            out[key] = KeyTarget(layer, param, None, 0, 1)
            continue
        converter = by_pattern[pattern]
        num_parts, interleave = _check_ops(converter, model_type, pattern)
        part = converter.source_patterns.index(pattern)
        out[key] = KeyTarget(layer, param, expert, part, num_parts, interleave)
    return out
