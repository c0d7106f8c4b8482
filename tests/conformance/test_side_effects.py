"""Prediction is free of side effects: with each predictor (and none), outputs, router logits and what user hooks on
routers and MoE blocks observe are exactly the normal model's.

A predictor may run a router ahead of time (gate_lookahead) or learn from the routing it sees (correlation,
history); none of this may show: the same logits and greedy tokens, as many `router_logits` tensors, and a forward
hook on each router and on each experts module's parent block called as often as on the normal model.
"""

from __future__ import annotations

import pytest
import torch

from hf_moe_offload.prefetch import list_predictors

from ._cases import CASES, NO_ROUTER, PAD, assert_misses_and_evictions, assert_same, token_ids

PREDICTORS = [*list_predictors(), "none"]
NEW = 3


def _watched(off) -> list[str]:
    """The names of each MoE layer's block (the experts module's parent) and router in the offloaded `off`."""
    names = {id(m): name for name, m in off.named_modules()}
    out = []
    for layer in off.offload_engine.topology.layers:
        out.append(layer.module_name.rpartition(".")[0])
        if layer.router is not None:
            out.append(names[id(layer.router)])
    return out


def _run(model, names: list[str]) -> tuple[dict[str, int], object, torch.Tensor]:
    """Hook call counts of modules `names` over one forward with router logits and one greedy generate, and the
    two results."""
    calls = dict.fromkeys(names, 0)

    def counter(name):
        def hook(module, args, output):
            calls[name] += 1

        return hook

    handles = [model.get_submodule(name).register_forward_hook(counter(name)) for name in names]
    try:
        ids = token_ids(2, 8, seed=5)
        with torch.no_grad():
            out = model(ids, output_router_logits=True)
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                pad_token_id=PAD)  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    return calls, out, tokens


@pytest.mark.parametrize("predictor", PREDICTORS)
@pytest.mark.parametrize(("model_type", "layout"), [pytest.param(*c, id="-".join(c)) for c in CASES])
def test_prediction_has_no_side_effects(cases, model_type, layout, predictor):
    case = cases.get(model_type, layout)
    with case.offloaded(prefetch=predictor) as off:
        assert off.offload_engine.config.predictor_names == ([] if predictor == "none" else [predictor])
        topology = off.offload_engine.topology
        assert all((layer.router is None) == (model_type in NO_ROUTER) for layer in topology.layers)
        names = _watched(off)
        ref_calls, ref, ref_tokens = case.family.once("side_effects", lambda: _run(case.normal, names))
        calls, out, tokens = _run(off, names)
        assert calls == ref_calls and all(calls.values())
        assert len(out.router_logits) == len(ref.router_logits)
        assert_same(ref, out)
        assert torch.equal(tokens, ref_tokens)
        assert_misses_and_evictions(off)
        routed = not (predictor == "gate_lookahead" and model_type in NO_ROUTER)
        if predictor != "none" and len(topology.layers) > 1 and routed:  # it predicted (and was scored), unseen
            assert off.offload_stats()["prefetch_per_layer"], off.offload_stats()
