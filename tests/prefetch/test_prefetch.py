"""Prefetching: the priority loader, predictors on deterministic traces, the prefetcher's accounting, and
unchanged outputs with every predictor on."""

import threading
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList, MinLengthLogitsProcessor

from hf_moe_offload import UnknownNameError
from hf_moe_offload.cache.loader import PriorityLoader
from hf_moe_offload.integration.plan import CORRELATION_FILE
from hf_moe_offload.prefetch import CorrelationPredictor, GateLookahead, HistoryPredictor, RoutingTrace, make_predictor
from hf_moe_offload.testing import build_tiny, save_checkpoint


class _Job:
    def __init__(self, name):
        self.name, self.job_state, self.priority = name, None, 0


def _loader(threads=1, max_spec=None):
    order, gate = [], threading.Event()

    def run(job):
        if job.name == "block":
            gate.wait(10)
        order.append(job.name)
        time.sleep(0.01)

    return PriorityLoader(threads, run, max_spec), order, gate


def _drain(loader, n, order):
    deadline = time.time() + 10
    while len(order) < n and time.time() < deadline:
        time.sleep(0.01)


def test_demand_before_speculative_promotion_and_cancellation():
    loader, order, gate = _loader(threads=1, max_spec=1)
    jobs = {n: _Job(n) for n in ["block", "far", "near", "demand", "promoted", "wrong"]}
    loader.submit(jobs["block"], 0)
    time.sleep(0.05)  # the single worker is now busy
    loader.submit(jobs["far"], 3)
    loader.submit(jobs["near"], 1)
    loader.submit(jobs["promoted"], 5)
    loader.submit(jobs["wrong"], 1)
    loader.submit(jobs["demand"], 0)
    loader.promote(jobs["promoted"])
    assert loader.cancel(jobs["wrong"])
    gate.set()
    _drain(loader, 5, order)
    assert order == ["block", "demand", "promoted", "near", "far"]
    assert not loader.cancel(jobs["far"])  # already done
    loader.shutdown()


def test_speculative_reads_leave_a_thread_for_demand():
    loader, order, gate = _loader(threads=2, max_spec=1)
    spec = [_Job("block"), _Job("s2")]
    loader.submit(spec[0], 1)  # a speculative read that blocks
    loader.submit(spec[1], 1)  # must wait: only one speculative read at a time
    time.sleep(0.05)
    loader.submit(_Job("demand"), 0)
    _drain(loader, 1, order)
    assert order == ["demand"]
    gate.set()
    _drain(loader, 3, order)
    assert order == ["demand", "block", "s2"]
    loader.shutdown()


def _chain_trace(steps=20, layers=3, experts=8):
    """Layer l+1 uses expert (e + 1) % E when layer l used e; step s starts at expert s % E."""
    chunks = []
    for s in range(steps):
        for layer in range(layers):
            e = (s + layer) % experts
            chunks.append((s, layer, np.array([[e, (e + 4) % experts]]), np.array([[0.6, 0.4]])))
    return RoutingTrace.concat(layers, experts, 2, chunks, {})


def test_correlation_learns_a_trace_and_round_trips(tmp_path):
    trace = _chain_trace()
    p = CorrelationPredictor([8, 8, 8], 2)
    p.learn(trace)
    p.observe(0, 0, {3, 7})
    scores = p.predict(0, 0, None, [1, 2])
    assert set(np.argsort(-scores[1])[:2]) == {4, 0}
    assert set(np.argsort(-scores[2])[:2]) == {5, 1}
    p.save(str(tmp_path / "c.npz"))
    q = CorrelationPredictor([8, 8, 8], 2)
    q.load(str(tmp_path / "c.npz"))
    assert all(np.array_equal(a, b) for a, b in zip(p.tables, q.tables))
    with pytest.raises(ValueError, match="do not fit"):
        CorrelationPredictor([8, 8], 2).load(str(tmp_path / "c.npz"))


def test_history_prefers_experts_of_similar_past_requests():
    p = HistoryPredictor([8, 8], 2)
    for experts in ({1, 2}, {5, 6}):  # two past requests
        p.begin_request()
        for step in range(5):
            p.observe(step, 0, experts)
            p.observe(step, 1, {e + 1 for e in experts})
    p.begin_request()
    p.observe(0, 0, {5, 6})
    scores = p.predict(0, 0, None, [1])[1]
    assert set(np.argsort(-scores)[:2]) == {6, 7}


def test_gate_lookahead_uses_the_next_router():
    torch.manual_seed(0)
    router = torch.nn.Linear(16, 8, bias=False)
    p = GateLookahead([8, 8], 2, routers={1: router})
    h = torch.randn(1, 16)
    scores = p.predict(0, 0, h, [1])[1]
    assert set(np.nonzero(scores)[0]) == set(router(h).topk(2).indices[0].tolist())
    assert p.predict(0, 0, None, [1]) == {}


def test_unknown_predictor_is_a_typed_error(mixtral_dir):
    with pytest.raises(UnknownNameError, match="valid predictors: correlation, gate_lookahead, history"):
        make_predictor("oracle", [8], 2)
    with pytest.raises(UnknownNameError):
        AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config={"prefetch": "oracle"})


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    ref = build_tiny("mixtral", num_hidden_layers=4)
    return ref, save_checkpoint(ref, str(tmp_path_factory.mktemp("deep")), "fused")


def test_outputs_unchanged_with_every_predictor(deep):
    ref, folder = deep
    cfg = {"host_budget": "40%", "prefetch": "gate_lookahead,correlation,history", "prefetch_depth": 2}
    off = AutoModelForCausalLM.from_pretrained(folder, offload_config=cfg)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    for _ in range(2):  # the second request benefits from history
        assert torch.equal(off.generate(ids, **kw), ref.generate(ids, **kw))
    with torch.no_grad():
        torch.testing.assert_close(off(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    s = off.offload_stats()
    assert s["prefetch_issued"] > 0 and s["prefetch_used"] > 0
    assert s["prefetch_used"] + s["prefetch_wasted"] <= s["prefetch_issued"]
    assert 0 < s["prefetch_precision"] <= 1 and 0 < s["prefetch_recall"] <= 1
    assert set(s["prefetch_per_layer"]) <= {0, 1, 2, 3}


def test_gate_lookahead_cuts_demand_loads(deep):
    """Prefetching means fewer loads that a forward must start itself (whether a prefetch lands before it is
    needed, i.e. counts as a hit, depends on timing: that is measured by `bench`, not asserted here)."""
    _, folder = deep
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(4))
    stats = {}
    for pf in ("none", "gate_lookahead"):
        off = AutoModelForCausalLM.from_pretrained(folder, offload_config={"host_budget": "40%", "prefetch": pf})
        off.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        stats[pf] = off.offload_stats()
    assert stats["none"]["demand_loads"] == stats["none"]["misses"]
    assert stats["gate_lookahead"]["prefetch_used"] > 0
    assert stats["gate_lookahead"]["demand_loads"] < stats["none"]["demand_loads"]


def test_step_boundary_processor_and_user_processors(deep):
    _, folder = deep
    off = AutoModelForCausalLM.from_pretrained(folder, offload_config={"host_budget": "40%"})
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(5))
    user = LogitsProcessorList([MinLengthLogitsProcessor(10, eos_token_id=2)])
    out = off.generate(ids, max_new_tokens=10, do_sample=False, logits_processor=user)
    assert out.shape[1] == 15
    assert off.offload_engine.prefetcher.step == 10  # one boundary per generated token


def test_correlation_is_persisted_next_to_the_model(deep, tmp_path):
    ref, folder = deep
    import shutil

    local = shutil.copytree(folder, tmp_path / "m")
    cfg = {"host_budget": "40%", "prefetch": "correlation"}
    off = AutoModelForCausalLM.from_pretrained(local, offload_config=cfg)
    off.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8, do_sample=False)
    path = off.offload_engine.save_correlation()
    assert path.endswith(CORRELATION_FILE)
    again = AutoModelForCausalLM.from_pretrained(local, offload_config=cfg)
    a = off.offload_engine.predictor("correlation").tables
    b = again.offload_engine.predictor("correlation").tables
    assert sum(t.sum() for t in b) > 0 and all(np.array_equal(x, y) for x, y in zip(a, b))


