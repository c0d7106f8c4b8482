"""`calibrate_neurons`: rank each expert's intermediate neurons by importance on a little text (for
`expert_fraction`, precision/neurons.py).

```
offloaded model (full precision, any budget) runs the calibration tokens; each expert call also computes
    a = act(x @ gate) * (x @ up)              (n_routed, I)
    importance += sum_n |a| * ||down[:, j]||  (I,)                  per (layer, expert)
-> order = argsort(-importance) per expert -> <model>/hf_moe_offload_neurons.npz  ("layer_<L>": int32 [E, I])
```
Experts no calibration token was routed to keep their natural order (any order is exact at `expert_fraction=1`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..adapters.interface import InterfaceExpertsAdapter
from ..errors import UnsupportedFeatureError
from ..precision import matmul
from ..precision.neurons import NEURONS_FILE, neuron_count

__all__ = ["calibrate_neurons", "neuron_importance"]


def neuron_importance(module, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`(I,)` float32: how much each intermediate neuron of one expert contributes to its output on tokens `x`."""
    t = module.is_transposed
    if module.has_gate:
        a = module._apply_gate(matmul(x, w["gate_up_proj"], t))
    else:
        a = module.act_fn(matmul(x, w["up_proj"], t))
    down = w["down_proj"].float()
    col_norm = down.norm(dim=1) if t else down.norm(dim=0)  # neuron j: row j of [I, H], column j of [H, I]
    return a.float().abs().sum(0) * col_norm


@torch.no_grad()
def calibrate_neurons(path: str, input_ids: list[torch.Tensor], progress: bool = False) -> dict:
    """Run `input_ids` (a list of `(1, T)` or `(B, T)` tensors) through the model at `path` and write the neuron order
    of every expert next to the model.

    Returns:
        `{"file", "tokens", "experts_seen", "experts"}`.

    Raises:
        UnsupportedFeatureError: a family whose experts do not dispatch through transformers' ExpertsInterface.
    """
    from transformers import AutoModelForCausalLM

    from .plan import resolve_folder

    folder = resolve_folder(path, {})
    model = AutoModelForCausalLM.from_pretrained(folder, offload_config={"host_budget": "25%", "prefetch": "none"})
    engine = model.offload_engine
    scores: dict[int, torch.Tensor] = {}
    modules = {}
    for layer in engine.topology.layers:
        if not isinstance(layer.adapter, InterfaceExpertsAdapter):
            raise UnsupportedFeatureError(
                f"calibrate: MoE layer {layer.layer} ({type(layer.module).__name__}) uses its own expert math; neuron "
                f"importance is computed for experts dispatched through transformers' ExpertsInterface only"
            )
        modules[layer.layer] = layer.module
        scores[layer.layer] = torch.zeros(layer.num_experts, neuron_count(layer.module, layer.params))
    run_layer = engine.run_layer

    def measuring_run_layer(layer, hidden, top_k_index, top_k_weights, expert_fn):
        def fn(w, x, e):
            scores[layer][e] += neuron_importance(modules[layer], w, x)
            return expert_fn(w, x, e)

        return run_layer(layer, hidden, top_k_index, top_k_weights, fn)

    engine.run_layer = measuring_run_layer
    tokens = 0
    try:
        batches = input_ids
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(input_ids, desc="calibrate", unit="batch")
        for ids in batches:
            ids = ids if ids.dim() == 2 else ids[None]
            model(ids)
            tokens += ids.numel()
    finally:
        engine.run_layer = run_layer
        engine.close()
    out = os.path.join(folder, NEURONS_FILE)
    orders = {f"layer_{k}": torch.argsort(-v, dim=1, stable=True).numpy().astype(np.int32) for k, v in scores.items()}
    np.savez(out + ".tmp.npz", **orders)
    os.replace(out + ".tmp.npz", out)
    seen = sum(int((v.sum(1) > 0).sum()) for v in scores.values())
    return {"file": out, "tokens": tokens, "experts_seen": seen, "experts": sum(v.shape[0] for v in scores.values())}
