"""`dtype=`, `device_map=`, `model.to(...)` and `torch.compile` with `offload_config`: equal outputs, or one typed error.

CPU only: the CUDA combinations are checked through their validation path (a device_map on another device than the
experts, a map on an accelerator this machine lacks; a move is refused the same way for any target device).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_moe_offload import OffloadConfigError
from hf_moe_offload.errors import UnsupportedFeatureError

X = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}  # as tests/conformance


def _load(folder, offload=None, **kwargs):
    extra = {} if offload is None else {"offload_config": {"host_budget": "50%", **offload}}
    return AutoModelForCausalLM.from_pretrained(folder, **extra, **kwargs).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits.float()


@pytest.fixture(scope="module")
def reference(mixtral_dir):
    return _logits(_load(mixtral_dir))


@pytest.mark.parametrize("dtype", ["auto", "bfloat16", torch.float16])
def test_dtype_forms_load_as_the_normal_model_does(mixtral_dir, dtype):
    normal, offloaded = _load(mixtral_dir, dtype=dtype), _load(mixtral_dir, {}, dtype=dtype)
    assert offloaded.dtype == normal.dtype
    tol = TOL[normal.dtype]  # experts summed in another order than the fused in-memory kernel
    torch.testing.assert_close(_logits(offloaded), _logits(normal), rtol=tol, atol=tol)


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, torch.device("cpu")])
def test_a_device_map_on_the_experts_device_works(mixtral_dir, reference, device_map):
    model = _load(mixtral_dir, {}, device_map=device_map)
    assert model.offload_engine.device == torch.device("cpu")
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device_map", ["cuda", {"": 0}, "cuda:1"])
def test_a_device_map_elsewhere_than_the_experts_is_refused_before_loading(mixtral_dir, device_map):
    with pytest.raises(OffloadConfigError, match="both must be one device"):
        _load(mixtral_dir, {"device": "cpu"}, device_map=device_map)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_auto_follows_the_device_map_and_says_when_that_device_is_missing(mixtral_dir):
    with pytest.raises(OffloadConfigError, match="CUDA is not available"):
        _load(mixtral_dir, {}, device_map={"": "cuda"})


def test_to_where_the_model_already_is_works(mixtral_dir, reference):
    model = _load(mixtral_dir, {})
    for move in (lambda m: m.to("cpu"), lambda m: m.to(torch.float32), lambda m: m.float(), lambda m: m.cpu()):
        assert move(model) is model
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "move, what",
    [
        (lambda m: m.to(torch.bfloat16), "torch.bfloat16"),
        (lambda m: m.half(), "torch.float16"),
        (lambda m: m.to("meta"), "meta"),
        (lambda m: m.to("cpu", torch.float64), "torch.float64"),
    ],
)
def test_moving_or_casting_is_refused_and_leaves_the_model_working(mixtral_dir, reference, move, what):
    model = _load(mixtral_dir, {})
    with pytest.raises(UnsupportedFeatureError, match=f"-> .*{what}.*from_pretrained"):
        move(model)
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_runs_the_experts_eagerly_between_compiled_graphs(mixtral_dir, reference):
    """Dynamo is what must cope with the expert loop (it is kept out of the graphs); the "eager" backend checks that
    in a third of inductor's time (inductor gives the same logits, docs/usage.md)."""
    model = _load(mixtral_dir, {})
    compiled = torch.compile(model, backend="eager")
    for _ in range(2):  # the second call reuses the compiled graphs (guards hold across expert loads)
        torch.testing.assert_close(_logits(compiled), reference, rtol=0, atol=1e-5)
    assert model.offload_stats()["misses"] > 0
