"""`hf-moe-offload plan`: the measured fixed cost of a step enters the prediction and travels with a saved profile;
`--json` prints one document. How close the prediction comes to `bench` is measured in docs/planner.md, not here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hf_moe_offload.cli.main import main as cli
from hf_moe_offload.scheduling.planner import ModelShape, estimate_step
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
