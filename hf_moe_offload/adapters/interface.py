"""The generic adapter: every experts class decorated with transformers' `@use_experts_implementation`.

Such a class stores its experts as 3-D parameters (`gate_up_proj [E, 2I, H]` or `up_proj [E, I, H]`, and
`down_proj [E, H, I]`; transposed when `is_transposed`) and dispatches its forward through `ExpertsInterface`.
The decorator sets the flags `has_gate`, `has_bias`, `is_transposed`, `is_concatenated`,
`has_post_expert_norm` on the instance, which is how we recognise it without naming any model class.
"""

from __future__ import annotations

from torch import nn

from .base import ExpertsAdapter, register_adapter

__all__ = ["InterfaceExpertsAdapter"]

_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")


@register_adapter("experts_interface")
class InterfaceExpertsAdapter(ExpertsAdapter):
    def matches(self, module: nn.Module) -> bool:
        if not all(hasattr(module, f) for f in _FLAGS):
            return False
        down = getattr(module, "down_proj", None)
        return down is not None and getattr(down, "dim", lambda: 0)() == 3

    def offloaded_param_names(self, module: nn.Module) -> list[str]:
        first = "gate_up_proj" if module.has_gate else "up_proj"
        return [first, "down_proj"]
