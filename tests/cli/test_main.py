"""`hf_moe_offload.cli.main`: a light startup (no torch, no transformers until a command runs), `--version`,
`python -m hf_moe_offload`, one-line errors with exit status 2, arguments checked before anything loads.

The startup checks run in fresh interpreters: this test process has torch loaded already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hf_moe_offload
from hf_moe_offload.cli.main import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = str(ROOT / "models" / "moe-tiny")
HEAVY = ("torch", "transformers", "numpy")


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def test_help_and_every_subcommand_parser_import_neither_torch_nor_transformers():
    code = (
        "import contextlib, io, json, sys\n"
        "from hf_moe_offload.cli.main import COMMANDS, build_parser\n"
        "for argv in [['--help']] + [[c.removesuffix('_cmd'), '--help'] for c in COMMANDS]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        build_parser().parse_args(argv)\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_version_from_the_module_and_the_console_script_entry_point():
    proc = _python(
        "import runpy, sys; sys.argv[1:] = ['--version']; runpy.run_module('hf_moe_offload', run_name='__main__')"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"hf-moe-offload {hf_moe_offload.__version__} (torch ")
    # The console script runs the function `python -m` runs.
    assert 'hf-moe-offload = "hf_moe_offload.cli.main:main"' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.slow
def test_python_dash_m_runs_the_same_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "hf_moe_offload", "inspect", SHIPPED, "--json"],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)  # stdout is exactly one JSON document
    assert info["supported"] is True and info["model_type"] == "mixtral"


# Each case: argv, the words the one-line error must hold. All fail before a model (or torch) is loaded.
EARLY_ERRORS = [
    (["run", SHIPPED], "--prompt"),
    (["run", SHIPPED, "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["run", SHIPPED, "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["run", SHIPPED, "--prompt", "x", "--greedy", "--temperature", "0.7"], "--greedy"),
    (["run", SHIPPED, "--prompt-file", "/nonexistent/prompts.txt"], "no such file"),
    (["run", SHIPPED, "--prompt", "x", "--host-budget", "lots"], "OffloadConfigError"),
    (["run", SHIPPED, "--prompt", "x", "--dtype", "float8"], "invalid choice"),
    (["run", SHIPPED, "--prompt", "x", "--threads", "-1"], "--threads"),
    (["trace", SHIPPED, "--batch", "-2"], "--batch"),
    (["trace", SHIPPED, "--prompt-file", "/nonexistent/p.txt"], "no such file"),
    (["plan", SHIPPED], "--host-memory"),
    (["plan", SHIPPED, "--host-memory", "lots"], "--host-memory"),
    (["plan", SHIPPED, "--host-memory", "1GiB", "--batches", "1,x"], "--batches"),
    (["bench"], "--synth"),
    (["bench", SHIPPED, "--batches", "0"], "--batches"),
    (["bench", SHIPPED, "--overhead", "much"], "--overhead"),
    (["bench", SHIPPED, "--replay", "/nonexistent/r.npz"], "no such file"),
    (["frobnicate"], "invalid choice"),
]


def test_bad_arguments_fail_at_once_with_one_line_and_status_2():
    code = (
        "import contextlib, io, json, sys\n"
        "from hf_moe_offload.cli.main import main\n"
        "out = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            rc = main(argv)\n"
        "        except SystemExit as e:\n"
        "            rc = e.code\n"
        "    out.append([rc, err.getvalue()])\n"
        f"print(json.dumps({{'results': out, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    proc = _python(code, json.dumps([argv for argv, _ in EARLY_ERRORS]))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for (argv, words), (rc, err) in zip(EARLY_ERRORS, report["results"]):
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and words in lines[0], (argv, rc, err)
        assert "Traceback" not in err
    assert report["heavy"] == []  # nothing heavy was imported: no model was loaded for any of them


def test_a_missing_model_folder_is_one_line(tmp_path, capsys):
    from hf_moe_offload.cli.main import main

    assert main(["run", str(tmp_path / "no-such-model"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-model" in err[0], err


def test_an_unexpected_error_is_one_line_and_traceback_shows_it(monkeypatch, capsys):
    from hf_moe_offload.cli import inspect_cmd
    from hf_moe_offload.cli.main import main

    def broken(path):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(inspect_cmd, "inspect_path", broken)
    assert main(["inspect", SHIPPED]) == 3
    assert capsys.readouterr().err.strip() == (
        "hf-moe-offload: unexpected RuntimeError: boom second line (rerun with --traceback for details)"
    )
    with pytest.raises(RuntimeError, match="boom"):
        main(["--traceback", "inspect", SHIPPED])


def test_one_name_per_concept_across_subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    flags = {name: set(p._option_string_actions) for name, p in sub.items()}
    assert set(flags) == {c.removesuffix("_cmd") for c in COMMANDS}
    for name, options in flags.items():
        assert {"--json", "--no-progress"} <= options, name
    for name in ("run", "trace"):
        assert {"--prompt", "--prompt-file", "--max-new-tokens", "--threads", "--dtype"} <= flags[name]
    assert "--max-new-tokens" in flags["bench"] and "--threads" in flags["bench"]
    assert {"--host-memory", "--device-memory", "--replay"} <= flags["plan"] and "--replay" in flags["bench"]
    # The 0.1 spellings still parse, to the new names, and are not advertised.
    args = parser.parse_args(["plan", "m", "--memory", "2GiB", "--trace", "r.npz"])
    assert (args.host_memory, args.replay) == ("2GiB", "r.npz")
    assert parser.parse_args(["bench", "m", "--new-tokens", "5"]).max_new_tokens == 5
    for name, words in (("plan", ("--memory ", "--trace ")), ("bench", ("--new-tokens",))):
        text = sub[name].format_help()
        assert not any(w in text for w in words), name
