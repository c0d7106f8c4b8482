"""Pre-quantized checkpoints (DeepSeek-style block FP8, GPT-OSS MXFP4): experts are read per expert with their
scales and dequantized into the cache slot; the offloaded model computes what transformers' normal load does."""

import json
import os
import shutil

import pytest
import torch
from _quantized import quantize_fp8, quantize_mxfp4, save_fp8_deepseek, save_mxfp4_gpt_oss
from transformers import AutoModelForCausalLM
from transformers.integrations.finegrained_fp8 import Fp8Dequantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from hf_moe_offload.errors import UnsupportedQuantizationError
from hf_moe_offload.storage import QuantSpec
from hf_moe_offload.storage.quantized import dequantize
from hf_moe_offload.storage.reader import slot_views

CHECKPOINTS = {"fp8": save_fp8_deepseek, "mxfp4": save_mxfp4_gpt_oss}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def quantized_ckpt(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    return request.param, CHECKPOINTS[request.param](folder)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(-1)


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_fp8_dequantize_matches_transformers(scale_fmt):
    w = torch.randn(48, 64) * 0.05
    q, s = quantize_fp8(w)
    if scale_fmt == "ue8m0":  # E8M0 exponents stored as uint8: scale = 2 ** (byte - 127)
        s = (torch.log2(s).round() + 127).to(torch.uint8)
    spec = QuantSpec("fp8", q.dtype, tuple(q.shape), "", 0, s.nbytes, s.dtype, tuple(s.shape), (16, 16))
    ours = dequantize(spec, _raw(q), _raw(s), torch.bfloat16)
    theirs = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.bfloat16)
    assert torch.equal(ours, theirs)
    if scale_fmt == "float":
        assert (ours.float() - w).abs().max() < 0.01


def test_mxfp4_dequantize_matches_transformers():
    w = torch.randn(1, 96, 64) * 0.05  # [E, out, in]
    blocks, scales = quantize_mxfp4(w)
    spec = QuantSpec("mxfp4", torch.uint8, tuple(blocks.shape[1:]), "", 0, 0, torch.uint8, tuple(scales.shape[1:]))
    ours = dequantize(spec, _raw(blocks[0]), _raw(scales[0]), torch.bfloat16)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)[0]  # [in, out], as the model holds it
    assert ours.shape == (64, 96) and torch.equal(ours, theirs)


def test_offloaded_quantized_model_matches_normal(quantized_ckpt):
    method, folder = quantized_ckpt
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    off = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, offload_config={"host_budget": "40%"})
    engine = off.offload_engine
    assert all(p.quant is not None and p.quant.scheme == method for ps in engine.layout.pieces[(0, 3)] for p in ps)

    layer = engine.topology.layers[-1]  # the slot holds exactly what transformers dequantized
    slot = torch.empty(engine.layout.slot_nbytes, dtype=torch.uint8)
    engine.store.read_into(layer.layer, 5, slot)
    ref_experts = ref.get_submodule(layer.module_name)
    for name, got in slot_views(slot, engine.layout, layer.layer).items():
        assert torch.equal(got, getattr(ref_experts, name)[5]), name

    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(off(ids).logits, ref(ids).logits, rtol=0, atol=0)
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(off.generate(ids[:1], **kw), ref.generate(ids[:1], **kw))
    s = off.offload_stats()
    assert s["misses"] > 0 and s["evictions"] > 0, s


def _with_quantization(src: str, dst: str, quantization_config: dict) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config
    with open(path, "w") as f:
        json.dump(config, f)
    return dst


@pytest.mark.parametrize(
    "quantization_config",
    [{"quant_method": "bitsandbytes", "load_in_4bit": True}, {"quant_method": "fp8", "expert_dtype": "fp4"}],
    ids=["bitsandbytes", "fp8-fp4-experts"],
)
def test_unsupported_quantization_is_refused_before_loading(mixtral_dir, tmp_path, quantization_config):
    folder = _with_quantization(mixtral_dir, str(tmp_path / "q"), quantization_config)
    with pytest.raises(UnsupportedQuantizationError, match="'fp8' and 'mxfp4'"):
        AutoModelForCausalLM.from_pretrained(folder, offload_config={"host_budget": "50%"})
