"""`hf_moe_offload.testing`: the tiny models build, both checkpoint layouts reload to the model's own weights, the
per-expert naming is what transformers writes, the tokenizer round-trips, and the core never imports the package."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_moe_offload
from hf_moe_offload.adapters import describe_model
from hf_moe_offload.testing import (
    FAMILIES,
    LAYOUTS,
    PER_EXPERT_NAMES,
    build_tiny,
    char_tokenizer,
    per_expert_keys,
    save_checkpoint,
    tiny_config,
)

PKG = pathlib.Path(hf_moe_offload.__file__).parent


def _saved_keys(folder: str) -> set[str]:
    keys = set()
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                keys.update(f.keys())
    return keys


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_a_deterministic_tiny_moe(family):
    model = build_tiny(family)
    assert model.config.model_type == family and not model.training
    summary = describe_model(model).summary()
    assert summary["experts_per_layer"] == 8 and summary["top_k"] == 2
    with torch.no_grad():
        logits = model(torch.arange(3, 15)[None]).logits
    assert logits.shape == (1, 12, 128) and torch.isfinite(logits).all()
    again = build_tiny(family).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())


def test_tiny_config_rejects_an_unknown_family():
    with pytest.raises(ValueError, match="no tiny config for model type 'llama'"):
        tiny_config("llama")


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_both_layouts_reload_to_the_same_state_dict(tmp_path, family, layout, shards):
    ref = build_tiny(family)
    folder = save_checkpoint(ref, str(tmp_path), layout, shards=shards)
    index = os.path.join(folder, "model.safetensors.index.json")
    assert os.path.exists(index) == (shards > 1)
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    want, got = ref.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


def test_fused_layout_holds_the_model_keys_and_shards_exactly(tmp_path):
    ref = build_tiny("mixtral")
    folder = save_checkpoint(ref, str(tmp_path), "fused", shards=3)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert weight_map.keys() == ref.state_dict().keys() == _saved_keys(folder)
    assert len(set(weight_map.values())) == 3


@pytest.mark.parametrize("family", PER_EXPERT_NAMES)
def test_per_expert_names_are_what_save_pretrained_writes(tmp_path, family):
    ref = build_tiny(family)
    want = set()
    for key, tensor in ref.state_dict().items():
        fused = ".experts." in key and tensor.dim() == 3
        want.update(per_expert_keys(family, key, num_experts=tensor.shape[0] if fused else None))
    assert _saved_keys(save_checkpoint(ref, str(tmp_path), "per_expert")) == want


def test_per_expert_keys_split_experts_in_order_and_reject_unknown_types():
    keys = per_expert_keys("mixtral", "model.layers.0.mlp.experts.gate_up_proj", num_experts=2)
    prefix = "model.layers.0.block_sparse_moe.experts"
    assert keys == [f"{prefix}.0.w1.weight", f"{prefix}.0.w3.weight", f"{prefix}.1.w1.weight", f"{prefix}.1.w3.weight"]
    assert per_expert_keys("olmoe", "model.layers.0.mlp.gate.weight") == ["model.layers.0.mlp.gate.weight"]
    with pytest.raises(ValueError, match="per_expert"):
        per_expert_keys("llama", "model.embed_tokens.weight")
    with pytest.raises(ValueError, match="no per-expert name"):
        per_expert_keys("mixtral", "model.layers.0.mlp.experts.gate_up_proj_bias", num_experts=2)


def test_save_checkpoint_rejects_an_unknown_layout(tmp_path):
    with pytest.raises(ValueError, match="layout must be one of"):
        save_checkpoint(build_tiny("mixtral"), str(tmp_path), "sharded")


def test_char_tokenizer_round_trips_ascii_within_the_tiny_vocabulary():
    pytest.importorskip("tokenizers")
    tok = char_tokenizer()
    text = "def f(x): return {'MoE': x ** 2}  # ~!"
    ids = tok(text).input_ids
    assert len(ids) == len(text) and max(ids) < 128 and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert (tok.unk_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 4) and batch.attention_mask[0].tolist() == [1, 1, 0, 0]


def test_importing_the_package_does_not_import_testing():
    code = "import sys, hf_moe_offload; print(any(m.startswith('hf_moe_offload.testing') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def _imports_testing(path: pathlib.Path) -> bool:
    """Whether the module at `path` imports `hf_moe_offload.testing`, absolutely or relatively."""
    parts = path.relative_to(PKG).parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.ImportFrom):
            base = ["hf_moe_offload", *parts[: len(parts) - (node.level - 1)]]
            names = [".".join(base + ([node.module] if node.module else [a.name for a in node.names][:1]))]
        else:
            continue
        if any(n == "hf_moe_offload.testing" or n.startswith("hf_moe_offload.testing.") for n in names):
            return True
    return False


def test_only_the_top_layer_imports_testing():
    # testing sits beside bench and cli: the synthesizer (bench) writes its key naming, nothing below may import it.
    top = {"testing", "bench", "cli"}
    core = [p for p in PKG.rglob("*.py") if p.relative_to(PKG).parts[0] not in top]
    assert [str(p.relative_to(PKG)) for p in core if _imports_testing(p)] == []
