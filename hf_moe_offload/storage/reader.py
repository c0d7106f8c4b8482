"""`ExpertStore`: reads one expert's bytes from the checkpoint's own files into a slot buffer.

Reads are `preadv` of each piece's byte range straight into the (possibly pinned) slot memory, so an expert costs
one system call per piece and no intermediate copy when the stored dtype is the compute dtype. Whatever the page
cache keeps of those bytes is a second copy of experts we already hold, so by default (`io_mode="fadvise"`) each
range is dropped from the page cache after the read; `"direct"` opens the files with `O_DIRECT` (aligned reads
through a small per-thread bounce buffer) and never fills the page cache; `"cached"` leaves it alone. The store is
thread-safe: file descriptors are shared, scratch buffers are per thread. A quantized piece (FP8, MXFP4) is read
with its scales and dequantized into the slot (quantized.py). A weight whose rows the checkpoint interleaves is
reordered in the slot once all its pieces are in (one in-memory copy of that weight).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

from ..errors import OffloadConfigError
from .layout import ExpertLayout, Piece
from .quantized import dequantize

__all__ = ["ExpertStore", "slot_views"]

_ALIGN = 4096
_DIRECT_CHUNK = 8 * 2**20


def slot_views(slot: torch.Tensor, layout: ExpertLayout, layer: int) -> dict[str, torch.Tensor]:
    """Typed, shaped views of one expert's weights inside a flat uint8 slot."""
    out = {}
    for p, off in zip(layout.layer_params[layer], layout.layer_offsets[layer]):
        out[p.name] = slot[off : off + p.nbytes].view(p.dtype).view(p.shape)
    return out


def _readinto(fd: int, buf: memoryview, offset: int) -> int:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


class ExpertStore:
    """Reads experts described by an `ExpertLayout`.

    Args:
        layout: pieces of every expert.
        io_mode: `"fadvise"`, `"direct"` or `"cached"` (see the module docstring).
    """

    def __init__(self, layout: ExpertLayout, io_mode: str = "fadvise"):
        self.layout = layout
        self.io_mode = io_mode
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._closed = False
        if io_mode == "direct":
            for path in layout.files:  # fail now, with a clear message, rather than in an I/O thread
                self._fd(path)

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            return fd
        with self._lock:
            if path not in self._fds:
                flags = os.O_RDONLY
                if self.io_mode == "direct":
                    flags |= getattr(os, "O_DIRECT", 0)
                try:
                    fd = os.open(path, flags)
                    if self.io_mode == "fadvise":  # no readahead: it would cache neighbouring experts we then hold
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                    self._fds[path] = fd
                except OSError as e:
                    if self.io_mode == "direct":
                        raise OffloadConfigError(
                            f"io_mode='direct': cannot open {path} with O_DIRECT ({e}); this file system may not "
                            f"support it; use io_mode='fadvise'"
                        ) from None
                    raise
            return self._fds[path]

    def _scratch(self, nbytes: int) -> np.ndarray:
        """Per-thread byte buffer aligned to 4096 (for O_DIRECT and dtype conversion)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.size < nbytes:
            raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
            shift = (-raw.ctypes.data) % _ALIGN
            buf = raw[shift : shift + nbytes]
            self._local.buf = buf
        return buf[:nbytes]

    def _read_piece(self, piece: Piece, dst: np.ndarray) -> None:
        self._read_range(piece.file, piece.offset, piece.nbytes, dst)

    def _read_range(self, file: str, offset: int, nbytes: int, dst: np.ndarray) -> None:
        fd = self._fd(file)
        if self.io_mode == "direct":
            pos, end, out = offset, offset + nbytes, 0
            while pos < end:
                a = pos - pos % _ALIGN
                b = min(-(-end // _ALIGN) * _ALIGN, a + _DIRECT_CHUNK)
                scratch = self._scratch(_DIRECT_CHUNK)
                got = _readinto(fd, memoryview(scratch[: b - a]), a)
                take = min(b, end) - pos
                if got < pos - a + take:
                    raise OSError(f"short read from {file} at byte {pos}: file changed or truncated")
                dst[out : out + take] = scratch[pos - a : pos - a + take]
                out += take
                pos += take
            return
        got = _readinto(fd, memoryview(dst), offset)
        if got != nbytes:
            raise OSError(f"short read from {file} at byte {offset}: file changed or truncated")
        if self.io_mode == "fadvise":
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)

    def read_into(self, layer: int, expert: int, slot: torch.Tensor) -> int:
        """Fill `slot` (flat uint8 CPU tensor of at least `layout.slot_nbytes`) with expert `(layer, expert)`.

        Returns:
            The number of bytes read from the files.
        """
        if self._closed:
            raise RuntimeError("ExpertStore is closed")
        slot_np = slot.numpy()
        params = self.layout.layer_params[layer]
        interleave = self.layout.layer_interleave.get(layer) or (None,) * len(params)
        total = 0
        for p, off, pieces, il in zip(
            params, self.layout.layer_offsets[layer], self.layout.pieces[(layer, expert)], interleave
        ):
            item = p.nbytes // max(1, _numel(p.shape))
            for piece in pieces:
                start = off + piece.dst_start * item
                if piece.quant is not None:
                    self._read_quantized(piece, slot[start : start + piece.numel * item].view(p.dtype))
                    total += piece.quant.scale_nbytes
                elif piece.src_dtype == p.dtype:
                    self._read_piece(piece, slot_np[start : start + piece.nbytes])
                else:
                    raw = np.empty(piece.nbytes, dtype=np.uint8)
                    self._read_piece(piece, raw)
                    src = torch.from_numpy(raw).view(piece.src_dtype)
                    slot[start : start + piece.numel * item].view(p.dtype).copy_(src)
                total += piece.nbytes
            if il is not None:
                w = slot[off : off + p.nbytes].view(p.dtype).view(p.shape)
                w.copy_(il.apply(w))
        return total

    def _read_quantized(self, piece: Piece, dst: torch.Tensor) -> None:
        """Read a quantized piece and its scales and dequantize them into `dst` (flat, compute dtype)."""
        q = piece.quant
        data = np.empty(piece.nbytes, dtype=np.uint8)
        scales = np.empty(q.scale_nbytes, dtype=np.uint8)
        self._read_piece(piece, data)
        self._read_range(q.scale_file, q.scale_offset, q.scale_nbytes, scales)
        w = dequantize(q, torch.from_numpy(data), torch.from_numpy(scales), dst.dtype)
        dst.view(w.shape).copy_(w)

    def drop_cached(self) -> int:
        """Drop the expert byte ranges from the page cache (e.g. after loading the other weights through mmap,
        whose readahead pulls neighbouring experts in). Pages that a live mmap maps stay. Returns bytes advised."""
        total = 0
        for path in self.layout.files:
            fd = os.open(path, os.O_RDONLY)
            try:
                for start, end in _merged_ranges(self.layout, path):
                    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
                    total += end - start
            finally:
                os.close(fd)
        return total

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _merged_ranges(layout: ExpertLayout, path: str) -> list[tuple[int, int]]:
    pieces = [p for per in layout.pieces.values() for ps in per for p in ps]
    ranges = [(p.offset, p.offset + p.nbytes) for p in pieces if p.file == path]
    ranges += [
        (p.quant.scale_offset, p.quant.scale_offset + p.quant.scale_nbytes)
        for p in pieces
        if p.quant and p.quant.scale_file == path
    ]
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for a, b in ranges:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged
