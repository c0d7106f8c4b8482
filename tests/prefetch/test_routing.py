"""One routing model: the recorder on every kind of MoE family, per-sequence views of a trace, and the cache
simulation that replays a trace through the real eviction policies (hit rates computed by hand)."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from hf_moe_offload.adapters import describe_model
from hf_moe_offload.bench.routing_stats import next_layer_recall, routing_report
from hf_moe_offload.cache.policies import LFUPolicy, replay
from hf_moe_offload.integration.tracing import record_routing
from hf_moe_offload.prefetch.trace import RoutingTrace, simulate_cache
from hf_moe_offload.testing import build_tiny, matrix_config, save_checkpoint, sharpen_routers


def _decode(*tokens, num_experts=8) -> RoutingTrace:
    """One sequence at one layer, decoded token by token: step t routes token t to `tokens[t]`."""
    chunks = [(t, 0, np.array([row]), np.ones((1, len(row)))) for t, row in enumerate(tokens)]
    return RoutingTrace.concat(1, num_experts, len(tokens[0]), chunks, {"batch": 1})


def _rate(counts: tuple[int, int]) -> float:
    return counts[0] / counts[1]


# -- the policy replay ---------------------------------------------------------------------------------------------


def test_replay_pins_a_request_and_follows_the_policy():
    # C=2, LRU: [0, 1] miss both; [1, 2] hit 1, 2 evicts 0; [2, 0] hit 2, 0 evicts 1 -> 2 hits / 6
    assert replay("lru", [[0, 1], [1, 2], [2, 0]], 2) == (2, 6)
    # C=2: after [0, 1] [0] [0] [1], expert 0 was used 3 times and 1 twice, but 1 was used last. [2] makes LRU
    # evict 0 (then [0] misses: 3 hits / 7) and LFU evict 1 (then [0] hits: 4 / 7).
    requests = [[0, 1], [0], [0], [1], [2], [0]]
    assert replay("lru", requests, 2) == (3, 7)
    assert replay(LFUPolicy(), requests, 2) == (4, 7)
    assert replay("lru", [[0, 1], [0, 1], [2]], 2, count_from=2) == (0, 1)  # warm-up requests are not counted
    with pytest.raises(ValueError, match="raise capacity to at least 3"):
        replay("lru", [[0, 1, 2]], 2)
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        replay("lru", [], 0)


# -- simulate_cache on hand-made traces -------------------------------------------------------------------------------


def test_lru_hits_by_hand():
    seq = _decode([0, 1], [0, 1], [2, 3], [0, 1])
    # C=2: token 1 hits both; token 2 evicts {0, 1}; token 3 misses both -> 2 hits / 8 lookups.
    assert simulate_cache(seq, 2) == (2, 8)
    # C=4: {0, 1} survive token 2 -> token 3 hits both.
    assert simulate_cache(seq, 4) == (4, 8)
    # C=2, overlapping sets: t0 miss 0,1; t1 hit 1, miss 2 (evicts 0); t2 hit 2, miss 0 -> 2 / 6.
    assert simulate_cache(_decode([0, 1], [1, 2], [2, 0]), 2) == (2, 6)
    # C=3 keeps {0, 1, 2} -> t2 hits both -> 3 / 6.
    assert _rate(simulate_cache(_decode([0, 1], [1, 2], [2, 0]), 3)) == pytest.approx(0.5)


def test_lru_recency_not_insertion_order():
    # C=3. t0 [0, 1]: 0 hits, cache (old -> new) 0 1. t1 [2, 0]: hit 0 -> 1 2 0. t2 [0, 3]: hit 0, 3 evicts 1
    # (least recently used; FIFO would evict 0, inserted first) -> 2 0 3. t3 [0, 2]: both hit. 4 hits / 8 lookups.
    assert simulate_cache(_decode([0, 1], [2, 0], [0, 3], [0, 2]), 3) == (4, 8)


def test_lru_edge_cases():
    assert simulate_cache(_decode([1, 1], [1, 1]), 2) == (1, 2)  # duplicates within a token count once
    with pytest.raises(ValueError):
        simulate_cache(_decode([0, 1, 2]), 2)  # a token's experts must fit in the cache
    # ids that name no weights (Switch's dropped token = E, LongCat's zero experts >= E) are not looked up
    assert simulate_cache(_decode([0, 8], [0, 9], num_experts=8), 2) == (1, 2)
    # sequences of different lengths, each decoded from a cold cache: (2 hits / 4) + (0 / 2)
    counts = [simulate_cache(_decode([0, 1], [0, 1]), 2), simulate_cache(_decode([0, 1]), 2)]
    assert sum(h for h, _ in counts) / sum(n for _, n in counts) == pytest.approx(2 / 6)


def test_simulate_cache_calls_layers_and_warmup():
    # two layers, two steps, a batch of 2 tokens per call: a call asks for its distinct experts once
    chunks = [(0, 0, [[0, 1], [1, 2]]), (0, 1, [[5, 6], [5, 6]]), (1, 0, [[0, 1], [0, 2]]), (1, 1, [[5, 7], [6, 7]])]
    trace = RoutingTrace.concat(
        2, 8, 2, [(s, layer, np.array(e), np.ones((2, 2))) for s, layer, e in chunks], {"batch": 2}
    )
    # shared cache of 5 over (layer, expert): step 0 loads {0,1,2} then {5,6}; step 1 hits 0, 1, 2, then 5, 6,
    # and 7 evicts (0, 0) -> 5 hits / 11 lookups
    assert simulate_cache(trace, 5) == (5, 11)
    assert simulate_cache(trace, 5, count_from=1) == (5, 6)  # the prefill warms the cache, uncounted
    assert simulate_cache(trace, 3, layers=[0]) == (3, 6)  # layer 0 alone: step 1 hits 0, 1, 2
    assert simulate_cache(trace, 3, layers=[1]) == (2, 5)  # layer 1 alone: step 1 hits 5, 6, misses 7
    assert simulate_cache(trace, 5, "lfu") == (5, 11)


# -- per-sequence views ----------------------------------------------------------------------------------------------


def test_sequences_split_batch_major_in_decode_order():
    # prefill of 2 sequences x 2 tokens, then one decode step of 1 token each
    chunks = [(0, 0, np.array([[0, 1], [2, 3], [4, 5], [6, 7]])), (1, 0, np.array([[1, 2], [5, 6]]))]
    trace = RoutingTrace.concat(1, 8, 2, [(s, layer, e, np.ones(e.shape)) for s, layer, e in chunks], {"batch": 2})
    a, b = trace.sequences()
    assert [a.rows(t, 0)[0].tolist() for t in range(a.num_steps)] == [[[0, 1]], [[2, 3]], [[1, 2]]]
    assert [b.rows(t, 0)[0].tolist() for t in range(b.num_steps)] == [[[4, 5]], [[6, 7]], [[5, 6]]]
    assert a.meta["sequence"] == 0 and b.meta["batch"] == 1
    with pytest.raises(ValueError, match="pass batch="):
        RoutingTrace.concat(1, 8, 2, [(s, layer, e, np.ones(e.shape)) for s, layer, e in chunks], {}).sequences()
    with pytest.raises(ValueError, match="not a multiple"):
        trace.sequences(batch=3)


def test_report_decodes_each_sequence_from_a_cold_cache():
    # a teacher-forced pass over 2 sequences of 2 tokens: [0,1] [2,3] then [0,1] [2,3]. Replayed as one stream,
    # a 4-expert cache would hit the whole second sequence; decoded separately from cold, nothing hits.
    e = np.array([[0, 1], [2, 3], [0, 1], [2, 3]])
    trace = RoutingTrace.concat(1, 4, 2, [(0, 0, e, np.ones(e.shape))], {"batch": 2})
    report = routing_report(trace, capacities=(2, 4))
    assert report["layers"][0]["lru_hit_c4"] == 0.0 and report["sequences"] == 2 and report["tokens"] == 4


def test_next_layer_recall_by_hand():
    # layer 0's lookahead predicts layer 1's experts: token 0 both right, token 1 one of two -> (1 + 0.5) / 2
    chunks = [
        (0, 0, np.array([[0, 1], [2, 3]]), np.ones((2, 2)), np.array([[4, 5], [6, 0]])),
        (0, 1, np.array([[5, 4], [6, 7]]), np.ones((2, 2)), np.full((2, 2), -1)),
    ]
    trace = RoutingTrace.concat(2, 8, 2, chunks, {"batch": 1})
    assert next_layer_recall(trace) == [pytest.approx(0.75)]
    with pytest.raises(ValueError, match="no lookahead"):
        next_layer_recall(RoutingTrace.concat(2, 8, 2, [c[:4] for c in chunks], {}))


# -- the recorder on every kind of family ----------------------------------------------------------------------------


def _record(model, **inputs) -> tuple[RoutingTrace, list]:
    """Run `model` once under the recorder; also return each router's output (in layer order)."""
    outs = {}

    def tap(layer: int):  # the model's own call comes last (a look-ahead may call the router first)
        return lambda module, args, out: outs.__setitem__(layer, out)

    layers = describe_model(model).layers
    taps = [layer.router.register_forward_hook(tap(layer.layer)) for layer in layers]
    try:
        with record_routing(model, meta={"batch": 2}) as rec, torch.no_grad():
            model(**inputs)
    finally:
        for handle in taps:
            handle.remove()
    return rec.trace(), [outs[layer.layer] for layer in layers]


