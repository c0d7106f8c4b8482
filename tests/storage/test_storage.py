"""The store reads exactly the expert bytes, in every layout and io mode, and rejects broken files."""

import json
import os
import struct

import pytest
import torch

from hf_moe_offload.adapters import describe_model
from hf_moe_offload.errors import CorruptCheckpointError, MissingShardError
from hf_moe_offload.integration import inspect_checkpoint
from hf_moe_offload.storage import ExpertStore, checkpoint_files, read_header, slot_views
from hf_moe_offload.testing import build_tiny, save_checkpoint


def _expected(model, layer, expert):
    experts = describe_model(model).layers[layer].module
    return {"gate_up_proj": experts.gate_up_proj[expert], "down_proj": experts.down_proj[expert]}


@pytest.mark.parametrize("io_mode", ["fadvise", "direct", "cached"])
def test_store_reads_each_expert_exactly(mixtral_ckpt, io_mode):
    model, folder = mixtral_ckpt
    _, layout, keys = inspect_checkpoint(model, folder)
    assert keys, "the checkpoint's expert keys were found"
    store = ExpertStore(layout, io_mode)
    slot = torch.empty(layout.slot_nbytes, dtype=torch.uint8)
    for layer, expert in [(0, 0), (0, 7), (1, 3)]:
        n = store.read_into(layer, expert, slot)
        views = slot_views(slot, layout, layer)
        for name, want in _expected(model, layer, expert).items():
            assert torch.equal(views[name], want), (io_mode, layer, expert, name)
        assert n == sum(p.nbytes for p in layout.layer_params[layer])
    store.close()


def test_sharded_per_expert_and_fused_layouts_agree(tmp_path):
    model = build_tiny("qwen2_moe")
    a = save_checkpoint(model, str(tmp_path / "a"), "per_expert", shards=2)
    b = save_checkpoint(model, str(tmp_path / "b"), "fused", shards=3)
    assert len(checkpoint_files(a)) > 1 and len(checkpoint_files(b)) == 3
    slots = []
    for folder in (a, b):
        _, layout, _ = inspect_checkpoint(model, folder)
        slot = torch.empty(layout.slot_nbytes, dtype=torch.uint8)
        ExpertStore(layout).read_into(1, 5, slot)
        slots.append(slot)
    assert torch.equal(slots[0], slots[1])


def test_stored_dtype_is_converted_to_model_dtype(tmp_path):
    model = build_tiny("mixtral")  # saved in float32
    folder = save_checkpoint(model, str(tmp_path / "f32"), "fused")
    bf16 = build_tiny("mixtral").to(torch.bfloat16)
    _, layout, _ = inspect_checkpoint(bf16, folder)
    slot = torch.empty(layout.slot_nbytes, dtype=torch.uint8)
    ExpertStore(layout).read_into(0, 2, slot)
    got = slot_views(slot, layout, 0)["down_proj"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, model.model.layers[0].mlp.experts.down_proj[2].to(torch.bfloat16))


def _write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)


def test_header_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4, 4)}, str(good))
    raw = good.read_bytes()
    assert read_header(str(good)).tensors["w"].nbytes == 64

    _write(tmp_path / "short.safetensors", b"\x01\x02")
    with pytest.raises(CorruptCheckpointError, match="too short"):
        read_header(str(tmp_path / "short.safetensors"))

    _write(tmp_path / "len.safetensors", struct.pack("<Q", 10**7) + b"{}")
    with pytest.raises(CorruptCheckpointError, match="header length"):
        read_header(str(tmp_path / "len.safetensors"))

    (n,) = struct.unpack("<Q", raw[:8])
    _write(tmp_path / "json.safetensors", raw[:8] + b"#" * n + raw[8 + n :])
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        read_header(str(tmp_path / "json.safetensors"))

    _write(tmp_path / "trunc.safetensors", raw[:-10])
    with pytest.raises(CorruptCheckpointError, match="past the end"):
        read_header(str(tmp_path / "trunc.safetensors"))

    header = json.loads(raw[8 : 8 + n])
    header["w"]["data_offsets"] = [0, 60]
    body = json.dumps(header).encode().ljust(n)
    _write(tmp_path / "size.safetensors", struct.pack("<Q", len(body)) + body + raw[8 + n :])
    with pytest.raises(CorruptCheckpointError, match="needs 64 bytes"):
        read_header(str(tmp_path / "size.safetensors"))

    with pytest.raises(MissingShardError):
        read_header(str(tmp_path / "absent.safetensors"))


def test_missing_shard_and_empty_folder(tmp_path):
    model = build_tiny("mixtral")
    folder = save_checkpoint(model, str(tmp_path / "m"), "fused", shards=2)
    os.remove(checkpoint_files(folder)[1])
    with pytest.raises(MissingShardError, match="missing"):
        checkpoint_files(folder)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(MissingShardError, match="no model.safetensors"):
        checkpoint_files(str(tmp_path / "empty"))


def test_interleaved_rows_are_reordered_as_transformers_does(tmp_path):
    """Inkling 2 stores `w13_weight` with gate and up rows alternating; the slot holds the model's `[gate; up]`."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import Interleave

    from hf_moe_offload.adapters import Interleaving
    from hf_moe_offload.testing import matrix_config

    w = torch.arange(24.0).reshape(6, 4)
    for inverse in (False, True):
        want = Interleave(dim=1, inverse=inverse).convert({"k": w[None]}, ["k"], ["t"])["t"][0]
        assert torch.equal(Interleaving(0, inverse).apply(w), want)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(matrix_config("inkling2_text"), dtype=torch.float32).eval()
    folder = save_checkpoint(model, str(tmp_path / "hub"), "per_expert")
    _, layout, keys = inspect_checkpoint(model, folder)
    assert any(k.endswith("w13_weight") for k in keys), "the hub layout was saved"
    assert layout.layer_interleave[0][0] == Interleaving(0)
    slot = torch.empty(layout.slot_nbytes, dtype=torch.uint8)
    for layer, expert in [(0, 0), (1, 5)]:
        ExpertStore(layout).read_into(layer, expert, slot)
        for name, want in _expected(model, layer, expert).items():
            assert torch.equal(slot_views(slot, layout, layer)[name], want), (layer, expert, name)
