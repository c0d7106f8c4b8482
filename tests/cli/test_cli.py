"""The `hf-moe-offload` command line: parsing and help, `bench`, `trace`, `inspect`, `run --json`, typed errors.

Everything runs on tiny in-process models; `bench` runs its workers in this process (`--in-process`) except one
test that checks the subprocess path once. The JSON keys are checked against the tables in docs/benchmarks.md.
Startup, `--version`, one-line errors and early checks are in test_main.py; `run` in test_run.py.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from hf_moe_offload.bench.timeline_export import timeline_metrics, to_chrome_trace
from hf_moe_offload.cache import Event
from hf_moe_offload.cli.main import build_parser
from hf_moe_offload.cli.main import main as cli
from hf_moe_offload.config import OffloadConfig

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
TINY_BENCH = [
    "--in-process",
    "--reps",
    "1",
    "--max-new-tokens",
    "3",
    "--prompt-len",
    "4",
    "--bandwidth-bytes",
    "1MiB",
    "--no-progress",
]


def _documented(section: str) -> set[str]:
    """Keys in the first column ("| `key` |", "| `a` / `b` |") of the table under `section` of docs/benchmarks.md."""
    text = DOCS.read_text()
    start = text.index(section)
    end = text.find("\n#", start + len(section))
    block = text[start : end if end > 0 else None]
    first_cells = re.findall(r"^\| (`[^|]+`) \|", block, flags=re.M)
    return {key for cell in first_cells for key in re.findall(r"`([A-Za-z0-9_]+)`", cell)}


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory, mixtral_model):
    from hf_moe_offload.testing import char_tokenizer, save_checkpoint

    folder = save_checkpoint(mixtral_model, str(tmp_path_factory.mktemp("tiny_tok")), "per_expert")
    char_tokenizer().save_pretrained(folder)
    return folder


def test_help_lists_every_command_and_offload_config_field_docs(capsys):
    for command in ("run", "bench", "trace"):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([command, "--help"])
        assert exc.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        for field in ("io_mode", "prefetch", "policy"):
            assert f"--{field.replace('_', '-')}" in text
        help_words = " ".join(OffloadConfig.__dataclass_fields__["io_threads"].metadata["help"].split())
        assert help_words in text, command
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    top = capsys.readouterr().out
    assert all(name in top for name in ("run", "inspect", "plan", "bench", "trace"))


def test_bench_arguments_parse_with_documented_defaults():
    args = build_parser().parse_args(["bench", "some/model", "--ablate", "prefetch,io_threads=1", "--ramlimit"])
    assert (args.model, args.scenario, args.batches, args.budgets) == (
        "some/model",
        "latency,throughput",
        "1,8,32",
        "25,50",
    )
    assert (args.cache, args.ramlimit, args.reps, args.threads, args.max_disk) == ("cold", True, 3, 1, "4GiB")
    from hf_moe_offload.bench.scenario_bench import make_configs, make_points

    names = [c.name for c in make_configs(["25", "2GiB"], ablations=["prefetch", "io_threads=1"])]
    assert names == [
        "memory",
        "accelerate@25%",
        "offload@25%",
        "offload@25%-prefetch",
        "offload@25%[io_threads=1]",
        "accelerate@2GiB",
        "offload@2GiB",
        "offload@2GiB-prefetch",
        "offload@2GiB[io_threads=1]",
    ]
    assert [p["key"] for p in make_points(["latency", "throughput"], [1, 8], 16, 4)] == [
        "latency",
        "throughput@1",
        "throughput@8",
    ]


def test_bench_prints_tables_and_writes_the_json_record_with_the_documented_keys(mixtral_dir, tmp_path, capsys):
    json_out = tmp_path / "bench.json"
    argv = ["bench", mixtral_dir, *TINY_BENCH, "--batches", "2", "--budgets", "50", "--ablate", "prefetch"]
    code = cli([*argv, "--json-out", str(json_out)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "latency: batch 1" in out and "throughput@2: batch 2" in out
    assert not out.lstrip().startswith("{") and "limits:" not in out  # the notes went to stderr
    record = json.loads(json_out.read_text())
    assert set(record) == _documented("### Top-level keys")
    assert set(record["limits"]) == _documented("### `limits`")
    assert list(record["results"]) == ["latency", "throughput@2"]
    names = ["memory", "accelerate@50%", "offload@50%", "offload@50%-prefetch"]
    assert list(record["configs"]) == names
    assert set(record["configs"]["offload@50%"]) == _documented("### `configs")
    for point in record["results"].values():
        assert list(point) == names
        for name, s in point.items():
            assert set(s) == _documented("### `results"), name
            assert s["runs_ok"] == 1 and s["tok_s"] > 0 and s["lower_bound_s"] > 0, (name, s["problems"])
    latency = record["results"]["latency"]
    assert latency["memory"]["x_memory"] == pytest.approx(1.0)
    assert latency["offload@50%"]["hit_rate"] is not None and latency["offload@50%"]["compute_s_per_step"] > 0
    assert (
        latency["accelerate@50%"]["moved_bytes_per_step"]
        == record["configs"]["accelerate@50%"]["accelerate_disk_bytes"]
    )
    assert latency["offload@50%"]["x_accelerate"] > 0 and latency["offload@50%"]["tokens_match_memory"] is True


def test_bench_worker_runs_in_a_fresh_process(mixtral_dir, capsys):
    args = [a for a in TINY_BENCH if a != "--in-process"]
    code = cli(
        ["bench", mixtral_dir, *args, "--scenario", "latency", "--baselines", "none", "--budgets", "50", "--json"]
    )
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["results"]["latency"]["offload@50%"]["runs_ok"] == 1


def test_a_worker_that_dies_keeps_the_points_it_finished(tmp_path):
    from hf_moe_offload.bench.scenario_bench import _merge_partial

    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"load_s": 1.0, "points": {"throughput@1": {"tok_s": 3.0}}}))
    result = {"error": "out of memory"}
    points = [{"key": "throughput@1"}, {"key": "throughput@32"}]
    _merge_partial(result, {"partial_path": str(partial)}, points)
    assert result["points"] == {"throughput@1": {"tok_s": 3.0}, "throughput@32": {"error": "out of memory"}}
    assert result["load_s"] == 1.0


def test_bench_replays_a_recorded_routing(mixtral_dir, mixtral_model, tmp_path, capsys):
    import torch

    from hf_moe_offload.integration.tracing import record_routing

    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    with record_routing(mixtral_model, meta={"batch": 1, "prompt_len": 5}) as rec:
        mixtral_model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    rec.trace().save(str(tmp_path / "r.npz"))
    code = cli(
        [
            "bench",
            mixtral_dir,
            *TINY_BENCH,
            "--baselines",
            "memory",
            "--budgets",
            "50",
            "--batches",
            "1,2",
            "--replay",
            str(tmp_path / "r.npz"),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert code == 0 and "throughput@2: skipped" in captured.err
    assert [p["key"] for p in record["points"]] == ["latency", "throughput@1"]
    assert record["points"][0]["prompt_len"] == 5 and record["replay"].endswith("r.npz")
    assert record["results"]["latency"]["offload@50%"]["tokens_match_memory"] is True


def test_trace_writes_a_perfetto_json_a_png_and_a_routing_trace(mixtral_dir, tmp_path, capsys):
    out_dir, routing = tmp_path / "trace", tmp_path / "routing.npz"
    code = cli(
        [
            "trace",
            mixtral_dir,
            "--max-new-tokens",
            "4",
            "--prompt-len",
            "6",
            "--out",
            str(out_dir),
            "--record-routing",
            str(routing),
            "--host-budget",
            "50%",
            "--json",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    record = json.loads(out)  # the whole of stdout is one JSON document
    assert record["timeline_png"] == str(out_dir / "timeline.png")
    assert 0 <= record["bubble_fraction"] <= 1 and 0 <= record["overlap"] <= 1
    trace = json.loads((out_dir / "timeline.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert spans and all(isinstance(e["ts"], (int, float)) and e["dur"] >= 0 and e["name"] for e in spans)
    assert {"compute", "io", "layer", "step"} <= {e["cat"].split(",")[0] for e in spans}
    tracks = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"steps", "compute"} <= tracks and any(t.startswith("I/O ") for t in tracks)
    assert sum(e["cat"] == "step" for e in spans) == record["steps"] == 4
    assert (out_dir / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from hf_moe_offload.prefetch.trace import RoutingTrace

    recorded = RoutingTrace.load(str(routing))
    assert recorded.num_steps == 4 and recorded.meta["prompt_len"] == 6 and recorded.meta["batch"] == 1


def test_trace_at_a_batch_replays_at_every_smaller_batch(tiny_with_tokenizer, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\\n    return x\nthe state of the union\n")
    routing = tmp_path / "r3.npz"
    code = cli(
        [
            "trace",
            tiny_with_tokenizer,
            "--prompt-file",
            str(prompts),
            "--batch",
            "3",
            "--max-new-tokens",
            "3",
            "--out",
            str(tmp_path / "t"),
            "--record-routing",
            str(routing),
            "--png-steps",
            "2",
        ]
    )
    assert code == 0
    assert "bubble fraction" in capsys.readouterr().out  # the table for people
    from hf_moe_offload.prefetch.trace import RoutingTrace

    recorded = RoutingTrace.load(str(routing))
    length = recorded.meta["prompt_len"]
    assert recorded.meta["batch"] == 3 and length == len("def f(x):\n    return x")  # one token per character
    assert len(recorded.rows(0, 0)[0]) == 3 * length and len(recorded.rows(1, 0)[0]) == 3
    capsys.readouterr()
    code = cli(
        [
            "bench",
            tiny_with_tokenizer,
            *TINY_BENCH,
            "--baselines",
            "memory",
            "--budgets",
            "50",
            "--scenario",
            "throughput",
            "--batches",
            "1,2,4",
            "--replay",
            str(routing),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert code == 0 and "throughput@4: skipped" in captured.err, captured.err
    assert [p["key"] for p in record["points"]] == ["throughput@1", "throughput@2"]
    for key in ("throughput@1", "throughput@2"):
        assert record["results"][key]["offload@50%"]["tokens_match_memory"] is True


def test_timeline_metrics_define_bubble_fraction_and_overlap():
    ev = [
        Event("layer", "MoE L0", 0.0, 4.0, "Main", {"layer": 0}),
        Event("compute", "L0E0", 0.0, 1.0, "Main", {}),
        Event("stall", "wait L0", 1.0, 2.0, "Main", {}),
        Event("compute", "L0E1", 2.0, 4.0, "Main", {}),
        Event("io", "read L0E1", 0.5, 2.0, "io_0", {"bytes": 10, "speculative": False}),
        Event("io", "read L1E0", 2.0, 3.0, "io_1", {"bytes": 10, "speculative": True}),
        Event("layer", "MoE L0", 5.0, 6.0, "Main", {"layer": 0}),
    ]
    m = timeline_metrics(ev)
    assert m["bubble_fraction"] == pytest.approx(1 / 5)  # 1 s stalled of 5 s of MoE layers
    assert m["overlap"] == pytest.approx(1.5 / 2.5)  # 1 s of the 2.5 s of I/O ran during the stall
    assert m["overlap_expert_compute"] == pytest.approx(1.5 / 2.5)
    assert (m["steps"], m["io_bytes"], m["io_speculative"], m["io_threads"]) == (2, 20, 1, 2)
    trace = to_chrome_trace(ev)["traceEvents"]
    io = [e for e in trace if e.get("cat", "").startswith("io")]
    assert [e["ts"] for e in io] == [5e5, 2e6] and io[1]["cat"] == "io,speculative" and io[0]["tid"] != io[1]["tid"]


def test_inspect_a_tiny_checkpoint(mixtral_dir, capsys):
    assert cli(["inspect", mixtral_dir, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["supported"] is True and info["model_type"] == "mixtral" and info["layout"] == "fused"
    assert cli(["inspect", mixtral_dir]) == 0
    table = capsys.readouterr().out
    assert table.startswith("path ") and "model_type           mixtral" in table  # a table, not JSON


def test_run_json_prints_one_record(tiny_with_tokenizer, capsys):
    code = cli(
        ["run", tiny_with_tokenizer, "--prompt", "hello", "--max-new-tokens", "3", "--json", "--host-budget", "50%"]
    )
    captured = capsys.readouterr()
    assert code == 0 and len(captured.out.strip().splitlines()) == 1
    record = json.loads(captured.out)
    assert record["results"][0]["new_tokens"] == 3 and record["offload_stats"]["misses"] > 0


@pytest.mark.parametrize(
    "argv, error",
    [
        (["run", "{dir}", "--prompt", "x", "--host-budget", "lots"], "OffloadConfigError"),
        (["run", "{dir}", "--prompt", "x", "--host-budget", "1KiB"], "BudgetTooSmallError"),
        (["bench", "{dir}", "--ablate", "turbo", "--in-process"], "OffloadConfigError"),
        (["trace", "{dir}", "--policy", "nope", "--out", "{tmp}"], "UnknownNameError"),
    ],
)
def test_a_typed_library_error_is_one_line_and_exit_code_2(argv, error, tiny_with_tokenizer, tmp_path, capsys):
    argv = [a.format(dir=tiny_with_tokenizer, tmp=tmp_path) for a in argv]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hf-moe-offload: {error}: "), err


def test_synthetic_presets_keep_real_layer_shapes_and_scale_depth():
    from hf_moe_offload.bench.presets import preset_config, scaled_layers
    from hf_moe_offload.errors import UnknownNameError

    layers, nbytes = scaled_layers("mixtral-8x7b", 8 * 1024**3)
    assert layers == 2 and nbytes <= 8 * 1024**3
    config = preset_config("mixtral-8x7b", layers)
    assert (config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok) == (
        4096,
        14336,
        8,
        2,
    )
    with pytest.raises(UnknownNameError, match="olmoe-1b-7b"):
        preset_config("gpt-5")


@pytest.mark.slow
def test_trace_without_matplotlib_writes_the_json_timeline_and_says_so(tmp_path):
    """In a fresh interpreter where `import matplotlib` fails, as without the `bench` extra."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None  # import matplotlib now raises ImportError\n"
        "from hf_moe_offload.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    model = pathlib.Path(__file__).resolve().parents[2] / "models" / "moe-tiny"
    argv = ["trace", str(model), "--prompt", "hi", "--max-new-tokens", "2", "--out", str(tmp_path / "t"), "--json"]
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["timeline_png"] is None and not (tmp_path / "t" / "timeline.png").exists()
    assert json.loads((tmp_path / "t" / "timeline.json").read_text())["traceEvents"]
    notes = [line for line in proc.stderr.splitlines() if "matplotlib" in line]
    assert len(notes) == 1 and "JSON timeline only" in notes[0]


