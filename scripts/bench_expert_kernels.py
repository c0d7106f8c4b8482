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
Reports microseconds per call, GFLOP/s and the weight bytes streamed per second (GB/s: the figure to hold against the
machine's memory bandwidth, since batch-1 decode is bandwidth-bound).
"""

from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=int, default=14336)
    ap.add_argument("--in", dest="inp", type=int, default=4096)
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--reps", type=int, default=20)
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
    print(
        f"weight {n} x {k}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print("| tokens | kernel | us/call | GFLOP/s | weight GB/s |")
    print("|---|---|---|---|---|")
    p8, p4 = packed["int8"], packed["int4"]
    for t in (int(x) for x in args.tokens.split(",")):
        x = torch.randn(t, k, dtype=torch.bfloat16)
        rows = [
            ("bf16 F.linear", "bf16", lambda x=x: F.linear(x, w)),
            ("fp32 F.linear", "fp32", lambda x=x: F.linear(x.float(), w32)),
            ("int8 quanto tensor (F.linear)", "int8", lambda x=x: F.linear(x, q8)),
            ("int8 _weight_int8pack_mm on slot", "int8", lambda x=x: torch._weight_int8pack_mm(x, p8.q, p8.scale)),
            ("int8 dequantized chunks + bf16 GEMM", "int8", lambda x=x: linear_dequantized(p8, x)),
            (f"int8 ours (GEMM from {DEQUANT_MIN_ROWS['int8']} rows)", "int8", lambda x=x: p8.linear(x)),
            ("int4 quanto tinygemm tensor (F.linear)", "int4", lambda x=x: F.linear(x, q4)),
            (
                "int4 _weight_int4pack_mm_for_cpu on slot",
                "int4",
                lambda x=x: torch._weight_int4pack_mm_for_cpu(x, p4.q, p4.spec.group_size, p4.scale),
            ),
            ("int4 dequantized chunks + bf16 GEMM", "int4", lambda x=x: linear_dequantized(p4, x)),
            (f"int4 ours (GEMM from {DEQUANT_MIN_ROWS['int4']} rows)", "int4", lambda x=x: p4.linear(x)),
            ("int4 quanto generic: dequantize, then bf16 matmul", "int4", lambda x=x: F.linear(x, q4g.dequantize())),
        ]
        for name, tier, fn in rows:
            reps = max(2, args.reps // 10) if "dequantize" in name else args.reps
            s = _time(fn, reps)
            print(f"| {t} | {name} | {s * 1e6:.0f} | {2 * t * n * k / s / 1e9:.1f} | {nbytes[tier] / s / 1e9:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
