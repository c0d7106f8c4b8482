"""Scheduling: the planner's cost model on hand-computable cases, its routing and cache models against Monte-Carlo,
the planner's constraints, Fiddler's placement rule, the token scheduler, profiles and their bandwidth measurements,
`mode="auto"` values and `hf-moe-offload plan` (which reserve the same bytes)."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from hf_moe_offload import OffloadConfig
from hf_moe_offload.cli.main import main as cli_main
from hf_moe_offload.prefetch import RoutingTrace
from hf_moe_offload.prefetch.trace import simulate_cache
from hf_moe_offload.scheduling.auto import auto_config, resolve_auto
from hf_moe_offload.scheduling.cost_model import (
    ModelShape,
    distinct_from_trace,
    estimate_step,
    expected_distinct,
    expected_lru_hit_rate,
    lower_bound,
    place_expert,
)
from hf_moe_offload.scheduling.model_plan import plan_for_model, shape_for_model
from hf_moe_offload.scheduling.planner import plan
from hf_moe_offload.scheduling.profile import (
    HardwareProfile,
    LinearFit,
    canonical_dims,
    measure_h2d_bandwidth,
    measure_profile,
    measure_read_bandwidth,
)
from hf_moe_offload.scheduling.token_scheduler import group_sequences, routing_signature

MB = 10**6
MiB = 2**20


def _profile(a=0.5e-3, b=0.0, disk=1e9, nbytes=MB, device=None) -> HardwareProfile:
    """A profile with round numbers: one expert load takes `nbytes / disk` s, one expert on n tokens `a + b n` s."""
    p = HardwareProfile(
        expert_nbytes=nbytes,
        hidden_size=64,
        intermediate_size=64,
        dtype="bfloat16",
        disk_read_Bps=disk,
        cpu_mem_Bps=1e30,
        cpu_fit=LinearFit(a, b),
        page_cache_read_Bps=10 * disk,
    )
    if device is not None:
        p.device, p.h2d_Bps, p.device_mem_Bps, p.device_fit = "cuda:0 fake", device[0], 1e30, LinearFit(*device[1])
    return p


SHAPE = ModelShape(num_layers=4, num_experts=8, top_k=2, expert_nbytes=MB, other_nbytes=0)


# -- cost model arithmetic ---------------------------------------------------------------------------------------


def test_transfer_bound_layer_overlap_vs_sum():
    # 2 distinct experts, all missed: 2 MB / 1 GB/s = 2 ms transfer; compute 2 * 0.5 ms = 1 ms per layer.
    c = estimate_step(_profile(), SHAPE, 1, compute_slots=2, distinct=[2, 2, 2, 2], hit_rate=0.0)
    assert c.transfer_s == pytest.approx([2e-3] * 4)
    assert c.compute_s == pytest.approx([1e-3] * 4)
    assert c.step_s == pytest.approx(8e-3)  # max(2, 1) ms x 4 layers
    assert c.serial_step_s == pytest.approx(12e-3)  # (2 + 1) ms x 4 layers
    assert c.tokens_per_s == pytest.approx(125.0)
    assert c.bubble_fraction == pytest.approx(0.5)


def test_compute_bound_layer_has_no_bubble():
    c = estimate_step(_profile(b=1e-4), SHAPE, 4, compute_slots=2, distinct=[4] * 4, hit_rate=0.75)
    assert c.transfer_s == pytest.approx([1e-3] * 4)  # 4 experts x 25% missed x 1 ms
    assert c.compute_s == pytest.approx([4 * 0.5e-3 + 1e-4 * 4 * 2] * 4)  # d * a + b * B * k
    assert c.step_s == pytest.approx(sum(c.compute_s))
    assert c.bubble_fraction == pytest.approx(0.0)


def test_each_layer_costs_the_roofline_bound():
    assert lower_bound(1e-3, 2 * MB, 1e9) == pytest.approx(2e-3)  # transfer-bound
    assert lower_bound(3e-3, 2 * MB, 1e9, 4 * MB, 1e9) == pytest.approx(4e-3)  # host -> device bound
    assert lower_bound(5e-3, None, 1e9) == 5e-3 and lower_bound(None, 2 * MB, None) is None
    c = estimate_step(_profile(), SHAPE, 1, compute_slots=2, distinct=[2, 2, 2, 2], hit_rate=0.5)
    assert c.step_s == pytest.approx(4 * lower_bound(c.compute_s[0], 2 * 0.5 * MB, 1e9))


def test_dense_time_streams_weights_once_and_reads_each_kv_cache():
    p = _profile()
    p.cpu_mem_Bps = 1e9
    shape = ModelShape(1, 8, 2, MB, other_nbytes=3 * MB, embedding_nbytes=MB)
    base = estimate_step(p, SHAPE, 1, 2, distinct=[2] * 4, hit_rate=1.0).compute_s[0]
    c = estimate_step(p, shape, 2, 2, distinct=[2], hit_rate=1.0, seq_bytes=MB)
    flops = 2 * 2 * (2 * MB / 2) / p.flops_per_second()  # 2 tokens x 2 FLOPs x streamed params
    assert c.compute_s[0] == pytest.approx(base + 2e-3 + flops + 2e-3)  # weights 2 MB + 2 sequences x 1 MB KV


# -- routing and cache models against simulation ------------------------------------------------------------------


@pytest.mark.parametrize("batch,experts,k", [(1, 8, 2), (4, 8, 2), (16, 64, 6), (64, 128, 8)])
def test_expected_distinct_matches_monte_carlo(batch, experts, k):
    rng = np.random.default_rng(0)
    draws = [len({int(e) for _ in range(batch) for e in rng.choice(experts, k, replace=False)}) for _ in range(2000)]
    # Uniform top-k without replacement: each expert is in a token's set with probability k/E, as the formula says.
    assert expected_distinct(batch, experts, k) == pytest.approx(np.mean(draws), rel=0.03)


def _uniform_trace(layers, experts, k, batch, steps=400, seed=0) -> RoutingTrace:
    """Decode steps of `batch` tokens, each routed to `k` distinct experts drawn uniformly, at every layer."""
    rng = np.random.default_rng(seed)
    chunks = [
        (step, layer, np.stack([rng.choice(experts, k, replace=False) for _ in range(batch)]), np.ones((batch, k)))
        for step in range(steps)
        for layer in range(layers)
    ]
    return RoutingTrace.concat(layers, experts, k, chunks, {"batch": batch})


@pytest.mark.parametrize("layers,experts,k,batch,capacity", [(8, 8, 2, 1, 32), (8, 8, 2, 4, 48), (4, 8, 2, 4, 16)])
def test_expected_lru_hit_rate_matches_simulation(layers, experts, k, batch, capacity):
    model = expected_lru_hit_rate(capacity, layers, experts, expected_distinct(batch, experts, k))
    # the cache's own LRU policy, one cache shared by every layer, after 50 warm-up steps
    hits, lookups = simulate_cache(_uniform_trace(layers, experts, k, batch), capacity, "lru", count_from=50)
    assert model == pytest.approx(hits / lookups, abs=0.05)


def test_expected_lru_hit_rate_limits():
    assert expected_lru_hit_rate(64, 8, 8, 2.0) == 1.0  # everything fits
    assert expected_lru_hit_rate(10, 8, 8, 2.0) == 0.0  # one step's 16 experts exceed the cache: LRU thrashes
    assert expected_lru_hit_rate(63, 8, 8, 8.0) == 0.0  # every expert every step: a cyclic scan


def test_distinct_from_trace_and_plan_uses_it():
    # Decode steps use one of two expert pairs, {0, 1} or {2, 3}: a batch never needs more than 4 experts.
    chunks = [(0, layer, np.array([[0, 1]] * 3), np.ones((3, 2))) for layer in range(2)]
    chunks += [
        (s, layer, np.array([[2 * (s % 2), 2 * (s % 2) + 1]]), np.ones((1, 2)))
        for s in range(1, 41)
        for layer in range(2)
    ]
    trace = RoutingTrace.concat(2, 8, 2, chunks, {})
    curve = distinct_from_trace(trace, (1, 2, 32), samples=32)
    assert curve[1] == [2.0, 2.0]
    assert curve[32] == [4.0, 4.0]
    shape = ModelShape(2, 8, 2, MB, 0)
    measured = plan(_profile(), shape, 100 * MB, batch_candidates=(1, 32), distinct_curve=curve)
    assert measured.candidates[1].distinct == [4.0, 4.0]
    uniform = plan(_profile(), shape, 100 * MB, batch_candidates=(1, 32))
    assert uniform.candidates[1].distinct[0] == pytest.approx(expected_distinct(32, 8, 2))


def test_distinct_from_a_batch_trace_mapped_to_a_bigger_model():
    # Recorded at batch 4 (one decode token per sequence per step): sequences 0-1 use experts {0, 1}, 2-3 use
    # {2, 3}. Batch 2 = two random sequences of one step (2 or 4 experts); batch 4 = all of them.
    rows = np.array([[0, 1], [0, 1], [2, 3], [2, 3]])
    chunks = [(s, 0, rows, np.full((4, 2), 0.5)) for s in range(6)]
    trace = RoutingTrace.concat(1, 4, 2, chunks, {"batch": 4})
    curve = distinct_from_trace(trace, (1, 2, 4), samples=64)
    assert curve[4] == [4.0]
    assert 2.0 <= curve[2][0] <= 4.0 and curve[1] == [2.0]
    # mapped to 8 experts, top-4 (each recorded expert owns a block of 2): every count doubles
    mapped = distinct_from_trace(trace, (1, 4), samples=64, num_experts=8, top_k=4)
    assert mapped[1] == [4.0] and mapped[4] == [8.0]


# -- the planner's choices ---------------------------------------------------------------------------------------


def test_unconstrained_planner_picks_the_biggest_batch():
    p = plan(_profile(b=1e-5), SHAPE, 10**9)
    assert p.feasible and p.batch_size == 256
    assert p.tokens_per_s == max(c.tokens_per_s for c in p.candidates)
    assert "<- plan" in str(p) and json.dumps(p.to_dict())


def test_planner_respects_the_latency_limit():
    free = plan(_profile(b=1e-5), SHAPE, 10**9)
    limit = free.candidates[3].step_s * 1.001  # batch 8 just fits
    p = plan(_profile(b=1e-5), SHAPE, 10**9, latency_limit_s=limit)
    assert p.feasible and p.step_s <= limit and p.batch_size == 8
    assert all(not c.feasible and c.reason.startswith("latency") for c in p.candidates if c.batch_size > 8)
    too_tight = plan(_profile(b=1e-5), SHAPE, 10**9, latency_limit_s=1e-6)
    assert not too_tight.feasible and too_tight.reason.startswith("latency")


def test_planner_respects_the_memory_budget():
    budget, seq = 40 * MB, MB  # each sequence's KV costs an expert slot
    p = plan(_profile(b=1e-5), SHAPE, budget, seq_bytes=seq)
    assert p.feasible and p.batch_size == 32
    chosen = next(c for c in p.candidates if c.batch_size == p.batch_size)
    assert sum(chosen.memory.values()) <= budget and chosen.compute_slots >= SHAPE.top_k
    assert all(c.reason.startswith("memory") for c in p.candidates if c.batch_size > 32)
    assert p.host_budget_bytes == chosen.compute_slots * MB


def test_more_cache_means_fewer_transfers():
    small = plan(_profile(), SHAPE, 8 * MB, batch_candidates=(1,))
    large = plan(_profile(), SHAPE, 32 * MB, batch_candidates=(1,))
    assert large.hit_rate == 1.0 and sum(large.transfer_s) == 0.0
    assert small.hit_rate < large.hit_rate and small.tokens_per_s < large.tokens_per_s


# -- placement (Fiddler) -----------------------------------------------------------------------------------------


def test_place_expert_flips_where_cpu_compute_stops_beating_the_copy():
    # copy 3.5 MB at 1 GB/s = 3.5 ms, device compute free, CPU 1 ms per token: CPU up to 3 tokens.
    p = _profile(a=0.0, b=1e-3, nbytes=3_500_000, device=(1e9, (0.0, 0.0)))
    assert [place_expert(n, p) for n in (1, 2, 3, 4, 8)] == ["cpu", "cpu", "cpu", "device", "device"]
    assert place_expert(100, _profile()) == "cpu"  # no accelerator
    assert place_expert(4, p, transfer_s=10e-3) == "cpu"


def test_device_plan_splits_budgets_and_places_missed_experts():
    p = _profile(a=0.0, b=1e-3, nbytes=3_500_000, device=(1e9, (0.0, 0.0)))
    shape = ModelShape(2, 8, 2, 3_500_000, other_nbytes=10 * MB)
    result = plan(p, shape, memory_budget_bytes=100 * MB, batch_candidates=(1, 64), device_memory_bytes=30 * MB)
    small, big = result.candidates
    assert small.placement == "cpu" and big.placement == "device"
    assert big.memory["device_slots"] == 5 * 3_500_000  # (30 - 10) MB of device memory -> 5 slots
    assert big.memory["host_slots"] == 16 * 3_500_000  # the host holds every expert
    assert result.device_budget_bytes > 0 and result.host_budget_bytes > 0


# -- token scheduler ---------------------------------------------------------------------------------------------


def _two_clusters(n=16, experts=8):
    sig = np.zeros((n, experts), dtype=np.int64)
    for i in range(n):  # even sequences use experts 0-3, odd ones 4-7: the input order mixes them
        base = 0 if i % 2 == 0 else experts // 2
        sig[i, base + (i // 2) % 4] = 3
        sig[i, base + (i // 2 + 1) % 4] = 1
    return sig


def test_token_scheduler_separates_two_clusters():
    sig = _two_clusters()
    sched = group_sequences(sig, 8)
    assert sorted(sched.permutation) == list(range(16))
    assert all(len(g) <= 8 for g in sched.groups)
    assert sched.distinct_before == [8, 8] and sched.distinct_after == [4, 4]
    assert sched.reduction == pytest.approx(0.5)
    assert {frozenset(i % 2 for i in g) for g in sched.groups} == {frozenset({0}), frozenset({1})}
    again = group_sequences(torch.as_tensor(sig), 8)  # deterministic, tensors accepted
    assert again.permutation == sched.permutation
    assert sched.reorder(list(range(16))) == sched.permutation
    assert [len(b) for b in sched.batches(list(range(16)))] == [8, 8]


def test_token_scheduler_multilayer_signatures_and_ragged_last_group():
    rng = np.random.default_rng(0)
    sig = rng.integers(0, 2, size=(21, 3, 16))
    sched = group_sequences(sig, 4)
    assert sorted(sched.permutation) == list(range(21))
    assert sorted(len(g) for g in sched.groups) == [1, 4, 4, 4, 4, 4]
    assert sum(sched.distinct_after) <= sum(sched.distinct_before)
    with pytest.raises(ValueError, match="group_size"):
        group_sequences(sig, 0)


def test_routing_signature_counts_router_choices():
    torch.manual_seed(0)
    router = torch.nn.Linear(16, 8)
    hidden = torch.randn(3, 5, 16)
    counts = routing_signature(router, hidden, num_experts=8, top_k=2)
    assert counts.shape == (3, 8) and counts.sum(1).tolist() == [10, 10, 10]
    expected = torch.bincount(torch.topk(router(hidden[1]), 2).indices.reshape(-1), minlength=8)
    assert torch.equal(counts[1], expected)
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    as_tuple = routing_signature(lambda x: (None, None, torch.topk(router(x), 2).indices), hidden, 8, 2, mask)
    assert as_tuple.sum(1).tolist() == [6, 10, 10]


# -- profile -----------------------------------------------------------------------------------------------------


def test_canonical_dims():
    assert canonical_dims({"gate_up_proj": [7168, 1024], "down_proj": [1024, 3584]}) == (1024, 3584)
    assert canonical_dims({"gate_up_proj": [1024, 7168], "down_proj": [3584, 1024]}) == (1024, 3584)  # transposed
    assert canonical_dims({"up_proj": [96, 64], "down_proj": [64, 96]}) == (64, 64)  # ungated: same FLOPs
    assert canonical_dims((32, 48)) == (32, 48)


def test_linear_fit_recovers_a_line():
    fit = LinearFit.fit([(n, 2e-3 + 1e-4 * n) for n in (1, 4, 16, 64)])
    assert fit.a == pytest.approx(2e-3) and fit.b == pytest.approx(1e-4)
    assert fit(0) == 0.0 and fit(10) == pytest.approx(3e-3)


def test_profile_measures_and_round_trips(tmp_path):
    sample = tmp_path / "sample.bin"
    sample.write_bytes(b"\1" * (2 << 20))
    cold, warm = measure_read_bandwidth(sample, block=1 << 20)
    assert cold > 0 and warm > 0
    p = measure_profile(
        {"gate_up_proj": [64, 32], "down_proj": [32, 32]},
        "float32",
        sample_file=sample,
        token_counts=(1, 4, 16),
        repeats=2,
    )
    assert (p.hidden_size, p.intermediate_size, p.expert_nbytes) == (32, 32, 3 * 32 * 32 * 4)
    assert p.disk_read_Bps > 0 and p.cpu_mem_Bps > 0 and len(p.cpu_fit.points) == 3 and not p.has_device
    assert p.disk_samples_Bps == [p.disk_read_Bps]
    path = tmp_path / "profile.json"
    p.save(path)
    back = HardwareProfile.load(path)
    assert back == p and json.dumps(back.to_dict()) == json.dumps(p.to_dict())
    assert back.cpu_expert_seconds(8) == pytest.approx(p.cpu_expert_seconds(8))


def test_read_bandwidth_of_a_file_and_a_folder(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(8 * MiB))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.bin").write_bytes(os.urandom(2 * MiB))
    assert measure_read_bandwidth(data, block=MiB)[0] > 0
    assert measure_read_bandwidth(data, block=MiB, max_bytes=4 * MiB)[1] > 0
    cold, warm = measure_read_bandwidth(tmp_path, block=MiB)  # a folder: every file under it
    assert cold > 0 and warm > 0


def test_read_bandwidth_with_several_readers_reads_every_piece_once_per_pass(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(8 * MiB))

    def rchar() -> int:  # bytes this process read through read syscalls, every thread included
        return int(next(x for x in open("/proc/self/io").read().splitlines() if x.startswith("rchar")).split()[1])

    before = rchar()
    cold, warm = measure_read_bandwidth(data, block=MiB, threads=3)
    assert cold > 0 and warm > 0
    assert 3 * 8 * MiB <= rchar() - before < 3 * 8 * MiB + MiB  # one cold and two warm passes of 8 pieces
    assert measure_h2d_bandwidth("cpu") is None  # no accelerator, nothing to copy to


def test_profile_combines_cold_samples_by_its_statistic():
    p = _profile(disk=1e9)
    p.disk_samples_Bps = [1e9]
    p.add_disk_sample(0.5e9)
    assert p.disk_read_Bps == 1e9  # the fastest: the bound stays a lower bound on a drifting disk
    p.add_disk_sample(2e9)
    assert p.disk_read_Bps == 2e9 and "[samples 1.00, 0.50, 2.00]" in p.describe()
    p.meta["statistic"] = "median"
    p.add_disk_sample(0.4e9)
    assert p.disk_read_Bps == pytest.approx(0.75e9)


# -- mode="auto" -------------------------------------------------------------------------------------------------


def test_resolve_auto_cpu_and_cuda_budgets():
    summary = {"moe_layers": 4, "experts_per_layer": 8, "top_k": 2, "bytes_per_expert": MB, "other_bytes": 10 * MB}
    fast = _profile(a=0.25e-3)  # a layer computes 2 experts in 0.5 ms, one load takes 1 ms: prefetch 2 layers ahead
    cpu = resolve_auto(OffloadConfig(device="cpu"), summary, fast, host_memory_bytes=30 * MB)
    assert cpu == {"host_budget": 17 * MB, "device_budget": 0, "prefetch_depth": 2}  # 90% of 30 MB - 10 MB dense
    tight = resolve_auto(OffloadConfig(device="cpu"), summary, None, host_memory_bytes=5 * MB)
    assert tight["host_budget"] == 2 * MB and tight["prefetch_depth"] == 1  # floored at top-k experts
    roomy = resolve_auto(OffloadConfig(device="cpu"), summary, None, host_memory_bytes=10**12)
    assert roomy["host_budget"] == 32 * MB  # capped at all expert bytes
    gpu = resolve_auto(
        OffloadConfig(device="cpu"),
        summary,
        None,
        device="cuda",
        host_memory_bytes=10 * MB,
        device_memory_bytes=20 * MB,
        batch_size=2,
        seq_bytes=MB,
    )
    assert gpu["device_budget"] == 18 * MB - 10 * MB - 2 * MB and gpu["host_budget"] == 9 * MB
    cfg = auto_config(OffloadConfig(device="cpu"), summary, profile=fast, host_memory_bytes=30 * MB)
    assert cfg.host_budget.nbytes == 17 * MB and cfg.prefetch_depth == 2


# -- CLI ---------------------------------------------------------------------------------------------------------

PLAN_KEYS = {
    "batch_size",
    "feasible",
    "tokens_per_s",
    "step_s",
    "serial_step_s",
    "bubble_fraction",
    "hit_rate",
    "placement",
    "host_budget_bytes",
    "device_budget_bytes",
    "transfer_s",
    "compute_s",
    "min_overlap_batch",
    "candidates",
    "inputs",
    "model",
    "profile",
    "offload_config",
}


def test_plan_command_prints_table_and_json(mixtral_dir, tmp_path, capsys):
    profile = tmp_path / "p.json"
    args = ["plan", mixtral_dir, "--host-memory", "64MiB", "--no-step-overhead", "--batches", "1,4,16"]
    code = cli_main([*args, "--disk-bandwidth", "400MB", "--save-profile", str(profile), "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # --json: one document, nothing else on stdout
    record = json.loads(out[0])
    assert code == 0 and PLAN_KEYS <= set(record)
    assert record["profile"]["disk_read_Bps"] == 400e6 and record["batch_size"] == 16
    assert cli_main([*args, "--profile", str(profile)]) == 0
    assert any("<- plan" in line for line in capsys.readouterr().out.splitlines())  # the table for people
    code = cli_main([*args[:4], "--profile", str(profile), "--latency", "1e-9", "--no-step-overhead", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 1 and record["feasible"] is False and record["reason"].startswith("latency")
    assert cli_main(["plan", mixtral_dir, "--host-memory", "25%", "--profile", str(profile)]) == 2


def test_plan_and_auto_reserve_the_same_bytes(mixtral_dir, tmp_path, capsys):
    # The same memory, batch and context: `plan` and `mode="auto"` (auto_config as loading calls it, the model's
    # config.json found beside the sample file) both keep the dense weights and the KV cache out of the memory.
    from hf_moe_offload.cli.inspect_cmd import inspect_path
    from hf_moe_offload.storage import checkpoint_files

    info = inspect_path(mixtral_dir)
    expert = info["bytes_per_expert"]
    with open(os.path.join(mixtral_dir, "config.json")) as f:
        config = json.load(f)
    shape, kv = shape_for_model(info, config)
    seq = 512 * kv
    memory = info["other_bytes"] + seq + 7 * expert + 100  # 7 slots once the KV is kept, 10 if it were forgotten
    profile = _profile(nbytes=expert)
    profile.save(tmp_path / "p.json")
    code = cli_main(
        [
            "plan",
            mixtral_dir,
            "--host-memory",
            str(memory),
            "--profile",
            str(tmp_path / "p.json"),
            "--batches",
            "1",
            "--context",
            "512",
            "--no-step-overhead",
            "--json",
        ]
    )
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["inputs"]["seq_bytes"] == seq > 3 * expert
    assert record["inputs"]["model"] == dataclasses.asdict(shape) and shape.embedding_nbytes > 0
    assert record["host_budget_bytes"] == 7 * expert

    sample = max(checkpoint_files(mixtral_dir), key=os.path.getsize)
    cfg = auto_config(
        OffloadConfig(mode="auto", device="cpu"),
        info,
        sample_file=sample,
        device="cpu",
        profile=profile,
        host_memory_bytes=memory,
        reserve_fraction=0.0,
        context=512,
    )
    assert cfg.host_budget.nbytes == record["host_budget_bytes"]
    direct = plan_for_model(profile, info, memory, model_config=config, batch_candidates=(1,))
    assert direct.host_budget_bytes == record["host_budget_bytes"] and direct.inputs["seq_bytes"] == seq
