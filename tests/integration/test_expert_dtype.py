"""Quantized expert tiers (`expert_dtype`): computed from packed slots, a prepared sidecar read instead of the
checkpoint when it matches, and refused when it does not."""

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_moe_offload import BudgetTooSmallError, OffloadConfigError
from hf_moe_offload.cli.main import main as cli
from hf_moe_offload.errors import SidecarError, UnsupportedFeatureError
from hf_moe_offload.integration.prepare import prepare_experts
from hf_moe_offload.storage.sidecar import MANIFEST
from hf_moe_offload.testing import build_tiny, save_checkpoint
from hf_moe_offload.testing.matrix import matrix_config
from hf_moe_offload.testing.models import sharpen_routers

pytestmark = pytest.mark.slow

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "..", "models", "moe-tiny")
IDS = torch.tensor([[5, 17, 42, 99, 120, 7, 8, 9, 200, 31, 64, 65]])
# Largest logit difference from the normal model on IDS (the shipped model's logits span about +-20); measured
# 0.06 (int8) and 0.09 (int4): see docs/precision.md for perplexity and agreement on held-out text.
LOGIT_BOUND = {"int8": 0.25, "int4": 0.5}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shipped") / "moe-tiny"
    shutil.copytree(SHIPPED, folder)
    return str(folder)


@pytest.fixture(scope="module")
def reference(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        return model(IDS).logits, model.generate(IDS, max_new_tokens=12, do_sample=False)


def _load(folder, **cfg):
    return AutoModelForCausalLM.from_pretrained(folder, offload_config={"host_budget": "10%"} | cfg)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_tier_holds_more_experts_and_stays_close(model_dir, reference, kind):
    full = _load(model_dir, sidecar="none")
    model = _load(model_dir, expert_dtype=kind, sidecar="none")
    s_full, s = full.offload_stats(), model.offload_stats()
    assert s["expert_dtype"] == kind and s["read_from"] == "checkpoint"
    shrink = s["bytes_per_expert_checkpoint"] / s["bytes_per_expert"]
    assert shrink > (1.9 if kind == "int8" else 3.4), shrink
    assert s["host_slots"] >= int(shrink * s_full["host_slots"]) - 1  # the same budget holds 2-3.6x more experts
    with torch.no_grad():
        logits = model(IDS).logits
        tokens = model.generate(IDS, max_new_tokens=12, do_sample=False)
    diff = (logits.float() - reference[0].float()).abs().max().item()
    assert 0 < diff <= LOGIT_BOUND[kind], diff
    assert torch.equal(tokens, reference[1])
    s = model.offload_stats()
    assert s["tokens_generated"] == 12
    assert s["bytes_loaded_per_token_by_precision"] == {"full": 0, kind: s["bytes_loaded_per_token"]}
    s_full = full.offload_stats()
    assert s_full["bytes_loaded_per_token_by_precision"] is None  # no token generated


def test_sidecar_round_trip_reads_fewer_bytes_and_gives_the_same_outputs(model_dir, tmp_path):
    out = str(tmp_path / "int4")
    assert cli(["prepare", model_dir, "--expert-dtype", "int4", "--output", out, "--json"]) == 0
    before = {f: os.path.getmtime(os.path.join(model_dir, f)) for f in os.listdir(model_dir)}
    on_load = _load(model_dir, expert_dtype="int4", sidecar="none", prefetch="none")  # no prefetch: same misses
    prepared = _load(model_dir, expert_dtype="int4", sidecar=out, prefetch="none")
    with torch.no_grad():
        a, b = on_load(IDS).logits, prepared(IDS).logits
    assert torch.equal(a, b)
    s_a, s_b = on_load.offload_stats(), prepared.offload_stats()
    assert s_b["read_from"] == "sidecar" and s_a["misses"] == s_b["misses"] > 0
    assert s_a["bytes_loaded"] / s_b["bytes_loaded"] > 3.4  # bf16 checkpoint bytes vs packed int4 bytes
    assert before == {f: os.path.getmtime(os.path.join(model_dir, f)) for f in os.listdir(model_dir)}


def test_default_sidecar_next_to_the_model_is_found_and_a_stale_one_refused(tmp_path):
    folder = str(tmp_path / "m")
    save_checkpoint(build_tiny("mixtral"), folder, "fused")
    info = prepare_experts(folder, "int8")
    assert info["sidecar"] == os.path.join(folder, "hf_moe_offload_experts", "int8")
    model = _load(folder, expert_dtype="int8")
    with torch.no_grad():
        model(IDS[:, :6] % 100)
    assert model.offload_stats()["read_from"] == "sidecar"
    model.offload_engine.close()
    ckpt = next(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    os.utime(os.path.join(folder, ckpt), ns=(1, 1))  # the checkpoint changed after the sidecar was made
    with pytest.raises(SidecarError, match="stale"):
        _load(folder, expert_dtype="int8")
    model = _load(folder, expert_dtype="int8", sidecar="none")  # the documented way out
    assert model.offload_stats()["read_from"] == "checkpoint"


def _edit_manifest(folder, edit):
    path = os.path.join(folder, MANIFEST)
    with open(path) as f:
        m = json.load(f)
    edit(m)
    with open(path, "w") as f:
        json.dump(m, f)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: os.remove(os.path.join(d, MANIFEST)), "has no manifest.json"),
        (lambda d: open(os.path.join(d, MANIFEST), "w").write("{"), "cannot be read"),
        (lambda d: _edit_manifest(d, lambda m: m.update(expert_dtype="int4")), "holds 'int4' experts"),
        (lambda d: _edit_manifest(d, lambda m: m["packing"]["0"][0].update(dtype="float16")), "another packing"),
        (lambda d: _edit_manifest(d, lambda m: m["num_experts"].update({"0": 3})), "another number of experts"),
        (lambda d: os.remove(os.path.join(d, "experts-L001.safetensors")), "lacks experts-L001"),
    ],
    ids=["no-manifest", "corrupt-manifest", "other-dtype", "foreign-packing", "other-model", "missing-file"],
)
def test_a_damaged_or_foreign_sidecar_is_refused(tmp_path, damage, match):
    folder, out = str(tmp_path / "m"), str(tmp_path / "sidecar")
    save_checkpoint(build_tiny("mixtral"), folder, "per_expert")
    prepare_experts(folder, "int8", out)
    damage(out)
    with pytest.raises(SidecarError, match=match):
        _load(folder, expert_dtype="int8", sidecar=out)


