"""torchrun worker of test_data_parallel.py: the data-parallel recipe of docs/distributed.md on 2 CPU ranks (gloo).

`python -m torch.distributed.run --nproc-per-node 2 _dp_worker.py CKPT CASE.json OUT.json`: every rank loads the
offloaded model on its own, generates its share of the prompts (with `generate_many`, then with a text-generation
pipeline), and rank 0 writes every prompt's new tokens and texts and the gathered statistics report.
"""

from __future__ import annotations

import json
import sys

import torch

import hf_moe_offload  # noqa: F401  (installs the hooks)


def main(folder: str, case_file: str, out: str) -> None:
    from transformers import AutoModelForCausalLM, pipeline

    from hf_moe_offload.integration.data_parallel import (
        gather_offload_stats,
        gather_outputs,
        generate_many_distributed,
        rank_share,
    )
    from hf_moe_offload.testing import char_tokenizer

    torch.distributed.init_process_group("gloo")
    with open(case_file) as f:
        case = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(folder, offload_config=case["offload_config"])
    tok = char_tokenizer()
    outputs = generate_many_distributed(model, tok, case["prompts"], **case["generate"])
    # the same share, through a text-generation pipeline
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    share = [case["prompts"][i] for i in rank_share(len(case["prompts"]), rank, world)]
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    texts = gather_outputs([o[0]["generated_text"] for o in pipe(share, **case["pipeline"])])
    report = gather_offload_stats(model)
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"outputs": [o.tolist() for o in outputs], "texts": texts, "report": report}, f)
    else:
        assert report is None
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
