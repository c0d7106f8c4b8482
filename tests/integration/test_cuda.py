"""The CUDA path: device slot pool, pinned host tier, copies on a side stream ordered by events.

These run only where a CUDA device exists (the CPU path is covered everywhere else); see docs/usage.md for the
last GPU run.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("host_budget", ["60%", 0])
def test_cuda_offload_matches_reference(mixtral_ckpt, host_budget):
    ref, folder = mixtral_ckpt
    cfg = {"device": "cuda", "device_budget": "30%", "host_budget": host_budget}
    off = AutoModelForCausalLM.from_pretrained(folder, offload_config=cfg)
    eng = off.offload_engine
    assert eng.cache.compute.pool.device.type == "cuda"
    assert eng.host_slots == 0 or eng.cache.host.pool.pin_memory
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        got = off(ids.cuda()).logits.cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    kw = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(off.generate(ids[:1].cuda(), **kw).cpu(), ref.generate(ids[:1], **kw))
    s = off.offload_stats()
    assert s["bytes_h2d"] > 0 and s["evictions"] > 0
    assert s["device_allocated_bytes"] <= eng.device_slots * s["bytes_per_expert"]


def test_copies_run_on_a_side_stream(mixtral_dir):
    off = AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config={"device": "cuda", "device_budget": "30%"})
    cache = off.offload_engine.cache
    assert cache._copy_stream != torch.cuda.current_stream()
    ids = torch.randint(3, 128, (1, 6)).cuda()
    off.generate(ids, max_new_tokens=4, do_sample=False)
    assert any(ev is not None for ev in cache.compute.pool.release_events)
