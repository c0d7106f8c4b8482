"""`OffloadEngine`: the per-model object that ties the load plan, store, cache, prefetcher and stats together.

It is built from a `LoadPlan` after `from_pretrained` has loaded every non-expert weight: the plan's topology is
re-bound to the loaded modules (the same layers, now real), and its layout, slots and config are used as they are.
It attaches a small handle to each experts module (`module._hf_moe_offload`), is reachable as
`model.offload_engine`, and runs each MoE layer through the expert loop (`execution.run_experts`), telling the
prefetcher first. `close()` stops the I/O threads and frees every slot buffer at once.
"""

from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..cache import ExpertCache, OffloadStats, make_policy
from ..cache.mixed import MixedPrecisionCaches
from ..errors import OffloadStateError, UnsupportedFeatureError
from ..execution import ExpertFn, run_experts
from ..prefetch import CorrelationPredictor, Prefetcher, make_predictor
from ..storage import ExpertStore
from .distributed import local_topology
from .experts_forward import HANDLE_ATTR
from .plan import CORRELATION_FILE, LoadPlan
from .threads import ThreadSizer
from .tiers import SlotPlan, open_store

__all__ = ["OffloadEngine", "LayerHandle", "live_engines"]

_LIVE: weakref.WeakSet = weakref.WeakSet()


def live_engines() -> list[OffloadEngine]:
    return list(_LIVE)


@dataclass
class LayerHandle:
    engine: OffloadEngine
    layer: int


