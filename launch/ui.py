"""`pretrain ui [CONFIG | RUN]`: the MLflow UI over the runs' tracking store.

Serves `tracking.uri` of the config (or of a run's run.json; default: the SQLite store in the
working directory) with `mlflow server`, bound to 127.0.0.1 unless --host says otherwise, and waits
until Ctrl-C. For a run it prints the URL of that run's metric charts (MLflow's model-training
view). A tracking URI that already is a server is only printed. Credentials never appear in what is
printed or on the server's command line: they come from the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from launch.args import add_set
from launch.errors import run_command
from trainer.errors import PretrainError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        nargs="?",
        help="YAML config, or a run (its directory or its name under --storage-path) whose tracking "
        "store to show, with the run's charts (default: sqlite:///mlflow.db)",
    )
    p.add_argument(
        "--storage-path", default="runs", help="where runs live (cluster.storage_path), default: runs"
    )
    add_set(p, "tracking.uri=sqlite:///other.db", over="the config")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)",
    )
    p.add_argument("--port", type=int, default=5000, help="port to serve on (default 5000)")


def run_dir_of(args: argparse.Namespace) -> Path | None:
    """The run directory CONFIG names (a directory, or a run's name under --storage-path), or None."""
    if not args.config or Path(args.config).is_file():
        return None
    for candidate in (Path(args.config), Path(getattr(args, "storage_path", "runs")) / args.config):
        if candidate.is_dir():
            return candidate
    return None


def tracking_uri(args: argparse.Namespace) -> str:
    """The store to serve: a run directory's record, else the config (+ --set), else the default."""
    from trainer.config import apply_overrides, from_dict, load_config

    if (run_dir := run_dir_of(args)) is not None:
        record = run_dir / "run.json"
        if record.is_file():
            return _recorded_uri(record)
        args = argparse.Namespace(**{**vars(args), "config": str(run_dir / "config.yaml")})
    if args.config:
        return load_config(args.config, args.set).tracking.uri
    return from_dict(apply_overrides({}, args.set)).tracking.uri


def _recorded_uri(record: Path) -> str:
    """The run's tracking URI, without the credentials a run recorded before they were kept out."""
    from trainer.config import take_tracking_credentials

    try:
        uri = json.loads(record.read_text())["tracking_uri"]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise PretrainError(
            f"{record}: no tracking URI to read ({type(e).__name__}: {e})", path=str(record)
        ) from None
    return take_tracking_credentials(uri)


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def server_command(uri: str, host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _mlflow_run_id(args: argparse.Namespace) -> str:
    """The MLflow run id of the run CONFIG names; "" for a config (or a run without one)."""
    run_dir = run_dir_of(args)
    try:
        return json.loads((run_dir / "run.json").read_text()).get("mlflow_run_id", "") if run_dir else ""
    except (OSError, ValueError, AttributeError):
        return ""


def run(args: argparse.Namespace) -> int:
    from cluster.tracking import run_link
    from trainer.metrics import mask_uri_credentials

    uri = tracking_uri(args)
    run_id = _mlflow_run_id(args)
    if uri.startswith(("http://", "https://")):
        print(f"tracking.uri is a server already; open {mask_uri_credentials(uri)}", flush=True)
        if link := run_link(uri, run_id):
            print(f"run {run_dir_of(args).name}'s charts: {link}", flush=True)
        return 0
    if not port_free(args.host, args.port):
        raise PretrainError(
            f"port {args.port} on {args.host} is in use; pick another with --port", field="--port"
        )
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(
        f"MLflow UI for {mask_uri_credentials(uri)} at http://{shown_host}:{args.port} (Ctrl-C stops it)",
        flush=True,
    )
    if link := run_link(uri, run_id, server=f"http://{shown_host}:{args.port}"):
        print(f"run {run_dir_of(args).name}'s charts: {link}", flush=True)
    proc = subprocess.Popen(server_command(uri, args.host, args.port), start_new_session=True)
    # SIGTERM (a test, a supervisor) stops the server like Ctrl-C does.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker processes
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pretrain ui", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
