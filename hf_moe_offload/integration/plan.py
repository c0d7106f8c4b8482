"""`LoadPlan`: everything an offloaded load needs, computed and validated before a byte of weights is read.

```
offload_config --coerce--> OffloadConfig --policy, predictor names--> known (UnknownNameError otherwise)
from_pretrained kwargs --> compatible with offloading (OffloadConfigError otherwise)
path --local folder or HF cache--> folder --config.json--> config, quantization (FP8 / MXFP4 only)
meta model (no memory) + every safetensors header --> topology, byte layout, expert checkpoint keys
mode="auto" --> measured hardware profile + planner --> concrete budgets
budgets --> slots per tier (BudgetTooSmallError with the smallest budget that works)
side files (correlation table) --> read and checked against the topology
```
`load_offloaded` builds one plan, calls transformers' `from_pretrained` with the experts kept out, and builds the
engine from the plan: nothing is computed twice, and every bad input fails here, before any weight is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from ..adapters import MoETopology, describe_model, resolve_expert_keys
from ..cache import make_policy
from ..config import OffloadConfig, format_bytes
from ..errors import BudgetTooSmallError, ModelNotFoundError, OffloadConfigError, UnsupportedQuantizationError
from ..prefetch import make_predictor
from ..storage import (
    SUPPORTED_METHODS,
    ExpertLayout,
    build_layout,
    checkpoint_files,
    checkpoint_quantization,
    choose_io_mode,
    fold_quantized,
    read_header,
)
from .budgets import TierLimit, available_host_bytes, fit_budget, parse_max_memory, tier_limits
from .distributed import ExpertShard, expert_shard, rank_device, shard_correlation, shard_layout, shard_topology
from .tiers import SlotPlan, plan_slot_layout, split_for_mixed, staging_bytes

logger = logging.getLogger("hf_moe_offload")

__all__ = [
    "LoadPlan",
    "make_plan",
    "resolve_device",
    "resolve_folder",
    "resolve_model_path",
    "plan_slots",
    "inspect_checkpoint",
    "meta_model",
    "model_class",
    "describe_checkpoint",
    "CORRELATION_FILE",
]

CORRELATION_FILE = "hf_moe_offload_correlation.npz"  # learned expert co-occurrence, kept next to the model
_INCOMPATIBLE = ("state_dict", "gguf_file", "quantization_config", "tp_plan", "device_mesh", "offload_folder")
_HINTS = {"quantization_config": " (a checkpoint already quantized with FP8 or MXFP4 loads without it)"}


@dataclass(frozen=True)
class LoadPlan:
    """The validated outcome of planning one offloaded load.

    Attributes:
        config: the user's config with `mode="auto"` resolved into concrete budgets.
        folder: local folder of the checkpoint.
        device: where experts are computed.
        topology: MoE layers of the meta model (names, expert counts, per-expert weights; modules are meta).
        layout: byte ranges of every expert in the checkpoint files.
        expert_keys: checkpoint keys holding expert weights (never read by transformers).
        host_slots: experts held in host RAM.
        device_slots: experts held on the accelerator (0 on CPU).
        quantization: the checkpoint's `quantization_config` (FP8 / MXFP4), or None.
        correlation_tables: a saved correlation table next to the model, checked against the topology, or None.
        kwargs: the `from_pretrained` keyword arguments to pass on (device_map / quantization_config added).
        shard: the experts this rank owns under expert parallelism (topology and layout are then the rank's, in
            local expert ids; see distributed.py), or None.
    """

    config: OffloadConfig
    folder: str
    device: torch.device
    topology: MoETopology = field(repr=False)
    layout: ExpertLayout = field(repr=False)
    expert_keys: tuple[str, ...] = field(repr=False)
    host_slots: int
    device_slots: int
    quantization: dict | None
    correlation_tables: list[np.ndarray] | None = field(default=None, repr=False)
    kwargs: dict = field(default_factory=dict, repr=False)
    shard: ExpertShard | None = None
    slots: SlotPlan | None = field(default=None, repr=False)

    @property
    def slot_layout(self) -> ExpertLayout:
        """What one cache slot holds (`layout` itself at full precision; packed parts for int8 / int4)."""
        return self.slots.layout if self.slots is not None else self.layout


def resolve_device(cfg: OffloadConfig) -> torch.device:
    """`cfg.device` as a torch device (`auto`: CUDA when available)."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OffloadConfigError(f"device: {cfg.device!r} was requested but CUDA is not available; use 'cpu' or 'auto'")
    return dev


