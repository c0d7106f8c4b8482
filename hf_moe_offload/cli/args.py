"""argparse options generated from `OffloadConfig`'s fields, so the CLI help is the config's own documentation."""

from __future__ import annotations

import argparse
import dataclasses

from ..config import OffloadConfig

__all__ = ["add_offload_args", "offload_config_from_args"]


def add_offload_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("offloading (OffloadConfig)")
    for f in dataclasses.fields(OffloadConfig):
        default = None if f.default is dataclasses.MISSING else f.default
        kind = int if f.type in ("int", int) else str
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"offload_{f.name}",
            type=kind,
            default=None,
            help=f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%"),
        )


def offload_config_from_args(args: argparse.Namespace) -> OffloadConfig:
    values = {f.name: getattr(args, f"offload_{f.name}") for f in dataclasses.fields(OffloadConfig)}
    return OffloadConfig.from_dict({k: v for k, v in values.items() if v is not None})
