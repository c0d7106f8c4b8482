"""Generate over several processes with an offloaded MoE model: expert parallel or data parallel.

Expert parallel: the ranks split the experts of every MoE layer; each offloads (plans, reads, caches) only its own.
    torchrun --nproc-per-node 2 examples/distributed_generate.py ep models/moe-tiny
Data parallel: every rank offloads the whole model on its own and generates a share of the prompts.
    torchrun --nproc-per-node 2 examples/distributed_generate.py dp models/moe-tiny examples/prompts_mixed.txt

Rank 0 prints the outputs and one statistics report gathered from every rank (docs/distributed.md).
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.distributed import DistributedConfig

import hf_moe_offload
from hf_moe_offload.integration.data_parallel import gather_offload_stats, gather_outputs, generate_many_distributed

mode, path = sys.argv[1], sys.argv[2]
cfg = hf_moe_offload.OffloadConfig(host_budget="50%")  # half of the experts this rank owns (ep) or of all (dp)
tok = AutoTokenizer.from_pretrained(path)

if mode == "ep":
    # fsdp_size=2, ep_size=2: each rank holds half of the experts and its own batch (FSDP shards the dense part);
    # tokens reach the experts' owners by all-to-all. DistributedConfig(tp_size=2, ep_size=2) shares one batch.
    model = AutoModelForCausalLM.from_pretrained(
        path, offload_config=cfg, distributed_config=DistributedConfig(fsdp_size=2, ep_size=2)
    )
    rank = torch.distributed.get_rank()
    prompt = ["The state of the Union", "Once upon a time"][rank]
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    texts = gather_outputs([tok.decode(out[0, ids.shape[1] :])])  # every rank's text, in rank order
elif mode == "dp":
    torch.distributed.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    model = AutoModelForCausalLM.from_pretrained(path, offload_config=cfg)
    with open(sys.argv[3]) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    outs = generate_many_distributed(model, tok, prompts, batch_size=8, max_new_tokens=16, do_sample=False)
    texts = [tok.decode(o) for o in outs]
else:
    sys.exit(f"mode must be 'ep' or 'dp', got {mode!r}")

report = gather_offload_stats(model)
if torch.distributed.get_rank() == 0:
    for text in texts:
        print(repr(text))
    per_rank = [{k: s[k] for k in ("hits", "misses", "bytes_loaded", "expert_bytes_total")} for s in report["ranks"]]
    print(json.dumps({"world_size": report["world_size"], "ranks": per_rank, "hit_rate": report["total"]["hit_rate"]}))
torch.distributed.destroy_process_group()
