"""`pretrain runs` and `pretrain status RUN` for runs on this machine: what each run directory under
`--storage-path` says about its run (run.json, config.yaml, summary.json, its commits) and, where
tracking is on, its MLflow run (the newest logged loss of a run still running, the link)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_runs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-path", default="runs", help="where runs live (cluster.storage_path), default: runs"
    )


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _last_logged_loss(uri: str, run_id: str) -> tuple[int, float] | None:
    """(step, loss) of the newest `loss` the MLflow run holds; None when there is none to read."""
    try:
        from mlflow.tracking import MlflowClient

        history = MlflowClient(uri).get_metric_history(run_id, "loss")
    except Exception:
        return None
    newest = max(history, key=lambda m: (m.step, m.timestamp), default=None)
    return (newest.step, newest.value) if newest else None


def describe_run(run_dir: Path) -> dict:
    """A run directory as the user's row: name, state, step, steps, newest commit, last loss, link."""
    from cluster.commits import newest_commit
    from cluster.tracking import run_link

    record = _read_json(run_dir / "run.json")
    summary = _read_json(run_dir / "summary.json")
    try:
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, ValueError):
        config = {}
    steps = (config.get("train") or {}).get("steps", 0)
    storage = (config.get("checkpoint") or {}).get("storage", "")
    try:
        commit = newest_commit(run_dir, storage)
    except Exception:  # an unreachable store: the row still shows
        commit = None
    losses = {int(k): v for k, v in (summary.get("losses") or {}).items()}
    step, loss = (max(losses), losses[max(losses)]) if losses else (commit or 0, None)
    uri, run_id = record.get("tracking_uri", ""), record.get("mlflow_run_id", "")
    state = record.get("state", "?")
    if uri and run_id and state == "running":  # the live numbers are in MLflow
        if (logged := _last_logged_loss(uri, run_id)) is not None and logged[0] >= step:
            step, loss = logged
    return {
        "name": record.get("name") or run_dir.name,
        "state": state,
        "step": step,
        "steps": steps,
        "commit": commit,
        "loss": loss,
        "mlflow_run_id": run_id,
        "mlflow": run_link(uri, run_id) if uri and run_id else "",
        "run_dir": str(run_dir),
        "error": record.get("error", ""),
    }


def local_runs(storage_path: str) -> list[Path]:
    """The run directories (run.json + config.yaml) under `storage_path`, oldest first."""
    root = Path(storage_path)
    if not root.is_dir():
        return []
    runs = [d for d in root.iterdir() if (d / "run.json").is_file() and (d / "config.yaml").is_file()]
    return sorted(runs, key=lambda d: (d / "run.json").stat().st_mtime)


def _mlflow_column(r: dict) -> str:
    return r["mlflow"] or (f"run {r['mlflow_run_id']}" if r["mlflow_run_id"] else "-")


def run_runs(args: argparse.Namespace) -> int:
    rows = [describe_run(d) for d in local_runs(args.storage_path)]
    if not rows:
        print(f"no runs under {args.storage_path}")
        return 0
    print(f"{'RUN':28s} {'STATE':10s} {'STEP':>11s} {'COMMIT':>7s} {'LOSS':>8s}  MLFLOW")
    for r in rows:
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        commit = str(r["commit"]) if r["commit"] is not None else "-"
        step = f"{r['step']}/{r['steps']}"
        print(f"{r['name']:28s} {r['state']:10s} {step:>11s} {commit:>7s} {loss:>8s}  {_mlflow_column(r)}")
    if any(r["mlflow_run_id"] and not r["mlflow"] for r in rows):
        print("a run's charts in a local MLflow store: pretrain ui RUN")
    return 0


def print_local_status(run_dir: Path) -> int:
    """`pretrain status RUN` of a run on this machine."""
    r = describe_run(run_dir)
    loss = f", last loss {r['loss']:.4f}" if r["loss"] is not None else ""
    commit = f"step {r['commit']}" if r["commit"] is not None else "none"
    print(f"{r['name']}: {r['state']}, step {r['step']}/{r['steps']}, newest commit {commit}{loss}")
    if r["error"]:
        print(f"error: {r['error']}")
    if r["mlflow"]:
        print(f"mlflow: {r['mlflow']}")
    elif r["mlflow_run_id"]:
        print(f"mlflow: run {r['mlflow_run_id']}; its charts: pretrain ui {run_dir}")
    print(f"run files: {r['run_dir']}")
    return 0
