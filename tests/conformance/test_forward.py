"""The forward pass over its whole output surface: offloaded vs normal, same dtype, same inputs.

Each case is one family in one checkpoint layout with a cache of top_k + 1 experts (`_cases.py`). fp32 outputs
match within 1e-4; bf16 and fp16 within the looser `TOL` (the normal model adds the k expert outputs in the low
dtype, the expert loop in the promoted one). What transformers itself does not support for a family
(`no_sdpa`, `NO_PACKED`) is asserted on the normal model before the test skips.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ._cases import (
    CASES,
    NO_PACKED,
    TOL,
    assert_misses_and_evictions,
    assert_same,
    attention,
    no_sdpa,
    padded_batch,
    token_ids,
)

pytestmark = pytest.mark.parametrize(("model_type", "layout"), [pytest.param(*c, id="-".join(c)) for c in CASES])


@torch.no_grad()
def test_full_output_surface_eager(cases, model_type, layout):
    """Logits, every hidden state, every attention map and every router logit, on a left-padded batch."""
    case = cases.get(model_type, layout)
    ids, mask = padded_batch("left")
    kw = dict(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    with attention("eager", case.normal, case.off):
        case.off.reset_offload_stats()
        ref, off = case.normal(**kw, output_router_logits=True), case.off(**kw, output_router_logits=True)
        assert_same(ref, off)
        assert_misses_and_evictions(case.off)
        assert ref.attentions and any(a is not None for a in ref.attentions)
        assert len(off.router_logits) == len(ref.router_logits) > 0


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@torch.no_grad()
def test_attention_implementation(cases, model_type, layout, impl):
    case = cases.get(model_type, layout)
    if impl == "sdpa" and (reason := no_sdpa(case.normal)):
        for model in (case.normal, case.off):
            with pytest.raises(ValueError, match="scaled_dot_product_attention"):
                model.set_attn_implementation("sdpa")
        pytest.skip(reason)
    ids, mask = padded_batch("right")
    with attention(impl, case.normal, case.off):
        assert case.off.config._attn_implementation == impl
        assert_same(case.normal(ids, attention_mask=mask), case.off(ids, attention_mask=mask))


@torch.no_grad()
def test_router_logits_and_aux_loss(cases, model_type, layout):
    """Same number of router-logit tensors, same values, same loss and auxiliary loss (where the model has one)."""
    case = cases.get(model_type, layout)
    ids = token_ids(2, 8)
    kw = dict(input_ids=ids, labels=ids, output_router_logits=True)
    ref, off = case.normal(**kw), case.off(**kw)
    assert len(off.router_logits) == len(ref.router_logits) > 0
    assert_same(ref, off)
    if getattr(ref, "aux_loss", None) is not None:
        torch.testing.assert_close(off.aux_loss, ref.aux_loss, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_inputs_embeds(cases, model_type, layout):
    case = cases.get(model_type, layout)
    ids = token_ids(2, 8)
    embeds = case.normal.get_input_embeddings()(ids)
    ref = case.normal(inputs_embeds=embeds)
    assert_same(ref, case.off(inputs_embeds=embeds))
    assert_same(ref.logits, case.off(input_ids=ids).logits)


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padding_and_batching_equivalence(cases, model_type, layout, side):
    """A padded batch matches the normal model; the short row alone equals its tokens in the batch."""
    case = cases.get(model_type, layout)
    ids, mask = padded_batch(side)
    batch, ref = case.off(ids, attention_mask=mask).logits, case.normal(ids, attention_mask=mask).logits
    assert_same(ref, batch)
    row, keep = ids[1:, mask[1].bool()], mask[1].bool()
    assert_same(case.normal(row).logits[0], ref[1, keep])  # a property of transformers' model first
    assert_same(case.off(row).logits[0], batch[1, keep])


@torch.no_grad()
def test_packed_sequences_match_normal(cases, model_type, layout):
    """Padding-free batch: two sequences in one row, position_ids restarting at 0 (offloaded == normal always)."""
    case = cases.get(model_type, layout)
    packed, positions = _packed()
    kw = dict(input_ids=packed, position_ids=positions, use_cache=False)
    assert_same(case.normal(**kw), case.off(**kw))


@torch.no_grad()
def test_packed_sequences_equal_separate_rows(cases, model_type, layout):
    case = cases.get(model_type, layout)
    packed, positions = _packed()
    if model_type in NO_PACKED:
        ref = case.normal(packed, position_ids=positions, use_cache=False).logits
        alone = case.normal(packed[:, 5:]).logits
        assert (ref[:, 5:] - alone).abs().max() > 1e-3, f"{model_type} now supports packing: drop it from NO_PACKED"
        pytest.skip(NO_PACKED[model_type])
    off = case.off(packed, position_ids=positions, use_cache=False).logits
    assert_same(case.off(packed[:, :5]).logits, off[:, :5])
    assert_same(case.off(packed[:, 5:]).logits, off[:, 5:])


def _packed() -> tuple[torch.Tensor, torch.Tensor]:
    return token_ids(1, 9, seed=2), torch.cat([torch.arange(5), torch.arange(4)])[None]


@torch.no_grad()
def test_return_dict_false(cases, model_type, layout):
    case = cases.get(model_type, layout)
    ids = token_ids(2, 8)
    ref, off = case.normal(ids, return_dict=False, use_cache=False), case.off(ids, return_dict=False, use_cache=False)
    assert isinstance(off, tuple)
    assert_same(ref, off)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@torch.no_grad()
def test_low_precision(cases, model_type, layout, dtype):
    """Loaded with `dtype=` bf16 / fp16 (experts converted per slot on load) vs the normal model loaded the same way
    (so a class's `_keep_in_fp32_modules` apply to both)."""
    case = cases.get(model_type, layout)
    normal = case.family.once(("dtype", dtype), lambda: _load_normal(case.folder, dtype))
    ids, mask = padded_batch("right")
    with case.offloaded(dtype=dtype) as off:
        assert off.dtype == dtype
        ref, got = normal(ids, attention_mask=mask, use_cache=False), off(ids, attention_mask=mask, use_cache=False)
        assert_same(ref, got, dtype)
        assert_misses_and_evictions(off)


def _load_normal(folder: str, dtype: torch.dtype):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


@torch.no_grad()
def test_determinism(cases, model_type, layout):
    """Two forwards give bitwise the same logits although the cache holds other experts the second time."""
    case = cases.get(model_type, layout)
    ids = token_ids(2, 8, seed=3)
    first = case.off(ids).logits
    assert torch.equal(first, case.off(ids).logits)
    torch.testing.assert_close(first, case.normal(ids).logits, atol=TOL[torch.float32][0], rtol=0)
