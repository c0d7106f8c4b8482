"""Install the hooks when transformers defines `PreTrainedModel`, not when `hf_moe_offload` is imported.

`import hf_moe_offload` promises that `from_pretrained(offload_config=...)` works afterwards. Importing torch and
transformers to keep that promise costs seconds, which the command line (`hf-moe-offload --help`) and any script
that only needs `OffloadConfig` should not pay. So the package calls `install_when_transformers_loads()`:

* `transformers.modeling_utils` already imported: `install()` runs now, as it always did;
* otherwise a one-shot `sys.meta_path` finder wraps the loader of `transformers.modeling_utils` so that
  `install()` runs right after that module executes, before any `from_pretrained` can be called.

The finder removes itself when it fires; `cancel()` removes it unfired. When the trigger fires while
`hf_moe_offload.integration` itself is importing (its hooks module imports `PreTrainedModel`), `install()` waits for
that package's last line (`run_pending()`).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__all__ = ["install_when_transformers_loads", "run_pending", "cancel", "TRIGGER"]

TRIGGER = "transformers.modeling_utils"
# The Auto classes read the config before any model class (and its modeling_utils) loads: installing when they are
# defined lets `AutoModelFor*.from_pretrained(path, offload_config=...)` check `path` first (integration/auto_classes.py).
AUTO_TRIGGER = "transformers.models.auto.modeling_auto"


_pending = False


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _install() -> None:
    """`install()`, or a note to do it when `hf_moe_offload.integration` finishes importing: transformers'
    `PreTrainedModel` is often first imported by that very package (its hooks module), which cannot be used
    until it has run to the end (`run_pending` is its last line)."""
    global _pending
    if _initializing("hf_moe_offload.integration"):
        _pending = True
        return
    try:
        from .integration import install
    except ImportError as err:  # a module on integration's own import chain is mid-import: same as above
        if "partially initialized" not in str(err):
            raise
        _pending = True
        return
    install()


def run_pending() -> None:
    """Install now if the trigger fired while `hf_moe_offload.integration` was importing."""
    global _pending
    if _pending:
        _pending = False
        from .integration.hooks import install

        install()


class _InstallAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real spec of `TRIGGER` so that `install()` follows its execution."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in (TRIGGER, AUTO_TRIGGER):
            return None
        cancel()  # one shot, and the lookup below must not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_install(module) -> None:
            exec_module(module)
            _install()

        spec.loader.exec_module = exec_then_install  # this loader instance serves this one spec
        return spec


def install_when_transformers_loads() -> None:
    """`install()` now if transformers' `PreTrainedModel` exists, else right after it is defined (idempotent)."""
    if TRIGGER in sys.modules or AUTO_TRIGGER in sys.modules:
        _install()
    elif not any(isinstance(f, _InstallAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _InstallAfterImport())


def cancel() -> None:
    """Remove the pending finder, if any."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _InstallAfterImport)]
