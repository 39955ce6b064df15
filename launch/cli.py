"""`pretrain`: what a person types. Each command parses, validates and hands off; no training
logic lives here."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

from launch import export, jobs, plan, prepare, runs, ui
from launch.args import Command, add_commands, add_config, add_run, add_set
from launch.errors import run_command
from trainer.errors import PretrainError


def _load(args: argparse.Namespace):
    from trainer.config import load_config

    return load_config(args.config, args.set)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "configs/tiny-cpu.yaml", "train.steps=100")


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


def add_resume_arguments(p: argparse.ArgumentParser) -> None:
    add_run(p)
    add_set(p, "train.steps=2000", over="the run's config")
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="train RUN again from step 0 when it has no committed checkpoint (without this flag such a "
        "resume is refused; with it, a run that has one is refused)",
    )


def cmd_resume(args: argparse.Namespace) -> int:
    from cluster.driver import resume_training

    return _summary(resume_training(args.run, args.set, args.storage_path, from_scratch=args.from_scratch))


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "configs/tiny-cpu.yaml", "train.steps=100", required=False)
    p.add_argument(
        "--fields", action="store_true", help="list every config field, its default and its meaning"
    )


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


# name -> Command(help, description, add_arguments, run), in the order `pretrain --help` lists them.
COMMANDS = {
    "prepare": Command(
        "tokenize raw text into WebDataset shards + manifest.json",
        "Train (or load) a tokenizer and write token shards and a manifest.",
        prepare.add_arguments,
        prepare.run,
    ),
    "train": Command(
        "train from a config on a local or remote Ray cluster",
        "Validate CONFIG, start (or join) Ray and run the training to the end.",
        add_train_arguments,
        cmd_train,
    ),
    "resume": Command(
        "continue a run from its newest committed checkpoint",
        "Continue RUN (a run directory, or a name under --storage-path) from its newest committed "
        "checkpoint, with its own config and MLflow run. --set may extend train.steps or change where it runs; "
        "changes to the model, data or batch, and moving checkpoint.storage away from the run's commits, are "
        "refused. A run without a committed checkpoint is refused unless --from-scratch; a run another "
        "driver is writing (its lease, <run>/lease.json) is refused, naming that driver.",
        add_resume_arguments,
        cmd_resume,
    ),
    "ui": Command(
        "serve the MLflow UI for the runs' tracking store (127.0.0.1)",
        "Start the MLflow UI for tracking.uri of CONFIG or of RUN, on 127.0.0.1; for a RUN, print the URL "
        "of its metric charts.",
        ui.add_arguments,
        ui.run,
    ),
    "config": Command(
        "print the resolved config, or every field with its meaning",
        "Print CONFIG after --set overrides and defaults, validated.",
        add_config_arguments,
        cmd_config,
    ),
    "submit": Command(
        "submit a training run to a Ray cluster as a Ray Job; returns at once",
        "Ship this project and the resolved CONFIG to the cluster at --address and start "
        "`pretrain train` there as a Ray Job whose id is the run name.",
        jobs.add_submit_arguments,
        jobs.run_submit,
    ),
    "status": Command(
        "state of a run: on this machine, or submitted (--address)",
        "State of RUN: a run on this machine (its directory, or its name under --storage-path), or with "
        "--address a run submitted to that cluster. Without RUN: every run, like `runs` or `list`.",
        jobs.add_status_arguments,
        jobs.run_status,
    ),
    "runs": Command(
        "the runs on this machine: state, step, newest commit, last loss, MLflow link",
        "List the runs under --storage-path (cluster.storage_path): name, state, step / steps, newest "
        "committed checkpoint, last logged loss and the link to the run's charts in MLflow.",
        runs.add_runs_arguments,
        runs.run_runs,
    ),
    "logs": Command("the driver log of a submitted run", None, jobs.add_logs_arguments, jobs.run_logs),
    "stop": Command(
        "stop a submitted run (its driver and workers)", None, jobs.add_stop_arguments, jobs.run_stop
    ),
    "list": Command("the runs (Ray jobs) on a cluster", None, jobs.add_address, jobs.run_list),
    "export": Command(
        "write a run's checkpoint as a Hugging Face model directory (verified)",
        "Consolidate RUN's newest committed checkpoint (or --step N) from any layout (ZeRO, TP, "
        "PP) into a transformers model directory (LlamaForCausalLM or GPT2LMHeadModel, safetensors, "
        "tokenizer), load it back with transformers and compare its logits with ours.",
        export.add_export_arguments,
        export.run_export,
    ),
    "generate": Command(
        "sample text from a run's checkpoint",
        "Continue --prompt with RUN's newest committed checkpoint (or --step N), "
        "using the corpus tokenizer; stops at <|endoftext|>.",
        export.add_generate_arguments,
        export.run_generate,
    ),
    "plan": Command(
        "print a config's layout, parameters, FLOPs and memory per device (runs nothing)",
        "Resolve CONFIG (with --set overrides) and print the rank layout (TP, DP and PP groups), "
        "the parameter count, FLOPs per token and an estimate of memory per device. Starts no process.",
        plan.add_arguments,
        plan.run_plan,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Pretrain GPT/LLaMA-style models on Ray + DeepSpeed from one YAML config.",
    )
    add_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True), COMMANDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("PRETRAIN_LOG_LEVEL", "INFO"), format="%(message)s")
    args = build_parser().parse_args(argv)
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # worker lines in a log file: no colour codes
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
