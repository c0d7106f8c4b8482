"""The offloaded experts forward, registered in transformers' `ExpertsInterface` as `"hf_moe_offload"`.

A thin adapter from transformers' contract `fn(self, hidden (T, H), top_k_index (T, k), top_k_weights (T, k))` to
the engine's expert loop (`execution.run_experts`) with the `ExpertsInterface` classes' per-expert math
(`execution.expert_mlp`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import OffloadError
from ..execution import expert_mlp

__all__ = ["offloaded_experts_forward", "IMPLEMENTATION_NAME", "HANDLE_ATTR"]

IMPLEMENTATION_NAME = "hf_moe_offload"
HANDLE_ATTR = "_hf_moe_offload"  # on each offloaded experts module: its `LayerHandle` (engine, layer)


def offloaded_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`ExpertsInterface` contract: `hidden_states (T, H)`, `top_k_index (T, k) int64`, `top_k_weights (T, k)`."""
    handle = self.__dict__.get(HANDLE_ATTR)
    if handle is None:
        raise OffloadError(
            f"{type(self).__name__} uses experts_implementation='{IMPLEMENTATION_NAME}' but its experts are not "
            f"offloaded (the model was not loaded with offload_config=..., or offloading was removed); load it with "
            f"from_pretrained(..., offload_config=...)"
        )
    expert_fn = functools.partial(expert_mlp, self)
    return handle.engine.run_layer(handle.layer, hidden_states, top_k_index, top_k_weights, expert_fn)
