"""Byte ranges of every expert: `(layer, expert) -> pieces per weight`, from headers and key targets alone.

A cache slot holds one expert as one contiguous buffer: its weights one after another (each 64-byte aligned) in
the model's compute dtype. Each weight is filled from one or more *pieces* of the checkpoint: a per-expert key is
one piece; a fused `[E, ...]` tensor gives the slice of expert `e` (a `[E * n, ...]` one its block of n rows);
gate and up are two pieces concatenated on dim 0. When the stored dtype equals the compute dtype a piece is read
straight into the slot; a quantized piece (FP8 or MXFP4, see quantized.py) carries its scales' byte range and is
dequantized into the slot. Where transformers' conversion reorders an assembled weight's rows (`Interleave`, e.g.
Inkling 2's alternating gate/up rows) the pieces are still plain byte ranges: the reader reads them in checkpoint
order, then reorders the weight in the slot (`ExpertLayout.layer_interleave`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..adapters import ExpertParam, Interleaving, KeyTarget, MoETopology
from ..errors import CorruptCheckpointError, UnsupportedLayoutError
from ..precision import PackedSpec
from ..precision.neurons import NeuronPlan
from .quantized import QuantizedWeight, QuantSpec
from .safetensors_file import TensorInfo

__all__ = ["Piece", "ExpertLayout", "build_layout", "packed_layout", "SLOT_ALIGN"]

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
        numel: number of elements it fills (dequantized elements for a quantized piece).
        quant: how to dequantize it; None when it is stored unquantized.
    """

    file: str
    offset: int
    nbytes: int
    src_dtype: torch.dtype
    dst_start: int
    numel: int
    quant: QuantSpec | None = None


@dataclass
class ExpertLayout:
    """Slot structure per layer and checkpoint pieces per expert."""

    slot_nbytes: int
    layer_params: dict[int, tuple[ExpertParam, ...]]
    layer_offsets: dict[int, tuple[int, ...]]  # byte offset of each weight inside a slot
    pieces: dict[tuple[int, int], tuple[tuple[Piece, ...], ...]]  # (layer, expert) -> pieces of each weight
    # layer -> per weight, how its rows are reordered once its pieces are read (None: kept in checkpoint order)
    layer_interleave: dict[int, tuple[Interleaving | None, ...]] = field(default_factory=dict)
    per_expert_keys: bool = False  # the checkpoint stores one tensor per expert (hub layout), not fused [E, ...]
    # quantized slots (precision/): layer -> how each dense weight is packed; empty for slots in the compute dtype
    layer_packed: dict[int, tuple[PackedSpec, ...]] = field(default_factory=dict)
    # layers whose family has its own expert math: their packed weights are handed over dequantized
    dense_math_layers: frozenset = frozenset()
    # elastic sub-experts: layer -> which neurons of each expert the slot keeps (precision.neurons)
    layer_neurons: dict[int, NeuronPlan] = field(default_factory=dict)

    @property
    def files(self) -> list[str]:
        pieces = [p for per_expert in self.pieces.values() for ps in per_expert for p in ps]
        return sorted({p.file for p in pieces} | {p.quant.scale_file for p in pieces if p.quant is not None})


