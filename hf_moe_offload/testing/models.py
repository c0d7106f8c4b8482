"""Tiny MoE models of the common families, built in-process from their configs (no download).

```
_COMMON sizes + FAMILIES[model_type] + overrides --AutoConfig.for_model--> tiny config
tiny config --AutoModelForCausalLM.from_config (seeded)--> model --sharpen_routers--> eval() model
```
Every family shares one set of small sizes (hidden 64, 2 layers, 4 query / 2 KV heads, vocabulary 128, 8 experts,
top-2); `FAMILIES` holds only what a family names differently or needs beyond that (data, not code). Random init
gives near-uniform routers, so the routers are redrawn with a larger spread: routing then depends on the token and
a cache sees distinct experts miss, hit and get evicted.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

__all__ = ["FAMILIES", "tiny_config", "tiny_mixtral_config", "build_tiny", "sharpen_routers"]

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)

# model_type -> config overrides giving a tiny MoE.
FAMILIES: dict[str, dict] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=64,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "qwen3_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        head_dim=16,
    ),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        num_hidden_layers=3,
        rope_interleave=True,
    ),
}

# The checkpoint synthesizer's tests pin an expert wider than the hidden size (I = 128) and a 256-token vocabulary.
_SYNTH_MIXTRAL = dict(intermediate_size=128, vocab_size=256, max_position_embeddings=512)


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """The tiny config of a family of `FAMILIES`.

    Args:
        model_type: a key of `FAMILIES`.
        **overrides: any field of the family's config, e.g. `num_hidden_layers=4`.

    Raises:
        ValueError: `model_type` is not in `FAMILIES`.
    """
    if model_type not in FAMILIES:
        raise ValueError(f"no tiny config for model type {model_type!r}; known: {', '.join(FAMILIES)}")
    return AutoConfig.for_model(model_type, **{**_COMMON, **FAMILIES[model_type], **overrides})


def tiny_mixtral_config(**overrides) -> PretrainedConfig:
    """`tiny_config("mixtral")` with intermediate size 128 and vocabulary 256, as the synthesizer's tests expect.

    Args:
        **overrides: any `MixtralConfig` field, e.g. `num_hidden_layers=1`.
    """
    return tiny_config("mixtral", **{**_SYNTH_MIXTRAL, **overrides})


@torch.no_grad()
def sharpen_routers(model: torch.nn.Module, std: float = 0.5) -> None:
    """Redraw every router matrix from N(0, `std`) in place so that routing depends on the token.

    A router is a parameter of 2 or more dims named `gate` or `router`, outside the experts and not a projection
    (`gate_proj`, `gate_up_proj`).
    """
    for name, p in model.named_parameters():
        if p.dim() >= 2 and ("gate" in name or "router" in name) and "experts" not in name and "proj" not in name:
            p.normal_(0, std)


def build_tiny(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """A seeded tiny causal LM of `model_type` with sharpened routers, in eval mode.

    Args:
        model_type: a key of `FAMILIES`.
        seed: the `torch.manual_seed` of the initialisation.
        dtype: the parameters' dtype.
        **overrides: config fields, as in `tiny_config`.

    Example:
        ```python
        >>> model = build_tiny("mixtral", num_hidden_layers=3)
        >>> model(torch.arange(3, 15)[None]).logits.shape
        torch.Size([1, 12, 128])
        ```
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    sharpen_routers(model)
    return model.eval()