def test_bad_expert_dtype_inputs_are_refused(model_dir, tmp_path):
    with pytest.raises(OffloadConfigError, match="expert_dtype"):
        _load(model_dir, expert_dtype="fp4")
    with pytest.raises(OffloadConfigError, match="expert_dtype is 'auto'"):
        _load(model_dir, sidecar=str(tmp_path))
    with pytest.raises(SidecarError, match="not a folder"):
        _load(model_dir, expert_dtype="int8", sidecar=str(tmp_path / "nowhere"))
    folder = str(tmp_path / "q")
    save_checkpoint(build_tiny("qwen3_moe"), folder, "fused")  # experts of 48 inputs: no int4 group divides it
    with pytest.raises(OffloadConfigError, match="int4 needs a multiple"):
        _load(folder, expert_dtype="int4")


def _dbrx(ffn_hidden_size: int):
    config = matrix_config("dbrx")
    config.ffn_config.ffn_hidden_size = ffn_hidden_size
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    sharpen_routers(model)
    return model


def test_int4_for_a_family_with_its_own_expert_math(tmp_path):
    # DBRX multiplies dense expert weights itself: int4 slots are unpacked for it, in whole blocks of 64 outputs.
    normal = _dbrx(ffn_hidden_size=64)
    folder = str(tmp_path / "dbrx")
    save_checkpoint(normal, folder, "per_expert")
    ids = IDS % normal.config.vocab_size
    model = _load(folder, host_budget="50%", expert_dtype="int4", sidecar="none")
    assert model.offload_stats()["expert_dtype"] == "int4"
    with torch.no_grad():
        want, got = normal(ids).logits, model(ids).logits
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel < 0.1, rel
    odd = str(tmp_path / "dbrx48")
    save_checkpoint(_dbrx(ffn_hidden_size=48), odd, "per_expert")
    with pytest.raises(UnsupportedFeatureError, match="no multiple of 64"):
        _load(odd, expert_dtype="int4", sidecar="none")