def _slot_offsets(params: tuple[ExpertParam, ...]) -> tuple[tuple[int, ...], int]:
    offsets, pos = [], 0
    for p in params:
        pos = (pos + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN
        offsets.append(pos)
        pos += p.nbytes
    return tuple(offsets), pos


def _quant_spec(q: QuantizedWeight, shape: tuple, count: int, e: int, block: tuple[int, int] | None) -> QuantSpec:
    """The `QuantSpec` of slice `e` of `count` (count 1: the whole tensor) of quantized weight `q`."""
    s = q.scales
    per = s.nbytes // count
    s_shape = s.shape[1:] if count > 1 else s.shape
    return QuantSpec(q.scheme, q.data.dtype, shape, s.file, s.start + e * per, per, s.dtype, s_shape, block)


def _quantized_parts(parts, key: str, info: TensorInfo, q: QuantizedWeight, t: KeyTarget, layer, block) -> None:
    """Add the pieces of a quantized checkpoint weight: one per-expert tensor, or every slice of a fused one."""
    if q.scheme == "mxfp4" and t.num_parts != 1:
        raise UnsupportedLayoutError(f"{key}: MXFP4 expert weights concatenated with others are not supported")
    if t.expert is not None:
        parts[(t.layer, t.expert, t.param)][t.part] = (
            info,
            info.start,
            info.nbytes,
            info.shape,
            _quant_spec(q, info.shape, 1, 0, block),
        )
        return
    count = info.shape[0] if info.shape else 0
    stored = next((p.stored_experts for p in layer.params if p.name == t.param), 0)
    if count not in (layer.num_experts, stored) or q.scales.shape[:1] != (count,):
        raise UnsupportedLayoutError(
            f"{key}: quantized expert weight {list(info.shape)} with scales {list(q.scales.shape)} does not hold one "
            f"slice per expert ({layer.num_experts}); hf_moe_offload cannot read it expert by expert"
        )
    per, shape = info.nbytes // count, info.shape[1:]
    for e in range(layer.num_experts):
        spec = _quant_spec(q, shape, count, e, block)
        parts[(t.layer, e, t.param)][t.part] = (info, info.start + e * per, per, shape, spec)


def _interleave_of(layer, p: ExpertParam, interleave: dict[tuple[int, str], Interleaving]) -> Interleaving | None:
    il = interleave.get((layer.layer, p.name))
    if il is not None and (il.dim >= len(p.shape) or p.shape[il.dim] % 2):
        raise UnsupportedLayoutError(
            f"MoE layer {layer.layer} ({layer.module_name}): the checkpoint interleaves dim {il.dim} of "
            f"{p.name!r}, but one expert's weight has shape {list(p.shape)}; expected an even size on that dim"
        )
    return il


def build_layout(
    topology: MoETopology,
    tensors: dict[str, TensorInfo],
    key_targets: dict[str, KeyTarget],
    quantized: dict[str, QuantizedWeight] | None = None,
    block_size: tuple[int, int] | None = None,
) -> ExpertLayout:
    """Work out the pieces of every expert weight.

    Args:
        topology: the model's MoE layers.
        tensors: every checkpoint key -> its `TensorInfo` (from the safetensors headers, after `fold_quantized`).
        key_targets: the keys that hold expert weights -> where they go (`resolve_expert_keys`).
        quantized: the quantized keys among them (`fold_quantized`).
        block_size: FP8 block size from the checkpoint's quantization config (None: derived from the scales).

    Raises:
        CorruptCheckpointError: an expert weight is missing from the checkpoint or has the wrong shape.
        UnsupportedLayoutError: a quantized weight is fused in a way that cannot be sliced per expert, or an
            interleave does not fit the weight's per-expert shape.
    """
    quantized = quantized or {}
    # (layer, expert, param) -> {part: (info, offset, nbytes, part_shape, quant)}
    parts: dict[tuple[int, int, str], dict[int, tuple]] = defaultdict(dict)
    num_parts: dict[tuple[int, str], int] = {}
    interleave: dict[tuple[int, str], Interleaving] = {}
    layers = {layer.layer: layer for layer in topology.layers}
    for key, t in key_targets.items():
        info = tensors[key]
        q = quantized.get(key)
        num_parts[(t.layer, t.param)] = t.num_parts
        if t.interleave is not None:
            interleave[(t.layer, t.param)] = t.interleave
        if q is not None:
            _quantized_parts(parts, key, info, q, t, layers[t.layer], block_size)
            continue
        if t.expert is None:
            # Fused over experts on dim 0: `[E, ...]` (one slice per expert) or `[E * n, ...]` (a block of n rows
            # per expert, e.g. DBRX); either way expert e's bytes are the e-th of E equal contiguous ranges.
            n_exp = layers[t.layer].num_experts
            stored = next((p.stored_experts for p in layers[t.layer].params if p.name == t.param), 0)
            if stored and info.shape and info.shape[0] == stored:  # trailing slices past n_exp are never read
                per = info.nbytes // stored
                for e in range(n_exp):
                    parts[(t.layer, e, t.param)][t.part] = (info, info.start + e * per, per, info.shape[1:], None)
                continue
            if not info.shape or info.shape[0] % n_exp:
                raise CorruptCheckpointError(
                    f"{info.file}: {key} has shape {list(info.shape)}; expected dim 0 to hold {n_exp} experts "
                    f"({n_exp} or a multiple of it)"
                )
            if info.shape[0] != n_exp and t.interleave is not None:  # the op's dims are not `[E, ...]` ones
                raise UnsupportedLayoutError(
                    f"{key}: expert weight {list(info.shape)} holds blocks of rows per expert and is interleaved "
                    f"on load; hf_moe_offload reorders only weights stored as [E, ...] or per expert"
                )
            per = info.nbytes // n_exp
            shape = info.shape[1:] if info.shape[0] == n_exp else (info.shape[0] // n_exp, *info.shape[1:])
            for e in range(n_exp):
                parts[(t.layer, e, t.param)][t.part] = (info, info.start + e * per, per, shape, None)
        else:
            parts[(t.layer, t.expert, t.param)][t.part] = (info, info.start, info.nbytes, info.shape, None)

    layer_params, layer_offsets, layer_interleave, slot_nbytes = {}, {}, {}, 0
    pieces: dict[tuple[int, int], tuple[tuple[Piece, ...], ...]] = {}
    for layer in topology.layers:
        offsets, size = _slot_offsets(layer.params)
        layer_params[layer.layer], layer_offsets[layer.layer] = layer.params, offsets
        layer_interleave[layer.layer] = tuple(_interleave_of(layer, p, interleave) for p in layer.params)
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
                    info, off, nbytes, shape, spec = found[k]
                    n = _numel(shape) * (spec.expand if spec else 1)
                    ps.append(Piece(info.file, off, nbytes, info.torch_dtype, start, n, spec))
                    start += n
                if start != _numel(p.shape):
                    raise CorruptCheckpointError(
                        f"expert {e} of MoE layer {layer.layer}: checkpoint pieces of {p.name!r} hold {start} "
                        f"elements; the model expects shape {list(p.shape)} ({_numel(p.shape)} elements)"
                    )
                per_param.append(tuple(ps))
            pieces[(layer.layer, e)] = tuple(per_param)
    per_expert = any(t.expert is not None for t in key_targets.values())
    return ExpertLayout(slot_nbytes, layer_params, layer_offsets, pieces, layer_interleave, per_expert)


def packed_layout(
    dense: ExpertLayout,
    layer_packed: dict[int, tuple[PackedSpec, ...]],
    dense_math_layers: frozenset = frozenset(),
    pieces: dict | None = None,
    layer_neurons: dict[int, NeuronPlan] | None = None,
) -> ExpertLayout:
    """The slot layout of quantized (or neuron-reduced) experts: each dense weight of `dense` becomes the parts of its
    `PackedSpec` (`precision.PackedSpec.parts`), after `layer_neurons` keeps a subset of each expert's neurons. `pieces` locates those parts on disk (a prepared sidecar); without it the parts
    are computed from the dense pieces on each load (`storage.encoding.EncodingStore`)."""
    layer_params, layer_offsets, slot_nbytes = {}, {}, 0
    for layer, specs in layer_packed.items():
        params = tuple(ExpertParam(name, shape, dtype) for spec in specs for name, shape, dtype in spec.parts())
        offsets, size = _slot_offsets(params)
        layer_params[layer], layer_offsets[layer] = params, offsets
        slot_nbytes = max(slot_nbytes, size)
    return ExpertLayout(
        slot_nbytes,
        layer_params,
        layer_offsets,
        pieces if pieces is not None else {},
        {layer: (None,) * len(params) for layer, params in layer_params.items()},
        dense.per_expert_keys,
        dict(layer_packed),
        frozenset(dense_math_layers),
        dict(layer_neurons or {}),
    )
