"""JetMoE: the MoE MLP (`JetMoeMoE`) keeps its experts in two `JetMoeParallelExperts` of 3-D `weight`.

```
JetMoeMoE: router (top-k softmax) -> index_sorted_experts, batch_index, batch_gates, expert_size
           input_linear.weight  [E, 2I, H]   -> act(first half) * second half
           output_linear.weight [E, H, I]    -> * gate -> index_add per token -> + bias
```
The offloaded forward calls the model's own router, rebuilds `(top_k_index, top_k_weights)` of shape `(T, k)`
from its sorted outputs, and runs the experts through the engine; the layer bias is added after, as JetMoE does.
The mixture of attention heads (`JetMoeMoA`, same parallel-experts storage but a `map`/`reduce` interface inside
attention) is small and stays resident. Both layouts store the fused `[E, ...]` tensors, read by byte range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ExpertForward, ExpertsAdapter, RunExperts, register_adapter

__all__ = ["JetMoeExpertsAdapter"]

_WEIGHTS = ("input_linear.weight", "output_linear.weight")


@register_adapter("jetmoe")
class JetMoeExpertsAdapter(ExpertsAdapter):
    def matches(self, module: nn.Module) -> bool:
        if hasattr(module, "map") or not hasattr(module, "activation") or "router" not in module._modules:
            return False  # JetMoeMoA (attention experts) has map/reduce and no activation
        linears = [module._modules.get("input_linear"), module._modules.get("output_linear")]
        return all(m is not None and getattr(getattr(m, "weight", None), "dim", lambda: 0)() == 3 for m in linears)

    def offloaded_param_names(self, module: nn.Module) -> list[str]:
        return list(_WEIGHTS)

    def top_k(self, module: nn.Module) -> int | None:
        return int(module.router.top_k)

    def expert_forward(self, module: nn.Module) -> ExpertForward:
        act = module.activation

        def forward(w: dict[str, torch.Tensor], x: torch.Tensor, e: int) -> torch.Tensor:
            h = F.linear(x.to(w[_WEIGHTS[0]].dtype), w[_WEIGHTS[0]])
            a, b = h.chunk(2, dim=-1)
            return F.linear(act(a) * b, w[_WEIGHTS[1]])

        return forward

    def install_forward(self, module: nn.Module, run_experts: RunExperts) -> bool:
        expert = self.expert_forward(module)
        num_experts = self.num_experts(module)

        def forward(layer_input: torch.Tensor) -> torch.Tensor:
            bsz, length, emb_size = layer_input.size()
            x = layer_input.reshape(-1, emb_size)
            index_sorted, _, batch_gates, expert_size, _ = module.router(x)
            k = module.router.top_k
            counts = torch.as_tensor(expert_size, device=x.device)
            experts_sorted = torch.repeat_interleave(torch.arange(num_experts, device=x.device), counts)
            top_k_index = torch.empty(x.shape[0] * k, dtype=torch.long, device=x.device)
            top_k_index[index_sorted] = experts_sorted
            top_k_weights = torch.empty(x.shape[0] * k, dtype=batch_gates.dtype, device=x.device)
            top_k_weights[index_sorted] = batch_gates
            out = run_experts(x, top_k_index.view(-1, k), top_k_weights.view(-1, k), expert)
            return out.view(bsz, length, emb_size) + module.bias

        self.set_forward(module, forward)
        return True
