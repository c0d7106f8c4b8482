"""Checkpoints of an in-memory model in the two layouts that real MoE checkpoints use, and their key names.

```
model --save_pretrained (transformers reverts its conversion mapping)--> "per_expert": experts.{e}.w1.weight, ...
model --state_dict, as held--------------------------------------------> "fused": experts.gate_up_proj [E, 2I, H]
```
"per_expert" is what the hub holds: one 2-D tensor per expert and per gate / up / down matrix, fused back into the
model's 3-D tensors by transformers' conversion mapping at load time. "fused" is what transformers 5 holds in
memory. Both may be sharded with a `model.safetensors.index.json`, so every read path of the loader is exercised.

`PER_EXPERT_NAMES` is the per-expert naming as data, for writers that cannot call `save_pretrained` because the
weights never exist in memory at once (the checkpoint synthesizer, `hf_moe_offload.bench.synth`);
`tests/testing/test_testing.py` holds it to what `save_pretrained` writes.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

__all__ = ["LAYOUTS", "PER_EXPERT_NAMES", "per_expert_keys", "save_checkpoint"]

LAYOUTS = ("per_expert", "fused")

# model_type -> (rename of the MoE block in every key, gate, up, down) in the per-expert layout. The fused
# `gate_up_proj[e]` is `cat(gate_e, up_e, dim=0)`; `down_proj[e]` is `down_e`.
PER_EXPERT_NAMES: dict[str, tuple[tuple[str, str] | None, str, str, str]] = {
    "mixtral": ((".mlp.", ".block_sparse_moe."), "w1", "w3", "w2"),
    "qwen2_moe": (None, "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": (None, "gate_proj", "up_proj", "down_proj"),
    "olmoe": (None, "gate_proj", "up_proj", "down_proj"),
}


def per_expert_keys(model_type: str, key: str, num_experts: int | None = None) -> list[str]:
    """The per-expert checkpoint keys of the model's state-dict key `key`.

    Args:
        model_type: a key of `PER_EXPERT_NAMES`.
        key: a state-dict key of the model, e.g. `model.layers.0.mlp.experts.gate_up_proj`.
        num_experts: E for a fused expert tensor (`[E, ...]`); None for any other tensor.

    Returns:
        For a fused expert tensor, one key per expert and matrix, expert-major (`gate_up_proj`: `[e0 gate, e0 up,
        e1 gate, ...]`, `down_proj`: `[e0 down, e1 down, ...]`); for any other tensor, its renamed key alone.

    Raises:
        ValueError: `model_type` has no per-expert naming, or `key` is an expert tensor other than
            `gate_up_proj` / `down_proj`.

    Example:
        ```python
        >>> per_expert_keys("mixtral", "model.layers.0.mlp.experts.down_proj", num_experts=2)
        ['model.layers.0.block_sparse_moe.experts.0.w2.weight', 'model.layers.0.block_sparse_moe.experts.1.w2.weight']
        ```
    """
    if model_type not in PER_EXPERT_NAMES:
        raise ValueError(
            f"layout='per_expert' is known for model types {sorted(PER_EXPERT_NAMES)}, got {model_type!r}; "
            "use layout='fused' or add the names to PER_EXPERT_NAMES."
        )
    rename, gate, up, down = PER_EXPERT_NAMES[model_type]
    renamed = key.replace(*rename) if rename else key
    if num_experts is None:
        return [renamed]
    prefix, _, param = renamed.rpartition(".")
    names = {"gate_up_proj": (gate, up), "down_proj": (down,)}.get(param)
    if names is None:
        raise ValueError(f"no per-expert name for expert parameter {key!r} of model type {model_type!r}")
    return [f"{prefix}.{e}.{name}.weight" for e in range(num_experts) for name in names]


def save_checkpoint(model: torch.nn.Module, folder: str, layout: str, shards: int = 1) -> str:
    """Save `model` and its config to `folder` in `layout`, in one file or sharded with an index.

    Args:
        model: a transformers model.
        folder: the directory to create or fill.
        layout: "per_expert" (`save_pretrained`, as on the hub) or "fused" (the model's own state-dict names).
        shards: more than 1 writes an index: "fused" deals the sorted keys round-robin over exactly `shards` files,
            "per_expert" lets `save_pretrained` cut shards of 200KB.

    Returns:
        `folder`.

    Raises:
        ValueError: `layout` is not one of `LAYOUTS`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    os.makedirs(folder, exist_ok=True)
    if layout == "per_expert":
        model.save_pretrained(folder, max_shard_size="200KB" if shards > 1 else "10GB")
        return folder
    model.config.save_pretrained(folder)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if shards == 1:
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return folder
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder
