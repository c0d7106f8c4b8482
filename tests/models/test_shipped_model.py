"""The shipped trained tiny MoE model (models/moe-tiny) and the routing statistics used to check it.

The model is built by ``scripts/build_tiny_model.py``; its routing is checked by ``scripts/routing_check.py``.
These tests load it offline with plain transformers (no offloading), generate, and re-run the routing check.
The recorder and the cache simulation the statistics build on are specified in ``tests/prefetch/test_routing.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hf_moe_offload.bench import routing_stats as rs  # noqa: E402
from hf_moe_offload.integration.tracing import record_routing  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "moe-tiny"
MAX_MODEL_BYTES = 60 * 1024 * 1024
# Measured on the shipped model (see models/moe-tiny/README.md); thresholds leave a margin below.
MIN_MEAN_RECALL = 0.75
MAX_BUSIEST_SHARE = 0.9
# nats/token on the first two held-out windows (measured 5.22 and 4.6); an untrained model scores ~ln(8192) = 9.0
MAX_HELDOUT_LOSS = {"speech": 5.5, "code": 5.0}
# recall of layer l+1's experts from layer l's input, for l >= 1 (measured 0.82-0.85); layer 0 -> 1 measures 0.59
# and is documented as the exception in the model card
MIN_LATER_LAYER_RECALL = 0.8
MIN_FIRST_LAYER_RECALL = 0.5


# ----------------------------------------------------------------------------------------------------------------
# routing_stats on hand-made inputs
# ----------------------------------------------------------------------------------------------------------------
def test_expert_load_counts_every_slot():
    assert rs.expert_load(np.array([[0, 1], [1, 2]]), 4).tolist() == [1, 2, 1, 0]
    assert rs.expert_load(torch.tensor([[[3, 3]]]), 4).tolist() == [0, 0, 0, 2]
    with pytest.raises(ValueError):
        rs.expert_load([[0, 4]], 4)


def test_normalized_entropy_and_busiest_share():
    assert rs.normalized_entropy([5, 5, 5, 5]) == pytest.approx(1.0)
    assert rs.normalized_entropy([0, 7, 0, 0]) == pytest.approx(0.0)
    assert rs.normalized_entropy([1, 1, 0, 0]) == pytest.approx(math.log(2) / math.log(4))  # = 0.5
    assert rs.busiest_expert_share([1, 3]) == pytest.approx(0.75)
    assert rs.busiest_expert_share([2, 2, 2, 2]) == pytest.approx(0.25)


def test_js_divergence_bounds():
    assert rs.js_divergence([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0)
    assert rs.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert 0.0 < rs.js_divergence([3, 1], [1, 3]) < 1.0


def test_topk_recall():
    predicted = [[0, 1], [2, 3]]
    actual = [[1, 0], [2, 5]]
    assert rs.topk_recall(predicted, actual) == pytest.approx((2 / 2 + 1 / 2) / 2)
    assert rs.topk_recall(actual, actual) == 1.0
    assert rs.topk_recall([[4, 6]], [[5, 7]]) == 0.0


def _tiny_random_mixtral(layers: int = 3, experts: int = 4):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return MixtralForCausalLM(config).eval()


def test_record_routing_and_report_on_random_model():
    model = _tiny_random_mixtral()
    blocks = [layer.mlp for layer in model.model.layers]
    inputs = {}
    taps = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, a[0])) for i, b in enumerate(blocks)]
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    with record_routing(model, meta={"batch": 3}) as rec, torch.no_grad():
        model(input_ids=ids)
    for tap in taps:
        tap.remove()
    trace = rec.trace()
    assert trace.num_layers == 3 and trace.num_experts == 4 and trace.top_k == 2
    assert trace.rows(0, 0)[0].shape == (30, 2) and trace.lookahead is not None
    with torch.no_grad():
        for layer, block in enumerate(blocks):
            # a layer's own router on its own input reproduces the recorded choice
            own = block.gate(inputs[layer].reshape(-1, 32))[2]
            assert rs.topk_recall(own, trace.rows(0, layer)[0]) == 1.0
            if layer:  # the recorded lookahead is the next router on the previous layer's input
                ahead = block.gate(inputs[layer - 1].reshape(-1, 32))[2]
                assert rs.topk_recall(ahead, trace.lookahead_rows(0, layer - 1)) == 1.0
    recalls = rs.next_layer_recall(trace)
    assert len(recalls) == 2 and all(0.0 <= r <= 1.0 for r in recalls)
    # hooks are gone afterwards
    assert not any(b.experts._forward_pre_hooks or b._forward_pre_hooks for b in blocks)

    report = rs.routing_report(trace, capacities=(2, 3), domains={"a": [0, 1], "b": [2]})
    assert report["tokens"] == 30 and report["sequences"] == 3 and len(report["layers"]) == 3
    assert sum(report["layers"][0]["load"]) == 60
    assert report["layers"][-1]["next_layer_recall"] is None
    assert report["summary"]["uniform_lru_baseline"] == {"c2": 0.5, "c3": 0.75}
    json.dumps(report)  # serialisable
    table = rs.format_report(report)
    assert "recall(l+1)" in table and "LRU@3" in table and len(table.splitlines()) == 3 + 3 + 1


# ----------------------------------------------------------------------------------------------------------------
# The shipped model
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    return model, tokenizer


def test_shipped_files_and_size():
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "build_info.json",
        "heldout_samples.json",
        "routing_check.json",
        "README.md",
    ):
        assert (MODEL_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert total <= MAX_MODEL_BYTES, f"{total / 2**20:.1f} MiB"
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert config["num_local_experts"] == 16 and config["num_experts_per_tok"] == 2
    assert config["dtype"] == "bfloat16"


def test_shipped_model_loads_and_generates(shipped):
    model, tokenizer = shipped
    assert type(model).__name__ == "MixtralForCausalLM"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 16
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    for prompt in ("My fellow citizens, the state of the Union", "def read_config(path):\n    "):
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=12, do_sample=False)
        new = out[0, enc["input_ids"].shape[1] :]
        assert 1 <= len(new) <= 12
        text = tokenizer.decode(new, skip_special_tokens=True)
        assert text.strip(), f"empty completion for {prompt!r}"
        assert sum(ch.isalpha() for ch in text) >= 3, text


def test_shipped_model_heldout_loss(shipped):
    model, _ = shipped
    samples = json.loads((MODEL_DIR / "heldout_samples.json").read_text())
    for name in ("speech", "code"):
        ids = torch.tensor(samples["domains"][name]["input_ids"][:2])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        assert loss < MAX_HELDOUT_LOSS[name], (name, loss)


def test_shipped_model_routing_check_passes():
    spec = importlib.util.spec_from_file_location("routing_check", REPO / "scripts" / "routing_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.run_routing_check(MODEL_DIR)
    assert report["num_layers"] >= 4 and report["num_experts"] == 16
    assert report["sequences"] == 16 and report["seq_len"] == 256
    assert module.check_thresholds(report, MAX_BUSIEST_SHARE, MIN_MEAN_RECALL) == []
    for row in report["layers"]:
        assert row["busiest_share"] < MAX_BUSIEST_SHARE
        assert row["lru_hit_c4"] >= row["lru_hit_c2"]
    assert report["summary"]["next_layer_recall"]["mean"] >= MIN_MEAN_RECALL
    recalls = [row["next_layer_recall"] for row in report["layers"][:-1]]
    assert recalls[0] >= MIN_FIRST_LAYER_RECALL
    assert min(recalls[1:]) >= MIN_LATER_LAYER_RECALL, recalls
    # learned routing: a cache beats the uniform-routing baseline (C / E)
    assert report["summary"]["lru_hit_c2"]["mean"] > 2 / 16
