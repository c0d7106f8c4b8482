"""Expert bytes at rest: safetensors headers, byte-range layout, and the reader."""

from .layout import ExpertLayout, Piece, build_layout
from .reader import ExpertStore, slot_views
from .safetensors_file import SafetensorsHeader, TensorInfo, checkpoint_files, read_header

__all__ = [
    "ExpertLayout",
    "Piece",
    "build_layout",
    "ExpertStore",
    "slot_views",
    "SafetensorsHeader",
    "TensorInfo",
    "checkpoint_files",
    "read_header",
]
