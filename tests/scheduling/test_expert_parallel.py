"""Planning for expert parallelism: a rank's share of the experts and the token dispatch it adds to a step."""

from __future__ import annotations

import pytest

from hf_moe_offload.errors import OffloadConfigError, UnsupportedParallelismError
from hf_moe_offload.scheduling.cost_model import ModelShape, expected_distinct
from hf_moe_offload.scheduling.expert_parallel import (
    Link,
    check_divides,
    dispatch_bytes,
    dispatch_seconds,
    parse_bandwidth,
    plan_expert_parallel,
    rank_distinct,
    rank_shape,
)
from hf_moe_offload.scheduling.planner import plan
from hf_moe_offload.scheduling.profile import HardwareProfile, LinearFit

SHAPE = ModelShape(num_layers=4, num_experts=8, top_k=2, expert_nbytes=1 << 20, other_nbytes=8 << 20)
PROFILE = HardwareProfile(1 << 20, 256, 1365, "bfloat16", 5e8, 1e10, LinearFit(1e-4, 1e-6))
LINK = Link(bandwidth_Bps=1e9, latency_s=1e-4)


def test_dispatch_is_free_on_one_rank_and_follows_the_formula_on_several():
    assert dispatch_seconds(16, 2, 1024, 2, 1, 4, LINK) == 0.0
    one_way = 16 * 2 * 1024 * 2 * (2 - 1) / 2
    assert dispatch_bytes(16, 2, 1024, 2, 2) == one_way
    assert dispatch_seconds(16, 2, 1024, 2, 2, 4, LINK) == pytest.approx(4 * 2 * (1e-4 + one_way / 1e9))
    assert dispatch_bytes(16, 2, 1024, 2, 4) == pytest.approx(3 * one_way / 2)  # (N - 1) / N of the pairs leave


def test_dispatch_grows_with_batch_and_top_k():
    base = dispatch_seconds(4, 2, 1024, 2, 2, 4, LINK)
    assert 0 < base < dispatch_seconds(8, 2, 1024, 2, 2, 4, LINK)
    assert base < dispatch_seconds(4, 4, 1024, 2, 2, 4, LINK)


def test_a_rank_plans_its_share_of_the_experts():
    local = rank_shape(SHAPE, 2)
    assert local.num_experts == 4 and local.total_expert_nbytes == SHAPE.total_expert_nbytes // 2
    # the distinct experts of the whole job's N * B tokens, split over N ranks
    assert rank_distinct(3, SHAPE, 2) == pytest.approx(expected_distinct(6, 8, 2) / 2)


def test_a_world_size_that_does_not_divide_the_experts_is_refused():
    with pytest.raises(UnsupportedParallelismError, match="--world-size=3 must divide.*has 8. Choose a --world"):
        check_divides(3, {"0": 8}, "--world-size")
    with pytest.raises(UnsupportedParallelismError, match="ep_size=3 must divide.*Choose an ep_size"):
        rank_shape(SHAPE, 3)


@pytest.mark.parametrize(
    ("text", "expected"), [("10Gbit", 1.25e9), ("100Mbps", 12.5e6), ("4GB", 4e9), ("1MiB", 1 << 20), ("2e9", 2e9)]
)
def test_bandwidths_read_bits_bytes_and_numbers(text, expected):
    assert parse_bandwidth(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["fast", "0", "-3", "25%"])
def test_a_bad_bandwidth_names_the_option(text):
    with pytest.raises(OffloadConfigError, match="--link-bandwidth"):
        parse_bandwidth(text)


def test_one_rank_is_the_plain_plan():
    kwargs = dict(batch_candidates=(1, 4), seq_bytes=1 << 20)
    one = plan_expert_parallel(PROFILE, SHAPE, 24 << 20, 1, hidden_size=256, itemsize=2, link=LINK, **kwargs)
    assert one.to_dict() == plan(PROFILE, SHAPE, 24 << 20, **kwargs).to_dict()
    assert "expert_parallel" not in one.inputs


def test_two_ranks_add_the_dispatch_to_each_step_and_plan_half_the_bytes():
    kwargs = dict(batch_candidates=(1, 4, 16), seq_bytes=1 << 20)
    two = plan_expert_parallel(PROFILE, SHAPE, 24 << 20, 2, hidden_size=256, itemsize=2, link=LINK, **kwargs)
    ep = two.inputs["expert_parallel"]
    assert ep["rank_expert_bytes"] * 2 == ep["model_expert_bytes"] == SHAPE.total_expert_nbytes
    assert two.inputs["model"]["num_experts"] == 4 and two.inputs["measured_distinct"] is False
    for cost in two.candidates:
        dispatch = ep["dispatch_s"][cost.batch_size]
        assert dispatch == dispatch_seconds(cost.batch_size, 2, 256, 2, 2, 4, LINK) > 0
        assert cost.step_s >= dispatch and cost.serial_step_s >= dispatch
        assert cost.tokens_per_s == pytest.approx(cost.batch_size / cost.step_s)
    assert ep["dispatch_s"][1] < ep["dispatch_s"][4] < ep["dispatch_s"][16]
    # with each rank holding half the experts, the same RAM per rank caches a larger share of them
    one = plan(PROFILE, SHAPE, 24 << 20, **kwargs)
    assert two.candidates[0].hit_rate > one.candidates[0].hit_rate
