"""Test helpers shipped with the package: tiny MoE models, their checkpoints and a tokenizer, built with no download.

Used by the test suite, the benchmarks and `scripts/`, so that a tiny model means the same thing everywhere:

* `models`: tiny configs of the common families (`FAMILIES`, `tiny_config`, `build_tiny`, `sharpen_routers`).
* `checkpoints`: `save_checkpoint` in the per-expert (hub) and fused (transformers 5) layouts, sharded or not,
  and the per-expert key naming (`PER_EXPERT_NAMES`, `per_expert_keys`) that the synthesizer also writes.
* `tokenizer`: `char_tokenizer`, a character-level tokenizer (needs `tokenizers`, the `bench` extra).
* `matrix`: the fidelity matrix, a tiny config derived for every MoE model type of transformers and the check
  that the offloaded model computes what the normal model computes.

This package sits at the top of the layering, beside `cli` and `bench`: it imports transformers and the rest of
the package, and nothing below it imports it; `import hf_moe_offload` does not import it.
"""

from .checkpoints import LAYOUTS, PER_EXPERT_NAMES, per_expert_keys, save_checkpoint
from .matrix import (
    ATOL,
    NEW_TOKENS,
    OVERRIDES,
    SHRINK,
    XFAIL,
    Reference,
    matrix_config,
    matrix_types,
    reference,
    run_case,
    xfail_reason,
)
from .models import FAMILIES, build_tiny, sharpen_routers, tiny_config, tiny_mixtral_config
from .tokenizer import char_tokenizer

__all__ = [
    "FAMILIES",
    "tiny_config",
    "tiny_mixtral_config",
    "build_tiny",
    "sharpen_routers",
    "LAYOUTS",
    "PER_EXPERT_NAMES",
    "per_expert_keys",
    "save_checkpoint",
    "char_tokenizer",
    "SHRINK",
    "OVERRIDES",
    "XFAIL",
    "ATOL",
    "NEW_TOKENS",
    "Reference",
    "matrix_config",
    "matrix_types",
    "reference",
    "run_case",
    "xfail_reason",
]
