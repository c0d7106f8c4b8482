"""`hf-moe-offload plan`: the measured fixed cost of a step enters the prediction and travels with a saved profile;
`--json` prints one document. How close the prediction comes to `bench` is measured in docs/planner.md, not here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hf_moe_offload.cli.main import main as cli
from hf_moe_offload.scheduling.cost_model import ModelShape, estimate_step
from hf_moe_offload.scheduling.profile import HardwareProfile, LinearFit

SHIPPED = str(Path(__file__).resolve().parents[2] / "models" / "moe-tiny")
PLAN = ["plan", SHIPPED, "--host-memory", "1GiB", "--batches", "1,4", "--disk-bandwidth", "500MB", "--json"]


def test_the_step_overhead_is_spread_over_the_layers_of_every_step():
    profile = HardwareProfile(1000, 8, 8, "float32", 1e9, 1e10, LinearFit(1e-5, 1e-6))
    shape = ModelShape(num_layers=4, num_experts=8, top_k=2, expert_nbytes=1000, other_nbytes=0)
    base = estimate_step(profile, shape, 1, 32, hit_rate=1.0)
    slow = estimate_step(dataclasses.replace(profile, step_overhead_s=0.02), shape, 1, 32, hit_rate=1.0)
    assert slow.step_s == pytest.approx(base.step_s + 0.02)
    assert slow.compute_s[0] == pytest.approx(base.compute_s[0] + 0.005)
    saved = HardwareProfile.from_dict(dataclasses.replace(profile, step_overhead_s=0.02).to_dict())
    assert saved.step_overhead_s == 0.02


@pytest.mark.slow
def test_plan_measures_the_step_overhead_on_the_model_and_a_saved_profile_keeps_it(tmp_path, capsys):
    saved = tmp_path / "profile.json"
    assert cli([*PLAN, "--save-profile", str(saved)]) == 0
    calibrated = json.loads(capsys.readouterr().out)
    overhead = calibrated["profile"]["step_overhead_s"]
    assert overhead > 0 and calibrated["step_s"] > overhead
    assert json.loads(saved.read_text())["step_overhead_s"] == overhead
    assert cli([*PLAN, "--profile", str(saved)]) == 0
    assert json.loads(capsys.readouterr().out)["step_s"] == pytest.approx(calibrated["step_s"])


def test_no_step_overhead_switches_the_measurement_off():
    from hf_moe_offload.cli.main import build_parser

    assert build_parser().parse_args(PLAN[:4]).step_overhead is True
    assert build_parser().parse_args([*PLAN[:4], "--no-step-overhead"]).step_overhead is False


@pytest.fixture
def fixed_profile(tmp_path):
    """A saved profile for the shipped model, so `plan` measures nothing (fast, and the same on every machine)."""
    path = tmp_path / "profile.json"
    HardwareProfile(393216, 128, 256, "bfloat16", 5e8, 1e10, LinearFit(1e-4, 1e-6), step_overhead_s=0.002).save(
        str(path)
    )
    return ["plan", SHIPPED, "--host-memory", "30MiB", "--batches", "1,4,16", "--profile", str(path)]


def test_world_size_one_is_todays_plan(fixed_profile, capsys):
    for extra in (["--json"], []):
        assert cli([*fixed_profile, *extra]) == 0
        default = capsys.readouterr().out
        assert cli([*fixed_profile, *extra, "--world-size", "1"]) == 0
        assert capsys.readouterr().out == default
    assert "expert parallel" not in default
    assert cli([*fixed_profile, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert "expert_parallel" not in record and "expert_parallel" not in record["inputs"]


def test_world_size_two_plans_a_rank_with_half_the_experts_and_the_dispatch(fixed_profile, capsys):
    assert cli([*fixed_profile, "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert cli([*fixed_profile, "--json", "--world-size", "2", "--link-bandwidth", "10Gbit"]) == 0
    two = json.loads(capsys.readouterr().out)
    ep = two["expert_parallel"]
    assert ep["world_size"] == 2 and ep["distributed_config"] == {"ep_size": 2, "fsdp_size": 2}
    assert ep["rank_expert_bytes"] * 2 == ep["model_expert_bytes"] == 6 * 16 * 393216
    assert ep["link_bandwidth_Bps"] == 1.25e9 and ep["link_latency_s"] == 1e-4
    assert ep["dispatch_s"] > 0 and ep["step_s"] == pytest.approx(ep["experts_step_s"] + ep["dispatch_s"])
    assert ep["step_s"] == two["step_s"] and ep["job_tokens_per_s"] == pytest.approx(2 * two["tokens_per_s"])
    dispatch = [c["dispatch_s"] for c in ep["candidates"]]
    assert dispatch == sorted(dispatch) and dispatch[0] < dispatch[-1]
    assert two["inputs"]["model"]["num_experts"] == 8 and one["inputs"]["model"]["num_experts"] == 16
    assert cli([*fixed_profile, "--world-size", "2"]) == 0
    table = capsys.readouterr().out
    assert (
        "expert parallel over 2 ranks" in table and "token dispatch" in table and "dispatch" in table.splitlines()[-1]
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--world-size", "3"], "--world-size=3 must divide the experts of every MoE layer; MoE layer 0 has 16"),
        (["--world-size", "0"], "--world-size: expected an integer >= 1, got 0"),
        (["--world-size", "2", "--link-bandwidth", "fast"], "--link-bandwidth: expected a positive bandwidth"),
    ],
)
def test_a_bad_world_size_or_link_is_refused_in_one_line(fixed_profile, capsys, flags, message):
    assert cli([*fixed_profile, *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and len(captured.err.strip().splitlines()) == 1
