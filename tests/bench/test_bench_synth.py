"""`hf_moe_offload.bench.synth`: random checkpoints load into transformers with the exact expected keys."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import MixtralForCausalLM

from hf_moe_offload.bench.synth import synthesize_from_config, synthesize_mixtral
from hf_moe_offload.testing import tiny_mixtral_config


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    config = tiny_mixtral_config()
    root = tmp_path_factory.mktemp("synth")
    fused = synthesize_from_config(root / "fused", config, layout="fused", progress=False)
    per_expert = synthesize_from_config(root / "per_expert", config, layout="per_expert", progress=False)
    return fused, per_expert


def _load(path):
    model, info = MixtralForCausalLM.from_pretrained(path, output_loading_info=True)
    return model.eval(), info


def test_both_layouts_load_without_missing_or_unexpected_keys(tiny_dirs):
    for path in tiny_dirs:
        model, info = _load(path)
        assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), path
        assert info["mismatched_keys"] == set()
        assert model.dtype == torch.bfloat16


def test_key_names_follow_each_layout(tiny_dirs):
    fused, per_expert = tiny_dirs
    with safe_open(fused / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.mlp.experts.gate_up_proj").get_shape() == [8, 256, 64]
        assert f.get_slice("model.layers.0.mlp.experts.down_proj").get_shape() == [8, 64, 128]
    assert "model.layers.1.mlp.gate.weight" in keys and "lm_head.weight" in keys
    with safe_open(per_expert / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        w1 = f.get_tensor("model.layers.0.block_sparse_moe.experts.3.w1.weight")
        w3 = f.get_tensor("model.layers.0.block_sparse_moe.experts.3.w3.weight")
        assert f.get_slice("model.layers.0.block_sparse_moe.experts.3.w2.weight").get_shape() == [64, 128]
    assert "model.layers.1.block_sparse_moe.gate.weight" in keys
    assert not any(".mlp." in k for k in keys)
    with safe_open(fused / "model.safetensors", "pt") as f:
        gate_up = f.get_slice("model.layers.0.mlp.experts.gate_up_proj")[3]
    assert torch.equal(gate_up, torch.cat([w1, w3], dim=0))


def test_both_layouts_give_identical_logits(tiny_dirs):
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [_load(path)[0](ids).logits for path in tiny_dirs]
    assert torch.equal(logits[0], logits[1])
    assert logits[0].std() > 0


def test_sharding_writes_a_valid_index(tmp_path):
    path = synthesize_mixtral(
        tmp_path / "sharded",
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        vocab_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        shard_bytes=100_000,
        progress=False,
    )
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in path.glob("*.safetensors")) == shards
    total = 0
    for shard in shards:
        with safe_open(path / shard, "pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == shard
                total += f.get_tensor(key).nbytes
    assert total == index["metadata"]["total_size"]
    assert not (path / "model.safetensors").exists()
    _, info = _load(path)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()


def test_same_seed_same_values_and_other_seed_differs(tmp_path):
    config = tiny_mixtral_config(num_hidden_layers=1)
    paths = [synthesize_from_config(tmp_path / str(s), config, seed=s, progress=False) for s in (0, 0, 1)]
    tensors = []
    for path in paths:
        with safe_open(path / "model.safetensors", "pt") as f:
            tensors.append(f.get_tensor("model.layers.0.self_attn.q_proj.weight"))
    assert torch.equal(tensors[0], tensors[1]) and not torch.equal(tensors[0], tensors[2])


def test_unknown_per_expert_model_type_is_rejected(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    with pytest.raises(ValueError, match="per_expert"):
        synthesize_from_config(tmp_path / "llama", config, layout="per_expert", progress=False)


# The benchmark's byte counts on a synthesized checkpoint.


def test_checkpoint_bytes_agree_between_layouts(tiny_dirs):
    from hf_moe_offload.bench.decode_bench import checkpoint_bytes

    fused, per_expert = (checkpoint_bytes(path) for path in tiny_dirs)
    assert fused == per_expert
    assert fused["expert"] == 2 * 8 * 3 * 64 * 128 * 2  # layers * experts * (gate, up, down) * H * I * bf16
    assert fused["total"] == fused["expert"] + fused["non_expert"]
