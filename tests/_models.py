"""Tiny MoE models built in-process and saved in both checkpoint layouts (no download)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

__all__ = ["FAMILIES", "tiny_config", "build_tiny", "save_checkpoint"]

_COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
)  # fmt: skip

# model_type -> config overrides giving a tiny MoE (data, not code).
FAMILIES = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1,
                      mlp_only_layers=[], head_dim=16),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=32,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_hidden_layers=3,
                        rope_interleave=True),
}  # fmt: skip


def tiny_config(model_type: str, **overrides):
    kw = {**_COMMON, **FAMILIES[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kw)


def build_tiny(model_type: str, seed: int = 0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    with torch.no_grad():  # random init gives near-uniform routers; sharpen them so routing is not degenerate
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("gate" in name or "router" in name) and "experts" not in name and "proj" not in name:
                p.normal_(0, 0.5)
    return model.eval()


def save_checkpoint(model, folder: str, layout: str, shards: int = 1) -> str:
    """Save `model` with per-expert keys (`save_pretrained`, as on the hub) or fused keys (the model's own
    state-dict names, as transformers 5 holds them), optionally sharded with an index."""
    os.makedirs(folder, exist_ok=True)
    if layout == "per_expert":
        model.save_pretrained(folder, max_shard_size="200KB" if shards > 1 else "10GB")
        return folder
    assert layout == "fused", layout
    model.config.save_pretrained(folder)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    keys = sorted(state)
    if shards == 1:
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder


def char_tokenizer():
    """A character-level fast tokenizer whose 128 ids fit the tiny models' vocabulary (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
