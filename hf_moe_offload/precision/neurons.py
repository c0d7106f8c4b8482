"""Elastic sub-experts (after MoE-Prism): only the most important intermediate neurons of each expert.

```
calibration (calibrate.py): importance_j = sum over routed tokens |a_j| * ||down[:, j]||      a = act(gate) * up
    -> order [E, I] per MoE layer, most important first  -> <model>/hf_moe_offload_neurons.npz
expert_fraction f < 1: keep k = ceil(f * I) neurons (rounded up to a multiple of 32 when I allows) of each expert:
    gate/up rows (concatenated [gate; up] or interleaved), down columns; the expert then computes k neurons, not I
```
Neuron j of an expert is row j of `up` (and of `gate`), column j of `down` (transposed families: the other dim), so
keeping a subset of neurons is exact for those neurons and drops the rest. `expert_fraction=1` never touches the
weights (bit-identical to the model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["NEURONS_FILE", "NeuronPlan", "neuron_count", "kept_neurons", "select_neurons", "reduced_shapes"]

NEURONS_FILE = "hf_moe_offload_neurons.npz"


def neuron_count(module, params) -> int:
    """Intermediate neurons per expert of an `ExpertsInterface` experts module, from its per-expert `params`
    (`gate_up_proj` holds two rows or columns per neuron, `up_proj` one)."""
    first = "gate_up_proj" if module.has_gate else "up_proj"
    shape = next(p.shape for p in params if p.name == first)
    return shape[1 if module.is_transposed else 0] // (2 if module.has_gate else 1)


def kept_neurons(intermediate: int, fraction: float) -> int:
    """Neurons kept of `intermediate` for `fraction` (a multiple of 32 when `intermediate` is, so int4 groups fit)."""
    k = math.ceil(fraction * intermediate)
    if intermediate % 32 == 0:
        k = min(intermediate, math.ceil(k / 32) * 32)
    return max(1, k)


@dataclass(frozen=True)
class NeuronPlan:
    """Which neurons of each expert of one layer are kept.

    Attributes:
        order: `[E, I]` neuron ids by importance, most important first (from calibration).
        keep: neurons kept per expert.
        has_gate, concatenated, transposed: the experts module's flags (`[gate; up]` or interleaved rows;
            `x @ W` orientation).
    """

    order: np.ndarray
    keep: int
    has_gate: bool
    concatenated: bool
    transposed: bool

    def kept(self, expert: int) -> torch.Tensor:
        return torch.from_numpy(np.sort(self.order[expert, : self.keep])).long()


def reduced_shapes(plan: NeuronPlan, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Per-expert weight shapes once `plan.keep` neurons are kept."""
    out = {}
    for name, shape in shapes.items():
        width = 2 * plan.keep if name == "gate_up_proj" else plan.keep
        neuron_dim = _neuron_dim(plan, name)
        out[name] = tuple(width if d == neuron_dim else s for d, s in enumerate(shape))
    return out


def _neuron_dim(plan: NeuronPlan, name: str) -> int:
    """The dim of a per-expert weight that indexes intermediate neurons."""
    if name == "down_proj":
        return 0 if plan.transposed else 1
    return 1 if plan.transposed else 0


def select_neurons(plan: NeuronPlan, expert: int, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The expert's weights restricted to its kept neurons (new tensors)."""
    keep = plan.kept(expert)
    out = {}
    for name, w in weights.items():
        idx = keep
        if name == "gate_up_proj":
            half = w.shape[_neuron_dim(plan, name)] // 2
            idx = torch.cat([keep, keep + half]) if plan.concatenated else torch.stack([2 * keep, 2 * keep + 1], 1)
            idx = idx.reshape(-1)
        out[name] = w.index_select(_neuron_dim(plan, name), idx).contiguous()
    return out
