"""Routing traces: recorded faithfully, saved compactly, replayed onto a model of another size."""

import numpy as np
import torch

from hf_moe_offload.integration.tracing import record_routing, replay_routing
from hf_moe_offload.prefetch.trace import RoutingTrace, map_routing
from hf_moe_offload.testing import build_tiny, save_checkpoint


def test_map_routing_by_hand():
    e = np.array([[0, 3], [1, 2]])
    w = np.array([[0.75, 0.25], [0.5, 0.5]], np.float32)
    # 4 -> 8 experts, k 2 -> 4: each recorded expert owns 2 target experts, 2 slots each
    me, mw = map_routing(e, w, 4, 8, 4)
    assert me.tolist() == [[0, 1, 6, 7], [2, 3, 4, 5]]
    np.testing.assert_allclose(mw[0], [0.375, 0.375, 0.125, 0.125])
    # 4 -> 2 experts, same k: experts merge pairwise
    me, mw = map_routing(e, w, 4, 2, 2)
    assert me.tolist() == [[0, 1], [0, 1]]
    np.testing.assert_allclose(mw.sum(1), 1.0)


def test_record_matches_the_router_and_round_trips(tmp_path):
    model = build_tiny("mixtral")
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    with record_routing(model) as rec:
        model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    trace = rec.trace()
    assert trace.num_steps == 5 and trace.num_layers == 2 and trace.top_k == 2
    e0, _ = trace.rows(0, 1)
    assert e0.shape == (10, 2)
    with torch.no_grad():  # the prefill routing of layer 0 is what its router computes on the layer input
        h = model.model.embed_tokens(ids)
        out = {}
        hk = model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: out.setdefault("x", a[0]))
        model(ids)
        hk.remove()
        _, _, idx = model.model.layers[0].mlp.gate(out["x"].reshape(-1, h.shape[-1]))
    assert np.array_equal(np.sort(trace.rows(0, 0)[0], 1), np.sort(idx.numpy(), 1))
    path = tmp_path / "t.npz"
    trace.save(str(path))
    back = RoutingTrace.load(str(path))
    assert np.array_equal(back.experts, trace.experts) and back.meta["model_type"] == "mixtral"


def test_replay_forces_routing_on_a_bigger_model():
    small = build_tiny("mixtral")
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    with record_routing(small) as rec:
        small.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    trace = rec.trace()
    big = build_tiny("mixtral", num_local_experts=16, num_experts_per_tok=4, num_hidden_layers=3)
    with replay_routing(big, trace), record_routing(big) as rec2:
        big.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    replayed = rec2.trace()
    for step in range(4):
        for layer in range(3):
            want, _ = map_routing(*trace.rows(step, layer % 2), 8, 16, 4)
            assert np.array_equal(replayed.rows(step, layer)[0], want)


def test_lookahead_is_recorded_and_drives_prefetch_in_a_replay(tmp_path):
    from transformers import AutoModelForCausalLM

    small = build_tiny("mixtral", num_hidden_layers=3)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    with record_routing(small) as rec:
        small.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    trace = rec.trace()
    assert trace.lookahead is not None and trace.lookahead.shape == trace.experts.shape
    assert trace.lookahead_rows(0, 2) is None  # the last layer predicts nothing
    rows = trace.lookahead_rows(3, 0)
    assert rows is not None and rows.min() >= 0 and rows.max() < 8
    path = str(tmp_path / "t.npz")
    trace.save(path)
    trace = RoutingTrace.load(path)
    assert trace.lookahead is not None

    big = build_tiny("mixtral", num_local_experts=16, num_hidden_layers=3)
    folder = save_checkpoint(big, str(tmp_path / "big"), "fused")
    off = AutoModelForCausalLM.from_pretrained(
        folder, offload_config={"host_budget": "30%", "prefetch": "gate_lookahead"}
    )
    predictor = off.offload_engine.prefetcher.predictors[0]
    own = dict(predictor.routers)
    with replay_routing(off, trace):
        off.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        replayed = dict(predictor.routers)
    assert predictor.routers == own  # restored
    assert set(replayed) and all(type(r).__name__ == "_ReplayedRouter" for r in replayed.values())
    s = off.offload_stats()
    assert s["prefetch_issued"] > 0 and s["prefetch_precision"] > 0