def resolve_folder(path: str | os.PathLike, kwargs: dict) -> str:
    """The local folder holding the checkpoint (`subfolder=` applied): see `resolve_model_path`."""
    root, sub = resolve_model_path(path, kwargs), kwargs.get("subfolder")
    return os.path.join(root, sub) if sub else root


def _local_path_hint(path: str, explicit: bool) -> str | None:
    """Why `path` must be meant as a local path, with the close folder names that exist; None when it may be a model
    id. `explicit`: only paths that cannot be ids (`./x`, `/x`, `~/x`, `a/b/c`), else also `models/x` where `models/`
    exists (the typo `models/moe-tinyy`)."""
    parent, name = os.path.split(os.path.normpath(os.path.expanduser(path)))
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path
    if not looks_local and (explicit or not (parent and os.path.isdir(parent))):
        return None
    parent = parent or "."
    if not os.path.isdir(parent):
        return f"{parent!r} does not exist either"
    close = difflib.get_close_matches(name, [e for e in os.listdir(parent) if os.path.isdir(os.path.join(parent, e))])
    if close:
        return "did you mean " + " or ".join(repr(os.path.join(parent, c)) for c in close[:3]) + "?"
    return f"{parent!r} holds no folder named like it"


def resolve_model_path(path: str | os.PathLike, kwargs: dict) -> str:
    """The local folder of `from_pretrained`'s `pretrained_model_name_or_path`, resolved as transformers resolves it:
    a local folder; else a model id: its snapshot in the Hugging Face cache, else (online) downloaded through
    huggingface_hub (safetensors weights and the small files beside them; other weight formats are skipped).

    Honours `revision=`, `cache_dir=`, `token=` and `local_files_only=` from `kwargs`, and `HF_HUB_OFFLINE`.

    Raises:
        ModelNotFoundError: at once, before any network retry: a path that is meant as local but is not a folder
            (a typo such as `models/moe-tinyy`, with the close names that exist), a string that is no valid model
            id, an id not in the cache while offline, or an id the hub does not serve (one attempt).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    hint = _local_path_hint(path, explicit=True)
    if hint is not None:
        raise ModelNotFoundError(f"{path!r} is not a folder ({hint}): pass the folder that holds config.json")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        raise ModelNotFoundError(
            f"{path!r} is neither a local folder nor a valid model id (such as 'org/name'); pass the folder that "
            f"holds config.json, or a model id"
        ) from None
    hub = {k: kwargs.get(k) for k in ("revision", "cache_dir", "token")}
    try:
        folder = snapshot_download(path, local_files_only=True, **hub)
    except Exception:  # noqa: BLE001 - not in the cache
        folder = None
    if folder is not None and _has_weights(folder, kwargs.get("subfolder")):
        return folder
    hint = _local_path_hint(path, explicit=False)  # not a cached id, and its parent folder exists: a typo
    if hint is not None:
        raise ModelNotFoundError(
            f"{path!r} is not a folder ({hint}) nor a model id in the Hugging Face cache: pass the folder that holds "
            f"config.json"
        )
    if kwargs.get("local_files_only") or constants.HF_HUB_OFFLINE:
        why = "local_files_only=True" if kwargs.get("local_files_only") else "HF_HUB_OFFLINE=1"
        raise ModelNotFoundError(
            f"{path!r} is not a local folder, and the model id is not in the Hugging Face cache "
            f"({kwargs.get('cache_dir') or constants.HF_HUB_CACHE}) with its safetensors files while offline ({why}): "
            f"download it first (`hf download {path}`) or pass the folder that holds config.json"
        )
    try:
        return snapshot_download(path, ignore_patterns=_OTHER_WEIGHTS, **hub)
    except Exception as e:  # noqa: BLE001 - one attempt: no retries, the reason is in the message
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelNotFoundError(
            f"{path!r} is not a local folder, not in the Hugging Face cache, and could not be downloaded from "
            f"{constants.ENDPOINT} ({type(e).__name__}: {reason}); check the id and the connection, or pass the folder "
            f"that holds config.json"
        ) from None


_OTHER_WEIGHTS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "original/*"]


def _has_weights(folder: str, subfolder: str | None) -> bool:
    """A cached snapshot can be partial (transformers fetched config.json only): it needs its safetensors too."""
    folder = os.path.join(folder, subfolder or "")
    return os.path.isdir(folder) and any(
        f.endswith((".safetensors", ".safetensors.index.json")) for f in os.listdir(folder)
    )


def plan_slots(
    cfg: OffloadConfig,
    topology: MoETopology,
    slot_nbytes: int,
    device: torch.device,
    limits: dict[str, TierLimit] | None = None,
) -> tuple[int, int]:
    """Slots per tier `(host_slots, device_slots)` from the budgets, fitted to `limits` (see budgets.py).

    Raises:
        BudgetTooSmallError: the compute tier cannot hold the top-k experts of one layer.
        BudgetTooLargeError: a budget in bytes exceeds its tier's limit.
    """
    total = topology.total_expert_nbytes
    n_experts = sum(layer.num_experts for layer in topology.layers)
    need = topology.max_top_k
    limits = limits or {}
    host_bytes = fit_budget("host_budget", cfg.host_budget, total, limits.get("host"))
    host_slots = min(host_bytes // slot_nbytes, n_experts)
    device_slots = 0
    checks = [("host_budget", cfg.host_budget, host_bytes, host_slots)]
    if device.type == "cuda":
        device_bytes = fit_budget("device_budget", cfg.device_budget, total, limits.get("device"))
        device_slots = min(device_bytes // slot_nbytes, n_experts)
        checks = [("device_budget", cfg.device_budget, device_bytes, device_slots)]
    for name, budget, nbytes, slots in checks:
        if slots < need:
            minimum = need * slot_nbytes
            raise BudgetTooSmallError(
                f"{name}={budget} ({format_bytes(nbytes)}) holds {slots} expert(s) of {format_bytes(slot_nbytes)}, "
                f"but each token is routed to {need} experts per layer, so at least {need} must fit at once. "
                f"Raise {name} to at least {format_bytes(minimum, round_up=True)} ({minimum} bytes, {need} experts; "
                f"the model has {format_bytes(total)} of experts in all)."
            )
    return host_slots, device_slots


def inspect_checkpoint(model: nn.Module, folder: str) -> tuple[MoETopology, ExpertLayout, list[str]]:
    """Topology of `model` (meta or loaded), the byte layout of its experts in the checkpoint at `folder`, and the
    checkpoint keys that hold expert weights (with their scales, for quantized checkpoints).

    Reads and validates every safetensors header; reads no tensor data.
    """
    topology = describe_model(model)
    tensors = {}
    for path in checkpoint_files(folder):
        tensors.update(read_header(path).tensors)
    tensors, quantized = fold_quantized(tensors)
    targets = resolve_expert_keys(model, list(tensors), topology)
    block = (checkpoint_quantization(folder) or {}).get("weight_block_size")
    layout = build_layout(topology, tensors, targets, quantized, tuple(block) if block else None)
    keys = {k for t in targets for k in (quantized[t].keys if t in quantized else (t,))}
    return topology, layout, sorted(keys)


def meta_model(cls: type, config: PretrainedConfig, kwargs: dict) -> nn.Module:
    """`cls(config)` on the meta device, in the dtype `from_pretrained` would load (no memory is allocated)."""
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = cls(config)
    return model.to(dtype)


def model_class(config: PretrainedConfig) -> type:
    """The class a checkpoint with `config` generates with: causal LM, else seq2seq LM, else the base model."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    for auto in (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModel):
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    raise OffloadConfigError(f"no transformers model class is registered for model type {config.model_type!r}")


