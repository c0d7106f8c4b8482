"""Typed errors of hf_moe_offload.

Every error raised for bad input derives from `OffloadError` and from the builtin that fits (`ValueError`,
`FileNotFoundError`, ...), so callers can catch either. Messages say what was expected, what was given and how
to fix it.
"""

from __future__ import annotations

__all__ = [
    "OffloadError",
    "OffloadConfigError",
    "UnsupportedModelError",
    "UnsupportedLayoutError",
    "UnsupportedQuantizationError",
    "BudgetTooSmallError",
    "BudgetTooLargeError",
    "ModelNotFoundError",
    "UnknownNameError",
    "MissingShardError",
    "CorruptCheckpointError",
    "UnsupportedFeatureError",
    "OffloadStateError",
    "CheckpointChangedError",
    "ExpertLoadError",
    "ExpertLoadTimeoutError",
    "SidecarError",
    "UnsupportedParallelismError",
    "LlamaCppUnavailableError",
]


class OffloadError(Exception):
    """Base class of every error raised by hf_moe_offload."""


class OffloadConfigError(OffloadError, ValueError):
    """An `OffloadConfig` field (or the value given for `offload_config=`) is invalid."""


class UnsupportedModelError(OffloadError, ValueError):
    """The model has no MoE experts module that hf_moe_offload knows how to offload."""


class UnsupportedLayoutError(OffloadError, ValueError):
    """The checkpoint stores expert weights in a layout the expert store cannot read by byte range."""


class UnsupportedQuantizationError(OffloadError, ValueError):
    """The checkpoint is quantized with a method whose expert weights hf_moe_offload cannot dequantize."""


class BudgetTooSmallError(OffloadError, ValueError):
    """A memory budget cannot hold the experts one MoE layer needs at once."""


class BudgetTooLargeError(OffloadError, ValueError):
    """A memory budget (in bytes) exceeds the memory the machine, or `max_memory=`, leaves for the experts."""


class ModelNotFoundError(OffloadError, FileNotFoundError):
    """`pretrained_model_name_or_path` is neither a local folder nor a model id that is cached or downloadable."""


class UnknownNameError(OffloadError, KeyError):
    """A registry lookup (policy, predictor, adapter) failed; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MissingShardError(OffloadError, FileNotFoundError):
    """A safetensors shard named by the checkpoint index does not exist."""


class CorruptCheckpointError(OffloadError, ValueError):
    """A safetensors file is truncated or its header is malformed."""


class UnsupportedFeatureError(OffloadError, NotImplementedError):
    """A transformers feature that cannot work on offloaded experts by design (the message says what to do)."""


class OffloadStateError(OffloadError, RuntimeError):
    """An offloaded model was used in a state that cannot serve it (e.g. after its engine was closed)."""


class CheckpointChangedError(OffloadError, RuntimeError):
    """A checkpoint file the experts are read from was replaced, rewritten or truncated after the model was loaded.

    Experts are read from the files on demand, so the files must stay as they were while the model is in use; the
    message names the file and what changed. Load the model again to use the new files.
    """


class SidecarError(OffloadError, ValueError):
    """A prepared quantized-experts folder (`hf-moe-offload prepare`) cannot be used for this load: missing, stale
    (the checkpoint changed since), foreign (another model's packing) or incomplete; the message says how to rebuild it.
    """


class ExpertLoadError(OffloadError, OSError):
    """Reading an expert from an unchanged checkpoint file failed (an I/O error, or fewer bytes than asked).

    The expert's cache slot is freed, so a later request reads it again.
    """


class ExpertLoadTimeoutError(ExpertLoadError, TimeoutError):
    """An expert was not loaded within the cache's `load_timeout` (a read that hangs, or no slot ever freed)."""


class UnsupportedParallelismError(OffloadConfigError):
    """A `distributed_config` layout that offloaded experts cannot run under yet (tensor parallelism of the experts,
    pipeline parallelism); the message names the setting and the layouts that work."""


class LlamaCppUnavailableError(OffloadError, ImportError):
    """The llama.cpp baseline of `hf-moe-offload bench` needs `llama-cpp-python` (the `llamacpp` extra) or
    llama.cpp's GGUF converter, and one of them is missing; the message says how to install it."""
