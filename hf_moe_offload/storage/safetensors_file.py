"""Safetensors headers, read and checked as strictly as safetensors itself, without touching tensor data.

File format: 8-byte little-endian header length N, N bytes of UTF-8 JSON `{name: {dtype, shape, data_offsets:
[begin, end]}, "__metadata__": {...}}`, then the data section; offsets are relative to its start (byte 8 + N).
`read_header` enforces the rules of safetensors' own reader (`SafeTensors::read_metadata` / `validate`) and raises
`CorruptCheckpointError` naming the file, the tensor and the rule broken:

1. header length: the file holds at least the 8-byte length field; N <= 100,000,000 and 8 + N <= file size.
2. header JSON: the N bytes are valid UTF-8 and one JSON object (no NaN/Infinity, no duplicate keys*).
3. `__metadata__`, when present (and not null): a JSON object mapping strings to strings.
4. tensor entry: every other key maps to an object with exactly* the keys `dtype`, `shape`, `data_offsets`.
5. dtype: a string the installed safetensors knows (asked of its own parser: BOOL, U8/I8 ... F64/C64, F8 variants,
   F4 and F6 sub-byte types), its bits per element read from the name (`DTYPE_BITS`).
6. shape: a list of non-negative integers (no bools, floats, strings or nulls), element count below 2**64.
7. data_offsets: a list of exactly 2 non-negative integers `[begin, end]` with begin <= end.
8. byte size: bits(dtype) x elements is a whole number of bytes (sub-byte dtypes) equal to end - begin.
9. coverage: sorted by offsets, the ranges start at 0 and each begins where the previous one ends (no overlap, no
   gap); the last ends exactly at the end of the file (file size - 8 - N).

(*) Stricter than safetensors, which lets a duplicate key overwrite and ignores extra keys in an entry.

dtypes torch has no element-for-element equivalent for (F4, F6_*) still validate; their `TensorInfo.dtype` is None
and `TensorInfo.torch_dtype` raises `UnsupportedLayoutError` naming the dtype. `checkpoint_files` resolves a model
folder (single file or sharded index) and raises `MissingShardError` for shards the index names but the folder lacks.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass

import torch

from ..errors import CorruptCheckpointError, MissingShardError, UnsupportedLayoutError

__all__ = [
    "TensorInfo",
    "SafetensorsHeader",
    "read_header",
    "checkpoint_files",
    "safetensors_dtypes",
    "DTYPES",
    "DTYPE_BITS",
]

# The dtypes of safetensors 0.8, used only if the installed safetensors' parser stops listing its own (see below).
_SAFETENSORS_08_DTYPES = tuple(
    "BOOL F4 F6_E2M3 F6_E3M2 U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 F8_E4M3FNUZ F8_E5M2FNUZ I16 U16 F16 BF16 I32 U32 F32 C64 F64 "
    "I64 U64".split()
)


def safetensors_dtypes() -> tuple[str, ...]:
    """The dtype names the installed safetensors reads, in its own order.

    Asked of safetensors itself: its parser refuses an unknown dtype with "unknown variant `?`, expected one of
    `BOOL`, `F4`, ...". Falls back to the dtypes of safetensors 0.8 if that message changes form.
    """
    import safetensors

    header = json.dumps({"t": {"dtype": "?", "shape": [0], "data_offsets": [0, 0]}}).encode()
    try:
        safetensors.deserialize(struct.pack("<Q", len(header)) + header)
    except Exception as e:  # noqa: BLE001 - the refusal is the answer
        listed = str(e).partition("expected one of")[2]
        names = re.findall(r"`([A-Z][A-Z0-9_]*)`", listed.partition(" at line")[0])
        if names:
            return tuple(names)
    return _SAFETENSORS_08_DTYPES


def _dtype_bits(name: str) -> int | None:
    """Bits per element, from the name as safetensors writes it: the number after the kind letters (`BF16`: 16,
    `F8_E4M3`: 8, `F4`: 4, `C64`: 64); `BOOL` takes a byte. None for a name of another form."""
    if name == "BOOL":
        return 8
    m = re.match(r"[A-Z]+?(\d+)(_|$)", name)
    return int(m.group(1)) if m else None


# Bits per element of every dtype the installed safetensors knows (F4 and F6_* are packed sub-byte types).
DTYPE_BITS: dict[str, int] = {n: b for n in safetensors_dtypes() if (b := _dtype_bits(n)) is not None}
_TORCH_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
}
# safetensors dtype -> the torch dtype holding one element of it (only those this torch build has).
DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _TORCH_NAMES.items() if hasattr(torch, v)}
_MAX_HEADER = 100_000_000  # safetensors' MAX_HEADER_SIZE
_U64 = 2**64
_FIX = "re-download or re-save this file (e.g. model.save_pretrained) and try again"

_FIELDS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor's bytes lie in its file (absolute offsets).

    `dtype` is the torch dtype of one element, or None when torch has none for the stored `dtype_name`.
    """

    file: str
    dtype: torch.dtype | None
    shape: tuple[int, ...]
    start: int
    end: int
    dtype_name: str = ""
    name: str = ""

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        """`dtype`; raises `UnsupportedLayoutError` (naming the dtype) when torch cannot hold the elements."""
        if self.dtype is None:
            raise UnsupportedLayoutError(
                f"{self.file}: tensor {self.name!r} is stored as safetensors dtype {self.dtype_name}, which has no "
                f"torch dtype (torch {torch.__version__}); hf_moe_offload cannot read it as an expert weight"
            )
        return self.dtype


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def _short(x: object) -> str:
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


