"""Expert-parallel offloading on 2 CPU ranks (torchrun, gloo): each rank plans, reads and counts only its own experts,
and computes what one process computes, for Mixtral, Qwen3-MoE, DeepSeek-V3 and GPT-OSS shapes (GPT-OSS: expert
biases, which transformers shards to the ranks itself, so they are indexed by local expert id).

One torchrun run serves every case (starting ranks costs more than the tiny models): `_ep_worker.py` writes what each
rank saw, the tests here compare it with one process's model.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_moe_offload.integration.plan import describe_checkpoint
from hf_moe_offload.testing import build_tiny, matrix_config, save_checkpoint, sharpen_routers

from ._launch import run_torchrun

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss")
KINDS = ("fsdp", "tp")  # expert parallel; "fsdp_only" (FSDP of the dense part alone) keeps every expert per rank
PROMPTS = [[5, 17, 3, 99, 42, 8, 61, 23, 77, 14, 2, 90], [33, 7, 120, 64, 11, 3, 58]]
NEW_TOKENS = 6
WORKER = os.path.join(os.path.dirname(__file__), "_ep_worker.py")


def _build(family: str):
    if family != "gpt_oss":
        return build_tiny(family)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(matrix_config("gpt_oss"))
    sharpen_routers(model)
    with torch.no_grad():  # non-zero expert biases: a bias row taken for the wrong expert changes the output
        for name, p in model.named_parameters():
            if "experts" in name and name.endswith("_bias"):
                p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory):
    """(root with the checkpoints, {rank: results}) of one 2-rank run over every family and layout."""
    root = tmp_path_factory.mktemp("ep_ckpts")
    out = tmp_path_factory.mktemp("ep_out")
    cases = {}
    for family in FAMILIES:
        save_checkpoint(_build(family), str(root / family), "fused")
        cases[family] = {"prompts": PROMPTS, "new_tokens": NEW_TOKENS, "host_budget": "50%"}
    (root / "cases.json").write_text(json.dumps(cases))
    run_torchrun(WORKER, str(root), str(out))
    return root, {r: torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)}


@pytest.fixture(scope="module")
def references(ep_run):
    """One process, no offloading: logits and greedy tokens of each prompt, and the full checkpoint layout."""
    root, _ = ep_run
    refs = {}
    for family in FAMILIES:
        model = AutoModelForCausalLM.from_pretrained(str(root / family)).eval()
        per_prompt = {}
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                logits = model(ids).logits[0]
                tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1] :].tolist()
            per_prompt[tuple(prompt)] = (logits, tokens)
        topology, layout, _ = describe_checkpoint(str(root / family))
        refs[family] = per_prompt, topology, layout
    return refs


@pytest.mark.slow
@pytest.mark.parametrize("kind", (*KINDS, "fsdp_only"))
@pytest.mark.parametrize("family", FAMILIES)
def test_ranks_compute_what_one_process_computes(ep_run, references, family, kind):
    _, ranks = ep_run
    per_prompt, _, _ = references[family]
    for rank, results in ranks.items():
        got = results[f"{family}/{kind}"]
        logits, tokens = per_prompt[tuple(got["prompt"])]
        assert got["tokens"] == tokens, f"rank {rank}"
        torch.testing.assert_close(got["logits"], logits, atol=1e-4, rtol=1e-4)
    if kind != "tp":  # each rank its own prompt (with EP: all-to-all dispatch, tokens exchanged between the ranks)
        assert ranks[0][f"{family}/{kind}"]["prompt"] != ranks[1][f"{family}/{kind}"]["prompt"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_rank_plans_and_reads_only_its_own_experts(ep_run, references, family, kind):
    _, ranks = ep_run
    _, topology, layout = references[family]
    moe_layers = [layer.layer for layer in topology.layers]
    experts = topology.layers[0].num_experts
    for rank, results in ranks.items():
        got = results[f"{family}/{kind}"]
        assert got["num_experts"] == [experts // 2] * len(moe_layers)
        assert got["layout_keys"] == [(layer, i) for layer in moe_layers for i in range(experts // 2)]
        stats = got["stats"]
        assert stats["expert_parallel"] == {"rank": rank, "size": 2}
        assert stats["expert_bytes_total"] * 2 == topology.total_expert_nbytes
        # host_budget="50%" is half of the rank's own experts: a quarter of the model's
        assert got["host_slots"] == len(moe_layers) * experts // 4
        assert stats["misses"] > 0 and got["reads"]
        owned = range(rank * experts // 2, (rank + 1) * experts // 2)
        own_bytes = {
            (os.path.basename(p.file), p.offset, p.nbytes)
            for layer in moe_layers
            for e in owned
            for pieces in layout.pieces[(layer, e)]
            for p in pieces
        }
        assert set(map(tuple, got["reads"])) <= own_bytes, f"rank {rank} read another rank's expert bytes"
        assert "under expert parallelism each rank holds only its own experts" in got["save"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_alone_keeps_every_expert_on_every_rank(ep_run, references, family):
    _, ranks = ep_run
    _, topology, _ = references[family]
    for results in ranks.values():
        got = results[f"{family}/fsdp_only"]
        assert "expert_parallel" not in got["stats"]
        assert got["stats"]["expert_bytes_total"] == topology.total_expert_nbytes
        assert got["num_experts"] == [layer.num_experts for layer in topology.layers]
