"""torchrun worker of test_expert_parallel.py: expert-parallel offloaded loads on 2 CPU ranks (gloo).

`python -m torch.distributed.run --nproc-per-node 2 _ep_worker.py ROOT OUT`: for every checkpoint folder in ROOT
and each layout (`fsdp`: fsdp_size=2, ep_size=2, all-to-all dispatch, each rank its own prompt; `tp`: tp_size=2,
ep_size=2, all-reduce dispatch, one shared prompt; `fsdp_only`: fsdp_size=2, every rank all experts), load with `offload_config`, compute the prompt's logits and its
greedy continuation, and write what the rank saw to OUT/rank{r}.pt: tokens, logits, offload stats, the planned
slots and layout, and every checkpoint byte range the rank read (recorded on the store's reads).
"""

from __future__ import annotations

import json
import os
import sys

import torch

import hf_moe_offload  # noqa: F401  (installs the hooks)

LAYOUTS = {
    "fsdp": dict(fsdp_size=2, ep_size=2),
    "tp": dict(tp_size=2, ep_size=2),
    "fsdp_only": dict(fsdp_size=2),
}


def main(root: str, out: str) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from hf_moe_offload.errors import UnsupportedFeatureError

    rank = int(os.environ["RANK"])
    with open(os.path.join(root, "cases.json")) as f:
        cases = json.load(f)
    results = {}
    for family, case in cases.items():
        for kind, sizes in LAYOUTS.items():
            model = AutoModelForCausalLM.from_pretrained(
                os.path.join(root, family),
                distributed_config=DistributedConfig(**sizes),
                offload_config={"host_budget": case["host_budget"], "io_mode": "cached"},
            )
            engine = model.offload_engine
            reads = []
            read_piece = engine.store._read_piece

            def record(piece, dst, read_piece=read_piece, reads=reads):
                reads.append((os.path.basename(piece.file), piece.offset, piece.nbytes))
                return read_piece(piece, dst)

            engine.store._read_piece = record
            prompt = case["prompts"][0 if kind == "tp" else rank]
            ids = torch.tensor([prompt])
            with torch.no_grad():
                logits = model(ids).logits
                tokens = model.generate(ids, max_new_tokens=case["new_tokens"], do_sample=False)
            results[f"{family}/{kind}"] = {
                "prompt": prompt,
                "logits": logits[0].float(),
                "tokens": tokens[0, ids.shape[1] :].tolist(),
                "stats": model.offload_stats(),
                "host_slots": engine.host_slots,
                "num_experts": [layer.num_experts for layer in engine.topology.layers],
                "layout_keys": sorted(engine.layout.pieces),
                "reads": reads,
            }
            if kind != "fsdp_only":  # every rank refuses at once, before any collective of transformers' save
                try:
                    model.save_pretrained(os.path.join(out, f"save-{rank}"))
                    results[f"{family}/{kind}"]["save"] = "saved"
                except UnsupportedFeatureError as e:
                    results[f"{family}/{kind}"]["save"] = str(e)
            engine.close()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
