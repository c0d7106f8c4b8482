"""Run in a fresh process: build a tiny-but-measurable MoE checkpoint, then load it (offloaded or not) and
report memory and page-cache figures as JSON. Used by test_memory.py."""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
from transformers import AutoModelForCausalLM  # noqa: E402

import hf_moe_offload  # noqa: E402,F401
from hf_moe_offload.bench.sysmem import PeakRssSampler, page_cache_resident_bytes  # noqa: E402
from hf_moe_offload.scheduling.profile import evict_page_cache  # noqa: E402
from hf_moe_offload.testing import build_tiny, save_checkpoint  # noqa: E402

mode, folder = sys.argv[1], sys.argv[2]
if not os.path.exists(os.path.join(folder, "config.json")):
    big = dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        vocab_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    save_checkpoint(build_tiny("mixtral", **big), folder, "fused")
    print(json.dumps({"built": folder}))
    sys.exit(0)

evict_page_cache(folder)
torch.set_num_threads(1)
out = {"cache_before": page_cache_resident_bytes(folder)}
with PeakRssSampler(interval_s=0.005) as peak:
    base = peak.sample()
    kw = {"offload_config": {"host_budget": "25%", "io_mode": mode}} if mode != "normal" else {}
    model = AutoModelForCausalLM.from_pretrained(folder, **kw)
    loaded = peak.sample()
out["load_anon_delta"] = peak.peak["RssAnon"] - base["RssAnon"]
out["load_file_delta"] = peak.peak["RssFile"] - base["RssFile"]
out["cache_after_load"] = page_cache_resident_bytes(folder)
if mode != "normal":
    eng = model.offload_engine
    out["expert_bytes"] = eng.topology.total_expert_nbytes
    out["other_bytes"] = eng.topology.other_nbytes
    out["budget_bytes"] = eng.host_slots * eng.layout.slot_nbytes
    with PeakRssSampler(interval_s=0.005) as peak2:
        model.generate(torch.arange(3, 35).view(1, -1), max_new_tokens=12, do_sample=False)
    out["gen_anon_delta"] = peak2.peak["RssAnon"] - loaded["RssAnon"]
    out["cache_after_generate"] = page_cache_resident_bytes(folder)
    out["stats"] = {k: v for k, v in model.offload_stats().items() if k != "per_layer"}
    out["pool_allocated"] = eng.cache.host.pool.allocated_bytes
print(json.dumps(out))
