"""Byte ranges of every expert: `(layer, expert) -> pieces per weight`, from headers and key targets alone.

A cache slot holds one expert as one contiguous buffer: its weights one after another (each 64-byte aligned) in
the model's compute dtype. Each weight is filled from one or more *pieces* of the checkpoint: a per-expert key is
one piece; a fused `[E, ...]` tensor gives the slice of expert `e` (a `[E * n, ...]` one its block of n rows);
gate and up are two pieces concatenated on dim 0. When the stored dtype equals the compute dtype a piece is read
straight into the slot.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ..adapters import ExpertParam, KeyTarget, MoETopology
from ..errors import CorruptCheckpointError
from .safetensors_file import TensorInfo

__all__ = ["Piece", "ExpertLayout", "build_layout", "SLOT_ALIGN"]

SLOT_ALIGN = 64


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class Piece:
    """A contiguous byte range of a checkpoint file that fills part of one expert weight.

    Attributes:
        file: path of the safetensors file.
        offset: absolute byte offset in the file.
        nbytes: bytes to read (in the stored dtype).
        src_dtype: stored dtype.
        dst_start: first element (in the weight's flattened per-expert tensor) that this piece fills.
        numel: number of elements.
    """

    file: str
    offset: int
    nbytes: int
    src_dtype: torch.dtype
    dst_start: int
    numel: int


@dataclass
class ExpertLayout:
    """Slot structure per layer and checkpoint pieces per expert."""

    slot_nbytes: int
    layer_params: dict[int, tuple[ExpertParam, ...]]
    layer_offsets: dict[int, tuple[int, ...]]  # byte offset of each weight inside a slot
    pieces: dict[tuple[int, int], tuple[tuple[Piece, ...], ...]]  # (layer, expert) -> pieces of each weight

    @property
    def files(self) -> list[str]:
        return sorted({p.file for per_expert in self.pieces.values() for ps in per_expert for p in ps})


def _slot_offsets(params: tuple[ExpertParam, ...]) -> tuple[tuple[int, ...], int]:
    offsets, pos = [], 0
    for p in params:
        pos = (pos + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN
        offsets.append(pos)
        pos += p.nbytes
    return tuple(offsets), pos


def build_layout(
    topology: MoETopology, tensors: dict[str, TensorInfo], key_targets: dict[str, KeyTarget]
) -> ExpertLayout:
    """Work out the pieces of every expert weight.

    Args:
        topology: the model's MoE layers.
        tensors: every checkpoint key -> its `TensorInfo` (from the safetensors headers).
        key_targets: the keys that hold expert weights -> where they go (`resolve_expert_keys`).

    Raises:
        CorruptCheckpointError: an expert weight is missing from the checkpoint or has the wrong shape.
    """
    # (layer, expert, param) -> {part: (info, offset, nbytes, part_shape)}
    parts: dict[tuple[int, int, str], dict[int, tuple[TensorInfo, int, int, tuple[int, ...]]]] = defaultdict(dict)
    num_parts: dict[tuple[int, str], int] = {}
    layers = {layer.layer: layer for layer in topology.layers}
    for key, t in key_targets.items():
        info = tensors[key]
        num_parts[(t.layer, t.param)] = t.num_parts
        if t.expert is None:
            # Fused over experts on dim 0: `[E, ...]` (one slice per expert) or `[E * n, ...]` (a block of n rows
            # per expert, e.g. DBRX); either way expert e's bytes are the e-th of E equal contiguous ranges.
            n_exp = layers[t.layer].num_experts
            stored = next((p.stored_experts for p in layers[t.layer].params if p.name == t.param), 0)
            if stored and info.shape and info.shape[0] == stored:  # trailing slices past n_exp are never read
                per = info.nbytes // stored
                for e in range(n_exp):
                    parts[(t.layer, e, t.param)][t.part] = (info, info.start + e * per, per, info.shape[1:])
                continue
            if not info.shape or info.shape[0] % n_exp:
                raise CorruptCheckpointError(
                    f"{info.file}: {key} has shape {list(info.shape)}; expected dim 0 to hold {n_exp} experts "
                    f"({n_exp} or a multiple of it)"
                )
            per = info.nbytes // n_exp
            shape = info.shape[1:] if info.shape[0] == n_exp else (info.shape[0] // n_exp, *info.shape[1:])
            for e in range(n_exp):
                parts[(t.layer, e, t.param)][t.part] = (info, info.start + e * per, per, shape)
        else:
            parts[(t.layer, t.expert, t.param)][t.part] = (info, info.start, info.nbytes, info.shape)

    layer_params, layer_offsets, slot_nbytes = {}, {}, 0
    pieces: dict[tuple[int, int], tuple[tuple[Piece, ...], ...]] = {}
    for layer in topology.layers:
        offsets, size = _slot_offsets(layer.params)
        layer_params[layer.layer], layer_offsets[layer.layer] = layer.params, offsets
        slot_nbytes = max(slot_nbytes, size)
        for e in range(layer.num_experts):
            per_param = []
            for p in layer.params:
                found = parts.get((layer.layer, e, p.name))
                want = num_parts.get((layer.layer, p.name), 1)
                if not found or sorted(found) != list(range(want)):
                    raise CorruptCheckpointError(
                        f"checkpoint lacks weight {p.name!r} of expert {e} in MoE layer {layer.layer} "
                        f"({layer.module_name}); the files are incomplete or do not belong to this model"
                    )
                ps, start = [], 0
                for k in range(want):
                    info, off, nbytes, shape = found[k]
                    n = _numel(shape)
                    ps.append(Piece(info.file, off, nbytes, info.dtype, start, n))
                    start += n
                if start != _numel(p.shape):
                    raise CorruptCheckpointError(
                        f"expert {e} of MoE layer {layer.layer}: checkpoint pieces of {p.name!r} hold {start} "
                        f"elements; the model expects shape {list(p.shape)} ({_numel(p.shape)} elements)"
                    )
                per_param.append(tuple(ps))
            pieces[(layer.layer, e)] = tuple(per_param)
    return ExpertLayout(slot_nbytes, layer_params, layer_offsets, pieces)
