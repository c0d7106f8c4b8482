"""Quantized expert weights (precision/): optimum-quanto's packing, the torch CPU kernels, both orientations."""

import pytest
import torch

from hf_moe_offload.adapters import ExpertParam
from hf_moe_offload.precision import PackedWeight, assemble, encode, matmul, pack_specs
from hf_moe_offload.precision.dequant import CHUNK, DEQUANT_MIN_ROWS, int4_dense_problem, int4_unpack_supported

# Relative error of one quantized matmul on Gaussian weights (documented in docs/precision.md).
REL_ERROR = {"int8": 0.02, "int4": 0.15}


def _packed(kind: str, shape, transposed: bool, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    (spec,) = pack_specs(kind, [ExpertParam("gate_up_proj", shape, dtype)], transposed)
    dense = (torch.randn(shape) * 0.05).to(dtype)
    return spec, dense, encode(spec, dense)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantized_matmul_is_close_to_the_dense_one(kind, transposed, dtype):
    shape = (128, 256) if transposed else (256, 128)  # in = 128 either way... out = 256
    spec, dense, parts = _packed(kind, shape, transposed, dtype)
    assert {k: (tuple(v.shape), v.dtype) for k, v in parts.items()} == {n: (s, d) for n, s, d in spec.parts()}
    w = assemble((spec,), parts, dense=False)["gate_up_proj"]
    assert isinstance(w, PackedWeight)
    x = torch.randn(5, spec.in_features, dtype=dtype)
    got = matmul(x, w, transposed).float()
    want = matmul(x, dense, transposed).float()
    assert got.shape == (5, spec.out_features) and got.dtype == torch.float32
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < REL_ERROR[kind], rel
    # families with their own expert math get the weight dequantized: the kernel agrees
    deq = assemble((spec,), parts, dense=True)["gate_up_proj"]
    assert deq.shape == dense.shape and deq.dtype == dtype
    assert ((matmul(x, deq, transposed).float() - got).norm() / want.norm()).item() < 0.01


def test_int4_layout_check_passes_on_this_torch():
    # The unpacking follows torch's undocumented CPU packing; if a torch upgrade changes it, this says so first.
    assert int4_unpack_supported()
    assert int4_dense_problem(256) is None
    assert "no multiple of 64" in int4_dense_problem(96)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_many_rows_take_the_dequantized_gemm_and_agree_with_the_kernel(kind, transposed, dtype, monkeypatch):
    shape = (128, 2 * CHUNK + 64) if transposed else (2 * CHUNK + 64, 128)  # 3 chunks, the last one partial
    spec, dense, parts = _packed(kind, shape, transposed, dtype)
    w = assemble((spec,), parts, dense=False)["gate_up_proj"]
    rows = DEQUANT_MIN_ROWS[kind]
    x = torch.randn(rows, spec.in_features, dtype=dtype)
    kernel = {"int8": torch._weight_int8pack_mm, "int4": torch._weight_int4pack_mm_for_cpu}[kind]
    calls = []
    monkeypatch.setattr(torch, kernel.__name__, lambda *a: calls.append(1) or kernel(*a))
    got = matmul(x, w, transposed).float()  # rows >= the threshold: no kernel call
    assert calls == []
    want = torch.cat([matmul(x[i : i + 1], w, transposed) for i in range(rows)]).float()  # one row: the kernel
    assert len(calls) == rows
    assert got.shape == want.shape == (rows, spec.out_features)
    assert ((got - want).norm() / want.norm()).item() < 0.01
    assert torch.equal(matmul(x, w, transposed), matmul(x, w, transposed))  # deterministic


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_encoding_is_deterministic_and_smaller(kind):
    spec, dense, a = _packed(kind, (256, 128), False)
    b = encode(spec, dense)
    assert all(torch.equal(a[k], b[k]) for k in a)
    packed = sum(t.numel() * t.element_size() for t in a.values())
    ratio = dense.numel() * dense.element_size() / packed
    assert ratio > (1.9 if kind == "int8" else 3.4), ratio


def test_int4_picks_a_group_the_inputs_allow_and_refuses_otherwise():
    assert pack_specs("int4", [ExpertParam("w", (8, 96), torch.float32)], False)[0].group_size == 32
    assert pack_specs("int4", [ExpertParam("w", (8, 256), torch.float32)], False)[0].group_size == 64
    with pytest.raises(ValueError, match="int4 needs a multiple"):
        pack_specs("int4", [ExpertParam("w", (8, 48), torch.float32)], False)
    with pytest.raises(ValueError, match="only 2-D"):
        pack_specs("int8", [ExpertParam("w", (2, 8, 48), torch.float32)], False)
