"""`pretrain export RUN --out DIR` and `pretrain generate RUN --prompt TEXT`.

RUN is a run directory or a run name under --storage-path. Both read the run's newest committed
checkpoint (or --step N), verified against its commit record, whatever layout trained it. Bad input
(no such run or step, a checkpoint file that does not match its sha256, an export that fails its
logits check) prints one message and exits 2, leaving nothing at --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from launch.args import add_run

DEFAULT_MAX_SHARD_SIZE = "5GB"  # trainer.export's default; not imported here so `--help` stays fast


def _quiet_progress_bars() -> None:
    # transformers draws a progress bar for each tiny step of a load.
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _add_run_args(p: argparse.ArgumentParser) -> None:
    add_run(p)
    p.add_argument("--step", type=int, default=None, help="committed step to read (default: the newest)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json to use (default: the one in the run's data.path, when local)",
    )


def _run_dir(args: argparse.Namespace) -> Path:
    """The run directory RUN names, with transformers' progress bars off for what reads it."""
    _quiet_progress_bars()
    from cluster.driver import find_run

    return find_run(args.run, args.storage_path)


def run_export(args: argparse.Namespace) -> int:
    from trainer.export import export_run

    result = export_run(
        _run_dir(args),
        args.out,
        step=args.step,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        tokenizer=args.tokenizer,
    )
    print(
        f"exported step {result['step']} ({result['arch']}, {result['dtype']}) to {result['out']}: "
        f"{', '.join(result['files'])}"
    )
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from trainer.generate import generate

    text = generate(
        _run_dir(args),
        args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        step=args.step,
        seed=args.seed,
        tokenizer=args.tokenizer,
    )
    print(text)
    return 0


def register(sub) -> None:
    """Add export and generate to the `pretrain` subparsers."""
    p = sub.add_parser(
        "export",
        help="write a run's checkpoint as a Hugging Face model directory (verified)",
        description="Consolidate RUN's newest committed checkpoint (or --step N) from any layout (ZeRO, TP, "
        "PP) into a transformers model directory (LlamaForCausalLM or GPT2LMHeadModel, safetensors, "
        "tokenizer), load it back with transformers and compare its logits with ours.",
    )
    _add_run_args(p)
    p.add_argument("--out", required=True, help="new (or empty) directory to write the model to")
    p.add_argument(
        "--dtype", choices=("bf16", "fp32"), default="bf16", help="weight dtype written (default bf16)"
    )
    p.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"split the weights into files of at most this size (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    p.set_defaults(fn=run_export)

    p = sub.add_parser(
        "generate",
        help="sample text from a run's checkpoint",
        description="Continue --prompt with RUN's newest committed checkpoint (or --step N), "
        "using the corpus tokenizer; stops at <|endoftext|>.",
    )
    _add_run_args(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-tokens", type=int, default=64, help="most new tokens (default 64)")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)"
    )
    p.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens; 0 = all")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.set_defaults(fn=run_generate)
