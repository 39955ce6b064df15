"""Arguments every `pretrain` command that reads a config shares."""

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


def add_config(p: argparse.ArgumentParser, example: str, set_example: str, required: bool = True) -> None:
    """The CONFIG file argument and its `--set` overrides."""
    p.add_argument("config", nargs=None if required else "?", help=f"YAML config file, e.g. {example}")
    add_set(p, set_example)
