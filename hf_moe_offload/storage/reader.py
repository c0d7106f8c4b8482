"""`ExpertStore`: reads one expert's bytes from the checkpoint's own files into a slot buffer.

Reads are `preadv` of each piece's byte range straight into the (possibly pinned) slot memory, so an expert costs
one system call per piece and no intermediate copy when the stored dtype is the compute dtype. Whatever the page
cache keeps of those bytes is a second copy of experts we already hold, so by default (`io_mode="fadvise"`) each
range is dropped from the page cache after the read; `"direct"` opens the files with `O_DIRECT` (aligned reads
through a small per-thread bounce buffer) and never fills the page cache; `"cached"` leaves it alone.
`OffloadConfig(io_mode="auto")` (the default) is resolved at load by `choose_io_mode`: `"cached"` when every expert
byte fits twice over in the memory left (the page cache then serves misses at memory speed and the kernel can still
reclaim it), else `"direct"` where the file system takes `O_DIRECT` (measured 1.6x `"fadvise"` on a Mixtral-sized
checkpoint under a memory limit: docs/benchmarks.md), else `"fadvise"`. The store is
thread-safe: file descriptors are shared, scratch buffers are per thread. A quantized piece (FP8, MXFP4) is read
with its scales and dequantized into the slot (quantized.py). A weight whose rows the checkpoint interleaves is
reordered in the slot once all its pieces are in (one in-memory copy of that weight).

The files must not change while a model reads from them. The store records each file's identity (size, mtime_ns,
inode) when it is built and holds the files to it: a file opened later (files are opened lazily, then kept open)
must be the one recorded, each read is followed by an `fstat` of its descriptor (a write in place changes the
mtime, a truncation the size), a failed or short read re-checks every path, and `check_files` (called at the start
of each `generate`) stats every path, which is what catches a file replaced by rename: the old inode stays open and
readable, so only the path shows the change. A change raises `CheckpointChangedError`; an I/O error on an unchanged
file raises `ExpertLoadError`.
"""

from __future__ import annotations

import os
import threading
from typing import NamedTuple

import numpy as np
import torch

from ..errors import CheckpointChangedError, ExpertLoadError, MissingShardError, OffloadConfigError, OffloadStateError
from ..precision import assemble
from .layout import ExpertLayout, Piece
from .quantized import dequantize

__all__ = ["ExpertStore", "FileIdentity", "slot_views", "choose_io_mode", "direct_io_supported"]

_ALIGN = 4096
_DIRECT_CHUNK = 8 * 2**20


def slot_views(slot: torch.Tensor, layout: ExpertLayout, layer: int) -> dict[str, torch.Tensor]:
    """Typed, shaped views of one expert's weights inside a flat uint8 slot (for quantized slots: a
    `precision.PackedWeight` per weight, or its dequantized tensor for families with their own expert math)."""
    out = {}
    for p, off in zip(layout.layer_params[layer], layout.layer_offsets[layer]):
        out[p.name] = slot[off : off + p.nbytes].view(p.dtype).view(p.shape)
    specs = layout.layer_packed.get(layer)
    if specs:
        return assemble(specs, out, dense=layer in layout.dense_math_layers)
    return out


def direct_io_supported(path: str) -> bool:
    """Whether `path`'s file system serves an aligned `O_DIRECT` read (tmpfs and some network file systems do not)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return False
    try:
        raw = np.empty(2 * _ALIGN, dtype=np.uint8)
        shift = (-raw.ctypes.data) % _ALIGN
        _readinto(fd, memoryview(raw[shift : shift + _ALIGN]), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def choose_io_mode(files: list[str], expert_nbytes: int, room_nbytes: int) -> tuple[str, str]:
    """The I/O mode `io_mode="auto"` resolves to, and why (see the module docstring).

    Args:
        files: the checkpoint files experts are read from.
        expert_nbytes: bytes of every expert this process reads.
        room_nbytes: host memory left once the non-expert weights and the host budget are in.
    """
    if 2 * expert_nbytes <= room_nbytes:
        return "cached", "the experts fit twice in the memory left: misses are served from the page cache"
    if files and all(direct_io_supported(f) for f in files):
        return "direct", "the experts do not fit in the memory left; O_DIRECT reads keep the page cache out of it"
    return "fadvise", "the experts do not fit in the memory left and the file system refuses O_DIRECT"


class FileIdentity(NamedTuple):
    """What `os.stat` says of a checkpoint file; when any of it changes, its bytes may have changed."""

    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    def change_to(self, now: FileIdentity | None, same_inode: bool = False) -> str | None:
        """How `now` differs from this identity, in words (None: unchanged). `same_inode`: compare an open
        descriptor's `fstat`, whose inode is the one opened, so only size and mtime can differ."""
        if now is None:
            return "was deleted"
        if not same_inode and (now.inode, now.device) != (self.inode, self.device):
            return f"was replaced by another file (inode {self.inode} -> {now.inode})"
        if now.size < self.size:
            return f"was truncated from {self.size} to {now.size} bytes"
        if now.size != self.size:
            return f"changed size from {self.size} to {now.size} bytes"
        if now.mtime_ns != self.mtime_ns:
            return f"was modified in place (mtime_ns {self.mtime_ns} -> {now.mtime_ns})"
        return None


