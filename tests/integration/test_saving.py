"""save_pretrained of an offloaded model writes a complete checkpoint, one layer's experts in memory at a time."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from hf_moe_offload.errors import UnsupportedFeatureError
from hf_moe_offload.testing import build_tiny, save_checkpoint
from hf_moe_offload.testing.matrix import matrix_config, sharpen_routers

# (family, auto class): decorated fused experts, an undecorated family ([E * I, H] weights), one module per expert.
CASES = [
    ("mixtral", AutoModelForCausalLM),
    ("dbrx", AutoModelForCausalLM),
    ("switch_transformers", AutoModelForSeq2SeqLM),
]
BUDGET = {"host_budget": "30%"}


def _model(family, auto):
    if family == "mixtral":
        return build_tiny(family)
    torch.manual_seed(0)
    model = auto.from_config(matrix_config(family)).eval()
    sharpen_routers(model)
    return model


def _logits(model, ids, seq2seq):
    with torch.no_grad():
        return model(ids, decoder_input_ids=ids if seq2seq else None).logits


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("family,auto", CASES, ids=[c[0] for c in CASES])
def test_saved_checkpoint_is_complete_and_loads_both_ways(tmp_path, family, auto, layout):
    reference = _model(family, auto)
    source = save_checkpoint(reference, str(tmp_path / "src"), layout)
    offloaded = auto.from_pretrained(source, offload_config=BUDGET)
    out = str(tmp_path / "saved")
    offloaded.save_pretrained(out)

    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    seq2seq = auto is AutoModelForSeq2SeqLM
    expected = _logits(reference, ids, seq2seq)
    normal = auto.from_pretrained(out)
    assert set(normal.state_dict()) == set(reference.state_dict())
    torch.testing.assert_close(normal.state_dict(), reference.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(_logits(normal, ids, seq2seq), expected, rtol=0, atol=1e-5)
    again = auto.from_pretrained(out, offload_config=BUDGET)
    torch.testing.assert_close(_logits(again, ids, seq2seq), expected, rtol=0, atol=1e-5)

    # one file per MoE layer, each no bigger than that layer's experts: never every expert at once
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    layers = offloaded.offload_engine.topology.layers
    expert_files = sorted(f for f in files if f.startswith("model-experts-"))
    assert len(expert_files) == len(layers)
    for name, layer in zip(expert_files, layers):
        size = os.path.getsize(os.path.join(out, name))
        assert layer.num_experts * layer.expert_nbytes <= size <= layer.num_experts * layer.expert_nbytes + 4096


def test_sharded_save_extends_the_index(tmp_path, mixtral_dir):
    offloaded = AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config=BUDGET)
    out = str(tmp_path / "saved")
    offloaded.save_pretrained(out, max_shard_size="50KB")
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 3  # transformers' shards + ours
    reference = AutoModelForCausalLM.from_pretrained(mixtral_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(reloaded.state_dict(), reference.state_dict(), rtol=0, atol=0)


def test_resaving_into_a_used_folder_leaves_no_stale_index(tmp_path, mixtral_dir):
    offloaded = AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config=BUDGET)
    out = str(tmp_path / "saved")
    offloaded.save_pretrained(out, max_shard_size="50KB")
    offloaded.save_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(mixtral_dir)
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out).state_dict(), reference.state_dict())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"safe_serialization": False}, "safetensors"),
        ({"push_to_hub": True}, "push_to_hub"),
        ({"state_dict": {}}, "state_dict"),
    ],
)
def test_unsupported_saves_are_refused_before_writing(tmp_path, mixtral_dir, kwargs, match):
    offloaded = AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config=BUDGET)
    out = tmp_path / "saved"
    with pytest.raises(UnsupportedFeatureError, match=match):
        offloaded.save_pretrained(out, **kwargs)
    assert not out.exists()


def test_saving_over_the_source_folder_is_refused(mixtral_dir):
    offloaded = AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config=BUDGET)
    before = sorted(os.listdir(mixtral_dir))
    with pytest.raises(UnsupportedFeatureError, match="read from"):
        offloaded.save_pretrained(mixtral_dir)
    assert sorted(os.listdir(mixtral_dir)) == before
