"""`pretrain export RUN --out DIR` and `pretrain generate RUN --prompt TEXT`.

RUN is a run directory or a run name under --storage-path. Both read the run's newest committed
checkpoint (or --step N), verified against its commit record, whatever layout trained it. Bad input
(no such run or step, a checkpoint file that does not match its sha256, an export that fails its
logits check) prints one message and exits 2, leaving nothing at --out.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from launch.args import add_options, add_run, option_values

DEFAULT_MAX_SHARD_SIZE = "5GB"  # trainer.export's default; not imported here so `--help` stays fast


def _quiet_progress_bars() -> None:
    # transformers draws a progress bar for each tiny step of a load.
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


# Keyword options of export_run and generate: keyword -> the settings of its `--keyword` flag.
READ_OPTIONS = {  # both: which checkpoint, which tokenizer
    "step": dict(type=int, default=None, help="committed step to read (default: the newest)"),
    "tokenizer": dict(
        default=None, help="tokenizer.json to use (default: the one in the run's data.path, when local)"
    ),
}
EXPORT_OPTIONS = {
    "dtype": dict(choices=("bf16", "fp32"), default="bf16", help="weight dtype written (default bf16)"),
    "max_shard_size": dict(
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"split the weights into files of at most this size (default {DEFAULT_MAX_SHARD_SIZE})",
    ),
}
GENERATE_OPTIONS = {
    "max_tokens": dict(type=int, default=64, help="most new tokens (default 64)"),
    "temperature": dict(type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)"),
    "top_k": dict(type=int, default=50, help="sample from the k likeliest tokens; 0 = all"),
    "seed": dict(type=int, default=0, help="sampling seed (default 0)"),
}


def _run_dir(args: argparse.Namespace) -> Path:
    """The run directory RUN names, with transformers' progress bars off for what reads it."""
    _quiet_progress_bars()
    from cluster.driver import find_run

    return find_run(args.run, args.storage_path)


def _command_arguments(
    flag: str, flag_help: str, options: dict[str, dict]
) -> Callable[[argparse.ArgumentParser], None]:
    """What adds a command's arguments: RUN, the read options, `--flag` (required), then `options`."""

    def add(p: argparse.ArgumentParser) -> None:
        add_run(p)
        add_options(p, READ_OPTIONS)
        p.add_argument(f"--{flag}", required=True, help=flag_help)
        add_options(p, options)

    return add


add_export_arguments = _command_arguments(
    "out", "new (or empty) directory to write the model to", EXPORT_OPTIONS
)
add_generate_arguments = _command_arguments("prompt", "text to continue", GENERATE_OPTIONS)


def _keywords(args: argparse.Namespace, options: dict[str, dict]) -> dict:
    """The read options' values and those of the command's own `options`."""
    return option_values(args, READ_OPTIONS | options)


def run_export(args: argparse.Namespace) -> int:
    from trainer.export import export_run

    result = export_run(_run_dir(args), args.out, **_keywords(args, EXPORT_OPTIONS))
    print(
        f"exported step {result['step']} ({result['arch']}, {result['dtype']}) to {result['out']}: "
        f"{', '.join(result['files'])}"
    )
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from trainer.generate import generate

    print(generate(_run_dir(args), args.prompt, **_keywords(args, GENERATE_OPTIONS)))
    return 0
