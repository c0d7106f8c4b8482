"""`read_header` enforces safetensors' own header rules, one test case per rule, on real hand-written files.

Each bad file is also checked against safetensors' reader (`safe_open`), so the rules stay no looser than
safetensors'; the two rules where hf_moe_offload is stricter (extra keys in an entry, duplicate JSON keys) say so.
"""

import json
import re
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from hf_moe_offload.errors import CorruptCheckpointError, UnsupportedLayoutError
from hf_moe_offload.storage import checkpoint_files, read_header
from hf_moe_offload.storage.safetensors_file import _SAFETENSORS_08_DTYPES, DTYPE_BITS, DTYPES, safetensors_dtypes
from hf_moe_offload.testing import build_tiny, save_checkpoint

A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
B = {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]}


def _raw(header, data: bytes = bytes(16)) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


_DROP = object()


def _good(**changes) -> dict:
    """The valid header `{"__metadata__", "a", "b.weight"}` with fields of `b.weight` changed (`_DROP`: removed)."""
    b = {k: v for k, v in {**B, **changes}.items() if v is not _DROP}
    return {"__metadata__": {"format": "pt"}, "a": A, "b.weight": b}


def _safetensors_rejects(path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception:
        return True
    return False


# (id, file bytes, tensor named in the message (None: the fault is not in one tensor), rule)
BAD = [
    ("file too short", b"\x01\x02", None, "header length"),
    ("length past end of file", struct.pack("<Q", 10**6) + b"{}", None, "header length"),
    ("length over the limit", struct.pack("<Q", 2**63) + b"{}", None, "header length"),
    ("not UTF-8", _raw(b'{"a\xff": 1}'), None, "header JSON"),
    ("not JSON", _raw(b"{not json}"), None, "header JSON"),
    ("JSON array", _raw(b"[]", b""), None, "header JSON"),
    ("NaN", _raw(b'{"__metadata__": {"k": NaN}}', b""), None, "header JSON"),
    ("lone surrogate", _raw(b'{"__metadata__": {"k": "\\ud800"}}', b""), None, "header JSON"),
    (
        "duplicate tensor (stricter)",
        _raw(b'{"a": %s, "a": %s}' % ((json.dumps(A).encode(),) * 2), bytes(8)),
        None,
        "header JSON",
    ),
    ("metadata not an object", _raw({**_good(), "__metadata__": ["pt"]}), None, "__metadata__"),
    ("metadata value not str", _raw({**_good(), "__metadata__": {"format": 1}}), None, "__metadata__"),
    ("entry not an object", _raw({"a": A, "b.weight": [1, 2]}), "b.weight", "tensor entry"),
    ("entry lacks data_offsets", _raw(_good(data_offsets=_DROP)), "b.weight", "tensor entry"),
    ("entry lacks dtype", _raw(_good(dtype=_DROP)), "b.weight", "tensor entry"),
    ("entry has an extra key (stricter)", _raw(_good(extra=1)), "b.weight", "tensor entry"),
    ("unknown dtype", _raw(_good(dtype="F128")), "b.weight", "dtype"),
    ("dtype not a string", _raw(_good(dtype=2)), "b.weight", "dtype"),
    ("lowercase dtype", _raw(_good(dtype="f16")), "b.weight", "dtype"),
    ("shape not a list", _raw(_good(shape=4)), "b.weight", "shape"),
    ("shape bool", _raw(_good(shape=[True, 4])), "b.weight", "shape"),
    ("shape float", _raw(_good(shape=[2.0, 2])), "b.weight", "shape"),
    ("shape string", _raw(_good(shape=["2", 2])), "b.weight", "shape"),
    ("shape null", _raw(_good(shape=[None, 2])), "b.weight", "shape"),
    ("shape negative", _raw(_good(shape=[-2, -2])), "b.weight", "shape"),
    ("shape overflows u64", _raw(_good(shape=[2**40, 2**40, 0])), "b.weight", "shape"),
    ("offsets 3 ints", _raw(_good(data_offsets=[8, 16, 24])), "b.weight", "data_offsets"),
    ("offsets 1 int", _raw(_good(data_offsets=[8])), "b.weight", "data_offsets"),
    ("offsets negative", _raw(_good(data_offsets=[-8, 0])), "b.weight", "data_offsets"),
    ("offsets bool", _raw(_good(data_offsets=[8, True])), "b.weight", "data_offsets"),
    ("offsets float", _raw(_good(data_offsets=[8.0, 16])), "b.weight", "data_offsets"),
    ("offsets null", _raw(_good(data_offsets=None)), "b.weight", "data_offsets"),
    ("begin after end", _raw(_good(data_offsets=[16, 8])), "b.weight", "data_offsets"),
    ("size != shape x itemsize", _raw(_good(shape=[3])), "b.weight", "byte size"),
    (
        "sub-byte size not whole bytes",
        _raw(_good(dtype="F4", shape=[3], data_offsets=[8, 10]), bytes(10)),
        "b.weight",
        "byte size",
    ),
    ("overlap", _raw(_good(dtype="U8", shape=[8], data_offsets=[4, 12]), bytes(12)), "b.weight", "coverage"),
    ("gap", _raw(_good(data_offsets=[12, 20]), bytes(20)), "b.weight", "coverage"),
    ("first not at 0", _raw({"a": {**A, "data_offsets": [4, 12]}}, bytes(12)), "a", "coverage"),
    ("bytes after the last tensor", _raw(_good(), bytes(20)), "b.weight", "coverage"),
    ("data truncated", _raw(_good(), bytes(12)), "b.weight", "coverage"),
]


@pytest.mark.parametrize("data, tensor, rule", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_each_rule_is_enforced(tmp_path, data, tensor, rule):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(CorruptCheckpointError) as e:
        read_header(str(path))
    msg = str(e.value)
    assert str(path) in msg and f"[rule: {rule}]" in msg and "re-download or re-save" in msg, msg
    if tensor is not None:
        assert f"tensor {tensor!r}" in msg, msg
    assert isinstance(e.value, ValueError)


SAFETENSORS_RULES = [c for c in BAD if "stricter" not in c[0]]


@pytest.mark.parametrize("data", [c[1] for c in SAFETENSORS_RULES], ids=[c[0] for c in SAFETENSORS_RULES])
def test_safetensors_rejects_the_same_files(tmp_path, data):
    """The rules are safetensors' own: its reader refuses every file `read_header` refuses (bar the stricter ones)."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    assert _safetensors_rejects(path)


def test_the_dtypes_are_those_safetensors_reads(tmp_path):
    """Asked of safetensors through another door (`safe_open` on a file): every dtype it lists has a size here."""
    header = {"t": {"dtype": "?", "shape": [0], "data_offsets": [0, 0]}}
    path = tmp_path / "unknown.safetensors"
    path.write_bytes(_raw(header, b""))
    with pytest.raises(Exception, match="expected one of") as e:
        safe_open(str(path), framework="pt")
    listed = re.findall(r"`(\w+)`", str(e.value).split("expected one of")[1])
    assert list(DTYPE_BITS) == listed == list(safetensors_dtypes())
    assert set(_SAFETENSORS_08_DTYPES) <= set(listed)  # the fallback is no wider than safetensors
    with pytest.raises(CorruptCheckpointError, match=r"unknown dtype '\?'; expected one of BOOL, F4, .*U64"):
        read_header(str(path))


@pytest.mark.parametrize("name", list(DTYPE_BITS))
def test_every_safetensors_dtype_is_accepted(tmp_path, name):
    """Hand-written: 8 elements of each dtype (sub-byte ones packed as safetensors packs them), then a zero-size one."""
    nbytes = 8 * DTYPE_BITS[name] // 8
    header = {
        "__metadata__": {"format": "pt"},
        "t": {"dtype": name, "shape": [2, 4], "data_offsets": [0, nbytes]},
        "empty": {"dtype": name, "shape": [0, 3], "data_offsets": [nbytes, nbytes]},
    }
    path = tmp_path / "ok.safetensors"
    path.write_bytes(_raw(header, bytes(nbytes)))
    assert not _safetensors_rejects(path)
    h = read_header(str(path))
    t = h.tensors["t"]
    assert (t.dtype_name, t.shape, t.nbytes, t.start) == (name, (2, 4), nbytes, len(path.read_bytes()) - nbytes)
    assert h.tensors["empty"].nbytes == 0 and h.metadata == {"format": "pt"}
    if name in ("F4", "F6_E2M3", "F6_E3M2"):
        assert t.dtype is None
        with pytest.raises(UnsupportedLayoutError, match=f"'t' is stored as safetensors dtype {name}"):
            _ = t.torch_dtype
    else:
        assert t.torch_dtype is DTYPES[name] and torch.empty((), dtype=t.dtype).element_size() * 8 == DTYPE_BITS[name]


def test_files_written_by_save_file_are_accepted(tmp_path):
    """U16/U32/U64/F8_E8M0 (rejected as corrupt before) and the other torch dtypes, as safetensors writes them."""
    dtypes = [torch.uint16, torch.uint32, torch.uint64, torch.float8_e8m0fnu, torch.float8_e4m3fn, torch.float8_e5m2]
    dtypes += [torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.complex64, torch.bool, torch.bfloat16]
    state = {
        str(d): torch.zeros(3, 5, dtype=d) if d.itemsize > 1 else torch.zeros(3, 5, dtype=torch.uint8).view(d)
        for d in dtypes
    }
    state["fp4"] = torch.zeros(3, 5, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)  # written as F4 [3, 10]
    path = str(tmp_path / "all.safetensors")
    save_file(state, path, metadata={"format": "pt"})
    tensors = read_header(path).tensors
    for d in dtypes:
        assert (tensors[str(d)].dtype, tensors[str(d)].shape, tensors[str(d)].nbytes) == (d, (3, 5), 15 * d.itemsize)
    assert (tensors["fp4"].dtype_name, tensors["fp4"].shape, tensors["fp4"].nbytes) == ("F4", (3, 10), 15)


def test_real_checkpoints_still_pass(mixtral_ckpt, tmp_path):
    model, folder = mixtral_ckpt
    sharded = save_checkpoint(build_tiny("qwen2_moe"), str(tmp_path / "q"), "per_expert", shards=2)
    for path in checkpoint_files(folder) + checkpoint_files(sharded):
        tensors = read_header(path).tensors
        with safe_open(path, framework="pt") as f:
            assert sorted(tensors) == sorted(f.keys())
            for key in f.keys():
                assert tensors[key].nbytes == f.get_tensor(key).nbytes, key


def test_from_pretrained_rejects_overlapping_ranges(tmp_path):
    folder = save_checkpoint(build_tiny("mixtral"), str(tmp_path / "m"), "fused")
    path = checkpoint_files(folder)[0]
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    order = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    (first, a), (second, b) = next(
        (x, y) for x, y in zip(order, order[1:]) if x[0][1] - x[0][0] == y[0][1] - y[0][0] and x[0][1] > x[0][0]
    )
    header[b]["data_offsets"] = first  # b now shares a's bytes; b's own bytes become a gap after it
    body = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    with pytest.raises(CorruptCheckpointError, match=r"overlap tensor .*\[rule: coverage\]") as e:
        AutoModelForCausalLM.from_pretrained(folder, offload_config={"host_budget": "50%"})
    assert path in str(e.value) and (repr(a) in str(e.value) or repr(b) in str(e.value))
