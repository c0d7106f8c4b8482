"""Which model types of the installed transformers are Mixture-of-Experts, found from transformers itself.

```
transformers/models/<dir>/modeling_<dir>.py --regex--> classes decorated @use_experts_implementation
CONFIG_MAPPING_NAMES + model_type_to_module_name   --> the model types whose config lives in <dir>
configuration_<dir>.py --config class has an experts field?  or the type has an Auto class in modeling_<dir>
                                                   --> MoEFamily(model_type, experts class, Auto mappings)
+ UNDECORATED: a data table of the MoE families whose experts class is not decorated (own adapters or none)
```
Discovery reads source files as text and imports no model module, so listing ~550 model folders costs a fraction
of a second; it is a map of what transformers ships, not a promise that we offload it. Whether a type is actually
offloaded exactly is proven by the fidelity matrix (tests/adapters/test_fidelity_matrix.py) and recorded in docs/models.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache

import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

__all__ = ["MoEFamily", "UNDECORATED", "discover_moe_families", "decorated_experts_classes"]

_DECORATED = re.compile(r"^@use_experts_implementation\b[^\n]*\n(?:@[^\n]*\n)*class (\w+)", re.M)
_CLASS = re.compile(r"^class (\w+)\(", re.M)
_EXPERTS_FIELD = re.compile(r"^\s+(?:self\.)?\w*expert\w*\s*[:=]", re.I | re.M)  # `num_experts: int = 8`


@dataclass(frozen=True)
class MoEFamily:
    """One MoE model type as transformers ships it.

    Attributes:
        model_type: the config's `model_type`, e.g. `"mixtral"`.
        experts_class: the class holding the experts, e.g. `"MixtralExperts"`.
        module: the transformers model folder, e.g. `"mixtral"`.
        decorated: True when `experts_class` is decorated with `@use_experts_implementation` (generic adapter).
        causal_lm: class name in the `AutoModelForCausalLM` mapping, or None.
        seq2seq_lm: class name in the `AutoModelForSeq2SeqLM` mapping, or None.
        image_text_to_text: class name in the `AutoModelForImageTextToText` mapping, or None.
        note: why the family is special (undecorated families only).
    """

    model_type: str
    experts_class: str
    module: str
    decorated: bool
    causal_lm: str | None
    seq2seq_lm: str | None = None
    image_text_to_text: str | None = None
    note: str = ""


# Undecorated MoE experts classes (model folder -> class, note): data, checked against the installed transformers
# by tests/adapters/test_fidelity_matrix.py (a renamed class, or a family decorated upstream, fails that test).
UNDECORATED: dict[str, tuple[str, str]] = {
    "dbrx": ("DbrxExperts", "2-D w1/v1/w2 [E*I, H] on DbrxExpertGLU; per-expert row blocks"),
    "llama4": ("Llama4TextExperts", "computes every expert densely on score-scaled inputs (sigmoid router)"),
    "jetmoe": ("JetMoeMoE", "MoE MLP (JetMoeParallelExperts) plus a mixture of attention heads (MoA)"),
    "longcat_flash": ("LongcatFlashExperts", "3-D experts plus identity 'zero experts' in the routing"),
    "step3p7": ("Step3p7Experts", "3-D experts with a clamped SwiGLU"),
    "switch_transformers": ("SwitchTransformersExperts", "one DenseActDense module per expert; encoder-decoder"),
    "nllb_moe": ("NllbMoeExperts", "one DenseActDense module per expert; encoder-decoder"),
    "doge": ("DogeCDMoE", "product-key retrieval experts of rank one stored in nn.Embedding tables"),
}


def _models_root() -> str:
    return os.path.join(os.path.dirname(transformers.__file__), "models")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def _class_bodies(source: str) -> dict[str, str]:
    """Top-level class name -> its source text (up to the next top-level class)."""
    matches = list(_CLASS.finditer(source))
    out = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(source)
        out[m.group(1)] = source[m.start() : end]
    return out


@lru_cache(maxsize=1)
def decorated_experts_classes() -> dict[str, tuple[str, ...]]:
    """Model folder -> names of its classes decorated with `@use_experts_implementation` (source scan only)."""
    root = _models_root()
    out = {}
    for folder in sorted(os.listdir(root)):
        source = _read(os.path.join(root, folder, f"modeling_{folder}.py"))
        if "@use_experts_implementation" not in source:
            continue
        names = tuple(_DECORATED.findall(source))
        if names:
            out[folder] = names
    return out


def _types_by_folder() -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for model_type, config_class in CONFIG_MAPPING_NAMES.items():
        out.setdefault(model_type_to_module_name(model_type), []).append((model_type, config_class))
    return out


def _families_of(folder: str, experts_class: str, decorated: bool, note: str, types) -> list[MoEFamily]:
    root = _models_root()
    configs = _class_bodies(_read(os.path.join(root, folder, f"configuration_{folder}.py")))
    modeling = set(_class_bodies(_read(os.path.join(root, folder, f"modeling_{folder}.py"))))
    out = []
    for model_type, config_class in types:
        causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        seq2seq = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        vlm = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
        has_auto = any(c in modeling for c in (causal, seq2seq, vlm) if c)
        # A sibling config (vision tower, audio encoder) has no experts field and no generative Auto class here.
        if not has_auto and not _EXPERTS_FIELD.search(configs.get(config_class, "")):
            continue
        out.append(MoEFamily(model_type, experts_class, folder, decorated, causal, seq2seq, vlm, note))
    return out


@lru_cache(maxsize=1)
def _discover() -> tuple[MoEFamily, ...]:
    types = _types_by_folder()
    out: list[MoEFamily] = []
    for folder, classes in decorated_experts_classes().items():
        out += _families_of(folder, ", ".join(classes), True, "", types.get(folder, []))
    for folder, (experts_class, note) in UNDECORATED.items():
        if folder in decorated_experts_classes() or folder not in types:
            continue  # decorated upstream since the table was written, or not in this transformers
        out += _families_of(folder, experts_class, False, note, types[folder])
    return tuple(sorted(out, key=lambda f: f.model_type))


def discover_moe_families(causal_lm_only: bool = False) -> list[MoEFamily]:
    """Every MoE model type of the installed transformers, sorted by model type.

    Args:
        causal_lm_only: keep only the types that `AutoModelForCausalLM` can build.

    Example:
        ```python
        >>> from hf_moe_offload.adapters.discovery import discover_moe_families
        >>> [f.model_type for f in discover_moe_families(causal_lm_only=True)][:3]
        ['afmoe', 'aria_text', 'axk1']
        ```
    """
    fams = list(_discover())
    return [f for f in fams if f.causal_lm] if causal_lm_only else fams
