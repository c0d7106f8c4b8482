"""Adapters: where a model family keeps its experts, and how to take them out of the module.

```
[Router] -> top_k_index (T, k) int64, top_k_weights (T, k) float -> [Experts] -> (T, H)
                                                                      ^ adapters find these modules
```
An adapter recognises an experts module, names the parameters that hold the experts (`[E, ...]` with one slice
per expert, or `[E * n, ...]` with one block of `n` rows per expert; a dotted name reaches into a child module)
and removes them from the module before weights load, leaving meta tensors that keep shape and dtype. Routers,
shared experts and biases stay ordinary resident parameters. Families are registered with
`@register_adapter(name)`; the first adapter whose `matches` accepts a module wins.

Two ways to compute with offloaded experts:

* classes decorated with `@use_experts_implementation` dispatch through transformers' `ExpertsInterface`, where
  hf_moe_offload registers its forward: the adapter only strips (`install_forward` is a no-op);
* any other class gets an instance-level forward from `install_forward(module, run_experts)`: it turns the
  module's inputs into routing `(top_k_index, top_k_weights)` and calls the engine's `run_experts`, giving it the
  family's per-expert math (`expert_forward`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnknownNameError

__all__ = [
    "ExpertParam",
    "ExpertsAdapter",
    "register_adapter",
    "get_adapter",
    "list_adapters",
    "find_adapter",
    "STRIPPED_ATTR",
    "RunExperts",
    "ExpertForward",
]

STRIPPED_ATTR = "_hf_moe_offload_stripped"

# `expert_forward(weights, x, e)`: one expert on its tokens, `x (n, H) -> (n, H)`; `weights` maps each offloaded
# name to that expert's slice (shape `ExpertParam.shape`, compute dtype, on the compute device).
ExpertForward = Callable[[dict[str, torch.Tensor], torch.Tensor, int], torch.Tensor]
# `run_experts(hidden (T, H), top_k_index (T, k) int64, top_k_weights (T, k), expert_forward) -> (T, H)`: the
# engine's cache-driven loop (loads missing experts, computes resident ones first, sums the k weighted outputs).
RunExperts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ExpertForward], torch.Tensor]
_ADAPTERS: dict[str, ExpertsAdapter] = {}


@dataclass(frozen=True)
class ExpertParam:
    """One offloaded weight of an experts module, as seen for a single expert.

    Attributes:
        name: attribute on the experts module, e.g. `"gate_up_proj"` (its full tensor is `[E, *shape]`).
        shape: shape of one expert's slice, e.g. `(2 * I, H)`.
        dtype: dtype the model computes in (the checkpoint may store another; it is converted on load).
        stored_experts: slices on dim 0 of the fused tensor when it holds more than the layer's experts (LongCat
            keeps identity "zero experts" after the routed ones); 0 means the layer's `num_experts`.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    stored_experts: int = 0

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class ExpertsAdapter(ABC):
    """Contract of a model-family adapter.

    Subclasses implement `matches` and `offloaded_param_names`. `strip`, `expert_params` and `num_experts` work
    for any module whose experts live in parameters indexed by expert first (`[E, ...]`, or `[E * n, ...]` when
    `expert_shape` is overridden). Undecorated families also implement `install_forward` (and `expert_forward`).
    """

    name: str = ""

    @abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """True when `module` is an experts module this adapter handles."""

    @abstractmethod
    def offloaded_param_names(self, module: nn.Module) -> list[str]:
        """Names of the parameters to offload, e.g. `["gate_up_proj", "down_proj"]` or `["mlp.w1"]` (dotted: a
        parameter of a child module; its state-dict key is the experts module's name + `.` + this name)."""

    def weight(self, module: nn.Module, name: str) -> torch.Tensor:
        """The (possibly dotted) weight `name` of `module`: a Parameter before `strip`, a meta tensor after."""
        owner, leaf = _owner(module, name)
        return getattr(owner, leaf)

    def num_experts(self, module: nn.Module) -> int:
        return int(self.weight(module, self.offloaded_param_names(module)[0]).shape[0])

    def expert_shape(self, module: nn.Module, name: str, full_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one expert's slice of weight `name` whose full shape is `full_shape` (default: drop dim 0)."""
        return tuple(full_shape[1:])

    def expert_params(self, module: nn.Module) -> tuple[ExpertParam, ...]:
        """Per-expert description of the offloaded weights (valid before and after `strip`)."""
        out = []
        for name in self.offloaded_param_names(module):
            t = self.weight(module, name)
            out.append(ExpertParam(name=name, shape=self.expert_shape(module, name, tuple(t.shape)), dtype=t.dtype))
        return tuple(out)

    def top_k(self, module: nn.Module) -> int | None:
        """Experts per token when the module knows it; None lets the topology read the model config."""
        return None

    def expert_keys(self, module: nn.Module) -> dict[str, tuple[str, ...]] | None:
        """For experts stored one module per expert: weight name -> the state-dict suffix of each expert's tensor,
        relative to the experts module (`{"wi.weight": ("expert_0.wi.weight", ...)}`). None (the default): each
        weight is one fused parameter, found through transformers' conversion mapping."""
        return None

    def offloaded_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        """Every tensor `strip` takes out (or will), to tell offloaded bytes from resident ones."""
        return [self.weight(module, name) for name in self.offloaded_param_names(module)]

    def strip(self, module: nn.Module) -> None:
        """Replace the offloaded parameters by meta tensors that are not parameters (so not in the state dict)."""
        if getattr(module, STRIPPED_ATTR, None):
            return
        names = self.offloaded_param_names(module)
        stripped = {}
        for name in names:
            owner, leaf = _owner(module, name)
            p = owner._parameters.pop(leaf)
            meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
            object.__setattr__(owner, leaf, meta)
            stripped[name] = (tuple(p.shape), p.dtype)
        object.__setattr__(module, STRIPPED_ATTR, stripped)
        object.__setattr__(module, "_hf_moe_offload_adapter", self)

    # -- compute, for classes that do not dispatch through ExpertsInterface ----------------------------------------
    def install_forward(self, module: nn.Module, run_experts: RunExperts) -> bool:
        """Give `module` an offload-aware forward that calls `run_experts`; return True when one was installed.

        The default does nothing and returns False: decorated classes already reach hf_moe_offload's forward
        through `ExpertsInterface`. Overrides build their forward and call `set_forward(module, fn)`.
        """
        return False

    def expert_forward(self, module: nn.Module) -> ExpertForward:
        """The family's math for one expert, `(weights, x (n, H), e) -> (n, H)` (used by `install_forward`)."""
        raise NotImplementedError(f"{type(self).__name__} computes through ExpertsInterface, not expert_forward")

    @staticmethod
    def set_forward(module: nn.Module, forward: Callable) -> None:
        """Shadow the class forward of `module` by `forward` (an instance attribute)."""
        module.forward = forward


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """`("mlp.w1")` -> (module.mlp, "w1")."""
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def register_adapter(name: str):
    """Class decorator registering an `ExpertsAdapter` subclass under `name` (duplicates are rejected)."""

    def deco(cls: type[ExpertsAdapter]) -> type[ExpertsAdapter]:
        if name in _ADAPTERS:
            raise ValueError(f"adapter {name!r} is already registered ({type(_ADAPTERS[name]).__name__})")
        cls.name = name
        _ADAPTERS[name] = cls()
        return cls

    return deco


def get_adapter(name: str) -> ExpertsAdapter:
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown adapter {name!r}; registered adapters: {', '.join(sorted(_ADAPTERS))}"
        ) from None


def list_adapters() -> list[str]:
    return sorted(_ADAPTERS)


def find_adapter(module: nn.Module) -> ExpertsAdapter | None:
    """The adapter that handles `module`, or None when it is not an experts module we know."""
    for adapter in _ADAPTERS.values():
        if adapter.matches(module):
            return adapter
    return None
