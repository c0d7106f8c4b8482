"""LongCat-Flash: 3-D experts plus identity "zero experts" that the router may pick.

```
router -> top_k_index (T, k) in [0, E + Z), top_k_weights (T, k)
LongcatFlashExperts: index < E : SwiGLU expert (gate_up_proj [E + Z, 2I, H], down_proj [E, H, I])
                     index >= E: identity, output = weight * hidden
```
`LongcatFlashExperts` is not decorated with `@use_experts_implementation`. The offloaded forward runs the routed
experts through the engine (indices >= E fall in the engine's sentinel bucket and contribute nothing) and adds the
zero experts' `weight * hidden` itself. `gate_up_proj` has Z unused trailing slices (the zero experts own no
weights, but the parameter is sized E + Z): `stored_experts` tells the store so; they are never read.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .base import ExpertForward, ExpertParam, ExpertsAdapter, RunExperts, register_adapter

__all__ = ["LongcatFlashExpertsAdapter"]


@register_adapter("longcat_flash")
class LongcatFlashExpertsAdapter(ExpertsAdapter):
    def matches(self, module: nn.Module) -> bool:
        if hasattr(module, "has_gate") or not hasattr(module, "zero_expert_num"):
            return False
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and down.dim() == 3

    def offloaded_param_names(self, module: nn.Module) -> list[str]:
        return ["gate_up_proj", "down_proj"]

    def num_experts(self, module: nn.Module) -> int:
        return int(module.num_routed_experts)

    def expert_params(self, module: nn.Module) -> tuple[ExpertParam, ...]:
        gate_up, down = super().expert_params(module)
        return (dataclasses.replace(gate_up, stored_experts=int(module.total_experts)), down)

    def expert_forward(self, module: nn.Module) -> ExpertForward:
        act = module.act_fn

        def forward(w: dict[str, torch.Tensor], x: torch.Tensor, e: int) -> torch.Tensor:
            gate, up = F.linear(x.to(w["gate_up_proj"].dtype), w["gate_up_proj"]).chunk(2, dim=-1)
            return F.linear(act(gate) * up, w["down_proj"])

        return forward

    def install_forward(self, module: nn.Module, run_experts: RunExperts) -> bool:
        expert = self.expert_forward(module)
        num_routed = int(module.num_routed_experts)

        def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
            if top_k_index.numel() == 0:
                return torch.zeros_like(hidden_states)
            out = run_experts(hidden_states, top_k_index, top_k_weights, expert)
            zero_weight = (top_k_weights * (top_k_index >= num_routed)).sum(dim=-1, keepdim=True)
            return out + (hidden_states * zero_weight).to(out.dtype)

        self.set_forward(module, forward)
        return True
