"""Expert precisions: quantized forms of expert weights in cache slots, and their matmuls (optimum-quanto)."""

from .dequant import int4_dense_problem
from .formats import EXPERT_DTYPES, INT4_GROUP_SIZES, PackedSpec, PackedWeight, assemble, encode, matmul, pack_specs

__all__ = [
    "EXPERT_DTYPES",
    "INT4_GROUP_SIZES",
    "PackedSpec",
    "PackedWeight",
    "assemble",
    "encode",
    "int4_dense_problem",
    "matmul",
    "pack_specs",
]
