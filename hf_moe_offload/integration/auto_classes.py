"""Resolve the model path before an Auto class reads the config, so a bad path or id fails at once.

`AutoModelFor*.from_pretrained(path, offload_config=...)` reads the config (`AutoConfig.from_pretrained`) before
it reaches the model class's `from_pretrained`, which hooks.py wraps. For a wrong path or an uncached id that
first read retries the network five times (about 23 s) and ends in transformers' own traceback. This wrapper
resolves `path` first with `resolve_model_path` (local folder, cached snapshot, or one download through
huggingface_hub), raises its one-line `ModelNotFoundError` at once, and hands transformers the local folder, so the
rest of the load reads local files only. The model's `name_or_path` is set back to what the caller passed, as a
load by id reports it. Loads without `offload_config` are untouched. `uninstall_auto()` restores the method.
"""

from __future__ import annotations

import functools
import os

from transformers.models.auto.auto_factory import _BaseAutoModelClass

from .plan import resolve_model_path

__all__ = ["install_auto", "uninstall_auto"]

_ORIGINAL_ATTR = "_hf_moe_offload_original_auto_from_pretrained"


def _auto_classes() -> list[type]:
    """Every Auto model class with its own `from_pretrained` (transformers copies the method into each class)."""
    import transformers.models.auto.modeling_auto  # noqa: F401  (defines the Auto classes: about 60 ms, once)

    found, todo = [], [_BaseAutoModelClass]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if "from_pretrained" in cls.__dict__:
            found.append(cls)
    return found


def _wrap(cls: type) -> None:
    original = cls.__dict__["from_pretrained"]
    func = original.__func__

    @functools.wraps(func)
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        bound = func.__get__(cls, cls)
        if kwargs.get("offload_config") is None:
            return bound(pretrained_model_name_or_path, *model_args, **kwargs)
        folder = resolve_model_path(pretrained_model_name_or_path, kwargs)
        result = bound(folder, *model_args, **kwargs)
        name = os.fspath(pretrained_model_name_or_path)
        if folder != name:  # an id: report it, not the snapshot folder, as transformers does
            model = result[0] if isinstance(result, tuple) else result
            model.name_or_path = model.config._name_or_path = name
        return result

    setattr(cls, _ORIGINAL_ATTR, original)
    cls.from_pretrained = classmethod(from_pretrained)


def install_auto() -> None:
    """Wrap `from_pretrained` of every Auto model class (idempotent)."""
    for cls in _auto_classes():
        if _ORIGINAL_ATTR not in cls.__dict__:
            _wrap(cls)


def uninstall_auto() -> None:
    """Restore `from_pretrained` of every Auto model class."""
    for cls in _auto_classes():
        if _ORIGINAL_ATTR in cls.__dict__:
            cls.from_pretrained = cls.__dict__[_ORIGINAL_ATTR]
            delattr(cls, _ORIGINAL_ATTR)
