"""Generate with an offloaded MoE model and print what the cache did.

python examples/generate_offloaded.py models/moe-tiny "The state of the Union"
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_moe_offload

path = sys.argv[1] if len(sys.argv) > 1 else "models/moe-tiny"
prompt = sys.argv[2] if len(sys.argv) > 2 else "The state of the Union"

cfg = hf_moe_offload.OffloadConfig(host_budget="25%")  # a quarter of the experts in RAM at once
model = AutoModelForCausalLM.from_pretrained(path, offload_config=cfg)
tok = AutoTokenizer.from_pretrained(path)

out = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=40, do_sample=False)
print(tok.decode(out[0], skip_special_tokens=True))
stats = model.offload_stats()
print({k: stats[k] for k in ("hits", "misses", "hit_rate", "evictions", "bytes_loaded", "stall_seconds")})
