"""Expert bytes at rest: safetensors headers, byte-range layout, quantized weights, and the reader."""

from .layout import ExpertLayout, Piece, build_layout
from .quantized import SUPPORTED_METHODS, QuantizedWeight, QuantSpec, checkpoint_quantization, fold_quantized
from .reader import ExpertStore, choose_io_mode, slot_views
from .safetensors_file import SafetensorsHeader, TensorInfo, checkpoint_files, read_header

__all__ = [
    "ExpertLayout",
    "Piece",
    "build_layout",
    "ExpertStore",
    "slot_views",
    "choose_io_mode",
    "SUPPORTED_METHODS",
    "QuantizedWeight",
    "QuantSpec",
    "checkpoint_quantization",
    "fold_quantized",
    "SafetensorsHeader",
    "TensorInfo",
    "checkpoint_files",
    "read_header",
]
