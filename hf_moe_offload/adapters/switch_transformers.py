"""Switch Transformers: top-1 routing with expert capacity, one `DenseActDense` (`wi`, `wo`) per expert.

```
SwitchTransformersSparseMLP: router -> selected_experts (T, 1, E) one-hot, all zero for a token over capacity
                                       routing_weights (T, 1)
SwitchTransformersExperts:   expert e: wo(act(wi(x))) * weight        (encoder and decoder layers alike)
```
The offloaded forward turns the one-hot dispatch mask into `top_k_index (T, 1)`; a token dropped for capacity
gets the engine's sentinel index E and contributes nothing, exactly as in the original. Weights are read per
expert (`...experts.expert_3.wi.weight`), the only layout Switch checkpoints have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ExpertForward, RunExperts, register_adapter
from .per_module import PerModuleExpertsAdapter

__all__ = ["SwitchTransformersExpertsAdapter"]


@register_adapter("switch_transformers")
class SwitchTransformersExpertsAdapter(PerModuleExpertsAdapter):
    weights = ("wi.weight", "wo.weight")

    def matches(self, module: nn.Module) -> bool:
        if not self._has_experts(module):
            return False
        first = module._modules[f"{self.prefix}0"]
        return all(isinstance(first._modules.get(n), nn.Linear) for n in ("wi", "wo")) and hasattr(first, "act")

    def top_k(self, module: nn.Module) -> int | None:
        return 1

    def expert_forward(self, module: nn.Module) -> ExpertForward:
        act = module._modules[f"{self.prefix}0"].act

        def forward(w: dict[str, torch.Tensor], x: torch.Tensor, e: int) -> torch.Tensor:
            h = act(F.linear(x.to(w["wi.weight"].dtype), w["wi.weight"]))
            return F.linear(h.to(w["wo.weight"].dtype), w["wo.weight"])

        return forward

    def install_forward(self, module: nn.Module, run_experts: RunExperts) -> bool:
        expert = self.expert_forward(module)
        num_experts = self.num_experts(module)

        def forward(hidden_states: torch.Tensor, selected_experts: torch.Tensor, routing_weights: torch.Tensor):
            mask = selected_experts.reshape(hidden_states.shape[0], num_experts)
            index = mask.argmax(dim=-1).masked_fill(mask.sum(dim=-1) == 0, num_experts)  # dropped: sentinel
            return run_experts(hidden_states, index[:, None], routing_weights.reshape(-1, 1), expert)

        self.set_forward(module, forward)
        return True
