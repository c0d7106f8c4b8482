"""Random MoE checkpoints on disk, written shard by shard, for tests and benchmarks.

A benchmark of expert offloading needs checkpoints larger than memory, in the layouts that real checkpoints use,
without downloading anything. This module writes them:

```
config ──> meta model ──> [tensor plan: key, shape, pieces] ──> [shard plan] ──> shard 1 .. shard n + index
                                     (no data yet)             (sizes only)      (generated, written, freed)
```

* The tensor plan comes from the model built on the `meta` device, so key names and shapes are exactly those
  of transformers (the "fused" layout: `mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`).
  The "per_expert" layout renders each fused expert tensor as one 2-D tensor per expert under the names the hub
  checkpoints use (Mixtral: `block_sparse_moe.experts.{e}.w1/w3/w2.weight`), and transformers' conversion
  mapping fuses them back at load time. The names are those of `hf_moe_offload.testing.per_expert_keys`, the
  same table the tests hold to what `save_pretrained` writes.
* Every value is drawn from a generator seeded by the seed and a canonical name of its *piece* (one expert's
  gate, up or down matrix, or one whole non-expert tensor), so both layouts hold identical values and load into
  identical models. Norm weights are ones, other 1-D tensors zeros, matrices N(0, std).
* The shard plan is computed from sizes before any data exists, so the file names (`model-00001-of-0000n`) are
  known up front; then each shard's tensors are generated, written with `safetensors.torch.save_file` and freed.
  Peak memory is about one shard plus one float32 piece.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, PretrainedConfig

from ..testing.checkpoints import per_expert_keys

__all__ = ["synthesize_from_config", "synthesize_mixtral"]

GiB = 1024**3


@dataclass(frozen=True)
class _Piece:
    """A slice of an output tensor filled from one seeded generator: `out[index] = N(0, std)` of `shape`."""

    name: str
    index: tuple[slice | int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Tensor:
    key: str
    shape: tuple[int, ...]
    fill: str  # "normal", "ones" or "zeros"
    pieces: tuple[_Piece, ...]


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


def _is_expert(key: str, shape: tuple[int, ...]) -> bool:
    return ".experts." in key and len(shape) == 3


def _expert_pieces(key: str, shape: tuple[int, ...]) -> tuple[_Piece, ...]:
    """One piece per expert, and per gate/up half for a fused gate-up tensor (split along dim 1)."""
    pieces = []
    for e in range(shape[0]):
        if key.endswith("gate_up_proj"):
            half = shape[1] // 2
            for j, part in enumerate(("gate", "up")):
                index = (e, slice(j * half, (j + 1) * half))
                pieces.append(_Piece(f"{key}[{e}].{part}", index, (half, *shape[2:])))
        else:
            pieces.append(_Piece(f"{key}[{e}]", (e,), shape[1:]))
    return tuple(pieces)


def _fused_plan(config: PretrainedConfig) -> list[_Tensor]:
    """The checkpoint tensors of `config`'s causal-LM model as transformers names them, from a meta model."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = dict(model.named_parameters())  # deduplicated: a tied lm_head appears once
    all_params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    plan = []
    for key, tensor in model.state_dict().items():
        if key in all_params and key not in params:
            continue
        shape = tuple(tensor.shape)
        if _is_expert(key, shape):
            plan.append(_Tensor(key, shape, "normal", _expert_pieces(key, shape)))
            continue
        fill = "normal" if len(shape) >= 2 else ("ones" if "norm" in key else "zeros")
        plan.append(_Tensor(key, shape, fill, (_Piece(key, (), shape),)))
    return plan


def _per_expert_plan(plan: list[_Tensor], model_type: str) -> list[_Tensor]:
    """Render the fused plan with one 2-D tensor per expert piece, named by `per_expert_keys` (pieces and keys are
    both expert-major, gate before up)."""
    out = []
    for tensor in plan:
        if not _is_expert(tensor.key, tensor.shape):
            (key,) = per_expert_keys(model_type, tensor.key)
            out.append(_Tensor(key, tensor.shape, tensor.fill, tensor.pieces))
            continue
        keys = per_expert_keys(model_type, tensor.key, num_experts=tensor.shape[0])
        for key, piece in zip(keys, tensor.pieces, strict=True):
            out.append(_Tensor(key, piece.shape, "normal", (_Piece(piece.name, (), piece.shape),)))
    return out


def _nbytes(tensor: _Tensor, dtype: torch.dtype) -> int:
    return math.prod(tensor.shape) * dtype.itemsize


def _shard_plan(plan: list[_Tensor], dtype: torch.dtype, shard_bytes: int) -> list[list[_Tensor]]:
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for tensor in plan:
        nbytes = _nbytes(tensor, dtype)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    return shards


def _generate(tensor: _Tensor, dtype: torch.dtype, seed: int, std: float) -> torch.Tensor:
    if tensor.fill == "ones":
        return torch.ones(tensor.shape, dtype=dtype)
    if tensor.fill == "zeros":
        return torch.zeros(tensor.shape, dtype=dtype)
    out = torch.empty(tensor.shape, dtype=dtype)
    for piece in tensor.pieces:
        generator = torch.Generator().manual_seed(_seed(seed, piece.name))
        values = torch.randn(piece.shape, generator=generator, dtype=torch.float32).mul_(std)
        out[piece.index] = values.to(dtype)
    return out


