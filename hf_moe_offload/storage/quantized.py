"""Quantized expert weights as checkpoints ship them, and their dequantization into a slot.

```
FP8 (DeepSeek-V3, quant_method "fp8"):  K  float8_e4m3 [out, in]  +  K_scale_inv  f32 [ceil(out/bm), ceil(in/bn)]
MXFP4 (GPT-OSS, quant_method "mxfp4"):  K_blocks  uint8 [out, in/32, 16]  +  K_scales  uint8 E8M0 [out, in/32]
```
(with a leading `[E]` when the checkpoint fuses the experts). `fold_quantized` names each quantized weight by the
key the model would load (`K`) so that transformers' conversion mapping resolves it like any other weight, and
records where its scales lie. `dequantize` repeats transformers' own CPU dequantization (`Fp8Dequantize`,
`convert_moe_packed_tensors`) for one expert: FP8 is `float32(w) * scale_inv` per block; MXFP4 looks each
nibble (low first) up in the E2M1 table and multiplies by `2 ** (scale - 127)`, giving `[out, in]`, which the model
holds transposed (`[in, out]`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .safetensors_file import TensorInfo

__all__ = [
    "SUPPORTED_METHODS",
    "QuantizedWeight",
    "QuantSpec",
    "fold_quantized",
    "checkpoint_quantization",
    "dequantize",
    "FP4_VALUES",
]

SUPPORTED_METHODS = ("fp8", "mxfp4")
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_COMPANIONS = ("activation_scale", "input_scale")  # static activation scales: unused once dequantized


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized checkpoint weight.

    Attributes:
        scheme: `"fp8"` or `"mxfp4"`.
        data: the quantized values (`K`, or `K_blocks`).
        scales: the scales (`K_scale_inv`, or `K_scales`).
        keys: every checkpoint key that belongs to this weight (data, scales and unused companions).
    """

    scheme: str
    data: TensorInfo
    scales: TensorInfo
    keys: tuple[str, ...]


@dataclass(frozen=True)
class QuantSpec:
    """How to dequantize one piece (one expert's part of a quantized weight).

    Attributes:
        scheme: `"fp8"` or `"mxfp4"`.
        dtype: stored dtype of the data (a float8 dtype, or uint8 for MXFP4).
        shape: stored shape of the piece's data, e.g. `(I, H)` (FP8) or `(2I, H/32, 16)` (MXFP4).
        scale_file, scale_offset, scale_nbytes: where the piece's scales lie.
        scale_dtype, scale_shape: their stored dtype and shape.
        block_size: FP8 block `(rows, cols)` from the checkpoint config; None derives it from the scale grid.
    """

    scheme: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    scale_file: str
    scale_offset: int
    scale_nbytes: int
    scale_dtype: torch.dtype
    scale_shape: tuple[int, ...]
    block_size: tuple[int, int] | None = None

    @property
    def expand(self) -> int:
        """Dequantized elements per stored element (MXFP4 packs two values in a byte)."""
        return 2 if self.scheme == "mxfp4" else 1


def fold_quantized(tensors: dict[str, TensorInfo]) -> tuple[dict[str, TensorInfo], dict[str, QuantizedWeight]]:
    """Rename quantized pairs to the key the model loads, drop their companions.

    Returns:
        `(tensors, quantized)`: the table with `K_blocks`/`K_scales` replaced by `K` (the blocks' info) and the
        scale keys removed, and `K -> QuantizedWeight` for every quantized weight. Unquantized keys are unchanged.
    """
    out, quantized = dict(tensors), {}
    for key, info in tensors.items():
        if key.endswith("_blocks") and info.dtype == torch.uint8:
            base = key.removesuffix("_blocks")
            scales = tensors.get(base + "_scales")
            if scales is not None:
                quantized[base] = QuantizedWeight("mxfp4", info, scales, (key, base + "_scales"))
                out[base] = out.pop(key)
                out.pop(base + "_scales")
        elif info.dtype in _FP8 and key + "_scale_inv" in tensors:
            owner = key.rpartition(".")[0]
            extra = tuple(
                k for k in (f"{owner}.{c}" for c in _FP8_COMPANIONS) if k in tensors and key.endswith(".weight")
            )
            quantized[key] = QuantizedWeight(
                "fp8", info, tensors[key + "_scale_inv"], (key, key + "_scale_inv", *extra)
            )
            for k in quantized[key].keys[1:]:
                out.pop(k, None)
    return out, quantized


def checkpoint_quantization(folder: str) -> dict | None:
    """The `quantization_config` of the checkpoint's `config.json` (None when absent or unreadable)."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            q = json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return q if isinstance(q, dict) else None


def _scales_fp32(scales: torch.Tensor) -> torch.Tensor:
    if scales.dtype == torch.uint8:  # E8M0 exponents ("ue8m0")
        return (scales.to(torch.float32) - 127.0).exp2()
    return scales.to(torch.float32)


def _fp8(data: torch.Tensor, scales: torch.Tensor, block: tuple[int, int] | None, dtype: torch.dtype) -> torch.Tensor:
    w, s = data.to(torch.float32), _scales_fp32(scales)
    if s.numel() == 1:
        return (w * s.reshape(())).to(dtype)
    rows, cols = w.shape[-2:]
    s = s.reshape(s.shape[-2:])
    bm, bn = block or (-(-rows // s.shape[0]), -(-cols // s.shape[1]))
    s = s.repeat_interleave(bm, dim=0)[:rows].repeat_interleave(bn, dim=1)[:, :cols]
    return (w * s).to(dtype)


def _mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows, groups, width = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    flat = blocks.reshape(rows * groups, width)
    out = torch.empty(rows * groups, 2 * width, dtype=dtype)
    out[:, 0::2] = lut[(flat & 0x0F).to(torch.int)]
    out[:, 1::2] = lut[(flat >> 4).to(torch.int)]
    torch.ldexp(out, scales.to(torch.int32).reshape(-1, 1) - 127, out=out)
    return out.reshape(rows, groups * 2 * width).t()


def dequantize(spec: QuantSpec, data: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One piece in `dtype`, shaped as the model holds it (contiguous order = the slot's order).

    Args:
        spec: the piece's `QuantSpec`.
        data: its raw bytes (uint8).
        scales: its scales' raw bytes (uint8).
        dtype: the model's compute dtype.
    """
    if spec.scheme == "fp8":
        w = data.view(spec.dtype).view(spec.shape)
        return _fp8(w, scales.view(spec.scale_dtype).view(spec.scale_shape), spec.block_size, dtype)
    if spec.scheme == "mxfp4":
        return _mxfp4(data.view(spec.shape), scales.view(spec.scale_shape), dtype)
    raise ValueError(f"unknown quantization scheme {spec.scheme!r}; known: {', '.join(SUPPORTED_METHODS)}")
