"""`hf-moe-offload` command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import sys

from . import bench_cmd, inspect_cmd, plan_cmd, run, trace_cmd

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moe-offload", description="Run MoE models whose experts exceed memory.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (run, inspect_cmd, plan_cmd, bench_cmd, trace_cmd):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # typed library errors become one clear line, exit code 2
        from ..errors import OffloadError

        if isinstance(e, OffloadError):
            print(f"hf-moe-offload: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