def test_mixed_precision_computes_unimportant_experts_quantized(model_dir, reference):
    with torch.no_grad():
        int4 = _load(model_dir, host_budget="25%", expert_dtype="int4", sidecar="none")(IDS).logits
    everything_low = _load(model_dir, host_budget="25%", expert_dtype="int4", sidecar="none", mixed_precision=1.0)
    some_low = _load(model_dir, host_budget="25%", expert_dtype="int4", sidecar="none", mixed_precision=0.3)
    with torch.no_grad():
        a, b = everything_low(IDS).logits, some_low(IDS).logits
    s_a, s_b = everything_low.offload_stats(), some_low.offload_stats()
    assert s_a["full_precision_slots"] > 0 and s_a["low_precision_computes"] == s_a["hits"] + s_a["misses"]
    assert torch.equal(a, int4)  # no expert reached the threshold: every one computed from its int4 copy
    assert 0 < s_b["low_precision_computes"] < s_b["hits"] + s_b["misses"]
    assert (b.float() - reference[0].float()).abs().max() <= LOGIT_BOUND["int4"]
    assert 0 < s_b["bytes_loaded_full_precision"] < s_b["bytes_loaded"]  # both tiers read
    some_low.generate(IDS, max_new_tokens=4, do_sample=False)
    s = some_low.offload_stats()
    split = s["bytes_loaded_per_token_by_precision"]
    assert set(split) == {"full", "int4"} and split["full"] > 0 and split["int4"] > 0
    assert sum(split.values()) == pytest.approx(s["bytes_loaded_per_token"])


def test_mixed_precision_needs_a_quantized_copy_and_room_for_both_tiers(model_dir):
    with pytest.raises(OffloadConfigError, match="needs a quantized copy"):
        _load(model_dir, mixed_precision=0.5)
    with pytest.raises(OffloadConfigError, match="mixed_precision"):
        _load(model_dir, expert_dtype="int8", mixed_precision=1.5)
    # 3% holds 10 int4 experts: 2 at full precision (the top-k, though more than half the bytes) and 3 quantized
    assert (
        _load(model_dir, host_budget="3%", expert_dtype="int4", mixed_precision=0.5).offload_stats()[
            "full_precision_slots"
        ]
        == 2
    )
    with pytest.raises(BudgetTooSmallError, match=r"mixed_precision: .* at least 1007616 bytes"):
        _load(model_dir, host_budget="2%", expert_dtype="int4", mixed_precision=0.5)  # 6 int4 experts' bytes


def test_expert_fraction_computes_the_calibrated_neurons(model_dir, reference, tmp_path):
    with pytest.raises(OffloadConfigError, match="hf-moe-offload calibrate"):
        _load(model_dir, expert_fraction=0.5)
    assert cli(["calibrate", model_dir, "--json"]) == 0
    full = _load(model_dir, expert_fraction=1.0)  # f = 1: the checkpoint's experts, untouched
    half = _load(model_dir, expert_fraction=0.5, prefetch="none")
    with torch.no_grad():
        assert torch.equal(full(IDS).logits, reference[0])
        logits = half(IDS).logits
    s = half.offload_stats()
    assert s["bytes_per_expert"] * 2 == s["bytes_per_expert_checkpoint"]
    top1 = (logits.argmax(-1) == reference[0].argmax(-1)).float().mean().item()
    assert top1 >= 0.9, top1
    # a sidecar of int4 experts with half their neurons: read, not recomputed, and refused for another fraction
    out = str(tmp_path / "int4-half")
    assert cli(["prepare", model_dir, "--expert-dtype", "int4", "--expert-fraction", "0.5", "--output", out]) == 0
    on_load = _load(model_dir, expert_dtype="int4", expert_fraction=0.5, sidecar="none", prefetch="none")
    prepared = _load(model_dir, expert_dtype="int4", expert_fraction=0.5, sidecar=out, prefetch="none")
    with torch.no_grad():
        assert torch.equal(on_load(IDS).logits, prepared(IDS).logits)
    assert prepared.offload_stats()["bytes_loaded"] * 6 < on_load.offload_stats()["bytes_loaded"]
    with pytest.raises(SidecarError, match="keeps neurons"):
        _load(model_dir, expert_dtype="int4", expert_fraction=0.75, sidecar=out)