def _is_u64(x: object) -> bool:
    return type(x) is int and 0 <= x < _U64  # type() excludes bool


def _json_object(pairs: list[tuple[str, object]]) -> dict:
    """JSON object hook: refuse duplicate keys (*) and lone surrogates (invalid JSON text for serde_json)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    for k, v in pairs:
        (k + v if isinstance(v, str) else k).encode("utf-8")  # UnicodeEncodeError is a ValueError
    return obj


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def read_header(path: str) -> SafetensorsHeader:
    """Parse and validate the header of one safetensors file (the rules are listed in the module docstring).

    Raises:
        MissingShardError: the file does not exist.
        CorruptCheckpointError: the file is truncated or its header breaks a rule; the message names the file, the
            tensor (when the fault is in one) and the rule.
    """

    def bad(rule: str, detail: str, name: str | None = None) -> CorruptCheckpointError:
        where = f"tensor {name!r}: " if name is not None else ""
        return CorruptCheckpointError(f"{path}: {where}{detail} [rule: {rule}]; {_FIX}")

    if not os.path.isfile(path):
        raise MissingShardError(f"safetensors file {path} does not exist; {_FIX}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("header length", f"file has {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise bad(
                "header length",
                f"header length field says {n} bytes but the file has {size} bytes and the limit is {_MAX_HEADER} "
                f"(truncated or not a safetensors file)",
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_json_object, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise bad("header JSON", f"header is not valid UTF-8 ({e})") from None
    except (ValueError, RecursionError) as e:
        raise bad("header JSON", f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header JSON", f"header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__", f"__metadata__ must be a JSON object of string -> string, got {_short(metadata)}")
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != _FIELDS:
            want = "an object with exactly the keys dtype, shape, data_offsets"
            raise bad("tensor entry", f"entry must be {want}, got {_short(info)}", name)
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in DTYPE_BITS:
            raise bad("dtype", f"unknown dtype {_short(dtype_name)}; expected one of {', '.join(DTYPE_BITS)}", name)
        if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
            raise bad("shape", f"shape {_short(shape)} must be a list of non-negative integers", name)
        pair = isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_u64, offsets))
        if not pair or offsets[0] > offsets[1]:
            want = "[begin, end]: exactly 2 non-negative integers with begin <= end"
            raise bad("data_offsets", f"data_offsets {_short(offsets)} must be {want}", name)
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
            if numel >= _U64:
                raise bad("shape", f"shape {_short(shape)} has 2**64 or more elements", name)
        bits = numel * DTYPE_BITS[dtype_name]
        if bits % 8 or bits // 8 != end - begin:
            need = f"{bits // 8} bytes" if bits % 8 == 0 else f"{bits} bits, not a whole number of bytes"
            span = f"data_offsets [{begin}, {end}) span {end - begin} bytes"
            raise bad("byte size", f"{span} but {dtype_name}{shape} needs {need}", name)
        dtype = DTYPES.get(dtype_name)
        tensors[name] = TensorInfo(path, dtype, tuple(shape), base + begin, base + end, dtype_name, name)
    pos, prev = 0, None  # end of the data covered so far, and the tensor that ends there
    for name in sorted(tensors, key=lambda k: (tensors[k].start, tensors[k].end)):
        begin, end = tensors[name].start - base, tensors[name].end - base
        if begin == pos:
            pos, prev = end, name
            continue
        if prev is None:
            what = f"start at byte {begin} of the data section; the first tensor must start at 0"
        elif begin < pos:
            what = f"[{begin}, {end}) overlap tensor {prev!r}, which ends at byte {pos}"
        else:
            what = f"start at byte {begin} but tensor {prev!r} ends at byte {pos}: a gap of {begin - pos} bytes"
        raise bad("coverage", f"data_offsets {what} (ranges must be contiguous, no overlap or gap)", name)
    if pos > size - base:
        what = f"data ends at byte {base + pos}, past the end of the file ({size} bytes): the file is truncated"
        raise bad("coverage", what, prev)
    if pos < size - base:
        raise bad("coverage", f"{size - base - pos} bytes follow the last tensor's data; the file must end there", prev)
    return SafetensorsHeader(path=path, file_size=size, tensors=tensors, metadata=metadata)


def checkpoint_files(folder: str) -> list[str]:
    """The safetensors files of a model folder: the shards of `model.safetensors.index.json`, or `*.safetensors`.

    Raises:
        MissingShardError: the index names a shard that is not in the folder, or there is no safetensors file.
        CorruptCheckpointError: the index is not valid JSON.
    """
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{index}: not a valid safetensors index ({e}); {_FIX}") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise MissingShardError(
                f"{folder}: the index names {len(shards)} shard(s) but {missing} is/are missing; download the "
                f"complete checkpoint (all files listed in model.safetensors.index.json)"
            )
        return [os.path.join(folder, s) for s in shards]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise MissingShardError(
            f"{folder}: no model.safetensors or model.safetensors.index.json found; hf_moe_offload reads experts "
            f"from safetensors files (convert .bin checkpoints with save_pretrained(safe_serialization=True))"
        )
    return [os.path.join(folder, f) for f in files]
