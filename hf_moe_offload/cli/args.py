"""What every subcommand shares: the `OffloadConfig` options (generated from its fields, so the CLI help is the
config's own documentation), `--json` / `--no-progress`, the output rule and early argument checks.

Output rule: stdout carries the result only, a table for people or, with `--json`, exactly one JSON document;
progress bars, notes and errors go to stderr. Progress bars (tqdm, transformers' own) show only when stderr is a
terminal, as `pip` and `git` do, and never with `--json` or `--no-progress`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from ..config import OffloadConfig

__all__ = [
    "UsageError",
    "add_offload_args",
    "add_output_args",
    "offload_config_from_args",
    "emit",
    "write_json_out",
    "note",
    "progress_enabled",
    "quiet_transformers",
    "check_file",
    "check_positive",
    "read_prompts",
    "DTYPES",
]

DTYPES = ("auto", "bfloat16", "float16", "float32")


class UsageError(ValueError):
    """A command-line value is invalid; `main` prints it as one line and exits with status 2."""


def add_offload_args(parser: argparse.ArgumentParser) -> None:
    """One `--field-name` option per `OffloadConfig` field (`dest="offload_<field>"`), skipping a field whose
    option the subcommand already defines itself."""
    group = parser.add_argument_group("offloading (OffloadConfig)")
    for f in dataclasses.fields(OffloadConfig):
        flag = f"--{f.name.replace('_', '-')}"
        if flag in parser._option_string_actions:
            continue
        default = None if f.default is dataclasses.MISSING else f.default
        kind = {"int": int, "float": float, "float | None": float}.get(str(f.type), str)
        group.add_argument(
            flag,
            dest=f"offload_{f.name}",
            type=kind,
            default=None,
            help=f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%"),
        )


def offload_config_from_args(args: argparse.Namespace, **own) -> OffloadConfig:
    """The `OffloadConfig` of the options given, and of the subcommand's `own` options that set a field (validated:
    raises `OffloadConfigError` on a bad value)."""
    values = {f.name: getattr(args, f"offload_{f.name}", None) for f in dataclasses.fields(OffloadConfig)} | own
    return OffloadConfig.from_dict({k: v for k, v in values.items() if v is not None})


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of a table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (off anyway without a terminal)")


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars on stderr: only for a terminal, never with `--json` or `--no-progress`."""
    if getattr(args, "json", False) or getattr(args, "no_progress", False):
        return False
    return sys.stderr.isatty()


def quiet_transformers(args: argparse.Namespace) -> None:
    """Apply the progress rule to transformers' own bars (weights loading)."""
    from transformers.utils import logging

    if progress_enabled(args):
        logging.enable_progress_bar()
    else:
        logging.disable_progress_bar()


def write_json_out(args: argparse.Namespace, record: dict) -> None:
    """`--json-out FILE`: the record as one JSON line in FILE as well."""
    if getattr(args, "json_out", None):
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def emit(args: argparse.Namespace, record: dict, table: str | None = None) -> None:
    """The command's result on the real stdout: `record` as JSON with `--json`, else `table` (if any)."""
    out = getattr(args, "stdout", None) or sys.stdout
    if getattr(args, "json", False):
        out.write(json.dumps(record) + "\n")
    elif table:
        out.write(table.rstrip("\n") + "\n")
    out.flush()


def note(command: str, message: str) -> None:
    print(f"{command}: {message}", file=sys.stderr, flush=True)


def check_positive(value: int | None, flag: str, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{flag}: expected an integer >= {minimum}, got {value}")


def check_file(path: str | None, flag: str) -> None:
    if path is not None and not os.path.isfile(path):
        raise UsageError(f"{flag}: no such file: {path}")


def read_prompts(prompts: list[str] | None, prompt_file: str | None, flag: str = "--prompt-file") -> list[str]:
    """`--prompt` values, then the lines of `--prompt-file` (one prompt per non-empty line; a literal `\\n` in a
    line stands for a newline, so a file can hold multi-line prompts)."""
    out = list(prompts or [])
    if prompt_file is not None:
        check_file(prompt_file, flag)
        with open(prompt_file, encoding="utf-8") as f:
            lines = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        if not lines:
            raise UsageError(f"{flag}: {prompt_file} holds no prompt (one prompt per non-empty line)")
        out += lines
    return out
