"""Expert precisions: how one expert's weights are held in a cache slot and multiplied.

```
expert_dtype  one weight W [out, in] (F.linear orientation) in a slot                 matmul
"auto"        W as the model computes it (the checkpoint's bytes, converted if needed)  F.linear / x @ W
"int8"        q int8 [out, in] + scale [out]            (per output channel, absmax)     torch._weight_int8pack_mm
"int4"        q uint8 [out, in/2] (tinygemm CPU packing) + scale_shift [in/g, out, 2]    torch._weight_int4pack_mm_for_cpu
              (groups of g inputs, asymmetric min-max)
```
From `dequant.DEQUANT_MIN_ROWS` rows on (a prefill), a packed weight is instead dequantized chunk by chunk into the
compute dtype and multiplied by one GEMM, which is faster there (dequant.py).
The quantization (scales, shifts, rounding, packing) is optimum-quanto's (`AbsmaxOptimizer`, `MaxOptimizer`,
`quantize_weight`, its tinygemm packing); the matmuls are the torch CPU kernels that quanto itself dispatches to,
called on the slot's views so that no tensor subclass is built per call and no expert is dequantized per decode call.
Scales keep the model's dtype, so the kernels take the activations as they come. A weight whose input size no
group size divides (int4) is refused when the load is planned.

Families whose per-expert math is their own (not transformers' `ExpertsInterface`) get each weight dequantized back
to its dense shape (`PackedWeight.dense`), which is correct but not faster; int4 only where `dequant.dequantizes`
(torch's packing is the layout it unpacks, whole 64-row blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dequant import DEQUANT_MIN_ROWS, dense_weight, dequantizes, int4_dense_problem, linear_dequantized

__all__ = ["EXPERT_DTYPES", "INT4_GROUP_SIZES", "PackedSpec", "PackedWeight", "pack_specs", "encode", "assemble"]

EXPERT_DTYPES = ("auto", "int8", "int4")
INT4_GROUP_SIZES = (64, 128, 32)  # preferred first (64: 4.5 bits per weight, as llama.cpp Q4_K_M); tinygemm takes these


@dataclass(frozen=True)
class PackedSpec:
    """How one dense expert weight is stored quantized.

    Attributes:
        name: the weight's name (`"gate_up_proj"`).
        kind: `"int8"`, `"int4"`, or `"dense"` (kept in the compute dtype: a subset of neurons at full precision).
        dense_shape: the weight's per-expert shape as the model holds it.
        dtype: the model's compute dtype (scales keep it).
        transposed: the model holds the weight as `[in, out]` (`x @ W`), not `[out, in]` (`F.linear`).
        group_size: inputs per int4 group (0 for int8).
    """

    name: str
    kind: str
    dense_shape: tuple[int, ...]
    dtype: torch.dtype
    transposed: bool
    group_size: int = 0

    @property
    def out_features(self) -> int:
        return self.dense_shape[-1] if self.transposed else self.dense_shape[0]

    @property
    def in_features(self) -> int:
        return self.dense_shape[0] if self.transposed else self.dense_shape[-1]

    def parts(self) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
        """`(name, shape, dtype)` of each tensor this weight is stored as."""
        n, k = self.out_features, self.in_features
        if self.kind == "dense":
            return ((self.name, self.dense_shape, self.dtype),)
        if self.kind == "int8":
            return ((f"{self.name}.q", (n, k), torch.int8), (f"{self.name}.scale", (n,), self.dtype))
        return (
            (f"{self.name}.q", (n, k // 2), torch.uint8),
            (f"{self.name}.scale_shift", (k // self.group_size, n, 2), self.dtype),
        )


@dataclass(frozen=True)
class PackedWeight:
    """A quantized weight in a slot, ready to multiply: `linear(x) == x @ W.T` for `W [out, in]`."""

    spec: PackedSpec
    q: torch.Tensor
    scale: torch.Tensor

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """`(n, in) -> (n, out)` in the scales' dtype."""
        x = x.to(self.scale.dtype)
        if x.shape[0] >= DEQUANT_MIN_ROWS[self.spec.kind] and dequantizes(self):
            return linear_dequantized(self, x)
        if self.spec.kind == "int8":
            return torch._weight_int8pack_mm(x, self.q, self.scale)
        return torch._weight_int4pack_mm_for_cpu(x, self.q, self.spec.group_size, self.scale)

    def dense(self) -> torch.Tensor:
        """The dequantized weight in the model's shape and dtype (for families with their own expert math).

        Raises:
            ValueError: an int4 weight `dequant.dequantizes` cannot unpack (see there).
        """
        if not dequantizes(self):
            raise ValueError(
                f"{self.spec.name}: this int4 weight ({self.spec.out_features} outputs) cannot be dequantized here: "
                f"{int4_dense_problem(self.spec.out_features)}"
            )
        w = dense_weight(self)  # [out, in]
        return w.t() if self.spec.transposed else w


