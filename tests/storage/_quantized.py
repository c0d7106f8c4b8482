"""Tiny pre-quantized checkpoints, written the way their hubs ship them (no download).

* DeepSeek-V3, block FP8: every linear weight whose dims divide the block becomes float8_e4m3fn plus a float32
  `weight_scale_inv` per block; other weights are stored in bf16; `quantization_config.quant_method = "fp8"`.
* GPT-OSS, MXFP4: the experts' `gate_up_proj` / `down_proj` become `*_blocks` (two E2M1 values per byte, low nibble
  first) and `*_scales` (E8M0 exponents, one per 32 values along the input dim); `quant_method = "mxfp4"`.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from hf_moe_offload.storage.quantized import FP4_VALUES
from hf_moe_offload.testing import build_tiny

__all__ = ["FP8_BLOCK", "quantize_fp8", "quantize_mxfp4", "save_fp8_deepseek", "save_mxfp4_gpt_oss"]

FP8_BLOCK = 16
_FP8_MAX = 448.0


def quantize_fp8(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """`[out, in]` -> (float8_e4m3fn weight, float32 scale_inv `[out / block, in / block]`)."""
    rows, cols = w.shape
    t = w.float().reshape(rows // block, block, cols // block, block)
    scale_inv = t.abs().amax(dim=(1, 3)).clamp(min=1e-12) / _FP8_MAX
    q = (t / scale_inv[:, None, :, None]).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(rows, cols), scale_inv


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[E, out, in]` -> (uint8 blocks `[E, out, in / 32, 16]`, uint8 E8M0 scales `[E, out, in / 32]`)."""
    e, rows, cols = w.shape
    t = w.float().reshape(e, rows, cols // 32, 32)
    exp = torch.ceil(torch.log2(t.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    idx = ((t / torch.exp2(exp)[..., None])[..., None] - torch.tensor(FP4_VALUES)).abs().argmin(-1).to(torch.uint8)
    return idx[..., 0::2] | (idx[..., 1::2] << 4), (exp + 127).to(torch.uint8)


def _finish(folder: str, state: dict, quantization_config: dict) -> str:
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(dtype="bfloat16", quantization_config=quantization_config)
    with open(path, "w") as f:
        json.dump(config, f)
    return folder


def save_fp8_deepseek(folder: str) -> str:
    """A tiny DeepSeek-V3 with per-expert hub keys, block-FP8 quantized."""
    build_tiny("deepseek_v3").save_pretrained(folder)
    state = {}
    for k, v in load_file(os.path.join(folder, "model.safetensors")).items():
        if k.endswith("proj.weight") and v.dim() == 2 and not (v.shape[0] % FP8_BLOCK or v.shape[1] % FP8_BLOCK):
            state[k], state[k + "_scale_inv"] = quantize_fp8(v)
        else:
            state[k] = v.to(torch.bfloat16)
    config = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [FP8_BLOCK] * 2,
        "activation_scheme": "dynamic",
    }
    return _finish(folder, state, config)


def save_mxfp4_gpt_oss(folder: str) -> str:
    """A tiny GPT-OSS whose experts are MXFP4 (the transformers-5 fused keys, as the hub checkpoints)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gpt_oss",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        sliding_window=64,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.weight.normal_(0, 0.5)
    model.save_pretrained(folder)
    state = {}
    for k, v in load_file(os.path.join(folder, "model.safetensors")).items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):  # the model holds [E, in, out]
            state[k + "_blocks"], state[k + "_scales"] = quantize_mxfp4(v.transpose(1, 2))
        else:
            state[k] = v.to(torch.bfloat16)
    skip = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
    return _finish(folder, state, {"quant_method": "mxfp4", "modules_to_not_convert": skip})
