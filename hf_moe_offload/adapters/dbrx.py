r"""DBRX: experts as three 2-D weights `w1`, `v1`, `w2` of shape `[E * I, H]` on `DbrxExpertGLU`.

```
DbrxFFN: router -> (top_k_weights, top_k_index) -> DbrxExperts(hidden, top_k_index, top_k_weights)
                                                    \-> mlp: w1 / v1 / w2 [E * I, H]: expert e = rows e*I:(e+1)*I
expert e: (silu(x @ w1_e.T) * (x @ v1_e.T)) @ w2_e          (w2 is stored [I, H] per expert, not transposed)
```
DBRX checkpoints (hub and transformers 5 alike) store the same fused `[E * I, H]` tensors, so one expert is one
contiguous row block of each: the store reads it by byte range like any fused layout. `DbrxExperts` is not
decorated with `@use_experts_implementation`, so the adapter installs an instance forward that routes through the
engine. Recognition is structural (an experts module whose `mlp` child holds 2-D `w1`/`v1`/`w2` with a row count
divisible by `num_experts`), so a model copying DBRX's layout is handled too.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ExpertForward, ExpertsAdapter, RunExperts, register_adapter

__all__ = ["DbrxExpertsAdapter"]

_WEIGHTS = ("w1", "v1", "w2")


@register_adapter("dbrx")
class DbrxExpertsAdapter(ExpertsAdapter):
    def matches(self, module: nn.Module) -> bool:
        mlp = module._modules.get("mlp")
        n = getattr(module, "num_experts", None)
        if mlp is None or not isinstance(n, int) or n <= 0:
            return False
        weights = [getattr(mlp, w, None) for w in _WEIGHTS]
        return all(isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] % n == 0 for w in weights)

    def offloaded_param_names(self, module: nn.Module) -> list[str]:
        return [f"mlp.{w}" for w in _WEIGHTS]

    def num_experts(self, module: nn.Module) -> int:
        return int(module.num_experts)

    def expert_shape(self, module: nn.Module, name: str, full_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (full_shape[0] // module.num_experts, *full_shape[1:])

    def expert_forward(self, module: nn.Module) -> ExpertForward:
        act = module.mlp.activation_fn

        def forward(w: dict[str, torch.Tensor], x: torch.Tensor, e: int) -> torch.Tensor:
            x = x.to(w["mlp.w1"].dtype)
            h = act(x.matmul(w["mlp.w1"].T)) * x.matmul(w["mlp.v1"].T)
            return h.matmul(w["mlp.w2"])

        return forward

    def install_forward(self, module: nn.Module, run_experts: RunExperts) -> bool:
        expert = self.expert_forward(module)
        hidden_size = module.hidden_size

        def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
            batch_size = hidden_states.shape[0]
            flat = hidden_states.reshape(-1, hidden_size)
            out = run_experts(flat, top_k_index, top_k_weights, expert)
            return out.view(batch_size, -1, hidden_size)

        self.set_forward(module, forward)
        return True
