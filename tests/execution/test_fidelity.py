"""Offloaded logits and greedy tokens equal the normal model's, for each family, in both checkpoint layouts,
at a budget small enough that experts are missed and evicted."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_moe_offload.testing import FAMILIES, build_tiny, save_checkpoint

LAYOUTS = ["per_expert", "fused"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_greedy_tokens_match(family, layout, tmp_path):
    ref = build_tiny(family)
    folder = save_checkpoint(ref, str(tmp_path), layout, shards=2)
    off = AutoModelForCausalLM.from_pretrained(folder, offload_config={"host_budget": "30%"})
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(off(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(off.generate(ids[:1], **kw), ref.generate(ids[:1], **kw))
    s = off.offload_stats()
    assert s["misses"] > 0 and s["evictions"] > 0, s
    assert off.offload_engine.cache.host.pool.allocated_bytes <= off.offload_engine.host_slots * s["bytes_per_expert"]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_bf16_model_matches_bf16_reference(family, tmp_path):
    ref = build_tiny(family, dtype=torch.bfloat16)
    folder = save_checkpoint(ref, str(tmp_path), "per_expert")
    off = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, offload_config={"host_budget": "30%"})
    assert off.offload_engine.topology.layers[0].params[0].dtype == torch.bfloat16
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(off(ids).logits, ref(ids).logits, rtol=2e-2, atol=2e-2)
    kw = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(off.generate(ids, **kw), ref.generate(ids, **kw))


def test_fp32_checkpoint_loaded_as_bf16(tmp_path):
    ref32 = build_tiny("mixtral")
    folder = save_checkpoint(ref32, str(tmp_path), "fused")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    off = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, offload_config={"host_budget": "50%"})
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(off(ids).logits, ref(ids).logits, rtol=2e-2, atol=2e-2)
