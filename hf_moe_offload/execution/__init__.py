"""The expert loop: one MoE layer's routed experts computed through the shared cache (no transformers import)."""

from .expert_loop import ExpertFn, run_experts
from .expert_math import expert_mlp

__all__ = ["ExpertFn", "run_experts", "expert_mlp"]