def _assert_restored(model) -> None:
    for layer in describe_model(model).layers:
        assert not layer.module._forward_pre_hooks and "forward" not in layer.module.__dict__


def test_record_decorated_family_reads_the_arguments():
    model = build_tiny("qwen3_moe")  # @use_experts_implementation: the experts take (hidden, top_k_index, weights)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    trace, outs = _record(model, input_ids=ids)
    assert (trace.num_layers, trace.num_experts, trace.top_k, trace.num_steps) == (2, 8, 2, 1)
    for layer, out in enumerate(outs):  # the router returns (logits, weights, top_k_index)
        assert np.array_equal(trace.rows(0, layer)[0], out[2].numpy())
    assert trace.lookahead_rows(0, 0) is not None and trace.lookahead_rows(0, 1) is None
    _assert_restored(model)


def test_record_dbrx_through_its_adapter_on_normal_and_offloaded_models(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(matrix_config("dbrx"), dtype=torch.float32).eval()
    sharpen_routers(model)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    trace, outs = _record(model, input_ids=ids)
    k = model.config.ffn_config.moe_top_k
    assert (trace.num_layers, trace.top_k) == (2, k)
    for layer, logits in enumerate(outs):  # the router returns logits; DbrxFFN takes their top-k
        want = np.sort(logits.topk(k, dim=-1).indices.numpy(), 1)
        assert np.array_equal(np.sort(trace.rows(0, layer)[0], 1), want)
    _assert_restored(model)

    off = AutoModelForCausalLM.from_pretrained(
        save_checkpoint(model, str(tmp_path / "dbrx"), "fused"), offload_config={"host_budget": "50%"}
    )
    engine_forwards = [layer.module.__dict__.get("forward") for layer in describe_model(off).layers]
    assert all(engine_forwards)  # the engine's instance forwards are installed
    with record_routing(off) as rec, torch.no_grad():
        off(input_ids=ids)
    assert np.array_equal(rec.trace().experts, trace.experts)
    assert [layer.module.__dict__.get("forward") for layer in describe_model(off).layers] == engine_forwards


def test_record_switch_encoder_decoder_one_hot_dispatch():
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(matrix_config("switch_transformers"), dtype=torch.float32).eval()
    sharpen_routers(model)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    trace, outs = _record(model, input_ids=ids, decoder_input_ids=ids[:, :3])
    assert trace.top_k == 1 and trace.num_steps == 1
    for layer, (mask, _, _) in enumerate(outs):  # the router returns a one-hot dispatch mask; all zero: dropped
        mask = mask.reshape(-1, trace.num_experts)
        want = mask.argmax(-1).masked_fill(mask.sum(-1) == 0, trace.num_experts)
        assert np.array_equal(trace.rows(0, layer)[0][:, 0], want.numpy())
    _assert_restored(model)

    # generation: the encoder runs once (step 0), each decoder pass is a step of 2 tokens (one per sequence)
    with record_routing(model, meta={"batch": 2}) as rec, torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    trace = rec.trace()
    encoder = sorted({int(x) for x in trace.layer[trace.step == 0]} - {int(x) for x in trace.layer[trace.step == 1]})
    assert trace.num_steps == 3 and encoder and all(len(trace.rows(0, layer)[0]) == 12 for layer in encoder)
    assert all(
        len(trace.rows(s, layer)[0]) == 2 for s in (1, 2) for layer in set(range(trace.num_layers)) - set(encoder)
    )
