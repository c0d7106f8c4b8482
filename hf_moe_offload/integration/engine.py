"""`OffloadEngine`: the per-model object that ties topology, checkpoint layout, store, cache and stats together.

It is built after `from_pretrained` has loaded every non-expert weight, attaches a small handle to each experts
module (`module._hf_moe_offload`), and is reachable as `model.offload_engine`. Budgets are resolved here into slot
counts; a budget that cannot hold one layer's top-k experts is refused with the smallest budget that would work.
"""

from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import MoETopology, describe_model, resolve_expert_keys
from ..cache import ExpertCache, OffloadStats, make_policy
from ..config import OffloadConfig, format_bytes
from ..errors import BudgetTooSmallError
from ..prefetch import CorrelationPredictor, Prefetcher, make_predictor
from ..storage import (
    ExpertLayout,
    ExpertStore,
    build_layout,
    checkpoint_files,
    checkpoint_quantization,
    fold_quantized,
    read_header,
)
from .experts_forward import run_layer

__all__ = ["OffloadEngine", "LayerHandle", "plan_slots", "inspect_checkpoint", "live_engines", "CORRELATION_FILE"]

CORRELATION_FILE = "hf_moe_offload_correlation.npz"  # learned expert co-occurrence, kept next to the model

_LIVE: weakref.WeakSet = weakref.WeakSet()


def live_engines() -> list[OffloadEngine]:
    return list(_LIVE)


@dataclass
class LayerHandle:
    engine: OffloadEngine
    layer: int


def resolve_device(cfg: OffloadConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from ..errors import OffloadConfigError

        raise OffloadConfigError(f"device: {cfg.device!r} was requested but CUDA is not available; use 'cpu' or 'auto'")
    return dev


def plan_slots(cfg: OffloadConfig, topology: MoETopology, slot_nbytes: int, device: torch.device) -> tuple[int, int]:
    """Slots per tier `(host_slots, device_slots)` from the budgets.

    Raises:
        BudgetTooSmallError: the compute tier cannot hold the top-k experts of one layer.
    """
    total = topology.total_expert_nbytes
    n_experts = sum(layer.num_experts for layer in topology.layers)
    need = topology.max_top_k
    host_bytes = cfg.host_budget.resolve(total)
    host_slots = min(host_bytes // slot_nbytes, n_experts)
    device_slots = 0
    checks = [("host_budget", cfg.host_budget, host_bytes, host_slots)]
    if device.type == "cuda":
        device_bytes = cfg.device_budget.resolve(total)
        device_slots = min(device_bytes // slot_nbytes, n_experts)
        checks = [("device_budget", cfg.device_budget, device_bytes, device_slots)]
    for name, budget, nbytes, slots in checks:
        if slots < need:
            raise BudgetTooSmallError(
                f"{name}={budget} ({format_bytes(nbytes)}) holds {slots} expert(s) of {format_bytes(slot_nbytes)}, "
                f"but each token is routed to {need} experts per layer, so at least {need} must fit at once. "
                f"Raise {name} to at least {format_bytes(need * slot_nbytes)} ({need} experts; the model has "
                f"{format_bytes(total)} of experts in all)."
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


class OffloadEngine:
    """Everything one offloaded model needs at run time."""

    def __init__(self, model: nn.Module, folder: str, cfg: OffloadConfig):
        self.config, self.folder = cfg, folder
        self.device = resolve_device(cfg)
        self.topology, self.layout, _ = inspect_checkpoint(model, folder)
        self.host_slots, self.device_slots = plan_slots(cfg, self.topology, self.layout.slot_nbytes, self.device)
        make_policy(cfg.policy)  # fail early on an unknown name
        self.stats = OffloadStats()
        self.store = ExpertStore(self.layout, cfg.io_mode)
        if cfg.io_mode != "cached":
            self.store.drop_cached()
        self.cache = ExpertCache(
            self.store,
            device=self.device,
            host_slots=self.host_slots,
            device_slots=self.device_slots,
            policy_factory=lambda: make_policy(cfg.policy),
            io_threads=cfg.io_threads,
            stats=self.stats,
        )
        self._num_experts = {layer.layer: layer.num_experts for layer in self.topology.layers}
        self.prefetcher = self._make_prefetcher(cfg)
        for layer in self.topology.layers:
            layer.module.__dict__["_hf_moe_offload"] = LayerHandle(self, layer.layer)
            # Undecorated families get an instance forward that calls run_layer (decorated ones: a no-op).
            layer.adapter.install_forward(layer.module, functools.partial(run_layer, layer.module, self, layer.layer))
        self._finalizer = weakref.finalize(self, self.cache.close)
        _LIVE.add(self)

    def _make_prefetcher(self, cfg: OffloadConfig) -> Prefetcher | None:
        names = cfg.predictor_names
        for name in names:  # validate every name before building anything
            make_predictor(name, [1], 1)
        if not names:
            return None
        layers = self.topology.layers
        num_experts, top_k = [layer.num_experts for layer in layers], self.topology.max_top_k
        routers = {layer.layer: layer.router for layer in layers if layer.router is not None}
        predictors = [make_predictor(n, num_experts, top_k, routers=routers) for n in names]
        for p in predictors:
            path = os.path.join(self.folder, CORRELATION_FILE)
            if isinstance(p, CorrelationPredictor) and os.path.isfile(path):
                p.load(path)
        return Prefetcher(self.cache, predictors, num_experts, top_k, cfg.prefetch_depth, cfg.io_threads)

    def predictor(self, name: str):
        """The active predictor registered as `name` (e.g. to `learn` a warm-up trace or `save` it)."""
        for p in self.prefetcher.predictors if self.prefetcher else []:
            if p.name == name:
                return p
        raise KeyError(f"predictor {name!r} is not active; active: {self.config.predictor_names}")

    def save_correlation(self, path: str | None = None) -> str:
        """Persist the correlation table next to the model (default) so later loads start warm."""
        path = path or os.path.join(self.folder, CORRELATION_FILE)
        self.predictor("correlation").save(path)
        return path

    def begin_request(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.begin_request()

    def step_end(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.on_step_end()

    def num_experts(self, layer: int) -> int:
        return self._num_experts[layer]

    def stats_dict(self) -> dict:
        """Counters (`hits`, `misses`, `evictions`, `bytes_loaded`, `stall_seconds`, ...), memory and layout."""
        out = self.stats.snapshot()
        out.update(self.cache.memory())
        out["bytes_per_expert"] = self.layout.slot_nbytes
        out["expert_bytes_total"] = self.topology.total_expert_nbytes
        out["device"] = str(self.device)
        out["policy"] = self.config.policy
        if self.prefetcher is not None:
            out.update(self.prefetcher.metrics())
        return out

    def reset_stats(self) -> None:
        self.stats.reset()
        if self.prefetcher is not None:
            self.prefetcher.reset_metrics()

    def close(self) -> None:
        self._finalizer()
