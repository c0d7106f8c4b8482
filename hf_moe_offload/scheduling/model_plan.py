r"""`plan_for_model`: one model and one machine in, one `Plan` out; what `hf-moe-offload plan` and `mode="auto"` share.

```
topology summary (MoETopology.summary() / inspect_path) --+
model config (PretrainedConfig or config.json dict) ------+--> shape_for_model --> ModelShape at the compute dtype
compute dtype, context tokens ---------------------------+                        (dense bytes, embedding bytes)
                                                                               --> KV bytes per token * context
HardwareProfile, memory, device memory, batch sizes ------------> planner.plan: each tier keeps dense + B * KV
                                                                  (+ reserve), the rest is expert slots --> Plan
```
Both callers reserve the same bytes because they build the same inputs here: the non-expert weights (embeddings
included) at the compute dtype, `batch * context` tokens of KV cache in the tier that computes, and no fixed
overhead (the memory given is what the run may use for weights, KV and slots; `mode="auto"` hands over its free
memory less `reserve_fraction`). Embedding bytes are kept apart in `ModelShape` because a decode step gathers their
rows instead of streaming them.
"""

from __future__ import annotations

from typing import Any

from .cost_model import DEFAULT_BATCHES, ModelShape
from .expert_parallel import DEFAULT_LINK, Link, plan_expert_parallel
from .planner import Plan
from .profile import HardwareProfile

__all__ = ["DEFAULT_CONTEXT", "COMPUTE_ITEMSIZE", "kv_bytes_per_token", "shape_for_model", "plan_for_model"]

