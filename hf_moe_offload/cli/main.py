"""`hf-moe-offload` command line (also `python -m hf_moe_offload`): thin subcommands over the library.

Each subcommand is a module with `add_parser(sub)`; it imports torch and transformers only inside the function
that runs it, so `--help`, `--version` and a bad argument answer at once. Arguments are checked before a model
loads. Output: stdout holds the result (a table, or one JSON document with `--json`); progress, notes and errors
go to stderr. Exit status: 0 success, 1 the command ran but its answer is negative (no feasible plan, some bench
runs failed, an unsupported checkpoint), 2 bad input (one line on stderr: a usage error, a typed library error, a
missing file), 3 an unexpected error (one line; `--traceback` shows it in full), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

__all__ = ["main", "build_parser", "COMMANDS"]

# Module names under hf_moe_offload.cli, in the order `--help` lists them.
COMMANDS = ("run", "inspect_cmd", "plan_cmd", "bench_cmd", "trace_cmd", "prepare_cmd", "calibrate_cmd")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the usage too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    def get(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"hf-moe-offload {__version__} (torch {get('torch')}, transformers {get('transformers')})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-moe-offload", description="Run MoE models whose experts exceed memory.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").add_parser(sub)
    return parser


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or repr(e)
    return f"{type(e).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.stdout = sys.stdout
    from ..errors import OffloadError
    from .args import UsageError

    redirect = contextlib.redirect_stdout(sys.stderr) if getattr(args, "json", False) else contextlib.nullcontext()
    try:
        with redirect:  # under --json anything a library prints goes to stderr; `emit` writes to args.stdout
            return args.func(args)
    except UsageError as e:
        print(f"hf-moe-offload {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (OffloadError, OSError) as e:  # typed library errors; missing or unreadable paths
        if args.traceback:
            raise
        print(f"hf-moe-offload: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-moe-offload: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.traceback:
            raise
        print(f"hf-moe-offload: unexpected {_one_line(e)} (rerun with --traceback for details)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