def _shard_names(n: int) -> Iterator[str]:
    if n == 1:
        yield "model.safetensors"
        return
    for i in range(n):
        yield f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def synthesize_from_config(
    out_dir: str | Path,
    config: PretrainedConfig,
    *,
    layout: str = "fused",
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 2 * GiB,
    seed: int = 0,
    std: float = 0.02,
    progress: bool = True,
) -> Path:
    """Write a random checkpoint for `config` (any causal LM transformers can build) to `out_dir`.

    Writes `config.json`, then one `model.safetensors` or several `model-0000i-of-0000n.safetensors` shards plus
    `model.safetensors.index.json`, holding at most one shard in memory.

    Args:
        out_dir: the directory to create or fill.
        config: the model config; its `dtype` is set to `dtype` in the saved `config.json`.
        layout: "fused" (transformers 5 names, 3-D experts) or "per_expert" (one tensor per expert, hub names;
            known model types are the keys of `hf_moe_offload.testing.PER_EXPERT_NAMES`).
        dtype: the dtype of every tensor on disk.
        shard_bytes: the largest shard size in bytes (a single larger tensor gets a shard of its own).
        seed: the seed; equal seeds give equal values in both layouts.
        std: the standard deviation of matrix values.
        progress: show a tqdm bar over the bytes written.

    Returns:
        The output directory as a `Path`.
    """
    if layout not in ("fused", "per_expert"):
        raise ValueError(f"layout must be 'fused' or 'per_expert', got {layout!r}")
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be > 0, got {shard_bytes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _fused_plan(config)
    if layout == "per_expert":
        plan = _per_expert_plan(plan, config.model_type)
    shards = _shard_plan(plan, dtype, shard_bytes)
    names = list(_shard_names(len(shards)))
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)

    config = copy.deepcopy(config)
    config.dtype = dtype
    config.save_pretrained(out)
    total = sum(_nbytes(t, dtype) for t in plan)
    weight_map = {}
    umask = os.umask(0)
    os.umask(umask)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"synthesize {out.name}", disable=not progress) as bar:
        for name, shard in zip(names, shards, strict=True):
            tensors = {}
            for tensor in shard:
                tensors[tensor.key] = _generate(tensor, dtype, seed, std)
                weight_map[tensor.key] = name
                bar.update(_nbytes(tensor, dtype))
            save_file(tensors, str(out / name), metadata={"format": "pt"})
            (out / name).chmod(0o666 & ~umask)  # save_file creates the file private (0600)
            del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


def _default_kv_heads(heads: int) -> int:
    return max(d for d in range(1, max(1, heads // 4) + 1) if heads % d == 0)


def synthesize_mixtral(
    out_dir: str | Path,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_experts: int = 8,
    top_k: int = 2,
    vocab_size: int = 32000,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    layout: str = "per_expert",
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 2 * GiB,
    seed: int = 0,
    std: float = 0.02,
    progress: bool = True,
    **config_kwargs,
) -> Path:
    """Write a random Mixtral-shaped checkpoint to `out_dir` (see `synthesize_from_config`).

    Args:
        out_dir: the directory to create or fill.
        hidden_size: H.
        intermediate_size: I, the size of one expert's hidden layer.
        num_layers: the number of decoder layers.
        num_experts: E, experts per layer.
        top_k: experts used per token.
        vocab_size: the vocabulary size.
        num_attention_heads: defaults to `hidden_size // 64` (head dim 64).
        num_key_value_heads: defaults to the largest divisor of the head count that is at most a quarter of it.
        layout: "per_expert" (as on the hub) or "fused" (as transformers 5 saves it).
        dtype, shard_bytes, seed, std, progress: as in `synthesize_from_config`.
        **config_kwargs: further `MixtralConfig` fields.

    Returns:
        The output directory as a `Path`.

    Example:
        ```python
        >>> path = synthesize_mixtral("/tmp/mixtral-tiny", hidden_size=64, intermediate_size=128, num_layers=2,
        ...                           vocab_size=256, num_attention_heads=4, num_key_value_heads=2)
        >>> model = MixtralForCausalLM.from_pretrained(path)
        ```
    """
    heads = num_attention_heads or max(1, hidden_size // 64)
    config = MixtralConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        vocab_size=vocab_size,
        num_attention_heads=heads,
        num_key_value_heads=num_key_value_heads or _default_kv_heads(heads),
        **config_kwargs,
    )
    return synthesize_from_config(
        out_dir, config, layout=layout, dtype=dtype, shard_bytes=shard_bytes, seed=seed, std=std, progress=progress
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m hf_moe_offload.bench.synth OUT --hidden-size 1024 ...`: write a random Mixtral checkpoint."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--intermediate-size", type=int, default=3584)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--layout", choices=("per_expert", "fused"), default="per_expert")
    parser.add_argument("--shard-gib", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", help="a config.json or model dir to synthesize instead of Mixtral")
    args = parser.parse_args(argv)
    kwargs = dict(layout=args.layout, shard_bytes=int(args.shard_gib * GiB), seed=args.seed)
    if args.config:
        path = synthesize_from_config(args.out_dir, AutoConfig.from_pretrained(args.config), **kwargs)
    else:
        path = synthesize_mixtral(
            args.out_dir,
            hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size,
            num_layers=args.num_layers,
            num_experts=args.num_experts,
            top_k=args.top_k,
            vocab_size=args.vocab_size,
            **kwargs,
        )
    print(path)


if __name__ == "__main__":
    main()
