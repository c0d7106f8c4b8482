"""The trained tiny MoE shipped with the package (`moe-tiny`, see its README), wherever the package was installed.

A wheel carries it as package data (`hf_moe_offload/_shipped/moe-tiny`, put there by setup.py from
`models/moe-tiny`); a source checkout or an editable install reads the checkout's `models/moe-tiny`. No torch or
transformers import: the command line can resolve the path before it loads anything.
"""

from __future__ import annotations

import os

__all__ = ["SHIPPED_MODELS", "shipped_model_path"]

SHIPPED_MODELS = ("moe-tiny",)
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def shipped_model_path(name: str = "moe-tiny") -> str:
    """The local folder of the shipped model `name`, loadable with `from_pretrained(path, offload_config=...)`.

    Raises:
        KeyError: `name` is not a shipped model (the message lists them).
        FileNotFoundError: the model files are not where this install keeps them.

    Example:
        ```python
        from hf_moe_offload.shipped import shipped_model_path

        model = AutoModelForCausalLM.from_pretrained(shipped_model_path(), offload_config={"host_budget": "25%"})
        ```
    """
    if name not in SHIPPED_MODELS:
        raise KeyError(f"no shipped model {name!r}; shipped: {', '.join(SHIPPED_MODELS)}")
    candidates = [os.path.join(_PACKAGE, "_shipped", name), os.path.join(os.path.dirname(_PACKAGE), "models", name)]
    for path in candidates:
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    raise FileNotFoundError(f"the shipped model {name!r} is in none of {candidates}; reinstall hf-moe-offload")
