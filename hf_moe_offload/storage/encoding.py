"""`EncodingStore`: quantized experts computed on each load from the checkpoint's own (dense) bytes.

```
checkpoint --ExpertStore.read_into--> per-thread staging slot (dense layout) --precision.encode--> cache slot (packed)
```
Used when `expert_dtype` is quantized and no prepared sidecar exists: the original files stay the only source, and
each miss reads the dense bytes (no fewer than at full precision) but the cache holds 2-4x more experts in the same
budget. With a sidecar (`storage.sidecar`) the packed bytes are read straight into the slot instead.
"""

from __future__ import annotations

import threading

import torch

from ..precision import encode
from ..precision.neurons import select_neurons
from .layout import ExpertLayout
from .reader import ExpertStore, slot_views

__all__ = ["EncodingStore", "encode_expert"]


def encode_expert(layout: ExpertLayout, layer: int, expert: int, dense: dict[str, torch.Tensor]) -> dict:
    """The parts a slot of `layout` holds for one expert, from its dense weights: the kept neurons
    (`layout.layer_neurons`), then each weight packed (`precision.encode`)."""
    plan = layout.layer_neurons.get(layer)
    if plan is not None:
        dense = select_neurons(plan, expert, dense)
    parts = {}
    for spec in layout.layer_packed[layer]:
        parts.update(encode(spec, dense[spec.name]))
    return parts


class EncodingStore:
    """An `ExpertStore` look-alike whose slots hold quantized experts.

    Args:
        dense: the store reading the checkpoint's dense experts.
        layout: the packed slot layout (`storage.layout.packed_layout`).
    """

    def __init__(self, dense: ExpertStore, layout: ExpertLayout):
        self.dense, self.layout = dense, layout
        self.io_mode = dense.io_mode
        self._local = threading.local()

    def _staging(self) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = torch.empty(self.dense.layout.slot_nbytes, dtype=torch.uint8)
            self._local.buf = buf
        return buf

    def read_into(self, layer: int, expert: int, slot: torch.Tensor) -> int:
        """Read expert `(layer, expert)` at full precision and write its packed form into `slot`; returns the bytes
        read from the checkpoint."""
        staging = self._staging()
        n = self.dense.read_into(layer, expert, staging)
        parts = encode_expert(self.layout, layer, expert, slot_views(staging, self.dense.layout, layer))
        for p, off in zip(self.layout.layer_params[layer], self.layout.layer_offsets[layer]):
            slot[off : off + p.nbytes].view(p.dtype).view(p.shape).copy_(parts[p.name])
        return n

    def check_files(self) -> None:
        self.dense.check_files()

    def drop_cached(self) -> int:
        return self.dense.drop_cached()

    def close(self) -> None:
        self.dense.close()
