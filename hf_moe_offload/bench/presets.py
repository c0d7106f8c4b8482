"""Random models with the real per-layer shapes of public MoE checkpoints, scaled in depth to fit a disk budget.

```
preset (public config values) --meta models of 1 and 2 layers--> bytes per layer, bytes outside the layers
    --> layers = (max_disk - fixed) // per_layer, clamped to [1, real depth] --> synthesize_from_config (cached)
```

Hidden size, expert intermediate size, number of experts, top-k, attention heads and vocabulary are those of the
public `config.json` files, so one expert, one attention block and one step's data movement cost what they cost
in the real model; only the number of decoder layers is reduced. A synthesized folder holds a `synth.json`
marker written last; a folder whose marker matches is reused, anything else is rewritten.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .synth import synthesize_from_config

__all__ = ["PRESETS", "preset_config", "scaled_layers", "synthesize_preset", "default_synth_dir"]

GiB = 1024**3
MARKER = "synth.json"

# Values from the public config.json of each model (shapes only; weights are random).
PRESETS: dict[str, dict] = {
    "mixtral-8x7b": dict(
        model_type="mixtral",
        hidden_size=4096,
        intermediate_size=14336,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        num_hidden_layers=32,
        max_position_embeddings=32768,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
        num_hidden_layers=48,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        max_position_embeddings=40960,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),
    "olmoe-1b-7b": dict(
        model_type="olmoe",
        hidden_size=2048,
        intermediate_size=1024,
        num_experts=64,
        num_experts_per_tok=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=50304,
        num_hidden_layers=16,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
}


def preset_config(name: str, num_layers: int | None = None) -> PretrainedConfig:
    """The transformers config of preset `name`, with `num_layers` decoder layers (default: the real depth)."""
    if name not in PRESETS:
        from ..errors import UnknownNameError

        raise UnknownNameError(f"unknown synthetic model {name!r}; known: {', '.join(sorted(PRESETS))}")
    values = dict(PRESETS[name])
    model_type = values.pop("model_type")
    if num_layers is not None:
        values["num_hidden_layers"] = num_layers
    return AutoConfig.for_model(model_type, **values)


def _param_bytes(config: PretrainedConfig, itemsize: int) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) * itemsize


def scaled_layers(name: str, max_disk: int, itemsize: int = 2) -> tuple[int, int]:
    """`(layers, checkpoint bytes)`: the most decoder layers of preset `name` whose checkpoint fits `max_disk`.

    At least one layer, at most the real depth.
    """
    one, two = (_param_bytes(preset_config(name, n), itemsize) for n in (1, 2))
    per_layer, fixed = two - one, 2 * one - two
    real = PRESETS[name]["num_hidden_layers"]
    layers = max(1, min(real, math.floor((max_disk - fixed) / per_layer)))
    return layers, fixed + layers * per_layer


def default_synth_dir() -> Path:
    """`$HF_MOE_OFFLOAD_SYNTH_DIR`, else `~/.cache/hf_moe_offload/synth`."""
    env = os.environ.get("HF_MOE_OFFLOAD_SYNTH_DIR")
    return Path(env) if env else Path.home() / ".cache" / "hf_moe_offload" / "synth"


def synthesize_preset(
    name: str,
    *,
    max_disk: int = 4 * GiB,
    num_layers: int | None = None,
    root: str | Path | None = None,
    layout: str = "per_expert",
    seed: int = 0,
    progress: bool = True,
) -> tuple[Path, dict]:
    """Write (or reuse) a random checkpoint of preset `name` scaled to `max_disk`, in bf16.

    Args:
        name: a key of `PRESETS`.
        max_disk: the largest checkpoint size in bytes (ignored when `num_layers` is given).
        num_layers: force this many decoder layers.
        root: the cache folder (default `default_synth_dir()`); the model goes to `root/<name>-<layers>l-<layout>`.
        layout: "per_expert" (hub names) or "fused".
        seed: the values' seed.
        progress: show tqdm bars while writing.

    Returns:
        `(folder, info)` with `info` the marker's content: preset, layers, real depth, bytes, layout, seed.
    """
    if num_layers is None:
        num_layers, nbytes = scaled_layers(name, max_disk)
    else:
        nbytes = None
    folder = Path(root or default_synth_dir()) / f"{name}-{num_layers}l-{layout}"
    info = {
        "preset": name,
        "layers": num_layers,
        "real_layers": PRESETS[name]["num_hidden_layers"],
        "layout": layout,
        "seed": seed,
        "dtype": "bfloat16",
    }
    marker = folder / MARKER
    if marker.is_file():
        try:
            if {k: v for k, v in json.loads(marker.read_text()).items() if k in info} == info:
                return folder, json.loads(marker.read_text())
        except json.JSONDecodeError:
            pass
        marker.unlink()
    synthesize_from_config(folder, preset_config(name, num_layers), layout=layout, seed=seed, progress=progress)
    info["checkpoint_bytes"] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    if nbytes is not None:
        info["planned_bytes"] = nbytes
    marker.write_text(json.dumps(info, indent=2) + "\n")
    return folder, info
