"""Packed expert weights dequantized in chunks of output rows: the fast path for calls with many rows (a prefill).

```
rows of x < DEQUANT_MIN_ROWS[kind]   -> the packed kernel (torch._weight_int8pack_mm / _weight_int4pack_mm_for_cpu)
rows of x >= DEQUANT_MIN_ROWS[kind]  -> per chunk of CHUNK output rows: dequantize into the compute dtype, one GEMM
```
The packed kernels cost time per row (on a 14336 x 4096 Mixtral weight, this 2-core AVX2 machine: about 0.75 ms per
row for int8 and 0.7 ms for int4), while a bf16 GEMM on a dequantized weight costs a fixed dequantization (about
10 ms for int8, 70 ms for int4) and little per row: at 256 rows int8 runs 6x faster this way and int4 2x, at 1024
rows 10x and 5.5x (`python scripts/bench_expert_kernels.py --tokens 1,8,32,256,1024`, docs/precision.md). A chunk of
1024 rows (8 MiB of bf16 at 4096 inputs) stays in the CPU caches and bounds the extra memory; no whole expert is
ever dequantized at once on this path.

int8 `W = q * scale[out]`: the chunk is `q.to(dtype)` and the scale multiplies the GEMM's output columns.
int4 torch's CPU tinygemm packing of `W [N, K]` is `[N/64, K, 32]` bytes: byte `(b, k, j)` holds `W[64b + j, k]` in
its low nibble and `W[64b + 32 + j, k]` in its high one, and a nibble `v` stands for `(v - 8) * scale + zero` with
`(scale, zero) = scale_shift[k // group, n]`. torch does not document this layout, so `int4_unpack_supported` checks
it once per process against the kernel itself; where it differs (another CPU build's packing), int4 stays on the
kernel at every row count and cannot be dequantized.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "DEQUANT_MIN_ROWS",
    "CHUNK",
    "int4_unpack_supported",
    "int4_dense_problem",
    "dequantizes",
    "linear_dequantized",
    "dense_weight",
]

# Rows of x from which dequantize + GEMM beats the packed kernel (crossovers measured by scripts/bench_expert_kernels.py
# on this machine: int8 between 16 and 32 rows, int4 between 64 and 256).
DEQUANT_MIN_ROWS = {"int8": 24, "int4": 128}
CHUNK = 1024  # output rows dequantized at a time (a multiple of int4's 64-row blocks)
_BLOCK = 64  # output rows per int4 tinygemm block


@functools.cache
def int4_unpack_supported() -> bool:
    """Whether this torch's CPU int4 packing is the layout `_int4_rows_t` unpacks: one small weight packed by torch,
    unpacked here and compared with the kernel's own product with the identity (exact in bf16)."""
    n, k, group = 2 * _BLOCK, 64, 32
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    scale_shift = (torch.rand(k // group, n, 2, generator=gen) - 0.5).to(torch.bfloat16)
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        want = torch._weight_int4pack_mm_for_cpu(torch.eye(k, dtype=torch.bfloat16), packed, group, scale_shift).t()
    except (RuntimeError, AttributeError):  # no CPU int4 kernel in this build
        return False
    if packed.shape != (n, k // 2) or packed.dtype != torch.uint8:
        return False
    got = _int4_rows_t(packed, scale_shift, group, 0, n, torch.float32).t()
    return bool(torch.allclose(got, want.float(), rtol=0.02, atol=0.02))


def _int4_rows_t(q: torch.Tensor, scale_shift: torch.Tensor, group: int, n0: int, n1: int, dtype) -> torch.Tensor:
    """Output rows `n0:n1` of a packed int4 weight, dequantized and transposed: `[K, n1 - n0]` in `dtype`."""
    k = q.shape[1] * 2
    blocks = q.view(-1, k, _BLOCK // 2)[n0 // _BLOCK : n1 // _BLOCK].permute(1, 0, 2)  # [K, blocks, 32]
    v = torch.stack((blocks & 0xF, blocks >> 4), 2).to(dtype).view(k // group, group, n1 - n0)
    scale = scale_shift[:, n0:n1, 0].to(dtype)
    zero = scale_shift[:, n0:n1, 1].to(dtype) - 8 * scale
    return torch.addcmul(zero[:, None], v, scale[:, None]).view(k, n1 - n0)


def int4_dense_problem(out_features: int) -> str | None:
    """Why an int4 weight with `out_features` outputs cannot be dequantized here, or None when it can."""
    if out_features % _BLOCK:
        return f"int4 weights are unpacked in blocks of {_BLOCK} outputs, and {out_features} is no multiple of {_BLOCK}"
    if not int4_unpack_supported():
        return (
            f"this torch ({torch.__version__}) packs int4 weights on the CPU in a layout hf_moe_offload does not unpack"
        )
    return None


def dequantizes(weight) -> bool:
    """Whether `weight` (a `PackedWeight`) can be dequantized here: every int8 weight; int4 where
    `int4_dense_problem` finds none."""
    spec = weight.spec
    return spec.kind == "int8" or (spec.kind == "int4" and int4_dense_problem(spec.out_features) is None)


def _rows_t(weight, n0: int, n1: int, dtype) -> torch.Tensor:
    if weight.spec.kind == "int8":
        return weight.q[n0:n1].to(dtype).t()
    return _int4_rows_t(weight.q, weight.scale, weight.spec.group_size, n0, n1, dtype)


def linear_dequantized(weight, x: torch.Tensor) -> torch.Tensor:
    """`x @ W.T` for a `PackedWeight` (`dequantizes(weight)`), `x` `(n, in)` in the scales' dtype, chunk by chunk."""
    n = weight.spec.out_features
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for n0 in range(0, n, CHUNK):
        n1 = min(n, n0 + CHUNK)
        out[:, n0:n1] = x @ _rows_t(weight, n0, n1, x.dtype)
    if weight.spec.kind == "int8":
        out.mul_(weight.scale)
    return out


def dense_weight(weight) -> torch.Tensor:
    """The whole dequantized weight `[out, in]` in the scales' dtype (`dequantizes(weight)`): for families with their
    own expert math, which multiply dense weights themselves."""
    if weight.spec.kind == "int8":
        return weight.q.to(weight.scale.dtype) * weight.scale[:, None]
    spec = weight.spec
    return (
        _int4_rows_t(weight.q, weight.scale, spec.group_size, 0, spec.out_features, weight.scale.dtype).t().contiguous()
    )