def _changed_error(path: str, what: str) -> CheckpointChangedError:
    return CheckpointChangedError(
        f"checkpoint file {path} {what} since the model was loaded. Experts are read from this file on demand, so "
        f"it must stay unchanged while the model is in use; load the model again (from_pretrained) to use the "
        f"file as it is now"
    )


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
        self._identity: dict[str, FileIdentity] = {}
        for path in layout.files:
            try:
                self._identity[path] = FileIdentity.of(os.stat(path))
            except FileNotFoundError:
                raise MissingShardError(f"checkpoint file {path} does not exist (it was there when planned)") from None
        if io_mode == "direct":
            try:
                for path in layout.files:  # fail now, with a clear message, rather than in an I/O thread
                    self._fd(path)
            except BaseException:
                self.close()
                raise

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
                except OSError as e:
                    self.check_files()
                    if self.io_mode == "direct":
                        raise OffloadConfigError(
                            f"io_mode='direct': cannot open {path} with O_DIRECT ({e}); this file system may not "
                            f"support it; use io_mode='fadvise'"
                        ) from None
                    raise ExpertLoadError(f"cannot open checkpoint file {path}: {e}") from e
                what = self._identity[path].change_to(FileIdentity.of(os.fstat(fd)))
                if what is not None:  # opened lazily: the path may already name another file
                    os.close(fd)
                    raise _changed_error(path, what)
                if self.io_mode == "fadvise":  # no readahead: it would cache neighbouring experts we then hold
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self._fds[path] = fd
            return self._fds[path]

    def check_files(self) -> None:
        """Stat every checkpoint file the experts are read from (one `os.stat` each) against what was recorded when
        the store was built.

        Raises:
            CheckpointChangedError: a file was deleted, replaced (another inode at the path), truncated, resized or
                modified in place (another mtime); the message names the file and the change.
        """
        for path, was in self._identity.items():
            try:
                now = FileIdentity.of(os.stat(path))
            except FileNotFoundError:
                now = None
            what = was.change_to(now)
            if what is not None:
                raise _changed_error(path, what)

    def _check_fd(self, path: str, fd: int) -> None:
        """After a read: the open file was not truncated or written since the store was built."""
        what = self._identity[path].change_to(FileIdentity.of(os.fstat(fd)), same_inode=True)
        if what is not None:
            raise _changed_error(path, what)

    def _failed(self, path: str, fd: int, message: str) -> ExpertLoadError:
        """A read failed or came back short: a changed file raises `CheckpointChangedError`, else the I/O error."""
        self._check_fd(path, fd)
        self.check_files()
        return ExpertLoadError(message)

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
                take = min(b, end) - pos
                self._pread(file, fd, memoryview(scratch[: b - a]), a, pos - a + take)
                dst[out : out + take] = scratch[pos - a : pos - a + take]
                out += take
                pos += take
        else:
            self._pread(file, fd, memoryview(dst), offset, nbytes)
            if self.io_mode == "fadvise":
                os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        self._check_fd(file, fd)

    def _pread(self, file: str, fd: int, buf: memoryview, offset: int, need: int) -> None:
        """Read into `buf` at `offset`; fewer than `need` bytes, or an OS error, is a failed read."""
        try:
            got = _readinto(fd, buf, offset)
        except OSError as e:
            raise self._failed(file, fd, f"reading {len(buf)} bytes at offset {offset} of {file} failed: {e}") from e
        if got < need:
            raise self._failed(
                file,
                fd,
                f"short read of {file}: {got} of {need} bytes at offset {offset}, although the file's size, inode "
                f"and mtime are as when the model was loaded (a failing disk or network file system?)",
            )

    def read_into(self, layer: int, expert: int, slot: torch.Tensor) -> int:
        """Fill `slot` (flat uint8 CPU tensor of at least `layout.slot_nbytes`) with expert `(layer, expert)`.

        Returns:
            The number of bytes read from the files.

        Raises:
            CheckpointChangedError: a file was replaced, rewritten or truncated since the store was built.
            ExpertLoadError: an I/O error or a short read of an unchanged file.
        """
        if self._closed:
            raise OffloadStateError("ExpertStore is closed")
        try:
            return self._read_expert(layer, expert, slot)
        except ExpertLoadError as e:
            raise ExpertLoadError(f"cannot load expert {expert} of MoE layer {layer}: {e}") from e.__cause__

    def _read_expert(self, layer: int, expert: int, slot: torch.Tensor) -> int:
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
