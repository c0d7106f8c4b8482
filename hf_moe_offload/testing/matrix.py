"""The fidelity matrix: every causal-LM and seq2seq MoE type transformers ships, built tiny, offloaded vs normal.

```
discover_moe_families() with a causal-LM or seq2seq Auto mapping -> model types
AutoConfig.for_model(type) defaults --shrink (SHRINK, layer lists, token ids, sub-configs) + OVERRIDES--> tiny config
tiny model (fp32, sharpened routers) -> reference logits (teacher-forced decoder for seq2seq) + greedy tokens
for layout in LAYOUTS: save -> from_pretrained(offload_config=<top_k + 1 slots>) -> same logits, same tokens,
                       misses > 0 and evictions > 0
```
Tiny configs are derived generically from each type's defaults; OVERRIDES holds only what a family needs beyond
that (data, not code). A type that cannot be offloaded exactly is listed in XFAIL with the precise reason: the
test marks it `xfail(strict=True)`, so fixing it turns the run red (XPASS) until the entry is removed. Used by
tests/adapters/test_fidelity_matrix.py and scripts/gen_models_doc.py (which runs the same cases without pytest); the
checkpoints are written by `save_checkpoint` (checkpoints.py) and the routers sharpened as in models.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig

from ..adapters.discovery import discover_moe_families
from ..integration import inspect_checkpoint
from .checkpoints import save_checkpoint
from .models import sharpen_routers

__all__ = [
    "SHRINK",
    "OVERRIDES",
    "XFAIL",
    "matrix_types",
    "xfail_reason",
    "matrix_config",
    "Reference",
    "reference",
    "run_case",
    "ATOL",
    "NEW_TOKENS",
]

ATOL = 1e-4
NEW_TOKENS = 6

# Generic shrink: applied to every key the type's default config has (hidden 64, 2 layers, 4/2 heads, vocab 128,
# 8 experts, top-2; MLA ranks and group routing small; the first layer dense where a family has dense layers).
SHRINK = dict(
    hidden_size=64,
    d_model=64,
    intermediate_size=96,
    moe_intermediate_size=48,
    expert_ffn_hidden_size=48,
    shared_expert_intermediate_size=64,
    num_hidden_layers=2,
    n_layers=2,
    num_attention_heads=4,
    n_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=128,
    max_seq_len=128,
    num_local_experts=8,
    num_experts=8,
    n_routed_experts=8,
    moe_num_experts=8,
    num_experts_per_tok=2,
    num_experts_per_token=2,
    moe_topk=2,
    moe_k=2,
    router_topk=2,
    moe_top_k=2,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    n_group=2,
    topk_group=1,
    num_expert_group=2,
    first_k_dense_replace=1,
    num_dense_layers=1,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    n_shared_experts=1,
    num_shared_experts=1,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_heads=4,
    linear_head_dim=16,
    mamba_d_state=16,
    mamba_n_heads=4,
    mamba_d_head=32,
    mamba_dt_rank=8,
    mamba_chunk_size=16,
    mamba_n_groups=1,
    sliding_window=64,
    use_mamba_kernels=False,
    num_layers=2,
    ffn_hidden_size=96,
    zero_expert_num=2,
    top_k_experts=2,
    index_n_heads=4,
    index_head_dim=16,
    index_topk=8,
    adapter_in_dim=64,
    adapter_out_dim=64,
    adapter_input_size=64,
    d_kv=16,
    d_ff=96,
    num_decoder_layers=2,
    num_sparse_encoder_layers=1,
    num_sparse_decoder_layers=1,
    encoder_sparse_step=1,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=96,
    decoder_ffn_dim=96,
)
_MLA_KEYS = ("kv_lora_rank",)  # multi-head latent attention: head_dim follows the rope dims
_TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id")

_GEMMA4_MOE = dict(enable_moe_block=True)  # Gemma 4 defaults to its dense variant
# Qwen4-Exp's indexed attention layers need the QSA indexer sizes (all None by default).
_QWEN4_QSA = dict(
    indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=4
)
_DOTS3_SWA = dict(head_dim=16)  # its sliding-window layers need head_dim = qk_nope_head_dim + qk_rope_head_dim

# Family-specific additions (model_type -> config kwargs), only where the generic shrink is not enough.
OVERRIDES: dict[str, dict] = {
    "dbrx": dict(
        # The modeling reads attn_config.rope_theta and clamps qkv by clip_qkv (None fails in clamp).
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(hidden_size=64, ffn_hidden_size=48, moe_num_experts=8, moe_top_k=2),
    ),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0),
    "zaya": dict(num_experts_per_tok=1),  # ZAYA supports top-1 routing only
    "granitemoehybrid": dict(layer_types=["linear_attention", "attention"]),  # default: every layer Mamba
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),  # default None: derived from a long pattern
    "gemma4_text": _GEMMA4_MOE,
    "gemma4": dict(text_config=_GEMMA4_MOE),
    "qwen4_exp_text": _QWEN4_QSA,
    "qwen4_exp": dict(text_config=_QWEN4_QSA),
    "dots3_note_text": _DOTS3_SWA,
    "dots3_note": dict(text_config=_DOTS3_SWA),
    "switch_transformers": dict(decoder_start_token_id=0),  # T5 convention; the config leaves it unset
}

# model_type (or (model_type, layout)) -> why it is not offloaded exactly. strict: a fix must remove the entry.
XFAIL: dict[str | tuple[str, str], str] = {
    "doge": "DogeCDMoE keeps rank-one 'experts' as rows of nn.Embedding tables (down_embed/up_embed) chosen by "
    "product keys: no per-expert MLP weights to offload (UnsupportedModelError)",
}


def matrix_types() -> list[str]:
    """Every MoE model type with an `AutoModelForCausalLM` or `AutoModelForSeq2SeqLM` mapping, from transformers."""
    return [f.model_type for f in discover_moe_families() if f.causal_lm or f.seq2seq_lm]


def _auto_class(model_type: str):
    fam = next(f for f in discover_moe_families() if f.model_type == model_type)
    return AutoModelForCausalLM if fam.causal_lm else AutoModelForSeq2SeqLM


def xfail_reason(model_type: str, layout: str) -> str | None:
    """Why `model_type` saved in `layout` is not offloaded exactly (from `XFAIL`), or None when it should be."""
    return XFAIL.get((model_type, layout)) or XFAIL.get(model_type)


def _shrink_list(values: list, n: int) -> list:
    """A per-layer list cut to n layers keeping its variety: the distinct values in first-seen order."""
    distinct = list(dict.fromkeys(map(repr, values)))
    picked = [next(v for v in values if repr(v) == d) for d in distinct][:n]
    return picked + [picked[-1]] * (n - len(picked))


def _shrunk_kwargs(default: PretrainedConfig) -> dict:
    d = default.to_dict()
    kw = {k: v for k, v in SHRINK.items() if k in d}
    if any(k in d for k in _MLA_KEYS):
        kw.pop("head_dim", None)
        if "head_dim" in d and "qk_rope_head_dim" in kw:
            kw["head_dim"] = kw["qk_rope_head_dim"]
        if "qk_head_dim" in d:
            kw["qk_head_dim"] = kw["qk_rope_head_dim"] + kw["qk_nope_head_dim"]
        if "num_key_value_heads" in d:  # latent KV is expanded to every query head
            kw["num_key_value_heads"] = kw["num_attention_heads"]
    n_old, n_new = d.get("num_hidden_layers", d.get("n_layers")), kw.get("num_hidden_layers", kw.get("n_layers"))
    if n_old and n_new:
        for k, v in d.items():
            if isinstance(v, list) and len(v) == n_old and k not in kw:
                kw[k] = _shrink_list(v, n_new)
            elif isinstance(v, dict) and v and all(str(i).isdigit() for i in v):  # per-layer overrides by index
                kw[k] = {i: c for i, c in v.items() if int(i) < n_new}
    vocab = kw.get("vocab_size", d.get("vocab_size"))
    if vocab and isinstance(d.get("unpadded_vocab_size"), int) and d["unpadded_vocab_size"] > vocab:
        kw["unpadded_vocab_size"] = vocab  # Inkling2: the head's size; transformers 5.24 pads it back to vocab_size
    for i, k in enumerate(_TOKEN_KEYS):
        if isinstance(d.get(k), int) and vocab and d[k] >= vocab:
            kw[k] = i
        elif isinstance(d.get(k), list):
            kw[k] = [t if t < vocab else i for t in d[k]]
    for name in getattr(default, "sub_configs", {}) or {}:
        sub = getattr(default, name, None)
        if isinstance(sub, PretrainedConfig):
            kw[name] = {**sub.to_dict(), **_shrunk_kwargs(sub)}
    return kw


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def matrix_config(model_type: str) -> PretrainedConfig:
    """The tiny config of `model_type`: shrunk defaults plus `OVERRIDES[model_type]` (merged into sub-configs)."""
    kw = _merge(_shrunk_kwargs(AutoConfig.for_model(model_type)), OVERRIDES.get(model_type, {}))
    return AutoConfig.for_model(model_type, **kw)


@dataclass
class Reference:
    """The normal model and what it computes on fixed inputs."""

    model_type: str
    model: torch.nn.Module
    input_ids: torch.Tensor
    logits: torch.Tensor
    tokens: torch.Tensor


@torch.no_grad()
def reference(model_type: str, seed: int = 0) -> Reference:
    """The tiny model of `model_type` (fp32, seeded, sharpened routers) and its logits and greedy tokens on two
    random sequences of 12 tokens."""
    torch.manual_seed(seed)
    model = _auto_class(model_type).from_config(matrix_config(model_type), dtype=torch.float32).eval()
    sharpen_routers(model)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, min(vocab, 128), (2, 12), generator=torch.Generator().manual_seed(seed))
    return Reference(model_type, model, ids, _logits(model, ids), _greedy(model, ids))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    if model.config.is_encoder_decoder:  # teacher-forced decoder on a prefix of the input
        return model(input_ids=ids, decoder_input_ids=ids[:, :6]).logits
    return model(input_ids=ids).logits


def _greedy(model, ids: torch.Tensor) -> torch.Tensor:
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
    )
    return out if model.config.is_encoder_decoder else out[:, ids.shape[1] :]


@torch.no_grad()
def run_case(ref: Reference, layout: str, folder: str) -> dict:
    """Save `ref.model` in `layout` under `folder`, load it offloaded with room for top-k + 1 experts, and check
    logits (atol `ATOL`) and `NEW_TOKENS` greedy tokens against the reference. Returns the offload stats.

    Raises:
        AssertionError: the offloaded model differs, or the cache saw no miss or no eviction.
    """
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(ref.model, folder, layout)
    topology, layout_info, _ = inspect_checkpoint(ref.model, folder)
    slots = topology.max_top_k + 1
    total = sum(layer.num_experts for layer in topology.layers)
    assert slots < total, f"{ref.model_type}: {total} experts in all; the matrix needs more than {slots}"
    cfg = {"host_budget": slots * layout_info.slot_nbytes, "device": "cpu"}
    model = _auto_class(ref.model_type).from_pretrained(folder, offload_config=cfg, dtype=torch.float32)
    try:
        logits = _logits(model, ref.input_ids)
        diff = (logits - ref.logits).abs().max().item()
        assert diff <= ATOL, f"{ref.model_type}/{layout}: logits differ by {diff:.3g} (atol {ATOL})"
        tokens = _greedy(model, ref.input_ids)
        assert torch.equal(tokens, ref.tokens), f"{ref.model_type}/{layout}: greedy {tokens} != {ref.tokens}"
        stats = model.offload_stats()
        assert stats["misses"] > 0 and stats["evictions"] > 0, f"{ref.model_type}/{layout}: {stats}"
        stats["max_abs_diff"] = diff
        return stats
    finally:
        model.offload_engine.close()
