"""Make `from_pretrained(..., offload_config=...)` work in programs that never import hf_moe_offload.

Installed next to `hf_moe_offload_autoload.pth`, whose one line runs `arm()` when Python starts (unless the
environment sets `HF_MOE_OFFLOAD_AUTOLOAD=0`). Standard library only: a process that never loads transformers
pays for this module and one import-system lookup per import, nothing else.

```
Python starts --.pth--> arm(): a one-shot finder on sys.meta_path
import of transformers.modeling_utils (any route: Auto classes, pipeline, lm_eval, a server)
    --finder--> after the module runs: PreTrainedModel.from_pretrained wrapped by a stub
from_pretrained(..., offload_config=X)  --stub--> import hf_moe_offload (installs the real hooks) --> offloaded load
from_pretrained(...) without it        --stub--> the original method, untouched arguments
```
The stub keeps the original method in `ORIGINAL_ATTR`; `hf_moe_offload.install()` unwraps it, so the real hooks sit
directly on transformers' method and `hf_moe_offload.uninstall()` restores transformers exactly. hf_moe_offload
itself (torch, numpy, its own modules) is imported only when a load asks for offloading.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
import warnings

__all__ = ["arm", "disarm", "is_armed", "ENV_VAR", "ORIGINAL_ATTR"]

ENV_VAR = "HF_MOE_OFFLOAD_AUTOLOAD"  # "0" turns the automatic activation off
ORIGINAL_ATTR = "_hf_moe_offload_autoload_original"  # on the stub function: transformers' own classmethod
_TARGET = "transformers.modeling_utils"


def _stub(original: classmethod):
    func = original.__func__

    def from_pretrained(cls, *args, **kwargs):
        if kwargs.get("offload_config") is not None:
            import hf_moe_offload

            hf_moe_offload.install()  # idempotent (the import installs them): the hooks replace this stub
            return cls.from_pretrained(*args, **kwargs)
        kwargs.pop("offload_config", None)
        return func.__get__(cls, cls)(*args, **kwargs)

    functools.update_wrapper(from_pretrained, func)  # name, docstring, signature (through __wrapped__)
    setattr(from_pretrained, ORIGINAL_ATTR, original)
    return classmethod(from_pretrained)


def _patch(modeling_utils) -> None:
    """Wrap `PreTrainedModel.from_pretrained` with the stub, unless hf_moe_offload's hooks (or the stub) are on."""
    cls = getattr(modeling_utils, "PreTrainedModel", None)
    current = getattr(cls, "__dict__", {}).get("from_pretrained")
    if not isinstance(current, classmethod):
        warnings.warn(
            f"hf_moe_offload autoload: transformers.PreTrainedModel.from_pretrained is not a classmethod here "
            f"({type(current).__name__}); offload_config= needs `import hf_moe_offload` in this program",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    if hasattr(current.__func__, ORIGINAL_ATTR) or "_hf_moe_offload_original_from_pretrained" in cls.__dict__:
        return
    cls.from_pretrained = _stub(current)


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then patches the module; the module keeps its real loader afterwards."""

    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self.inner
        if module.__spec__ is not None:
            module.__spec__.loader = self.inner
        self.inner.exec_module(module)
        try:
            _patch(module)
        except Exception as e:  # noqa: BLE001 - never break the user's import of transformers
            warnings.warn(f"hf_moe_offload autoload failed ({type(e).__name__}: {e})", RuntimeWarning, stacklevel=2)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        disarm()  # one shot: also keeps the lookup below from coming back here
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)
        return spec


_finder = _Finder()


def is_armed() -> bool:
    return _finder in sys.meta_path


def arm() -> None:
    """Patch `from_pretrained` as soon as transformers defines it (now, if it already has)."""
    if os.environ.get(ENV_VAR, "1") == "0":
        return
    module = sys.modules.get(_TARGET)
    if module is not None:
        _patch(module)
    elif not is_armed():
        sys.meta_path.insert(0, _finder)


def disarm() -> None:
    """Remove the finder (a stub already installed stays until `hf_moe_offload.uninstall()`)."""
    while _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