def describe_checkpoint(folder: str) -> tuple[MoETopology, ExpertLayout, list[str]]:
    """`inspect_checkpoint` of the checkpoint at `folder` on a meta model of its own class (headers only)."""
    config = _model_config(folder, {})
    return inspect_checkpoint(meta_model(model_class(config), config, {}), folder)


def _check_kwargs(kwargs: dict, device: torch.device) -> None:
    for name in _INCOMPATIBLE:
        if kwargs.get(name) is not None:
            raise OffloadConfigError(
                f"from_pretrained: {name}= cannot be combined with offload_config=; hf_moe_offload reads experts "
                f"from the checkpoint's safetensors files itself. Remove {name}= or load without offload_config"
                f"{_HINTS.get(name, '')}"
            )
    device_map = kwargs.get("device_map")
    if device_map is None:
        if device.type == "cuda" and kwargs.get("distributed_config") is None:  # else transformers binds the rank's
            kwargs["device_map"] = {"": str(device)}
        return
    targets = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
    if len(targets) != 1 or {str(t) for t in targets} & {"auto", "disk", "meta", "balanced", "sequential"}:
        raise OffloadConfigError(
            f"from_pretrained: device_map={device_map!r} cannot be combined with offload_config=; non-expert weights "
            f"go to one device and experts are managed by hf_moe_offload. Pass offload_config(device=...) instead"
        )


