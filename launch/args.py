"""What the `pretrain` commands share: the `Command` record `launch/cli.py` lists them in, a
config and its overrides, a run, and keyword options declared once in a table."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One `pretrain` command: its one-line help, its description (None: none shown), what adds its
    arguments to its parser, and what runs it with the parsed arguments (returns the exit code)."""

    help: str
    description: str | None
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_commands(sub, commands: dict[str, Command]) -> None:
    """Add each command (name -> `Command`, in help order) to the `pretrain` subparsers."""
    for name, c in commands.items():
        p = sub.add_parser(name, help=c.help, description=c.description)
        c.add_arguments(p)
        p.set_defaults(fn=c.run)


def add_options(p: argparse.ArgumentParser, options: dict[str, dict]) -> None:
    """A `--name` flag for each keyword option: `options` maps a function's keyword (`vocab_size`)
    to the settings of its flag (`--vocab-size`)."""
    for name, settings in options.items():
        p.add_argument("--" + name.replace("_", "-"), **settings)


def option_values(args: argparse.Namespace, options: dict[str, dict]) -> dict:
    """The parsed values of `options`, as keyword arguments for the function they belong to."""
    return {name: getattr(args, name) for name in options}


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
