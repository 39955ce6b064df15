"""Training runs as Ray Jobs on a running Ray cluster, addressed by run name.

`submit` ships the project (the directory holding `launch/`, `cluster/`, `trainer/`) as the
job's working_dir together with the resolved config, and starts `python -m launch.cli train` in
it; the driver inside the job joins the cluster (RAY_ADDRESS) and runs the training as usual.
The job's submission id IS the run name, so `status`, `logs`, `stop` and `list` need only the
run name and the cluster's job API address (`http://HEAD:8265`). Jobs submitted with Ray's own
`ray job submit` are found by their submission id (`raysubmit_...`).

Credentials never travel with a job: Ray keeps a job's entrypoint, runtime_env (env_vars included)
and metadata in its job record, readable by anyone who can reach the job API, and its working_dir
on every node that runs it. The run's processes on the cluster take MLflow's and AWS's own
variables from their nodes' environment.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from cluster.tracking import MODEL_TRAINING_VIEW, run_charts_url
from trainer.config import Config, apply_overrides, load_config, load_yaml, save_config
from trainer.errors import PretrainError
from trainer.metrics import mask_uri_credentials, split_uri_credentials

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What never travels with the code: environments, corpora, runs, tracking stores, caches, git.
EXCLUDES = [
    ".venv",
    "venv",
    "/data",
    "/runs",
    "mlruns",
    "*.db",
    ".git",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "/build",
    "/dist",
    "/.whl",
]
STAGING_DIR = ".pretrain-submit"  # the resolved config waits here while the working_dir is uploaded
RUN_METADATA_KEY = "pretrain_run"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class JobError(PretrainError, RuntimeError):
    """A job request that cannot be done (no cluster there, no such run, ...); the message says why."""


def auth_headers() -> dict[str, str]:
    """The Ray token (RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token)
    as a bearer header, so a cluster started with token authentication accepts us even when
    RAY_AUTH_MODE is not set here. Never logged."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        try:
            token = path.read_text().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str):
    """A JobSubmissionClient for the cluster's job API at `address` (http://HEAD:8265)."""
    if not address:
        raise JobError(
            "give the cluster's job API address: --address http://HEAD:8265 (or set RAY_ADDRESS)",
            field="--address",
        )
    if "://" not in address:
        address = "http://" + address
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as e:
        reason = mask_uri_credentials(str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise JobError(
            f"no Ray job API answers at {mask_uri_credentials(address)}: {reason}; check the address "
            "(the head's dashboard port, default 8265), that the head runs, and the Ray auth token",
            field="--address",
        ) from None


def _call(fn, *args):
    try:
        return fn(*args)
    except JobError:
        raise
    except Exception as e:
        raise JobError(mask_uri_credentials(str(e).splitlines()[0] if str(e) else type(e).__name__)) from None


# A head that has just started answers job submissions with this until its job agent is up.
_AGENT_NOT_READY = "No available agent to submit job"


def _submit_when_agent_ready(submit, wait_s: float = 60.0):
    """submit(), retried for up to `wait_s` while the head says its job agent is not up yet."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return submit()
        except Exception as e:
            if _AGENT_NOT_READY not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(1.0)


def list_jobs(client) -> list:
    """Every job on the cluster, oldest first."""
    return sorted(_call(client.list_jobs), key=lambda j: j.start_time or 0)


def find_job(client, run: str):
    """The job of run `run`: submission id == run name, else a job whose metadata names the run."""
    for job in reversed(list_jobs(client)):
        if run in (job.submission_id, (job.metadata or {}).get(RUN_METADATA_KEY)):
            return job
    raise JobError(f"no run {run!r} on this cluster; `pretrain list --address ...` shows the runs it has")


def run_name_of(job) -> str:
    return (job.metadata or {}).get(RUN_METADATA_KEY) or job.submission_id or job.job_id or ""


def new_run_name(cfg: Config) -> str:
    name = cfg.cluster.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not _NAME.match(name):
        raise JobError(
            f"cluster.run_name={name!r}: a submitted run's name is its Ray job id; use letters, digits, "
            "'.', '_' and '-' (at most 128)",
            field="cluster.run_name",
        )
    return name


def load_submitted_config(path: str, overrides: list[str]) -> Config:
    """The config (YAML + --set) to submit. A tracking.uri with credentials is refused: a local run
    takes them into this process's environment, but a job would not get them (see the module doc)."""
    raw = apply_overrides(load_yaml(path), list(overrides))
    tracking = raw.get("tracking")
    uri = tracking.get("uri") if isinstance(tracking, dict) else None
    if isinstance(uri, str) and uri.startswith(("http://", "https://")):
        clean = split_uri_credentials(uri)[0]
        if clean != uri:
            raise JobError(
                f"tracking.uri carries credentials, and a submitted run never takes them along (Ray "
                f"keeps a job's files and environment readable through its job API); set "
                f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the "
                f"environment of the cluster's nodes (`ray start`, a Kubernetes Secret) and give "
                f"tracking.uri as {clean}",
                field="tracking.uri",
            )
    return load_config(path, overrides)


def head_is_local(address: str) -> bool:
    """Whether the job API at `address` runs on this machine (loopback, or this host's address):
    then the job's driver sees this machine's files at the same paths."""
    import socket
    from urllib.parse import urlsplit

    host = urlsplit(address if "://" in address else "http://" + address).hostname or ""
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        return False
    try:
        own = {socket.gethostbyname(socket.gethostname())}
    except OSError:
        own = set()
    return ip.startswith("127.") or ip in own


def _local_path(value: str) -> bool:
    return "://" not in value


def _relative_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:///") and not uri.startswith("sqlite:////")


def check_for_cluster(cfg: Config, address: str) -> Config:
    """`cfg` as the job on the cluster at `address` must get it, checked before anything is
    submitted: a job runs in a temporary copy of the project, so a relative data.path is not found
    there and a relative storage_path or SQLite tracking.uri is deleted with it. A head on this
    machine gets them as absolute paths (the run lands where `pretrain train` puts it); another
    head is refused with the fix. A local corpus that does not serve the config is refused too."""
    from cluster.driver import absolutize, check_corpus
    from trainer.data.storage import check_root

    if not address:
        connect(address)  # says to give --address
    check_root(cfg.data.path)
    relative = []
    if _local_path(cfg.data.path) and not os.path.isabs(cfg.data.path):
        relative.append(
            (
                "data.path",
                f"data.path={cfg.data.path}",
                "the corpus on a path every node sees (a shared filesystem, absolute) or in object "
                "storage (s3://bucket/prefix, https://...)",
            )
        )
    if _local_path(cfg.cluster.storage_path) and not os.path.isabs(cfg.cluster.storage_path):
        relative.append(
            (
                "cluster.storage_path",
                f"cluster.storage_path={cfg.cluster.storage_path}",
                "an absolute path on a filesystem every node shares, or s3://bucket/prefix",
            )
        )
    if cfg.tracking.enabled and _relative_sqlite(cfg.tracking.uri):
        relative.append(
            (
                "tracking.uri",
                f"tracking.uri={cfg.tracking.uri}",
                "a tracking server (http://HOST:5000) or a SQLite file on a shared path (sqlite:////shared/mlflow.db)",
            )
        )
    local = head_is_local(address)
    if relative and not local:
        field, what, fix = relative[0]
        others = "".join(f"; and {w} (give {f})" for _, w, f in relative[1:])
        raise JobError(
            f"{what} is relative: a submitted run starts in a temporary copy of this project on the "
            f"cluster, where it is not found or is deleted with the job; give {fix}{others}",
            field=field,
        )
    if local:
        cfg = absolutize(cfg)
    if not _local_path(cfg.data.path) or os.path.isdir(cfg.data.path):
        check_corpus(cfg)  # the manifest serves the config (vocab, sequence length, batches)
    elif local:
        raise JobError(
            f"data.path={cfg.data.path}: no such directory on this machine, where the cluster's head runs; "
            "give the directory `pretrain prepare` wrote",
            field="data.path",
            path=cfg.data.path,
        )
    return cfg


def submit(cfg: Config, address: str, project_root: Path = PROJECT_ROOT) -> dict:
    """Submit `cfg` as a Ray Job named after the run; returns at once with
    {run_name, job_id, address, mlflow}. Refuses a run name the cluster already has."""
    name = new_run_name(cfg)
    cfg = replace(cfg, cluster=replace(cfg.cluster, run_name=name))
    client = connect(address)
    existing = {j.submission_id: j for j in list_jobs(client)}
    if name in existing:
        raise JobError(
            f"run {name} already exists on this cluster ({existing[name].status}); "
            "pick another --set cluster.run_name=...",
            field="cluster.run_name",
        )
    staged = Path(project_root) / STAGING_DIR / f"{name}.yaml"
    staged.parent.mkdir(exist_ok=True)
    save_config(cfg, staged)
    try:
        job_id = _call(
            _submit_when_agent_ready,
            lambda: client.submit_job(
                entrypoint=f"python -m launch.cli train {STAGING_DIR}/{name}.yaml",
                submission_id=name,
                runtime_env={"working_dir": str(project_root), "excludes": EXCLUDES},
                metadata={RUN_METADATA_KEY: name, "pretrain_config": cfg.name},
            ),
        )
    finally:
        staged.unlink(missing_ok=True)
        if not any(staged.parent.iterdir()):
            shutil.rmtree(staged.parent, ignore_errors=True)
    return {"run_name": name, "job_id": job_id, "address": address, "mlflow": mlflow_link(cfg)}


def mlflow_link(cfg: Config, run_id: str = "") -> str:
    """Where the run shows in MLflow, credentials masked: the run's page when its id is known,
    else its experiment; "" when tracking is off or not a server (nothing to open from afar)."""
    uri = cfg.tracking.uri
    if not cfg.tracking.enabled or not uri.startswith(("http://", "https://")):
        return ""
    base = mask_uri_credentials(uri).rstrip("/")
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            return base
        if not run_id:
            runs = client.search_runs(
                [exp.experiment_id], f"attributes.run_name = '{cfg.cluster.run_name}'", max_results=1
            )
            run_id = runs[0].info.run_id if runs else ""
        if not run_id:
            return f"{base}/#/experiments/{exp.experiment_id}?{MODEL_TRAINING_VIEW}"
        return run_charts_url(uri, exp.experiment_id, run_id)
    except Exception:
        return base


def status(client, run: str) -> dict:
    return describe(find_job(client, run))


def describe(job) -> dict:
    """A job as the run it carries: name, job id, state (running, succeeded, ...), message."""
    return {
        "run_name": run_name_of(job),
        "job_id": job.submission_id or job.job_id,
        "state": str(job.status.value if hasattr(job.status, "value") else job.status).lower(),
        "message": mask_uri_credentials(job.message or ""),
        "start_time": job.start_time,
        "end_time": job.end_time,
    }


def logs(client, run: str) -> str:
    job = find_job(client, run)
    return _call(client.get_job_logs, job.submission_id)


def follow_logs(client, run: str) -> Iterator[str]:
    """The job's log as it grows, until the job ends."""
    import asyncio

    job = find_job(client, run)
    stream = client.tail_job_logs(job.submission_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def stop(client, run: str, wait_s: float = 60.0) -> str:
    """Stop a running run's job (its driver, and with it the worker group); returns the final state."""
    job = find_job(client, run)
    state = str(job.status.value if hasattr(job.status, "value") else job.status)
    if state in TERMINAL:
        raise JobError(f"run {run} is not running: it {state.lower()} already")
    _call(client.stop_job, job.submission_id)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        state = str(_call(client.get_job_status, job.submission_id).value)
        if state in TERMINAL:
            return state.lower()
        time.sleep(0.5)
    return state.lower()