def _model_config(folder: str, kwargs: dict) -> PretrainedConfig:
    config = kwargs.get("config")
    if not isinstance(config, PretrainedConfig):
        config = AutoConfig.from_pretrained(folder, trust_remote_code=kwargs.get("trust_remote_code", False))
    return config


def _quantization(config: PretrainedConfig) -> dict | None:
    """The checkpoint's `quantization_config` as a dict, or None.

    Raises:
        UnsupportedQuantizationError: a method (or FP8 variant) whose expert weights we cannot dequantize.
    """
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    q = q.to_dict() if hasattr(q, "to_dict") else dict(q)
    method = q.get("quant_method")
    if method not in SUPPORTED_METHODS or (method == "fp8" and q.get("expert_dtype", "fp8") != "fp8"):
        what = f"{method!r} with expert_dtype={q.get('expert_dtype')!r}" if method == "fp8" else repr(method)
        raise UnsupportedQuantizationError(
            f"the checkpoint is quantized with quant_method={what}; hf_moe_offload dequantizes expert weights of "
            f"quant_method {' and '.join(map(repr, SUPPORTED_METHODS))} (DeepSeek-style block FP8 with "
            f"weight_scale_inv, GPT-OSS MXFP4 blocks/scales) only. Use an unquantized or FP8/MXFP4 checkpoint, or "
            f"load without offload_config"
        )
    return q


def _quantization_arg(q: dict, expert_modules: list[str]):
    """`quantization_config=` that keeps the experts modules unquantized (their weights never load: we read them)."""
    from transformers import FineGrainedFP8Config, Mxfp4Config

    if q["quant_method"] == "mxfp4":  # only the experts are MXFP4: dequantizing changes nothing else
        return Mxfp4Config(dequantize=True)
    keep = list(q.get("modules_to_not_convert") or []) + expert_modules
    return FineGrainedFP8Config(dequantize=bool(q.get("dequantize", False)), modules_to_not_convert=keep)


def _check_names(cfg: OffloadConfig, topology: MoETopology) -> None:
    """Policy and predictor names exist and the predictors can be built for this topology."""
    make_policy(cfg.policy)
    num_experts = [layer.num_experts for layer in topology.layers]
    for name in cfg.predictor_names:
        make_predictor(name, num_experts, topology.max_top_k)


