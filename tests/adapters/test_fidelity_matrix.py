"""Every causal-LM and seq2seq MoE type that transformers ships, offloaded vs normal, in every checkpoint layout.

One case per (model type, layout), id `model_type-layout`: a tiny fp32 model built from the type's own default
config (hf_moe_offload/testing/matrix.py), saved per-expert (`save_pretrained`, as on the hub) and fused (the state dict),
loaded with `offload_config=` and a cache of top-k + 1 experts. The offloaded logits must match within 1e-4, six
greedy tokens must be identical, and the cache must have missed and evicted. Types that cannot be offloaded are
`xfail(strict=True)` entries of `XFAIL` with the reason, so a fix fails the run until the entry goes.
"""

from __future__ import annotations

import os

import pytest

from hf_moe_offload.adapters.discovery import UNDECORATED, decorated_experts_classes, discover_moe_families
from hf_moe_offload.testing import LAYOUTS, XFAIL, matrix_types, reference, run_case, xfail_reason

pytestmark = pytest.mark.slow  # over 5 s on a 2-core CPU; still part of the default run

_TYPES = matrix_types()


def _cases():
    for mt in _TYPES:
        for layout in LAYOUTS:
            reason = xfail_reason(mt, layout)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(mt, layout, id=f"{mt}-{layout}", marks=marks)


_REFS: dict[str, object] = {}


def _reference(model_type: str):
    if model_type not in _REFS:
        _REFS.clear()  # cases of one type run together: keep one reference model alive at a time
        _REFS[model_type] = reference(model_type)
    return _REFS[model_type]


@pytest.mark.parametrize(("model_type", "layout"), list(_cases()))
def test_offloaded_matches_normal(model_type, layout, tmp_path):
    stats = run_case(_reference(model_type), layout, str(tmp_path / layout))
    assert stats["max_abs_diff"] <= 1e-4


def test_discovery_finds_the_known_families():
    types = set(_TYPES)
    expected = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "deepseek_v3", "dbrx", "llama4_text", "jetmoe"}
    expected |= {"switch_transformers", "nllb-moe"}  # seq2seq
    assert expected <= types, f"missing from discovery: {sorted(expected - types)}"
    assert "qwen3_vl_moe" in {f.model_type for f in discover_moe_families()}  # listed, not in the matrix


def test_undecorated_table_matches_transformers():
    """A family listed as undecorated must exist and still be undecorated (else move it to the generic path)."""
    import transformers

    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    for folder, (cls, _) in UNDECORATED.items():
        with open(os.path.join(root, folder, f"modeling_{folder}.py"), encoding="utf-8") as f:
            assert f"class {cls}(" in f.read(), f"{folder}: class {cls} not found"
        assert folder not in decorated_experts_classes(), f"{folder} is decorated now: drop it from UNDECORATED"


def test_xfail_entries_name_matrix_cases():
    for key in XFAIL:
        mt, layout = (key, None) if isinstance(key, str) else key
        assert mt in _TYPES, f"XFAIL entry {key!r} names a type the matrix does not run: remove it"
        assert layout in (None, *LAYOUTS), f"XFAIL entry {key!r}: unknown layout"
