"""What a model's MoE looks like: its experts modules, in layer order, with sizes and top-k.

`describe_model` works on a model built on the meta device (before any weight is read) as well as on a loaded
one whose experts were stripped. The layer index used everywhere in hf_moe_offload is the ordinal of the experts
module among the model's experts modules (dense layers, e.g. DeepSeek's first layers, are not counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import UnsupportedModelError
from .base import ExpertParam, ExpertsAdapter, find_adapter

__all__ = ["ExpertsLayer", "MoETopology", "describe_model", "TOP_K_CONFIG_KEYS", "ROUTER_ATTRS"]

# Attributes of the MoE block (the experts module's parent) that hold its router, by family (data).
ROUTER_ATTRS = ("gate", "router")
# Config attributes that hold the number of experts each token is routed to, by family (data, not code).
TOP_K_CONFIG_KEYS = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_topk",
    "top_k",
    "moe_k",
    "router_topk",
    "moe_top_k",
    "top_k_experts",
)
# Nested configs searched after the experts module's own config and the model config (DBRX keeps top-k in
# `ffn_config`, multimodal models in `text_config`).
_SUB_CONFIGS = ("ffn_config", "text_config")


@dataclass
class ExpertsLayer:
    """One MoE layer: an experts module and the per-expert weights it offloads."""

    layer: int
    module_name: str
    module: nn.Module = field(repr=False)
    adapter: ExpertsAdapter = field(repr=False)
    num_experts: int
    top_k: int
    params: tuple[ExpertParam, ...]
    router: nn.Module | None = field(default=None, repr=False)  # returns (logits, weights, indices) or logits

    @property
    def expert_nbytes(self) -> int:
        return sum(p.nbytes for p in self.params)

    def param_key(self, name: str) -> str:
        """State-dict key the fused parameter `name` would have, e.g. `model.layers.0.mlp.experts.down_proj`."""
        return f"{self.module_name}.{name}" if self.module_name else name


@dataclass
class MoETopology:
    """All offloadable MoE layers of a model, plus byte counts."""

    layers: list[ExpertsLayer]
    other_nbytes: int  # bytes of every parameter and buffer that is not an offloaded expert weight

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def expert_nbytes(self) -> int:
        """Bytes of the largest expert (cache slots are sized to it)."""
        return max(layer.expert_nbytes for layer in self.layers)

    @property
    def total_expert_nbytes(self) -> int:
        return sum(layer.expert_nbytes * layer.num_experts for layer in self.layers)

    @property
    def max_top_k(self) -> int:
        return max(layer.top_k for layer in self.layers)

    def summary(self) -> dict:
        first = self.layers[0]
        return {
            "moe_layers": self.num_layers,
            "experts_per_layer": first.num_experts,
            "top_k": first.top_k,
            "bytes_per_expert": self.expert_nbytes,
            "expert_bytes": self.total_expert_nbytes,
            "other_bytes": self.other_nbytes,
            "params": {p.name: list(p.shape) for p in first.params},
            "dtype": str(first.params[0].dtype).replace("torch.", ""),
        }


def _top_k(module: nn.Module, adapter: ExpertsAdapter, num_experts: int, model_config) -> int:
    known = adapter.top_k(module)
    if known:
        return min(known, num_experts)
    configs = [getattr(module, "config", None), model_config]
    configs += [getattr(model_config, name, None) for name in _SUB_CONFIGS]
    for cfg in configs:
        if cfg is None:
            continue
        for key in TOP_K_CONFIG_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return min(value, num_experts)
    return num_experts  # unknown: assume a token may use every expert (the safe bound for budgets)


def describe_model(model: nn.Module) -> MoETopology:
    """Find every experts module of `model` that an adapter handles.

    Raises:
        UnsupportedModelError: when the model has no experts module any registered adapter recognises.
    """
    layers: list[ExpertsLayer] = []
    offloaded_ids: set[int] = set()
    model_config = getattr(model, "config", None)
    for name, module in model.named_modules():
        adapter = find_adapter(module)
        if adapter is None:
            continue
        params = adapter.expert_params(module)
        offloaded_ids.update(id(t) for t in adapter.offloaded_tensors(module))
        n = adapter.num_experts(module)
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        router = next(
            (getattr(parent, a) for a in ROUTER_ATTRS if isinstance(getattr(parent, a, None), nn.Module)), None
        )
        top_k = _top_k(module, adapter, n, model_config)
        layers.append(ExpertsLayer(len(layers), name, module, adapter, n, top_k, params, router))
    if not layers:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise UnsupportedModelError(
            f"model type {model_type!r} ({type(model).__name__}) has no MoE experts module that hf_moe_offload can "
            f"offload: expected experts stored as 3-D [num_experts, ...] weights (transformers' "
            f"@use_experts_implementation classes). Load it without offload_config, or see docs/models.md for the "
            f"supported families."
        )
    other = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in offloaded_ids:
            other += t.numel() * t.element_size()
    return MoETopology(layers=layers, other_nbytes=other)
