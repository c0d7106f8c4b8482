"""Shared base of the families that keep one `nn.Module` per expert (Switch Transformers, NLLB-MoE).

```
experts (ModuleDict): expert_0 = DenseActDense(wi / fc1, wo / fc2), expert_1 = ..., expert_{E-1}
checkpoint:           ...experts.expert_3.wi.weight  (per expert in every layout: nothing is ever fused)
```
The offloaded weight names are the per-expert suffixes (`"wi.weight"`); `expert_keys` tells the key resolver
which state-dict key holds expert e's tensor, so each expert is one byte range per weight. `strip` takes the
tensors out of every expert module. Subclasses name the expert modules' weights and supply the forward.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import STRIPPED_ATTR, ExpertsAdapter

__all__ = ["PerModuleExpertsAdapter"]


class PerModuleExpertsAdapter(ExpertsAdapter):
    """Experts as `module[f"{prefix}{e}"]` submodules holding `weights` (dotted names inside one expert)."""

    prefix = "expert_"
    weights: tuple[str, ...] = ()

    def _expert_names(self, module: nn.Module) -> list[str]:
        return [f"{self.prefix}{e}" for e in range(int(module.num_experts))]

    def _has_experts(self, module: nn.Module) -> bool:
        n = getattr(module, "num_experts", None)
        if not isinstance(n, int) or n <= 0 or not isinstance(module, nn.ModuleDict):
            return False
        return all(name in module._modules for name in self._expert_names(module))

    def offloaded_param_names(self, module: nn.Module) -> list[str]:
        return list(self.weights)

    def num_experts(self, module: nn.Module) -> int:
        return int(module.num_experts)

    def weight(self, module: nn.Module, name: str) -> torch.Tensor:
        return super().weight(module, f"{self.prefix}0.{name}")  # every expert has the same shape

    def expert_shape(self, module: nn.Module, name: str, full_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(full_shape)  # `weight` returns one expert's tensor, not a fused one

    def expert_keys(self, module: nn.Module) -> dict[str, tuple[str, ...]]:
        return {w: tuple(f"{e}.{w}" for e in self._expert_names(module)) for w in self.weights}

    def offloaded_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        return [
            ExpertsAdapter.weight(self, module, f"{e}.{w}") for e in self._expert_names(module) for w in self.weights
        ]

    def strip(self, module: nn.Module) -> None:
        if getattr(module, STRIPPED_ATTR, None):
            return
        stripped = {}
        for e in self._expert_names(module):
            expert = module._modules[e]
            for name in self.weights:
                path, _, leaf = name.rpartition(".")
                owner = expert.get_submodule(path) if path else expert
                p = owner._parameters.pop(leaf)
                object.__setattr__(owner, leaf, torch.empty(p.shape, dtype=p.dtype, device="meta"))
                stripped[f"{e}.{name}"] = (tuple(p.shape), p.dtype)
        object.__setattr__(module, STRIPPED_ATTR, stripped)
        object.__setattr__(module, "_hf_moe_offload_adapter", self)
