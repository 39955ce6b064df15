"""`pretrain submit | status | logs | stop | list`: training runs as Ray Jobs on a running cluster,
addressed by run name and the cluster's job API address (--address http://HEAD:8265, or
RAY_ADDRESS). Each command parses, calls `cluster.jobs` and prints; nothing else lives here."""

from __future__ import annotations

import argparse
import os
import sys
import time

from launch.args import add_config


def add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS", ""),
        help="the Ray cluster's job API, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)",
    )


def add_submit_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "configs/llama-1b.yaml", "cluster.num_workers=16")
    add_address(p)


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", help="run name (default: every run, like `list` or `runs`)")
    add_address(p)
    p.add_argument(
        "--storage-path",
        default="runs",
        help="without --address: where this machine's runs live (cluster.storage_path), default: runs",
    )


def add_logs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run name")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the run ends")
    add_address(p)


def add_stop_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run name")
    add_address(p)


def run_submit(args: argparse.Namespace) -> int:
    from cluster import jobs
    from trainer.config import MLFLOW_CREDENTIAL_VARS
    from trainer.metrics import mask_uri_credentials

    cfg = jobs.load_submitted_config(args.config, args.set)
    cfg = jobs.check_for_cluster(cfg, args.address)
    out = jobs.submit(cfg, args.address)
    print(f"submitted run {out['run_name']} (Ray job id {out['job_id']})", flush=True)
    if out["mlflow"]:
        print(f"mlflow: {out['mlflow']}")
    if "://" not in cfg.cluster.storage_path:
        print(f"run files: {os.path.join(cfg.cluster.storage_path, out['run_name'])}")
    if cfg.tracking.enabled and cfg.tracking.uri.startswith(("http://", "https://")):
        given = [n for n in MLFLOW_CREDENTIAL_VARS if os.environ.get(n)]
        if given:
            print(
                f"note: {', '.join(given)} stay on this machine; the run's processes on the cluster "
                "take them from their nodes' environment",
                file=sys.stderr,
            )
    a = mask_uri_credentials(args.address)
    print(
        f"watch: pretrain status {out['run_name']} --address {a}; pretrain logs {out['run_name']} -f --address {a}"
    )
    return 0


def _row(s: dict) -> str:
    started = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["start_time"] / 1000)) if s["start_time"] else ""
    )
    return f"{s['run_name']:32s} {s['state']:10s} {started:19s} {s['job_id']}"


def run_status(args: argparse.Namespace) -> int:
    from cluster import jobs

    if not args.address:  # a run on this machine: its directory says it all
        from cluster.driver import find_run
        from launch import runs

        if not args.run:
            return runs.run_runs(args)
        return runs.print_local_status(find_run(args.run, args.storage_path))
    if not args.run:
        return run_list(args)
    s = jobs.status(jobs.connect(args.address), args.run)
    print(f"{s['run_name']}: {s['state']}" + (f" ({s['message']})" if s["message"] else ""))
    return 0


def run_logs(args: argparse.Namespace) -> int:
    from cluster import jobs

    client = jobs.connect(args.address)
    if args.follow:
        for chunk in jobs.follow_logs(client, args.run):
            print(chunk, end="", flush=True)
    else:
        print(jobs.logs(client, args.run), end="")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    from cluster import jobs

    state = jobs.stop(jobs.connect(args.address), args.run)
    print(f"{args.run}: {state}")
    return 0 if state == "stopped" else 1


def run_list(args: argparse.Namespace) -> int:
    from cluster import jobs

    client = jobs.connect(args.address)
    print(f"{'RUN':32s} {'STATE':10s} {'STARTED':19s} JOB ID")
    for job in jobs.list_jobs(client):
        if job.submission_id is None:
            continue  # a driver that connected on its own (no job API submission)
        print(_row(jobs.describe(job)))
    return 0
