"""One expert's math for the classes that dispatch through transformers' `ExpertsInterface`.

It mirrors transformers' `grouped_mm` path for a single expert and honours the experts class flags (`has_gate`,
`has_bias`, `is_transposed`, `_apply_gate`, `has_post_expert_norm`), so offloaded outputs match the normal model's.
It reads only attributes of the module, never imports transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..precision import matmul

__all__ = ["expert_mlp"]


def expert_mlp(module: nn.Module, w: dict[str, torch.Tensor], x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert `e` of `module` applied to its tokens.

    Args:
        module: the experts module (its flags, biases, activation and norm stay resident).
        w: the expert's weight slices by name (`gate_up_proj` or `up_proj`, `down_proj`), in the compute dtype,
            or quantized (`precision.PackedWeight`, multiplied by its kernel).
        x: `(n, H)` hidden states of the tokens routed to `e`.
        e: expert index (selects the bias rows).

    Returns:
        `(n, H)`, the expert's output before the routing weight is applied.
    """
    transposed = module.is_transposed
    if module.has_gate:
        weight, bias = w["gate_up_proj"], module.gate_up_proj_bias[e] if module.has_bias else None
    else:
        weight, bias = w["up_proj"], module.up_proj_bias[e] if module.has_bias else None
    h = matmul(x, weight, transposed)
    if bias is not None:
        h = h + bias
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    down = w["down_proj"]
    out = matmul(h, down, transposed)
    if module.has_bias:
        out = out + module.down_proj_bias[e]
    if module.has_post_expert_norm:
        out = module.post_expert_norm(out)
    return out
