"""Every model class of a family loads offloaded, through its Auto class and its concrete class, and computes what
the normal model computes.

The classes are discovered from transformers' Auto mappings (base model, causal LM, every task head). A head class
loaded from a causal-LM checkpoint has a randomly initialised head: its weights are copied from the normal model
into the offloaded one (`load_state_dict(strict=False)`; heads are not experts), then outputs are compared on a
right-padded batch of two. Only expert weights may be offloaded: the state dict of the offloaded model is the
normal one minus exactly the experts' fused parameters. Only models that generate get the wrapped `generate`.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from hf_moe_offload import CorruptCheckpointError

from ._cases import (
    DEFAULT_FAMILIES,
    FAMILIES,
    LAYOUTS,
    PAD,
    PREFIX_MISMATCH,
    assert_misses_and_evictions,
    assert_same,
    padded_batch,
)
from ._cases import task_classes as _task_classes

_CLASS_CASES = [
    pytest.param(mt, layout, auto_name, via, id=f"{mt}-{layout}-{auto_name}-{via}")
    for mt in FAMILIES
    for auto_name, _, _ in _task_classes(mt)
    if (mt, auto_name) not in PREFIX_MISMATCH
    for layout in LAYOUTS
    for via in ("auto", "concrete")
]
_MISMATCH_CASES = [
    pytest.param(mt, layout, auto_name, id=f"{mt}-{layout}-{auto_name}")
    for (mt, auto_name) in PREFIX_MISMATCH
    for layout in LAYOUTS
]


def _classes(model_type: str, auto_name: str):
    return next((auto, concrete) for name, auto, concrete in _task_classes(model_type) if name == auto_name)


def _normal(case, auto_name: str):
    """The normal model of the class, loaded from the checkpoint (once per family: the layout changes nothing)."""

    def load():
        _, concrete = _classes(case.model_type, auto_name)
        model = concrete.from_pretrained(case.folder, dtype=torch.float32).eval()
        model.config.pad_token_id = PAD
        return model

    return case.family.once(("class", auto_name), load)


def _expert_keys(model) -> set[str]:
    topology = model.offload_engine.topology
    return {layer.param_key(p.name) for layer in topology.layers for p in layer.params}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_a_base_model_and_a_causal_lm(family):
    names = {name for name, _, _ in _task_classes(family)}
    assert {"AutoModel", "AutoModelForCausalLM"} <= names, names


@pytest.mark.parametrize(("model_type", "layout", "auto_name", "via"), _CLASS_CASES)
@torch.no_grad()
def test_class_loads_offloaded_and_matches_normal(cases, model_type, layout, auto_name, via):
    case = cases.get(model_type, layout)
    auto, concrete = _classes(model_type, auto_name)
    normal = _normal(case, auto_name)
    with case.offloaded(auto if via == "auto" else concrete) as off:
        assert type(off) is concrete
        # Only experts are offloaded: heads, routers, shared experts and norms stay real tensors in the state dict.
        experts = _expert_keys(off)
        assert set(off.state_dict()) == set(normal.state_dict()) - experts
        assert all(not p.is_meta for p in off.parameters())
        inside = "" if off is off.base_model else f"{off.base_model_prefix}."  # the base model, never a head
        assert all(layer.module_name.startswith(inside) for layer in off.offload_engine.topology.layers)
        missing, unexpected = off.load_state_dict(normal.state_dict(), strict=False)
        assert missing == [] and set(unexpected) == experts
        off.config.pad_token_id = PAD

        ids, mask = padded_batch("right")
        assert_same(normal(input_ids=ids, attention_mask=mask), off(input_ids=ids, attention_mask=mask))
        assert_misses_and_evictions(off)
        # generate() is wrapped only where the model generates.
        assert ("generate" in off.__dict__) == normal.can_generate()
        if normal.can_generate():
            kw = dict(input_ids=ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=PAD)
            assert torch.equal(normal.generate(**kw), off.generate(**kw))


@pytest.mark.parametrize(("model_type", "layout", "auto_name"), _MISMATCH_CASES)
def test_head_with_another_prefix_refuses_with_a_typed_error(cases, model_type, layout, auto_name):
    """The documented quirk (PREFIX_MISMATCH): the normal load silently loads nothing; the offloaded one refuses."""
    case = cases.get(model_type, layout)
    auto, concrete = _classes(model_type, auto_name)
    normal, info = concrete.from_pretrained(case.folder, output_loading_info=True)
    loaded = set(normal.state_dict()) - set(info["missing_keys"])
    assert loaded == set(), f"{concrete.__name__} now loads {sorted(loaded)}: drop it from PREFIX_MISMATCH"
    for cls in (auto, concrete):
        with pytest.raises(CorruptCheckpointError, match="checkpoint lacks weight"):
            cls.from_pretrained(case.folder, offload_config=case.config())


def test_compatibility_doc_has_a_row_per_class():
    """docs/compatibility.md lists every class of every default family (a new head in transformers needs a row)."""
    doc = (pathlib.Path(__file__).parents[2] / "docs" / "compatibility.md").read_text()
    for mt in DEFAULT_FAMILIES:
        for _, _, concrete in _task_classes(mt):
            assert f"| {mt} | `{concrete.__name__}` |" in doc, f"docs/compatibility.md: no row for {concrete.__name__}"
