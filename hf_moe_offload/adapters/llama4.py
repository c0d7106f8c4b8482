"""Llama 4 (text): `Llama4TextExperts` computes every expert densely on score-scaled inputs.

```
Llama4TextMoe: router -> scores (T, E), 0 where not routed (sigmoid(-inf))
               routed_in = hidden repeated E times * scores  -> (E * T, H) -> Llama4TextExperts -> (E * T, H)
               out = shared_expert(hidden) + sum over E
expert e:      (up * silu(gate)) @ down_proj[e],  gate | up = x @ gate_up_proj[e]      (gate_up_proj [E, H, 2I])
```
The experts module sees only `routed_in`, so the offloaded forward recovers the routing from it: a row that is
all zeros (a token not routed to that expert, or a zero hidden state) maps to zero through a bias-free SwiGLU, so
skipping it is exact; every other row is computed by its expert through the engine (weight 1: the score is
already in the input). The result is scattered back to `(E * T, H)` so `Llama4TextMoe` sums it as before. Weights
are fused `[E, ...]` in every Llama 4 checkpoint, read by byte range.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ExpertForward, ExpertsAdapter, RunExperts, register_adapter

__all__ = ["Llama4ExpertsAdapter"]


@register_adapter("llama4")
class Llama4ExpertsAdapter(ExpertsAdapter):
    def matches(self, module: nn.Module) -> bool:
        # Structural: transposed 3-D experts with a dense (E * T, H) forward and no routing inputs.
        if hasattr(module, "has_gate") or not hasattr(module, "expert_dim"):
            return False
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        return (
            isinstance(gate_up, torch.Tensor)
            and isinstance(down, torch.Tensor)
            and gate_up.dim() == 3
            and down.dim() == 3
            and gate_up.shape[2] == 2 * module.expert_dim
            and down.shape[1] == module.expert_dim
        )

    def offloaded_param_names(self, module: nn.Module) -> list[str]:
        return ["gate_up_proj", "down_proj"]

    def expert_forward(self, module: nn.Module) -> ExpertForward:
        act = module.act_fn

        def forward(w: dict[str, torch.Tensor], x: torch.Tensor, e: int) -> torch.Tensor:
            gate, up = (x.to(w["gate_up_proj"].dtype) @ w["gate_up_proj"]).chunk(2, dim=-1)
            return (up * act(gate)) @ w["down_proj"]

        return forward

    def install_forward(self, module: nn.Module, run_experts: RunExperts) -> bool:
        expert = self.expert_forward(module)
        num_experts, hidden_size = module.num_experts, module.hidden_size

        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            x = hidden_states.view(num_experts, -1, hidden_size)
            expert_idx, token_idx = x.ne(0).any(dim=-1).nonzero(as_tuple=True)
            rows = x[expert_idx, token_idx]
            ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
            y = run_experts(rows, expert_idx[:, None], ones, expert)
            out = torch.zeros_like(x)
            out[expert_idx, token_idx] = y.to(out.dtype)
            return out.view(-1, hidden_size)

        self.set_forward(module, forward)
        return True
