"""NLLB-MoE: top-2 routing, one `DenseActDense` (`fc1`, `fc2`, with biases) per expert.

```
NllbMoeSparseMLP: router -> router_mask (T, k) expert indices, router_probs (T, k)
NllbMoeExperts:   expert e: fc2(act(fc1(x))) * prob,  then * (1 - moe_token_dropout) at inference
```
The routing arrives as indices already, so the offloaded forward hands it to the engine and applies the
inference-time token-dropout scale after the sum (it is linear). Each expert's four tensors (weights and
biases) are offloaded together and read per expert (`...experts.expert_3.fc1.weight`), NLLB's only layout.
Training-time token dropout is not reproduced: offloading is for inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ExpertForward, RunExperts, register_adapter
from .per_module import PerModuleExpertsAdapter

__all__ = ["NllbMoeExpertsAdapter"]


@register_adapter("nllb_moe")
class NllbMoeExpertsAdapter(PerModuleExpertsAdapter):
    weights = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")

    def matches(self, module: nn.Module) -> bool:
        if not self._has_experts(module) or not hasattr(module, "moe_token_dropout"):
            return False
        first = module._modules[f"{self.prefix}0"]
        return all(isinstance(first._modules.get(n), nn.Linear) for n in ("fc1", "fc2")) and hasattr(first, "act")

    def top_k(self, module: nn.Module) -> int | None:
        return 2

    def expert_forward(self, module: nn.Module) -> ExpertForward:
        act = module._modules[f"{self.prefix}0"].act

        def forward(w: dict[str, torch.Tensor], x: torch.Tensor, e: int) -> torch.Tensor:
            h = act(F.linear(x.to(w["fc1.weight"].dtype), w["fc1.weight"], w["fc1.bias"]))
            return F.linear(h.to(w["fc2.weight"].dtype), w["fc2.weight"], w["fc2.bias"])

        return forward

    def install_forward(self, module: nn.Module, run_experts: RunExperts) -> bool:
        expert = self.expert_forward(module)

        def forward(hidden_states: torch.Tensor, router_mask: torch.Tensor, router_probs: torch.Tensor):
            out = run_experts(hidden_states, router_mask, router_probs, expert)
            if module.moe_token_dropout > 0:
                out = out * (1 - module.moe_token_dropout)
            return out

        self.set_forward(module, forward)
        return True
