"""Arguments the `pretrain` commands share: a config and its overrides, or a run."""

from __future__ import annotations

import argparse


def add_set(p: argparse.ArgumentParser, example: str, over: str = "the YAML") -> None:
    """`--set KEY=VALUE`, repeatable: a config field's value that wins over `over`."""
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config field, e.g. --set {example} (repeatable; beats {over})",
    )


def add_run(p: argparse.ArgumentParser) -> None:
    """The RUN argument: a run directory, or a run's name under `--storage-path`."""
    p.add_argument("run", help="run directory, or run name under --storage-path")
    p.add_argument(
        "--storage-path", default="runs", help="where runs live (cluster.storage_path), default: runs"
    )


def add_config(p: argparse.ArgumentParser, example: str, set_example: str, required: bool = True) -> None:
    """The CONFIG file argument and its `--set` overrides."""
    p.add_argument("config", nargs=None if required else "?", help=f"YAML config file, e.g. {example}")
    add_set(p, set_example)