DEFAULT_CONTEXT = 512
COMPUTE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def _get(config, name: str):
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def kv_bytes_per_token(config, itemsize: int) -> int:
    """KV cache bytes one token adds over all layers: `2 * kv_heads * head_dim` per layer, or MLA's latent.

    Args:
        config: a `PretrainedConfig` or the dict of its `config.json` (a `text_config` inside is used).
        itemsize: bytes per element of the cache.
    """
    text = _get(config, "text_config") or config
    layers = int(_get(text, "num_hidden_layers") or 0)
    if _get(text, "kv_lora_rank"):
        return layers * (_get(text, "kv_lora_rank") + (_get(text, "qk_rope_head_dim") or 0)) * itemsize
    heads = _get(text, "num_attention_heads") or 0
    kv_heads = _get(text, "num_key_value_heads") or heads
    head_dim = _get(text, "head_dim") or (_get(text, "hidden_size") // heads if heads else 0)
    return layers * 2 * kv_heads * head_dim * itemsize


def shape_for_model(
    topology_summary: dict[str, Any] | ModelShape, model_config=None, dtype: str | None = None
) -> tuple[ModelShape, int]:
    """The planner's `ModelShape` of a model at the compute dtype, and the KV bytes one token adds.

    Args:
        topology_summary: `MoETopology.summary()` or `inspect_path(...)` (its `dtype` is the stored dtype); a
            `ModelShape` is taken as it is (KV at 2 bytes per element).
        model_config: a `PretrainedConfig` or its dict, for the KV cache and embedding sizes; None counts neither.
        dtype: the compute dtype (`"bfloat16"`, ...); default the stored one. Expert and dense bytes scale with it.

    Raises:
        ValueError: `dtype` is not one of `COMPUTE_ITEMSIZE`.
    """
    if isinstance(topology_summary, ModelShape):
        return topology_summary, kv_bytes_per_token(model_config, 2) if model_config is not None else 0
    stored = topology_summary.get("dtype")
    dtype = dtype or stored
    if dtype is not None and dtype not in COMPUTE_ITEMSIZE and dtype != stored:
        raise ValueError(f"dtype: expected one of {', '.join(COMPUTE_ITEMSIZE)}, got {dtype!r}")
    itemsize = COMPUTE_ITEMSIZE.get(dtype, 2)
    scale = itemsize / COMPUTE_ITEMSIZE.get(stored, itemsize)
    embedding = kv = 0
    if model_config is not None:
        text = _get(model_config, "text_config") or model_config
        embedding = int((_get(text, "vocab_size") or 0) * (_get(text, "hidden_size") or 0) * itemsize)
        kv = kv_bytes_per_token(model_config, itemsize)
    summary = dict(
        topology_summary,
        bytes_per_expert=int(topology_summary["bytes_per_expert"] * scale),
        other_bytes=int(topology_summary["other_bytes"] * scale),
    )
    return ModelShape.from_summary(summary, embedding_nbytes=embedding), kv


def plan_for_model(
    profile: HardwareProfile,
    topology_summary: dict[str, Any] | ModelShape,
    memory_bytes: int,
    *,
    model_config=None,
    dtype: str | None = None,
    context: int = DEFAULT_CONTEXT,
    seq_bytes: int | None = None,
    device_memory_bytes: int | None = None,
    latency_limit_s: float | None = None,
    batch_candidates=DEFAULT_BATCHES,
    distinct_curve: dict[int, list[float]] | None = None,
    hit_rate: float | None = None,
    read_from: str = "disk",
    world_size: int = 1,
    link: Link = DEFAULT_LINK,
) -> Plan:
    """Plan one model on this machine: `shape_for_model`, then `planner.plan` with its KV cache per sequence.

    Args:
        profile: the machine's `HardwareProfile`.
        topology_summary: `MoETopology.summary()` or `inspect_path(...)`.
        memory_bytes: host memory for dense weights (CPU only), KV caches and expert slots.
        model_config: a `PretrainedConfig` or its dict (KV cache and embedding sizes).
        dtype: the compute dtype; default the stored one.
        context: tokens per sequence (prompt + generated) the KV cache holds.
        seq_bytes: KV bytes per sequence, instead of `context` tokens of `model_config`'s KV.
        device_memory_bytes: accelerator memory for dense weights, KV caches and device slots (None: CPU only).
        latency_limit_s, batch_candidates, distinct_curve, hit_rate, read_from: as for `planner.plan`.
        world_size: plan one rank of this many expert-parallel ranks (`expert_parallel.plan_expert_parallel`: its
            share of the experts, token dispatch over `link` added to each step); `distinct_curve` is then the
            whole model's against tokens per step. Needs `model_config` (its `hidden_size`).
        link: the network between the ranks.

    Returns:
        The `Plan`; `plan.inputs["model"]` and `plan.inputs["seq_bytes"]` hold what was reserved.

    Example:
        ```python
        >>> info = inspect_path("model")
        >>> p = plan_for_model(profile, info, 8 << 30, model_config=AutoConfig.from_pretrained("model"))
        >>> p.host_budget_bytes
        ```
    """
    shape, kv = shape_for_model(topology_summary, model_config, dtype)
    hidden = itemsize = 0
    if world_size != 1:
        text = None if model_config is None else _get(model_config, "text_config") or model_config
        hidden = int(_get(text, "hidden_size") or 0) if text is not None else 0
        if not hidden:
            raise ValueError("world_size > 1: the model config's hidden_size is needed to cost the token dispatch")
        stored = None if isinstance(topology_summary, ModelShape) else topology_summary.get("dtype")
        itemsize = COMPUTE_ITEMSIZE.get(dtype or stored, 2)
    return plan_expert_parallel(
        profile,
        shape,
        memory_bytes,
        world_size,
        hidden_size=hidden,
        itemsize=itemsize,
        link=link,
        latency_limit_s=latency_limit_s,
        batch_candidates=batch_candidates,
        seq_bytes=context * kv if seq_bytes is None else seq_bytes,
        device_memory_bytes=device_memory_bytes,
        distinct_curve=distinct_curve,
        hit_rate=hit_rate,
        read_from=read_from,
    )