def test_bench_memory_limit_needs_ramlimit_and_an_amount(mixtral_dir, capsys):
    assert cli(["bench", mixtral_dir, *TINY_BENCH, "--memory-limit", "1GiB"]) == 2
    assert "--memory-limit applies with --ramlimit" in capsys.readouterr().err
    assert cli(["bench", mixtral_dir, "--ramlimit", "--memory-limit", "25%", "--no-progress"]) == 2
    assert "expected an amount such as 3.5GiB" in capsys.readouterr().err


def test_bench_memory_limit_puts_every_budget_under_one_limit(mixtral_dir, capsys):
    from hf_moe_offload.bench import sysmem

    try:
        sysmem.find_memory_cgroup()
    except sysmem.CgroupUnavailableError as err:
        pytest.skip(f"no usable memory cgroup (v1 or v2) on this machine: {err}")
    args = [a for a in TINY_BENCH if a != "--in-process"]
    argv = ["bench", mixtral_dir, *args, "--scenario", "latency", "--baselines", "none", "--budgets", "25,100"]
    code = cli([*argv, "--ramlimit", "--memory-limit", "1GiB", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["memory_limit_bytes"] == 1024**3 and record["overhead_bytes"] is None
    for name in ("offload@25%", "offload@100%"):
        assert record["results"]["latency"][name]["runs_ok"] == 1
        assert 0 < record["configs"][name]["cgroup_max_usage_bytes"] <= 1024**3
