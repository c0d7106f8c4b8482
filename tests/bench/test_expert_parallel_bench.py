"""`bench.expert_parallel_bench` without processes: the ranks' budgets, the rows made of fake rank results, the
table. The real 1-vs-2-rank run is tests/cli/test_bench_world_size.py."""

from __future__ import annotations

import pytest

from hf_moe_offload.bench.expert_parallel_bench import format_table, plan_memory_bytes, rank_budget, summarise
from hf_moe_offload.errors import OffloadConfigError

MiB = 1 << 20


def _rank(rank: int, expert_bytes: int, read: float, peak: int, hit: float = 0.5) -> dict:
    return {
        "rank": rank,
        "hit_rate": hit,
        "expert_bytes_total": expert_bytes,
        "decode_bytes_per_token": read,
        "peak_bytes": peak,
    }


def _run(tok_s: float, ranks: list[dict]) -> dict:
    return {"ranks": ranks, "decode_tok_s": tok_s, "ttft_s": 0.5, "hit_rate": ranks[0]["hit_rate"]}


@pytest.mark.parametrize(
    "budget, world, expected",
    [
        ("50%", 2, "100%"),
        ("25%", 2, "50%"),
        ("75%", 2, "100%"),
        ("10%", 4, "40%"),
        ("2GiB", 2, "2GiB"),
        ("50%", 1, "50%"),
    ],
)
def test_each_rank_caches_the_bytes_one_process_caches(budget, world, expected):
    assert rank_budget(budget, world) == expected


def test_a_bad_budget_is_a_typed_error():
    with pytest.raises(OffloadConfigError, match="--budgets"):
        rank_budget("lots", 2)


def test_rows_hold_medians_per_rank_bytes_peaks_and_the_prediction():
    runs = {
        ("50%", 1): [
            _run(1.0, [_rank(0, 64 * MiB, 8 * MiB, 300 * MiB)]),
            _run(3.0, [_rank(0, 64 * MiB, 4 * MiB, 310 * MiB)]),
        ],
        ("50%", 2): [
            _run(5.0, [_rank(0, 32 * MiB, 0, 200 * MiB, 1.0), _rank(1, 32 * MiB, 2 * MiB, 220 * MiB, 0.8)]),
            {"error": "rank 1 of 2 exited with 1: boom", "ranks": []},
        ],
    }
    predicted = {"50%": {1: {"tokens_per_s": 2.0, "hit_rate": 0.4}, 2: {"tokens_per_s": 9.0, "hit_rate": 0.9}}}
    one, two = summarise(runs, limits={"50%": 400 * MiB}, predicted=predicted)
    assert (one["world_size"], one["host_budget"], two["host_budget"]) == (1, "50%", "100%")
    assert one["decode_tok_s"] == 2.0 and one["decode_tok_s_runs"] == [1.0, 3.0] and one["runs_ok"] == 2
    assert one["bytes_read_per_token_per_rank"] == 6 * MiB and one["peak_bytes_per_rank"] == 310 * MiB
    assert two["expert_bytes_per_rank"] * 2 == one["expert_bytes_per_rank"]
    assert two["bytes_read_per_token_per_rank"] == MiB and two["hit_rate"] == pytest.approx(0.9)
    assert (two["runs"], two["runs_ok"], two["errors"]) == (2, 1, ["rank 1 of 2 exited with 1: boom"])
    assert (one["predicted_tok_s"], two["predicted_tok_s"], two["limit_bytes"]) == (2.0, 9.0, 400 * MiB)
    table = format_table([one, two]).splitlines()
    assert len(table) == 3 and "plan tok/s" in table[0] and "1/2" in table[2]


def test_a_budget_whose_runs_all_failed_shows_dashes():
    (row,) = summarise({("25%", 2): [{"error": "timed out", "ranks": []}]})
    assert row["decode_tok_s"] is None and row["expert_bytes_per_rank"] is None and row["runs_ok"] == 0
    assert " - " in format_table([row])


def test_the_planned_memory_is_dense_plus_the_budget_plus_kv():
    summary = {"other_bytes": 100, "expert_bytes": 1000}
    assert plan_memory_bytes(summary, "50%", kv_bytes=7) == 100 + 500 + 7
    assert plan_memory_bytes(summary, "2KiB", kv_bytes=0) == 100 + 2048