def _int4_group(in_features: int) -> int | None:
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


def pack_specs(kind: str, params, transposed: bool | None) -> tuple[PackedSpec, ...]:
    """The `PackedSpec` of each dense weight (`ExpertParam`s of one layer).

    Args:
        kind: `"int8"`, `"int4"` or `"dense"`.
        params: the layer's `ExpertParam`s (name, per-expert shape, compute dtype).
        transposed: whether the family multiplies `x @ W` (`[in, out]`); None for families with their own math
            (their weights are quantized along their stored rows and dequantized for use).

    Raises:
        ValueError: a weight is not 2-D, or (int4) no group size divides its input size.
    """
    out = []
    for p in params:
        if len(p.shape) != 2 and kind != "dense":
            raise ValueError(f"expert weight {p.name!r} has shape {list(p.shape)}; only 2-D weights can be quantized")
        spec = PackedSpec(p.name, kind, tuple(p.shape), p.dtype, bool(transposed))
        if kind == "int4":
            group = _int4_group(spec.in_features)
            if group is None:
                raise ValueError(
                    f"expert weight {p.name!r} {list(p.shape)} has {spec.in_features} inputs; int4 needs a multiple "
                    f"of one of the group sizes {INT4_GROUP_SIZES}"
                )
            spec = PackedSpec(p.name, kind, tuple(p.shape), p.dtype, bool(transposed), group)
        out.append(spec)
    return tuple(out)


def encode(spec: PackedSpec, dense: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantize one expert's dense weight with optimum-quanto; returns `{part name: tensor}` as `spec.parts()`."""
    if spec.kind == "dense":
        return {spec.name: dense.to(spec.dtype)}
    from optimum.quanto import AbsmaxOptimizer, MaxOptimizer, qint4, qint8, quantize_weight
    from optimum.quanto.tensor.weights.tinygemm import TinyGemmWeightQBitsTensor

    w = (dense.t() if spec.transposed else dense).to(spec.dtype).contiguous()  # [out, in]
    if spec.kind == "int8":
        scale = AbsmaxOptimizer()(w, qint8, axis=0)
        qw = quantize_weight(w, qint8, axis=0, scale=scale, optimized=False)
        return {f"{spec.name}.q": qw._data, f"{spec.name}.scale": qw._scale.reshape(-1).to(spec.dtype)}
    scale, shift = MaxOptimizer()(w, qint4, axis=0, group_size=spec.group_size)
    qw = quantize_weight(w, qint4, axis=0, scale=scale, shift=shift, group_size=spec.group_size, optimized=False)
    tg = TinyGemmWeightQBitsTensor(
        qint4, 0, spec.group_size, w.size(), w.stride(), qw._data.unpack(), (qw._scale, qw._shift)
    )
    return {f"{spec.name}.q": tg._data._data, f"{spec.name}.scale_shift": tg._scale_shift.to(spec.dtype)}


def assemble(specs: tuple[PackedSpec, ...], views: dict[str, torch.Tensor], dense: bool) -> dict:
    """The weights an expert function takes, from a slot's part views: a `PackedWeight` per weight, or (`dense`,
    for families with their own expert math) the dequantized tensor."""
    out = {}
    for spec in specs:
        if spec.kind == "dense":
            out[spec.name] = views[spec.name]
            continue
        q = views[f"{spec.name}.q"]
        scale = views[f"{spec.name}.scale" if spec.kind == "int8" else f"{spec.name}.scale_shift"]
        w = PackedWeight(spec, q, scale)
        out[spec.name] = w.dense() if dense else w
    return out


def matmul(x: torch.Tensor, weight, transposed: bool) -> torch.Tensor:
    """`x` times one expert weight as the family multiplies it: dense `[in, out]` (`transposed`), dense
    `[out, in]`, or a `PackedWeight`."""
    if isinstance(weight, PackedWeight):
        return weight.linear(x)
    x = x.to(weight.dtype)
    return x @ weight if transposed else F.linear(x, weight)
