"""The load plan: every bad input is refused before transformers loads a weight, and the engine is built from it."""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_moe_offload import OffloadConfig
from hf_moe_offload.errors import (
    BudgetTooSmallError,
    CorruptCheckpointError,
    OffloadConfigError,
    OffloadError,
    UnknownNameError,
)
from hf_moe_offload.integration import loading, make_plan
from hf_moe_offload.integration.plan import CORRELATION_FILE
from hf_moe_offload.storage import reader

# One bad value per OffloadConfig field, with the error it must raise.
BAD_VALUES = {
    "host_budget": ("100KB", BudgetTooSmallError),
    "device_budget": ("lots", OffloadConfigError),
    "policy": ("random", UnknownNameError),
    "io_threads": (0, OffloadConfigError),
    "threads": (0, OffloadConfigError),
    "device": ("cuda:0" if not torch.cuda.is_available() else "tpu", OffloadConfigError),
    "io_mode": ("mmap", OffloadConfigError),
    "prefetch": ("gate_lookahead,oracle", UnknownNameError),
    "prefetch_depth": (9, OffloadConfigError),
    "mode": ("fast", OffloadConfigError),
    "expert_dtype": ("fp4", OffloadConfigError),
    "sidecar": ("/nonexistent/sidecar", OffloadConfigError),  # with expert_dtype 'auto' there is nothing to read
    "expert_fraction": (0.0, OffloadConfigError),
    "mixed_precision": (0.5, OffloadConfigError),  # needs a quantized expert_dtype
}


@pytest.fixture
def spies(monkeypatch):
    """Count calls of transformers' from_pretrained (through the one place that calls it) and of expert reads."""
    calls = {"from_pretrained": 0, "reads": 0}
    load, readinto = loading._load_without_experts, reader._readinto

    def spy_load(*args, **kwargs):
        calls["from_pretrained"] += 1
        return load(*args, **kwargs)

    def spy_read(*args, **kwargs):
        calls["reads"] += 1
        return readinto(*args, **kwargs)

    monkeypatch.setattr(loading, "_load_without_experts", spy_load)
    monkeypatch.setattr(reader, "_readinto", spy_read)
    return calls


def test_every_config_field_has_a_bad_value_case():
    assert set(BAD_VALUES) == {f.name for f in dataclasses.fields(OffloadConfig)}


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_bad_field_is_refused_before_any_weight_is_read(mixtral_dir, spies, field):
    value, error = BAD_VALUES[field]
    with pytest.raises(error) as info:
        AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config={field: value})
    assert isinstance(info.value, OffloadError)
    assert spies == {"from_pretrained": 0, "reads": 0}, f"{field}: work happened before the error"


@pytest.mark.parametrize("damage", ["shape", "garbage"])
def test_corrupt_correlation_table_is_refused_before_loading(tmp_path, mixtral_model, spies, damage):
    from hf_moe_offload.testing import save_checkpoint

    folder = save_checkpoint(mixtral_model, str(tmp_path / "m"), "fused")
    path = os.path.join(folder, CORRELATION_FILE)
    if damage == "shape":
        np.savez_compressed(path, np.zeros((3, 3)))
    else:
        with open(path, "wb") as f:
            f.write(b"not an npz file")
    threads = set(threading.enumerate())
    with pytest.raises(CorruptCheckpointError, match=CORRELATION_FILE):
        AutoModelForCausalLM.from_pretrained(folder, offload_config={"prefetch": "correlation"})
    assert spies == {"from_pretrained": 0, "reads": 0}
    assert set(threading.enumerate()) <= threads, "I/O threads leaked"


def test_budget_hint_is_itself_enough(mixtral_dir):
    with pytest.raises(BudgetTooSmallError) as info:
        AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config={"host_budget": "1KB"})
    hint = str(info.value).split("to at least ")[1].split(" (")[0]
    model = AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config={"host_budget": hint.replace(" ", "")})
    assert model.offload_engine.host_slots == model.offload_engine.topology.max_top_k


def test_engine_is_built_from_the_plan(mixtral_dir, spies):
    model = AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config={"host_budget": "50%"})
    engine = model.offload_engine
    assert spies["from_pretrained"] == 1
    assert engine.layout is engine.plan.layout  # the headers were read once, by the plan
    assert [x.module_name for x in engine.topology.layers] == [x.module_name for x in engine.plan.topology.layers]
    assert all(x.module.gate_up_proj.device.type == "meta" for x in engine.topology.layers)


def test_make_plan_alone_reads_headers_only(mixtral_dir, spies):
    plan = make_plan(AutoModelForCausalLM._model_mapping[type(_config(mixtral_dir))], mixtral_dir, {}, {})
    assert plan.host_slots > 0 and plan.device.type in ("cpu", "cuda")
    assert spies == {"from_pretrained": 0, "reads": 0}


def _config(folder):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def test_close_frees_slots_and_stops_threads(mixtral_dir):
    import gc
    import weakref

    model = AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config={"host_budget": "50%"})
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    cache = model.offload_engine.cache
    assert cache.host.pool.allocated_bytes > 0
    engine_ref = weakref.ref(model.offload_engine)
    threads = list(cache._loader._threads)
    del model
    gc.collect()
    assert engine_ref() is None
    assert cache.host.pool.allocated_bytes == 0
    assert not any(t.is_alive() for t in threads)


def test_closed_engine_raises_a_typed_error(mixtral_dir):
    from hf_moe_offload.errors import OffloadStateError

    model = AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config={"host_budget": "50%"})
    model.offload_engine.close()
    assert model.offload_engine.closed
    with pytest.raises(OffloadStateError, match="closed"):
        model(torch.tensor([[5, 6, 7]]))


def test_layout_knows_whether_keys_are_per_expert(mixtral_ckpt, request):
    from hf_moe_offload.integration.plan import describe_checkpoint

    _, folder = mixtral_ckpt
    _, layout, keys = describe_checkpoint(folder)
    per_expert = request.node.callspec.params["mixtral_ckpt"] == "per_expert"
    assert layout.per_expert_keys is per_expert
    assert len(keys) == (2 * 3 * 8 if per_expert else 2 * 2)  # layers x (w1, w2, w3) x experts | layers x fused


@pytest.mark.parametrize("shards", [1, 2])
def test_a_model_id_in_the_hf_cache_loads_offloaded(tmp_path, mixtral_model, shards):
    """A hub id resolved offline through the local cache layout (refs/main -> snapshots/<sha>), sharded or not."""
    from hf_moe_offload.testing import save_checkpoint

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-mixtral"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    save_checkpoint(mixtral_model, str(repo / "snapshots" / sha), "fused", shards=shards)
    model = AutoModelForCausalLM.from_pretrained(
        "tiny-org/tiny-mixtral", cache_dir=str(tmp_path / "hub"), offload_config={"host_budget": "30%"}
    )
    assert os.path.realpath(model.offload_engine.folder) == os.path.realpath(repo / "snapshots" / sha)
    assert model.name_or_path == model.config._name_or_path == "tiny-org/tiny-mixtral"  # as a load by id reports it
    ids = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, mixtral_model(ids).logits, rtol=1e-5, atol=1e-5)
