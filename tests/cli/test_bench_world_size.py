"""`hf-moe-offload bench --world-size N`: the flags are checked before anything loads, and one real run of the shipped
model as 1 rank and as 2 expert-parallel ranks (separate processes, gloo) gives the documented JSON record.

`--world-size 1` is bench as it was: test_cli.py runs it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hf_moe_offload.cli.main import build_parser
from hf_moe_offload.cli.main import main as cli

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = str(ROOT / "models" / "moe-tiny")  # 6 MoE layers x 16 experts
DOCS = ROOT / "docs" / "benchmarks.md"


def _documented(section: str) -> set[str]:
    text = DOCS.read_text()
    start = text.index(section)
    end = text.find("\n#", start + len(section))
    block = text[start : end if end > 0 else None]
    cells = re.findall(r"^\| (`[^|]+`) \|", block, flags=re.M)
    return {key for cell in cells for key in re.findall(r"`([A-Za-z0-9_]+)`", cell)}


def test_world_size_defaults_to_one_and_baselines_to_todays():
    args = build_parser().parse_args(["bench", "some/model"])
    assert args.world_size == 1 and args.baselines is None  # bench resolves None to memory,accelerate


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if a model would be resolved, synthesized or run."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was resolved before the arguments were checked")

    monkeypatch.setattr("hf_moe_offload.cli.bench_cmd._resolve_model", refuse)
    monkeypatch.setattr("hf_moe_offload.bench.expert_parallel_bench.run_comparison", refuse)


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--world-size", "0"], "hf-moe-offload bench: error: --world-size: expected an integer >= 1, got 0"),
        (
            ["--world-size", "3"],
            "hf-moe-offload: UnsupportedParallelismError: --world-size=3 must divide the experts of every MoE layer",
        ),
        (["--world-size", "2", "--baselines", "accelerate"], "hf-moe-offload bench: error: --baselines accelerate:"),
        (["--world-size", "2", "--baselines", "llamacpp-q8_0"], "hf-moe-offload bench: error: --baselines"),
        (["--world-size", "2", "--ablate", "prefetch"], "hf-moe-offload bench: error: --ablate:"),
        (["--world-size", "2", "--in-process"], "hf-moe-offload bench: error: --in-process:"),
        (["--world-size", "2", "--device", "cuda"], "hf-moe-offload bench: error: --device cuda:"),
    ],
)
def test_a_bad_world_size_or_a_one_process_flag_is_refused_in_one_line(flags, error, nothing_runs, capsys):
    assert cli(["bench", SHIPPED, *flags, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(error), err


def test_a_synthetic_preset_is_checked_before_it_is_synthesized(nothing_runs, capsys):
    assert cli(["bench", "--synth", "mixtral-8x7b", "--world-size", "3"]) == 2  # 8 experts per layer
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--world-size=3 must divide" in err[0] and "has 8" in err[0], err


@pytest.mark.slow
def test_bench_world_size_two_measures_one_rank_and_two_ranks(tmp_path, capsys):
    json_out = tmp_path / "ep.json"
    argv = ["bench", SHIPPED, "--world-size", "2", "--budgets", "50", "--reps", "1", "--max-new-tokens", "3"]
    argv += ["--prompt-len", "4", "--bandwidth-bytes", "1MiB", "--safety-limit", "none", "--timeout", "120"]
    code = cli([*argv, "--json", "--json-out", str(json_out)])
    record = json.loads(capsys.readouterr().out)
    assert code == 0, record["results"]
    assert json.loads(json_out.read_text()) == record
    assert set(record) == _documented("### `bench --world-size` record")
    assert record["world_sizes"] == [1, 2] and record["distributed_config"] == {"tp_size": 2, "ep_size": 2}
    rows = {row["world_size"]: row for row in record["results"]}
    assert set(rows) == {1, 2}
    for row in rows.values():
        assert set(row) == _documented("### `bench --world-size` rows")
        assert row["runs_ok"] == 1 and row["decode_tok_s"] > 0 and row["peak_bytes_per_rank"] > 0, row
        assert row["bytes_read_per_token_per_rank"] >= 0 and row["predicted_tok_s"] > 0
    assert rows[1]["host_budget"] == "50%" and rows[2]["host_budget"] == "100%"  # the same bytes of cache
    assert 2 * rows[2]["expert_bytes_per_rank"] == rows[1]["expert_bytes_per_rank"]
