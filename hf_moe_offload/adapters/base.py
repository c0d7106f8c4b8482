"""Adapters: where a model family keeps its experts, and how to take them out of the module.

```
[Router] -> top_k_index (T, k) int64, top_k_weights (T, k) float -> [Experts] -> (T, H)
                                                                      ^ adapters find these modules
```
An adapter recognises an experts module, names the 3-D parameters that hold the experts (`[E, ...]`, one slice
per expert) and removes them from the module before weights load, leaving meta tensors that keep shape and
dtype. Routers, shared experts and biases stay ordinary resident parameters. Families are registered with
`@register_adapter(name)`; the first adapter whose `matches` accepts a module wins.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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
]

STRIPPED_ATTR = "_hf_moe_offload_stripped"
_ADAPTERS: dict[str, ExpertsAdapter] = {}


@dataclass(frozen=True)
class ExpertParam:
    """One offloaded weight of an experts module, as seen for a single expert.

    Attributes:
        name: attribute on the experts module, e.g. `"gate_up_proj"` (its full tensor is `[E, *shape]`).
        shape: shape of one expert's slice, e.g. `(2 * I, H)`.
        dtype: dtype the model computes in (the checkpoint may store another; it is converted on load).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class ExpertsAdapter(ABC):
    """Contract of a model-family adapter.

    Subclasses implement `matches` and `offloaded_param_names`; `strip` and `expert_params` work for any module
    whose experts live in 3-D parameters indexed by expert first.
    """

    name: str = ""

    @abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """True when `module` is an experts module this adapter handles."""

    @abstractmethod
    def offloaded_param_names(self, module: nn.Module) -> list[str]:
        """Names of the `[E, ...]` parameters to offload, e.g. `["gate_up_proj", "down_proj"]`."""

    def num_experts(self, module: nn.Module) -> int:
        return int(getattr(module, self.offloaded_param_names(module)[0]).shape[0])

    def expert_params(self, module: nn.Module) -> tuple[ExpertParam, ...]:
        """Per-expert description of the offloaded weights (valid before and after `strip`)."""
        out = []
        for name in self.offloaded_param_names(module):
            t = getattr(module, name)
            out.append(ExpertParam(name=name, shape=tuple(t.shape[1:]), dtype=t.dtype))
        return tuple(out)

    def strip(self, module: nn.Module) -> None:
        """Replace the offloaded parameters by meta tensors that are not parameters (so not in the state dict)."""
        if getattr(module, STRIPPED_ATTR, None):
            return
        names = self.offloaded_param_names(module)
        stripped = {}
        for name in names:
            p = module._parameters.pop(name)
            meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
            object.__setattr__(module, name, meta)
            stripped[name] = (tuple(p.shape), p.dtype)
        object.__setattr__(module, STRIPPED_ATTR, stripped)
        object.__setattr__(module, "_hf_moe_offload_adapter", self)


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
        raise UnknownNameError(f"unknown adapter {name!r}; registered adapters: {', '.join(sorted(_ADAPTERS))}") from None


def list_adapters() -> list[str]:
    return sorted(_ADAPTERS)


def find_adapter(module: nn.Module) -> ExpertsAdapter | None:
    """The adapter that handles `module`, or None when it is not an experts module we know."""
    for adapter in _ADAPTERS.values():
        if adapter.matches(module):
            return adapter
    return None
