"""`SlotPool`: fixed-size expert slots on one device, allocated on first use.

All experts of a model have the same size, so a memory tier is a pool of `n_slots` flat uint8 buffers of
`slot_nbytes`: no fragmentation, never more than the budget allows, and moving an expert is one contiguous copy.
"""

from __future__ import annotations

import torch

__all__ = ["SlotPool"]


class SlotPool:
    """`n_slots` flat uint8 buffers of `slot_nbytes` on `device`, allocated lazily."""

    def __init__(self, name: str, n_slots: int, slot_nbytes: int, device: torch.device, pin_memory: bool = False):
        self.name, self.n_slots, self.slot_nbytes = name, n_slots, slot_nbytes
        self.device, self.pin_memory = device, pin_memory
        self.free_buffers()

    def take(self) -> int | None:
        return self._free.pop() if self._free else None

    def give(self, idx: int) -> None:
        self._free.append(idx)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def buffer(self, idx: int) -> torch.Tensor:
        buf = self._buffers[idx]
        if buf is None:
            buf = torch.empty(self.slot_nbytes, dtype=torch.uint8, device=self.device, pin_memory=self.pin_memory)
            self._buffers[idx] = buf
        return buf

    def free_buffers(self) -> None:
        """Every slot free and unallocated: the initial state, and after `ExpertCache.close` (no expert in use)."""
        self._buffers: list[torch.Tensor | None] = [None] * self.n_slots
        self._free = list(range(self.n_slots - 1, -1, -1))
        # CUDA: the event after the last kernel that read each slot; a copy into the slot waits on it
        self.release_events: list = [None] * self.n_slots

    @property
    def allocated_bytes(self) -> int:
        return sum(b.numel() for b in self._buffers if b is not None)
