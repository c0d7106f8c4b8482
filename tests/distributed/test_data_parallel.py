"""The data-parallel recipe: 2 ranks each offload the model on their own and generate a share of the prompts (with
`generate_many` and with a text-generation pipeline); the outputs equal one process's and the per-rank statistics
come back as one report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, pipeline

from hf_moe_offload.integration.batching import generate_many
from hf_moe_offload.integration.data_parallel import (
    gather_offload_stats,
    generate_many_distributed,
    rank_share,
)
from hf_moe_offload.testing import char_tokenizer

from ._launch import run_torchrun

CASE = {
    "offload_config": {"host_budget": "50%"},
    "prompts": ["Mixture of experts", "offload", "data parallel ranks", "abc", "the quick brown fox"],
    "generate": {"batch_size": 2, "schedule": "none", "max_new_tokens": 5, "do_sample": False},
    "pipeline": {"max_new_tokens": 4, "do_sample": False},
}


def test_rank_share_covers_every_item_once():
    for n in range(7):
        for world in (1, 2, 3):
            shares = [list(rank_share(n, r, world)) for r in range(world)]
            assert sum(shares, []) == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        rank_share(3, 2, 2)


@pytest.mark.slow
def test_one_process_is_a_world_of_one(mixtral_dir):
    model = AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config=CASE["offload_config"])
    tok = char_tokenizer()
    outs = generate_many_distributed(model, tok, CASE["prompts"], **CASE["generate"])
    ref, _ = generate_many(model, tok, CASE["prompts"], **CASE["generate"])
    assert [o.tolist() for o in outs] == [r.tolist() for r in ref]
    report = gather_offload_stats(model)
    assert report["world_size"] == 1 and report["ranks"][0]["misses"] == report["total"]["misses"] > 0


@pytest.mark.slow
def test_two_ranks_generate_what_one_process_generates(mixtral_dir, tmp_path):
    case_file, out = tmp_path / "case.json", tmp_path / "out.json"
    case_file.write_text(json.dumps(CASE))
    run_torchrun(str(Path(__file__).with_name("_dp_worker.py")), mixtral_dir, str(case_file), str(out))
    got = json.loads(out.read_text())

    model = AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config=CASE["offload_config"])
    tok = char_tokenizer()
    # one process, every prompt: rank 0's share [0, 1] and rank 1's [2, 3], [4] are the same batches of 2
    ref, _ = generate_many(model, tok, CASE["prompts"], **CASE["generate"])
    assert got["outputs"] == [o.tolist() for o in ref]

    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    assert got["texts"] == [o[0]["generated_text"] for o in pipe(CASE["prompts"], **CASE["pipeline"])]

    report = got["report"]
    assert report["world_size"] == 2 and len(report["ranks"]) == 2
    new_tokens = CASE["generate"]["max_new_tokens"] + CASE["pipeline"]["max_new_tokens"]  # per prompt, both passes
    assert [s["tokens_generated"] for s in report["ranks"]] == [2 * new_tokens, 3 * new_tokens]
    assert report["total"]["tokens_generated"] == len(CASE["prompts"]) * new_tokens
    assert report["total"]["misses"] == sum(s["misses"] for s in report["ranks"]) > 0
    hits, misses = report["total"]["hits"], report["total"]["misses"]
    assert report["total"]["hit_rate"] == pytest.approx(hits / (hits + misses))
