"""`pretrain`: what a person types. Each command parses, validates and hands off; no training
logic lives here."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

from launch.args import add_config, add_run, add_set
from launch.errors import run_command
from trainer.errors import PretrainError


def _load(args: argparse.Namespace):
    from trainer.config import load_config

    return load_config(args.config, args.set)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from cluster.driver import run_training

    return _summary(run_training(cfg))


def _summary(s: dict) -> int:
    print(
        f"done: {s['steps']} steps, {s['tokens']:,} tokens, final loss {s['final_loss']:.4f}, "
        f"{s['tokens_per_s']:,.0f} tokens/s, {s['wall_s']:.0f} s wall; run files: {s['run_dir']}"
    )
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from cluster.driver import resume_training

    return _summary(resume_training(args.run, args.set, args.storage_path))


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved config (YAML + --set), or every field with its doc."""
    import yaml

    from trainer.config import describe_fields

    if args.fields:
        for name, default, doc in describe_fields():
            print(f"{name:36s} {default:24s} {doc}")
        return 0
    if not args.config:
        raise PretrainError("give a CONFIG file, or --fields to list every field", field="config")
    print(yaml.safe_dump(_load(args).to_dict(), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Pretrain GPT/LLaMA-style models on Ray + DeepSpeed from one YAML config.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from launch import prepare

    p = sub.add_parser(
        "prepare",
        help="tokenize raw text into WebDataset shards + manifest.json",
        description="Train (or load) a tokenizer and write token shards and a manifest.",
    )
    prepare.add_arguments(p)
    p.set_defaults(fn=prepare.run)

    p = sub.add_parser(
        "train",
        help="train from a config on a local or remote Ray cluster",
        description="Validate CONFIG, start (or join) Ray and run the training to the end.",
    )
    add_config(p, "configs/tiny-cpu.yaml", "train.steps=100")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser(
        "resume",
        help="continue a run from its newest committed checkpoint",
        description="Continue RUN (a run directory, or a name under --storage-path) from its newest committed "
        "checkpoint, with its own config and MLflow run. --set may extend train.steps or change where it runs; "
        "changes to the model, data or batch are refused.",
    )
    add_run(p)
    add_set(p, "train.steps=2000", over="the run's config")
    p.set_defaults(fn=cmd_resume)

    from launch import ui

    p = sub.add_parser(
        "ui",
        help="serve the MLflow UI for the runs' tracking store (127.0.0.1)",
        description="Start the MLflow UI for tracking.uri of CONFIG or a run directory, on 127.0.0.1.",
    )
    ui.add_arguments(p)
    p.set_defaults(fn=ui.run)

    p = sub.add_parser(
        "config",
        help="print the resolved config, or every field with its meaning",
        description="Print CONFIG after --set overrides and defaults, validated.",
    )
    add_config(p, "configs/tiny-cpu.yaml", "train.steps=100", required=False)
    p.add_argument(
        "--fields", action="store_true", help="list every config field, its default and its meaning"
    )
    p.set_defaults(fn=cmd_config)

    from launch import jobs

    jobs.register(sub)
    from launch import export

    export.register(sub)
    from launch import plan

    plan.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("PRETRAIN_LOG_LEVEL", "INFO"), format="%(message)s")
    args = build_parser().parse_args(argv)
    return run_command(args.fn, args)


def run() -> None:
    """The `pretrain` program: `main`, then a quick exit. By then the process holds every module
    a run imported (MLflow, SQLAlchemy, Ray, pandas, pyarrow), and the interpreter's collections
    at shutdown would walk all of them after the run's last line. Frozen, they are left to the OS;
    atexit handlers (Ray's shutdown, logging's flush) and thread joins still run. Only the program
    does this: `main` called in-process leaves the caller's GC alone."""
    try:
        code = main()
    finally:
        gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
