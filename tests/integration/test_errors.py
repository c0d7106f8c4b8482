"""Bad input gets a typed, actionable error and leaves no partial state."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

import hf_moe_offload
from hf_moe_offload import (
    BudgetTooSmallError,
    CorruptCheckpointError,
    MissingShardError,
    ModelNotFoundError,
    OffloadConfigError,
    UnknownNameError,
    UnsupportedModelError,
)
from hf_moe_offload.integration import loading
from hf_moe_offload.storage import checkpoint_files
from hf_moe_offload.testing import build_tiny, save_checkpoint


def _no_partial_state():
    assert getattr(loading._state, "ctx", None) is None
    hooks = torch.nn.modules.module._global_module_registration_hooks
    assert not any(getattr(h, "__name__", "") == "_registration_hook" for h in hooks.values())
    assert hf_moe_offload.is_installed()


def test_unsupported_dense_model(tmp_path):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'llama'.*Load it without offload_config"):
        AutoModelForCausalLM.from_pretrained(tmp_path, offload_config={})
    _no_partial_state()


def test_budget_smaller_than_top_k(mixtral_dir):
    with pytest.raises(BudgetTooSmallError, match="routed to 2 experts.*at least"):
        AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config={"host_budget": "100KB"})
    _no_partial_state()


def test_unknown_policy(mixtral_dir):
    with pytest.raises(UnknownNameError, match="valid policies: lfu, lru"):
        AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config={"policy": "random"})
    _no_partial_state()


def test_invalid_config_value(mixtral_dir):
    with pytest.raises(OffloadConfigError, match="io_threads"):
        AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config='{"io_threads": 0}')


def test_incompatible_kwargs(mixtral_dir):
    with pytest.raises(OffloadConfigError, match="device_map"):
        AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config={}, device_map="auto")
    with pytest.raises(ModelNotFoundError, match="not a local folder"):
        MixtralForCausalLM.from_pretrained("no-such-org/no-such-model", offload_config={})


def test_missing_shard(tmp_path):
    folder = save_checkpoint(build_tiny("mixtral"), str(tmp_path / "m"), "fused", shards=2)
    os.remove(checkpoint_files(folder)[0])
    with pytest.raises(MissingShardError, match="missing"):
        AutoModelForCausalLM.from_pretrained(folder, offload_config={})
    _no_partial_state()


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_checkpoint(tmp_path, damage):
    folder = save_checkpoint(build_tiny("mixtral"), str(tmp_path / "m"), "fused")
    path = checkpoint_files(folder)[0]
    data = open(path, "rb").read()
    data = data[: len(data) // 2] if damage == "truncate" else data[:8] + b"\xff" * 16 + data[24:]
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(CorruptCheckpointError):
        AutoModelForCausalLM.from_pretrained(folder, offload_config={})
    _no_partial_state()


def test_missing_expert_weights_are_reported(tmp_path):
    model = build_tiny("mixtral")
    folder = save_checkpoint(model, str(tmp_path / "m"), "per_expert")
    from safetensors.torch import load_file, save_file

    path = checkpoint_files(folder)[0]
    state = load_file(path)
    del state["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match="expert 5 in MoE layer 1"):
        AutoModelForCausalLM.from_pretrained(folder, offload_config={})


def test_a_normal_load_still_works_after_errors(mixtral_dir):
    model = AutoModelForCausalLM.from_pretrained(mixtral_dir)
    assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj, torch.nn.Parameter)
    assert not hasattr(model, "offload_stats")