def _prefetcher(mixtral_dir, mixtral_model, host_slots: int, scores):
    """A real cache of the tiny Mixtral (`host_slots`, LRU, 2 I/O threads) and a Prefetcher whose one predictor
    always scores `scores` (8 experts per layer, 2 layers, top-2)."""
    from hf_moe_offload.cache import ExpertCache, OffloadStats, make_policy
    from hf_moe_offload.integration import inspect_checkpoint
    from hf_moe_offload.prefetch import Predictor, Prefetcher
    from hf_moe_offload.storage import ExpertStore

    class Fixed(Predictor):
        def predict(self, step, layer, hidden, targets):
            return {t: np.asarray(scores, dtype=float) for t in targets}

    _, layout, _ = inspect_checkpoint(mixtral_model, mixtral_dir)
    stats = OffloadStats()
    cache = ExpertCache(
        ExpertStore(layout),
        device=torch.device("cpu"),
        host_slots=host_slots,
        device_slots=0,
        policy_factory=lambda: make_policy("lru"),
        io_threads=2,
        stats=stats,
    )
    return cache, stats, Prefetcher(cache, [Fixed([8, 8], 2)], [8, 8], 2, io_threads=2)


def test_poor_predictions_switch_speculative_loads_off(mixtral_dir, mixtral_model):
    cache, stats, pf = _prefetcher(mixtral_dir, mixtral_model, 6, np.eye(8)[7])  # always expert 7, never routed
    routing = torch.tensor([[0, 1]])
    issued = []
    for _ in range(30):
        for layer in (0, 1):
            pf.on_layer(layer, torch.zeros(1, 64), routing)
            for e in (0, 1):  # what the forward would do: use the routed experts
                lease = cache.try_acquire((layer, e))
                lease.wait()
                lease.release()
        issued.append(stats.snapshot()["prefetch_issued"])
    assert issued[0] > 0  # tried at first
    assert pf.metrics()["prefetch_precision"] == 0.0
    assert issued[-1] == issued[-10]  # then stopped: precision 0 < hit rate
    cache.close()


def test_an_io_bound_model_prefetches_only_near_certain_predictions(mixtral_dir, mixtral_model):
    """The break-even precision is 1 - compute / load: compute = time between MoE layers less the forward's
    stalls, load = the mean seconds of one expert load."""
    cache, stats, pf = _prefetcher(mixtral_dir, mixtral_model, 4, np.zeros(8))  # predicts nothing: no loads
    assert pf._break_even(2) == 0.0  # nothing measured yet
    for _ in range(3):
        pf.on_layer(0, torch.zeros(1, 64), torch.tensor([[0, 1]]))
        time.sleep(0.06)
        stats.stall(0.05)  # what the forward reports when it waits for an expert: 10 ms of compute remain
        pf.on_layer(1, torch.zeros(1, 64), torch.tensor([[0, 1]]))
    assert stats.snapshot()["prefetch_issued"] == 0
    stats.load_time(0.4), stats.add("loads")  # one load took 0.4 s
    # 1 - 0.01 / 0.4 = 0.975 (2: experts per layer); without the stall taken out it would be 1 - 0.06 / 0.4 = 0.85
    assert 0.9 < pf._break_even(2) <= 0.98, pf._break_even(2)
    assert pf._break_even(8) == 0.0  # no gap measured for layers routing to 8 experts (a prefill)
    pf._evidence[2].right, pf._evidence[2].scored = 50, 100  # precision 0.5, far above the hit rate (0)
    assert not pf._worth_it(2)  # I/O bound: half the prefetches would waste disk time
    stats.reset()
    stats.load_time(0.01), stats.add("loads")  # loads far shorter than the compute between layers
    assert pf._break_even(2) == 0.0 and pf._worth_it(2)  # compute-bound: any useful prediction is worth loading
    assert pf.metrics()["prefetch_break_even"] == 0.0
    cache.close()


@pytest.mark.parametrize("family", ["longcat_flash", "zaya"])
def test_gate_lookahead_keeps_routers_with_zero_expert_columns(tmp_path, family):
    """Routers with more logit columns than routed experts (zero / no-op experts) still predict: their integer
    top-k is used and ids past the routed experts are dropped."""
    from hf_moe_offload.testing.matrix import matrix_config, sharpen_routers

    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(matrix_config(family)).eval()
    sharpen_routers(ref)
    folder = save_checkpoint(ref, str(tmp_path / "m"), "fused")
    off = AutoModelForCausalLM.from_pretrained(folder, offload_config={"host_budget": "40%"})
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(off.generate(ids, **kw), ref.generate(ids, **kw))
    lookahead = off.offload_engine.predictor("gate_lookahead")
    assert sorted(lookahead.routers) == [x.layer for x in off.offload_engine.topology.layers]
    assert off.offload_stats()["prefetch_precision"] > 0
