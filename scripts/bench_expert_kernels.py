"""Expert matmul kernels per precision, side by side in one run (docs/precision.md, "Why these kernels").

    python scripts/bench_expert_kernels.py [--out 14336] [--in 4096] [--tokens 1,8] [--reps 20]

One expert weight of `out x in` (Mixtral-8x7B's w1 by default), `tokens` activations. Rows:
* bf16 / fp32 `F.linear` (what `expert_dtype="auto"` runs);
* int8: optimum-quanto's tensor subclass through `F.linear`, and the same kernel called on raw slot views
  (`torch._weight_int8pack_mm`);
* int4: quanto's tinygemm tensor subclass, the raw kernel (`torch._weight_int4pack_mm_for_cpu`), and quanto's generic
  int4 tensor (dequantize, then a bf16 matmul: what runs without a CPU int4 kernel);
* for both: our chunked dequantize + bf16 GEMM (precision/dequant.py), and what hf_moe_offload runs ("ours": the
  kernel below `DEQUANT_MIN_ROWS` rows, the chunked GEMM from there on).
Reports microseconds per call, GFLOP/s, the weight bytes streamed per second (GB/s: the figure to hold against the
machine's memory bandwidth, since batch-1 decode is bandwidth-bound) and the fraction of the roofline: the time
`max(FLOPs / bf16 GEMM speed, weight bytes / memory bandwidth)`, both measured first, over the measured time.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import time

import torch
import torch.nn.functional as F

from hf_moe_offload.adapters import ExpertParam
from hf_moe_offload.precision import assemble, encode, pack_specs
from hf_moe_offload.precision.dequant import DEQUANT_MIN_ROWS, linear_dequantized


def _time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _roofline() -> tuple[float, float]:
    """The machine's measured memory read bandwidth (bytes/s: one summing pass over 1 GiB) and bf16 GEMM speed
    (FLOP/s: 4096^3), each the best of a few runs: the roofline each kernel row is held against."""
    big = torch.ones(1 << 28, dtype=torch.float32)
    mem = big.numel() * 4 / _time(big.sum, 3)
    a = torch.randn(4096, 4096).to(torch.bfloat16)
    flops = 2 * 4096**3 / _time(lambda: a @ a, 3)
    return mem, flops


def _int8_kernel(x, p):
    return torch._weight_int8pack_mm(x, p.q, p.scale)


def _int4_kernel(x, p):
    return torch._weight_int4pack_mm_for_cpu(x, p.q, p.spec.group_size, p.scale)


def _copies(weight, working_set: float, nbytes: int):
    """A callable giving the next of enough copies of `weight` (a tensor or a PackedWeight) to fill `working_set`
    bytes, round robin: each call then streams its weight from memory, as an expert freshly read into a slot is."""
    count = max(1, math.ceil(working_set / nbytes))
    if isinstance(weight, torch.Tensor):
        copies = [weight.clone() for _ in range(count)]
    else:
        copies = [dataclasses.replace(weight, q=weight.q.clone(), scale=weight.scale.clone()) for _ in range(count)]
    turn = itertools.cycle(copies)
    return lambda: next(turn)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=int, default=14336)
    ap.add_argument("--in", dest="inp", type=int, default=4096)
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument(
        "--working-set",
        type=float,
        default=1.5,
        help="GiB of copies of each weight cycled through, so that a weight is not in the CPU caches (default 1.5)",
    )
    args = ap.parse_args(argv)
    from optimum.quanto import AbsmaxOptimizer, MaxOptimizer, qint4, qint8, quantize_weight

    torch.manual_seed(0)
    n, k = args.out, args.inp
    w = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
    w32 = w.float()
    packed = {}
    for kind in ("int8", "int4"):
        (spec,) = pack_specs(kind, [ExpertParam("w", (n, k), torch.bfloat16)], False)
        packed[kind] = assemble((spec,), encode(spec, w), dense=False)["w"]
    q8 = quantize_weight(w, qint8, axis=0, scale=AbsmaxOptimizer()(w, qint8, axis=0))
    scale, shift = MaxOptimizer()(w, qint4, axis=0, group_size=128)
    q4 = quantize_weight(w, qint4, axis=0, scale=scale, shift=shift, group_size=128)
    q4g = quantize_weight(w, qint4, axis=0, scale=scale, shift=shift, group_size=128, optimized=False)
    nbytes = {"bf16": 2 * n * k, "fp32": 4 * n * k, "int8": n * k + 2 * n, "int4": n * k // 2 + 4 * n * k // 64}
    ws = args.working_set * 1024**3
    ws_w, ws_w32 = _copies(w, ws, nbytes["bf16"]), _copies(w32, ws, nbytes["fp32"])
    ws_p8, ws_p4 = _copies(packed["int8"], ws, nbytes["int8"]), _copies(packed["int4"], ws, nbytes["int4"])
    mem_Bps, peak_flops = _roofline()
    print(
        f"weight {n} x {k}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}; roofline: memory {mem_Bps / 1e9:.1f} GB/s "
        f"(sum of 1 GiB), bf16 GEMM {peak_flops / 1e9:.0f} GFLOP/s (4096^3); each weight cycled over "
        f"{args.working_set:g} GiB of copies except quanto's (one copy, cache-resident)"
    )
    print("| tokens | kernel | us/call | GFLOP/s | weight GB/s | of roofline |")
    print("|---|---|---|---|---|---|")
    for t in (int(x) for x in args.tokens.split(",")):
        x = torch.randn(t, k, dtype=torch.bfloat16)
        rows = [
            ("bf16 F.linear", "bf16", lambda x=x: F.linear(x, ws_w())),
            ("fp32 F.linear", "fp32", lambda x=x: F.linear(x.float(), ws_w32())),
            ("int8 quanto tensor (F.linear)", "int8", lambda x=x: F.linear(x, q8)),
            ("int8 _weight_int8pack_mm on slot", "int8", lambda x=x: _int8_kernel(x, ws_p8())),
            ("int8 dequantized chunks + bf16 GEMM", "int8", lambda x=x: linear_dequantized(ws_p8(), x)),
            (f"int8 ours (GEMM from {DEQUANT_MIN_ROWS['int8']} rows)", "int8", lambda x=x: ws_p8().linear(x)),
            ("int4 quanto tinygemm tensor (F.linear)", "int4", lambda x=x: F.linear(x, q4)),
            ("int4 _weight_int4pack_mm_for_cpu on slot", "int4", lambda x=x: _int4_kernel(x, ws_p4())),
            ("int4 dequantized chunks + bf16 GEMM", "int4", lambda x=x: linear_dequantized(ws_p4(), x)),
            (f"int4 ours (GEMM from {DEQUANT_MIN_ROWS['int4']} rows)", "int4", lambda x=x: ws_p4().linear(x)),
            ("int4 quanto generic: dequantize, then bf16 matmul", "int4", lambda x=x: F.linear(x, q4g.dequantize())),
        ]
        for name, tier, fn in rows:
            reps = max(2, args.reps // 10) if "dequantize" in name else args.reps
            s = _time(fn, reps)
            roof = max(2 * t * n * k / peak_flops, nbytes[tier] / mem_Bps)
            print(
                f"| {t} | {name} | {s * 1e6:.0f} | {2 * t * n * k / s / 1e9:.1f} | {nbytes[tier] / s / 1e9:.2f} "
                f"| {roof / s:.2f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
