"""The slot layout of a load: the checkpoint's experts as they are, or quantized (`expert_dtype`), read from a
prepared sidecar when one matches.

```
expert_dtype="auto"                        slots = the checkpoint layout (compute dtype)           bit-identical
expert_dtype="int8"/"int4", no sidecar     slots = packed layout; each miss reads dense bytes and quantizes them
expert_dtype="int8"/"int4", sidecar        slots = packed layout; each miss reads the packed bytes (2-3.6x fewer)
expert_fraction=f < 1                      each expert keeps its f most important neurons (precision/neurons.py),
                                           then is packed as above (or kept in the compute dtype with "auto")
```
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..adapters import MoETopology
from ..adapters.interface import InterfaceExpertsAdapter
from ..config import OffloadConfig
from ..errors import BudgetTooSmallError, OffloadConfigError, SidecarError, UnsupportedFeatureError
from ..precision import PackedSpec, int4_dense_problem, pack_specs
from ..precision.neurons import NEURONS_FILE, NeuronPlan, kept_neurons, neuron_count, reduced_shapes
from ..storage import ExpertLayout, ExpertStore
from ..storage.encoding import EncodingStore
from ..storage.layout import packed_layout
from ..storage.sidecar import MANIFEST, default_sidecar_folder, open_sidecar

__all__ = [
    "SlotPlan",
    "plan_slot_layout",
    "layer_packing",
    "neurons_record",
    "default_sidecar",
    "split_for_mixed",
    "staging_bytes",
    "open_store",
]


@dataclass(frozen=True)
class SlotPlan:
    """What a cache slot holds and where a miss reads it from.

    Attributes:
        layout: the slot layout (the checkpoint's own layout at full precision).
        expert_dtype: `"auto"`, `"int8"` or `"int4"`.
        sidecar: the prepared sidecar folder read on a miss, or None (the checkpoint is read).
    """

    layout: ExpertLayout
    expert_dtype: str = "auto"
    sidecar: str | None = None
    full_precision_slots: int = 0  # mixed precision: dense slots beside the quantized ones (`split_for_mixed`)


def _neuron_plans(folder: str, fraction: float, topology: MoETopology) -> dict[int, NeuronPlan]:
    """The kept neurons of every MoE layer for `expert_fraction` (empty at 1), from the calibration file.

    Raises:
        OffloadConfigError: no calibration file, or one made for other shapes.
        UnsupportedFeatureError: a family whose experts cannot drop neurons (own expert math, or expert biases).
    """
    if fraction >= 1:
        return {}
    path = os.path.join(folder, NEURONS_FILE)
    if not os.path.isfile(path):
        raise OffloadConfigError(
            f"expert_fraction={fraction:g} needs the neuron importance of each expert: run "
            f"`hf-moe-offload calibrate {folder}` once (it writes {NEURONS_FILE} next to the model)"
        )
    with np.load(path) as data:
        orders = {int(k.removeprefix("layer_")): data[k] for k in data.files}
    plans = {}
    for layer in topology.layers:
        m = layer.module
        if not isinstance(layer.adapter, InterfaceExpertsAdapter) or m.has_bias:
            raise UnsupportedFeatureError(
                f"expert_fraction: MoE layer {layer.layer} ({type(m).__name__}) "
                f"{'has expert biases' if isinstance(layer.adapter, InterfaceExpertsAdapter) else 'uses its own expert math'}"
                f"; only experts without biases dispatched through transformers' ExpertsInterface can drop neurons. "
                f"Use expert_fraction=1"
            )
        inter = neuron_count(m, layer.params)
        order = orders.get(layer.layer)
        if order is None or order.shape != (layer.num_experts, inter):
            raise OffloadConfigError(
                f"{path}: holds neuron orders {None if order is None else list(order.shape)} for MoE layer "
                f"{layer.layer}, expected [{layer.num_experts}, {inter}]; run `hf-moe-offload calibrate {folder}` again"
            )
        keep = kept_neurons(inter, fraction)
        plans[layer.layer] = NeuronPlan(order, keep, bool(m.has_gate), bool(m.is_concatenated), bool(m.is_transposed))
    return plans


def layer_packing(
    kind: str, topology: MoETopology, neurons: dict[int, NeuronPlan] | None = None
) -> tuple[dict[int, tuple[PackedSpec, ...]], frozenset]:
    """Packing of every MoE layer (`kind` "int8", "int4", or "dense" for kept neurons at full precision), and the
    layers whose family has its own expert math (their quantized weights are dequantized for use).

    Raises:
        OffloadConfigError: a weight that cannot be quantized (not 2-D, or int4 with an input size no group size
            divides).
    """
    packed, dense_math = {}, set()
    for layer in topology.layers:
        interface = isinstance(layer.adapter, InterfaceExpertsAdapter)
        transposed = bool(layer.module.is_transposed) if interface else None
        params = layer.params
        if not interface:
            dense_math.add(layer.layer)
            problems = [int4_dense_problem(p.shape[0]) for p in params if kind == "int4" and len(p.shape) == 2]
            if any(problems):
                raise UnsupportedFeatureError(
                    f"expert_dtype='int4': MoE layer {layer.layer} ({type(layer.module).__name__}) uses its own "
                    f"expert math, which gets dequantized weights, and {next(filter(None, problems))}; use "
                    f"expert_dtype='int8' for this family"
                )
        if neurons and layer.layer in neurons:
            shapes = reduced_shapes(neurons[layer.layer], {p.name: p.shape for p in params})
            params = tuple(dataclasses.replace(p, shape=shapes[p.name]) for p in params)
        try:
            packed[layer.layer] = pack_specs(kind, params, transposed)
        except ValueError as e:
            raise OffloadConfigError(
                f"expert_dtype={kind!r}: MoE layer {layer.layer} ({layer.module_name}): {e}; use expert_dtype='int8' "
                f"or 'auto'"
            ) from None
    return packed, frozenset(dense_math)


def neurons_record(folder: str, fraction: float) -> dict | None:
    """What a sidecar records of the kept neurons (None at `expert_fraction=1`)."""
    if fraction >= 1:
        return None
    st = os.stat(os.path.join(folder, NEURONS_FILE))
    return {"expert_fraction": fraction, "file": {"size": st.st_size, "mtime_ns": st.st_mtime_ns}}


def default_sidecar(folder: str, kind: str, fraction: float) -> str:
    return default_sidecar_folder(folder, kind if fraction >= 1 else f"{kind}-f{fraction:g}")


def plan_slot_layout(
    cfg: OffloadConfig, folder: str, topology: MoETopology, layout: ExpertLayout, device: torch.device, sharded: bool
) -> SlotPlan:
    """The slot layout for `cfg.expert_dtype` and `cfg.expert_fraction`, with the sidecar it reads from (checked now,
    before any weight loads).

    Raises:
        UnsupportedFeatureError: a quantized `expert_dtype` on CUDA (the quantized kernels are the CPU ones).
        SidecarError: a sidecar that was named or found next to the model does not match this checkpoint.
    """
    kind, fraction = cfg.expert_dtype, cfg.expert_fraction
    if kind == "auto" and fraction >= 1:
        return SlotPlan(layout)
    if device.type != "cpu":
        raise UnsupportedFeatureError(
            f"expert_dtype={kind!r} / expert_fraction={fraction:g} compute experts with CPU kernels; device={device} "
            f"is not supported yet. Use device='cpu', or the defaults on {device}"
        )
    neurons = _neuron_plans(folder, fraction, topology)
    packed, dense_math = layer_packing("dense" if kind == "auto" else kind, topology, neurons)
    on_load = SlotPlan(packed_layout(layout, packed, dense_math, layer_neurons=neurons), kind)
    frac = "" if fraction >= 1 else f" --expert-fraction {fraction:g}"
    rebuild = f"rebuild it with `hf-moe-offload prepare {folder} --expert-dtype {kind}{frac}`, or pass sidecar='none'"
    where = cfg.sidecar
    if where == "none" or kind == "auto":
        return on_load
    if where is None:
        where = default_sidecar(folder, kind, fraction)
        if not os.path.exists(os.path.join(where, MANIFEST)):
            return on_load  # no sidecar: quantize on load
    elif not os.path.isdir(where):
        raise SidecarError(f"sidecar={where!r} is not a folder; {rebuild.replace('rebuild it', 'write it')}")
    if sharded:
        raise UnsupportedFeatureError(
            "a quantized-experts sidecar cannot be read under expert parallelism yet; pass sidecar='none' (each rank "
            "quantizes its own experts on load)"
        )
    pieces = open_sidecar(where, layout, packed, kind, rebuild, neurons_record(folder, fraction))
    return SlotPlan(packed_layout(layout, packed, dense_math, pieces, neurons), kind, where)


def split_for_mixed(slots: SlotPlan, host_slots: int, dense_nbytes: int, top_k: int) -> tuple[SlotPlan, int]:
    """Mixed precision: half the host bytes of `host_slots` packed slots (at least the top-k experts of one layer)
    become dense slots; returns the plan with its `full_precision_slots` and the packed slots left.

    Raises:
        BudgetTooSmallError: the budget cannot hold the top-k experts of one layer in each tier.
    """
    packed = slots.layout.slot_nbytes
    total = host_slots * packed
    full = max(top_k, (total // 2) // dense_nbytes)
    low = max(0, total - full * dense_nbytes) // packed
    if low < top_k:
        minimum = top_k * (dense_nbytes + packed)
        raise BudgetTooSmallError(
            f"mixed_precision: the host budget ({total} bytes) is split between full-precision and quantized experts "
            f"and holds {min(full, total // dense_nbytes)} and {low} of them, but each token is routed to {top_k} "
            f"experts per layer; raise host_budget to at least {minimum} bytes, or drop mixed_precision"
        )
    return dataclasses.replace(slots, full_precision_slots=full), low


def staging_bytes(dense: ExpertLayout, slots: SlotPlan, io_threads: int) -> int:
    """Host bytes the loaders hold besides the slots: quantizing (or cutting neurons) on load reads each expert at
    full precision into a staging buffer that each I/O thread keeps (the encoder's temporaries are transient and
    left to the headroom); a sidecar or the checkpoint's own layout reads straight into the slot."""
    if slots.layout is dense or slots.sidecar is not None:
        return 0
    return io_threads * dense.slot_nbytes


def open_store(dense: ExpertLayout, slots: SlotPlan, io_mode: str):
    """The store that fills cache slots: the checkpoint's, a sidecar's, or quantize-on-load over the checkpoint."""
    if slots.layout is dense:
        return ExpertStore(dense, io_mode)
    if slots.sidecar is not None:
        return ExpertStore(slots.layout, io_mode)
    return EncodingStore(ExpertStore(dense, io_mode), slots.layout)