class _RefuseBackward(torch.autograd.Function):
    """Identity on the experts' output whose backward raises: offloaded experts cannot be trained through."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise UnsupportedFeatureError(
            "backward through offloaded experts is not supported: their weights live in a cache whose slots are "
            "reused, so gradients cannot be computed. Run inference under torch.no_grad() / torch.inference_mode(), "
            "or train the model without offload_config"
        )


class OffloadEngine:
    """Everything one offloaded model needs at run time.

    Args:
        model: the model `from_pretrained` loaded with its expert weights left out.
        plan: the validated plan of that load (`make_plan`).
    """

    def __init__(self, model: nn.Module, plan: LoadPlan):
        self.plan, self.config, self.folder, self.device = plan, plan.config, plan.folder, plan.device
        self.topology = local_topology(model, plan.shard)  # the rank's own experts under expert parallelism
        got = [layer.module_name for layer in self.topology.layers]
        if got != [layer.module_name for layer in plan.topology.layers]:
            raise OffloadStateError(
                f"the loaded model's MoE layers {got} differ from the planned ones "
                f"{[layer.module_name for layer in plan.topology.layers]}; this is a bug, please report it"
            )
        self.layout, self.host_slots, self.device_slots = plan.layout, plan.host_slots, plan.device_slots
        cfg = plan.config
        self.stats = OffloadStats()
        self.threads = ThreadSizer(cfg.threads)
        self.threads.apply()
        self.store = open_store(plan.layout, plan.slots or SlotPlan(plan.layout), cfg.io_mode)
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
        self.mixed = self._make_mixed(plan, cfg)
        self._num_experts = {layer.layer: layer.num_experts for layer in self.topology.layers}
        self.prefetcher = self._make_prefetcher()
        for layer in self.topology.layers:
            layer.module.__dict__[HANDLE_ATTR] = LayerHandle(self, layer.layer)
            # Undecorated families get an instance forward that calls run_layer (decorated ones: a no-op).
            layer.adapter.install_forward(layer.module, functools.partial(self.run_layer, layer.layer))
        # The cache's method, not the engine's: the finalizer must not keep the engine alive.
        self._finalizer = weakref.finalize(self, (self.mixed or self.cache).close)
        _LIVE.add(self)

    def _make_mixed(self, plan: LoadPlan, cfg) -> MixedPrecisionCaches | None:
        """Mixed precision: a cache of dense experts beside the quantized `self.cache` (see cache/mixed.py)."""
        if cfg.mixed_precision is None:
            return None
        full = ExpertCache(
            ExpertStore(plan.layout, cfg.io_mode),
            device=self.device,
            host_slots=plan.slots.full_precision_slots,
            device_slots=0,
            policy_factory=lambda: make_policy(cfg.policy),
            io_threads=cfg.io_threads,
            stats=self.stats,
            bytes_counter="bytes_loaded_full_precision",
        )
        return MixedPrecisionCaches(full, self.cache, cfg.mixed_precision)

    def _make_prefetcher(self) -> Prefetcher | None:
        names = self.config.predictor_names
        if not names:
            return None
        layers = self.topology.layers
        num_experts, top_k = [layer.num_experts for layer in layers], self.topology.max_top_k
        routers = {layer.layer: layer.router for layer in layers if layer.router is not None}
        predictors = [make_predictor(n, num_experts, top_k, routers=routers) for n in names]
        for p in predictors:
            if isinstance(p, CorrelationPredictor) and self.plan.correlation_tables is not None:
                p.tables = [t.copy() for t in self.plan.correlation_tables]
        return Prefetcher(
            self.cache, predictors, num_experts, top_k, self.config.prefetch_depth, self.config.io_threads
        )

    # -- the expert loop ---------------------------------------------------------------------------------------------
    # Opaque to torch.compile: the loop waits on I/O threads and reuses cache slots, which dynamo cannot trace (it
    # fails on the engine's state); compiled models run it eagerly between their compiled graphs.
    @torch.compiler.disable
    def run_layer(
        self,
        layer: int,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        expert_fn: ExpertFn,
    ) -> torch.Tensor:
        """MoE layer `layer`: tell the prefetcher its routing, then run its experts (`execution.run_experts`)."""
        if not self._finalizer.alive:
            raise OffloadStateError(
                "this offloaded model's engine was closed (offload_engine.close()); load the model again to use it"
            )
        step = None
        if self.prefetcher is not None:
            self.prefetcher.on_layer(layer, hidden, top_k_index)
            step = self.prefetcher.step
        cache = self.cache
        if self.mixed is not None:  # each expert's tier follows its largest routing weight in this call
            n = self._num_experts[layer]
            importance = torch.zeros(n + 1).scatter_reduce(
                0, top_k_index.reshape(-1).clamp(0, n), top_k_weights.reshape(-1).float(), "amax"
            )
            cache = self.mixed.for_call(dict(enumerate(importance[:n].tolist())))
        run = functools.partial(run_experts, cache=cache, layer=layer, num_experts=self._num_experts[layer], step=step)
        if not (torch.is_grad_enabled() and (hidden.requires_grad or top_k_weights.requires_grad)):
            return run(hidden, top_k_index, top_k_weights, expert_fn)
        # Slots are reused as soon as an expert is computed, so autograd must not keep them: compute without a
        # graph and make a backward through this layer fail loudly instead of giving wrong gradients.
        with torch.no_grad():
            out = run(hidden, top_k_index, top_k_weights, expert_fn)
        return _RefuseBackward.apply(hidden, top_k_weights, out)

    # -- prediction ------------------------------------------------------------------------------------------------
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
        """A `generate` call starts: check that the checkpoint files are unchanged (one `stat` each), so a replaced,
        rewritten or truncated file raises `CheckpointChangedError` before any token is computed from it."""
        self.store.check_files()
        self.threads.apply()
        if self.prefetcher is not None:
            self.prefetcher.begin_request()

    def step_end(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.on_step_end()

    def num_experts(self, layer: int) -> int:
        return self._num_experts[layer]

    # -- statistics and lifetime -------------------------------------------------------------------------------------
    def stats_dict(self) -> dict:
        """Counters (`hits`, `misses`, `evictions`, `bytes_loaded`, `stall_seconds`, ...), memory and layout."""
        out = self.stats.snapshot()
        out.update((self.mixed or self.cache).memory())
        out["bytes_per_expert"] = self.cache.layout.slot_nbytes
        out["bytes_per_expert_checkpoint"] = self.layout.slot_nbytes
        slots = self.plan.slots or SlotPlan(self.layout)
        out["expert_dtype"] = slots.expert_dtype
        out["read_from"] = "sidecar" if slots.sidecar else "checkpoint"
        tokens = out["tokens_generated"]
        out["bytes_loaded_per_token"] = out["bytes_loaded"] / tokens if tokens else None
        quantized = slots.expert_dtype  # "auto": every slot at full precision
        full = out["bytes_loaded_full_precision"] if self.mixed else out["bytes_loaded"] if quantized == "auto" else 0
        split = {"full": full} if quantized == "auto" else {"full": full, quantized: out["bytes_loaded"] - full}
        out["bytes_loaded_per_token_by_precision"] = {k: v / tokens for k, v in split.items()} if tokens else None
        out["prefetch_wasted_bytes_per_token"] = out["prefetch_wasted_bytes"] / tokens if tokens else None
        out["expert_bytes_total"] = self.topology.total_expert_nbytes
        out["device"] = str(self.device)
        out["policy"] = self.config.policy
        out["io_mode"] = self.config.io_mode
        out["threads"] = self.threads.last_decision["threads"]
        if self.plan.shard is not None:
            out["expert_parallel"] = {"rank": self.plan.shard.rank, "size": self.plan.shard.size}
        if self.prefetcher is not None:
            out.update(self.prefetcher.metrics())
        return out

    def reset_stats(self) -> None:
        self.stats.reset()
        if self.prefetcher is not None:
            self.prefetcher.reset_metrics()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop the I/O threads, close the checkpoint files and free every slot buffer (idempotent)."""
        self._finalizer()
