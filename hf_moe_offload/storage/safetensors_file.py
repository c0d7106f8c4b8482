"""Safetensors headers, read and checked without touching tensor data.

File format: 8-byte little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets:
[begin, end]}, "__metadata__": {...}}`, then the data; offsets are relative to byte 8 + N. `read_header` checks
everything a byte-range reader relies on (header bounds, JSON, dtypes, offsets inside the file, sizes that match
shape x itemsize) and raises `CorruptCheckpointError` naming the file and the fault. `checkpoint_files` resolves a
model folder (single file or sharded index) and raises `MissingShardError` for shards the index names but the
folder lacks.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from ..errors import CorruptCheckpointError, MissingShardError

__all__ = ["TensorInfo", "SafetensorsHeader", "read_header", "checkpoint_files", "DTYPES"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_MAX_HEADER = 100 * 2**20
_FIX = "re-download or re-save this file (e.g. model.save_pretrained) and try again"


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor's bytes lie in its file (absolute offsets)."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str) -> SafetensorsHeader:
    """Parse and validate the header of one safetensors file.

    Raises:
        MissingShardError: the file does not exist.
        CorruptCheckpointError: the file is truncated or its header is malformed.
    """
    if not os.path.isfile(path):
        raise MissingShardError(f"safetensors file {path} does not exist; {_FIX}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{path}: file has {size} bytes, too short for a safetensors header; {_FIX}")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CorruptCheckpointError(
                f"{path}: header length field says {n} bytes but the file has {size} bytes (truncated or not a "
                f"safetensors file); {_FIX}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: header is not valid JSON ({e}); {_FIX}") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: header must be a JSON object, got {type(header).__name__}; {_FIX}")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} has a malformed header entry {info!r}; {_FIX}"
            ) from None
        if dtype_name not in DTYPES:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype_name!r}; expected one of {', '.join(DTYPES)}"
            )
        dtype = DTYPES[dtype_name]
        numel = 1
        for d in shape:
            numel *= int(d)
        expected = numel * torch.empty((), dtype=dtype).element_size()
        if not (0 <= begin <= end) or end - begin != expected:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} spans bytes [{begin}, {end}) but {dtype_name}{list(shape)} needs "
                f"{expected} bytes; {_FIX}"
            )
        if base + end > size:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} ends at byte {base + end}, past the end of the file ({size} bytes): the "
                f"file is truncated; {_FIX}"
            )
        tensors[name] = TensorInfo(path, dtype, tuple(int(d) for d in shape), base + begin, base + end)
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