def make_plan(cls: type, path: str | os.PathLike, kwargs: dict, offload_config) -> LoadPlan:
    """Validate everything about one `from_pretrained(path, offload_config=...)` call and plan it.

    Raises:
        OffloadConfigError, UnknownNameError, BudgetTooSmallError, UnsupportedModelError, UnsupportedLayoutError,
        UnsupportedQuantizationError, MissingShardError, CorruptCheckpointError: before any weight is read.
    """
    cfg = OffloadConfig.coerce(offload_config)
    device = resolve_device(cfg)
    kwargs = dict(kwargs)
    shard = expert_shard(kwargs)  # before _check_kwargs: tp_plan= gets the parallelism error
    device = rank_device(device, kwargs)
    max_memory = parse_max_memory(kwargs.pop("max_memory", None), device)  # honoured as tier limits, never passed on
    _check_kwargs(kwargs, device)
    folder = resolve_folder(path, kwargs)
    config = _model_config(folder, kwargs)
    quantization = _quantization(config)
    topology, layout, expert_keys = inspect_checkpoint(meta_model(cls, config, kwargs), folder)
    layout, topology = shard_layout(layout, topology, shard), shard_topology(topology, shard)
    _check_names(cfg, topology)
    if quantization is not None:
        kwargs["quantization_config"] = _quantization_arg(quantization, [x.module_name for x in topology.layers])
    if cfg.mode == "auto":  # measured hardware profile + planner -> concrete budgets and prefetch depth
        from ..scheduling.auto import auto_config

        sample = max(checkpoint_files(folder), key=os.path.getsize)
        cfg = auto_config(cfg, topology.summary(), sample_file=sample, device=device, model_config=config)
    slots = plan_slot_layout(cfg, folder, topology, layout, device, shard is not None)
    limits = tier_limits(device, topology.other_nbytes, max_memory, staging_bytes(layout, slots, cfg.io_threads))
    host_slots, device_slots = plan_slots(cfg, topology, slots.layout.slot_nbytes, device, limits)
    if cfg.mixed_precision is not None:
        slots, host_slots = split_for_mixed(slots, host_slots, layout.slot_nbytes, topology.max_top_k)
    if cfg.io_mode == "auto":
        room = available_host_bytes()[0] - topology.other_nbytes - host_slots * slots.layout.slot_nbytes
        mode, why = choose_io_mode(list(layout.files), topology.total_expert_nbytes, room)
        logger.info("io_mode=auto -> %s (%s)", mode, why)
        cfg = dataclasses.replace(cfg, io_mode=mode)
    tables = None
    correlation = os.path.join(folder, CORRELATION_FILE)
    if "correlation" in cfg.predictor_names and os.path.isfile(correlation):
        tables = shard_correlation(correlation, [layer.num_experts for layer in topology.layers], shard)
    plan = LoadPlan(
        config=cfg,
        folder=folder,
        device=device,
        topology=topology,
        layout=layout,
        expert_keys=tuple(expert_keys),
        host_slots=host_slots,
        device_slots=device_slots,
        quantization=quantization,
        correlation_tables=tables,
        shard=shard,
        kwargs=kwargs,
        slots=slots,
    )
    _log_plan(plan, limits)
    return plan


def _log_plan(plan: LoadPlan, limits: dict[str, TierLimit]) -> None:
    """The load's decisions at INFO on the `hf_moe_offload` logger (silent unless the application enables it)."""
    cfg, top, slot = plan.config, plan.topology, plan.slot_layout.slot_nbytes
    logger.info(
        "offloading %s: %d MoE layers, %s of experts in %s slots, computed on %s",
        plan.folder,
        top.num_layers,
        format_bytes(top.total_expert_nbytes),
        format_bytes(slot),
        plan.device,
    )
    tiers = [("host", cfg.host_budget, plan.host_slots)]
    if plan.device.type == "cuda":
        tiers.append(("device", cfg.device_budget, plan.device_slots))
    for tier, budget, slots in tiers:
        limit = limits.get(tier)
        logger.info(
            "%s_budget=%s -> %d slots (%s; limit %s = %s)",
            tier,
            budget,
            slots,
            format_bytes(slots * slot),
            format_bytes(limit.nbytes) if limit else "none",
            limit.source if limit else "-",
        )
    logger.info(
        "prefetch=%s (depth %d), policy=%s, io_mode=%s, io_threads=%d",
        ",".join(cfg.predictor_names) or "none",
        cfg.prefetch_depth,
        cfg.policy,
        cfg.io_mode,
        cfg.io_threads,
    )
