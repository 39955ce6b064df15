"""The MLflow run of a training run: created once by the driver, appended to by one worker.

The run holds the resolved config (as params, secrets masked, and as `config.yaml`), tags that
say what ran where (run name, Ray job, git commit, layout, attempt), the tokenizer and data
manifest, and the metrics the loop logs through `trainer.metrics.MlflowLogger`.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from trainer.config import Config
from trainer.errors import PretrainError
from trainer.metrics import mask_uri_credentials

log = logging.getLogger("pretrain")

MASK = "***"
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value's length
# Name segments that mark a secret: `api_key`, `secret_access_key`, `hf_token`, `db.password`
# match; `n_kv_heads`, `tokens_per_s`, `keep` do not.
_SECRET_SEGMENTS = {
    "secret",
    "secrets",
    "password",
    "passwd",
    "token",
    "key",
    "apikey",
    "credential",
    "credentials",
}
_SEGMENT_SPLIT = re.compile(r"[._\-\s]+|(?<=[a-z0-9])(?=[A-Z])")
# How MLflow's REST client words a store's refusal of missing or wrong credentials.
_UNAUTHORIZED = re.compile(
    r"error code 40[13]\b|\b(401|403)\b.*(Unauthorized|Forbidden)|UNAUTHENTICATED|PERMISSION_DENIED"
)


# MLflow 3's UI opens an experiment in its model-training view (runs, metric charts) rather than its
# GenAI view (traces, evaluations) for this experiment tag; the page URL carries the same choice.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


class TrackingError(PretrainError, RuntimeError):
    """The tracking store cannot take the run; the message says what to do (`field`: tracking.uri)."""


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):  # data.sources.0.path
            out.update(flatten({str(i): x for i, x in enumerate(v)}, key + "."))
        else:
            out[key] = str(v)
    return out


def is_secret_name(name: str) -> bool:
    """True when a (dotted) key name has a segment like `secret`, `password`, `token` or `key`."""
    return any(seg.lower() in _SECRET_SEGMENTS for seg in _SEGMENT_SPLIT.split(name) if seg)


def redact(value, name: str = ""):
    """`value` with secrets masked: everything under a secret-looking name, and the password of
    any `scheme://user:pass@host` URI in strings. Dicts and lists are walked."""
    if name and is_secret_name(name) and value not in ("", None, {}, []):
        return MASK
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return mask_uri_credentials(value)
    return value


def config_params(cfg: Config) -> dict[str, str]:
    """The resolved config flattened to MLflow params (`model.d_model` -> "256"), secrets masked."""
    return {k: v[:MAX_PARAM_VALUE] for k, v in flatten(redact(cfg.to_dict())).items()}


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingError when an http(s) tracking server does not answer within `timeout_s`."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    shown = mask_uri_credentials(uri)
    try:
        resp = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        if resp.status_code >= 500:
            raise TrackingError(f"HTTP {resp.status_code}")
    except (requests.RequestException, TrackingError) as e:
        reason = mask_uri_credentials(str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise TrackingError(
            f"tracking.uri {shown} does not answer: {reason}; start the server "
            f"(e.g. `mlflow server --host 127.0.0.1 --port 5000`) or set tracking.enabled: false",
            field="tracking.uri",
        ) from None


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def git_commit(path: Path | None = None) -> str:
    """HEAD of the git checkout holding this code, or "" (not a checkout, no git, too slow)."""
    path = path or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except Exception:
        return ""


def ray_job_id() -> str:
    """The Ray job this process belongs to, or "" outside Ray (never starts Ray)."""
    if job := os.environ.get("RAY_JOB_ID", ""):
        return job
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            return ray.get_runtime_context().get_job_id() or ""
    except Exception:
        pass
    return ""


def layout_tag(cfg: Config) -> str:
    p = cfg.parallel
    return f"dp{cfg.dp()}-tp{p.tp}-pp{p.pp}-zero{p.zero_stage}"


def run_tags(cfg: Config, run_dir: Path | str, attempt: int = 1) -> dict[str, str]:
    tags = {
        "run_name": cfg.cluster.run_name,
        "layout": layout_tag(cfg),
        "attempt": str(attempt),
        "pretrain.run_dir": str(run_dir),
    }
    if job := ray_job_id():
        tags["ray_job_id"] = job
    if commit := git_commit():
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # the UI shows this one on the run page
    return {k: mask_uri_credentials(v) for k, v in tags.items()}


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])


def log_config_artifact(cfg: Config, run_id: str) -> None:
    """The resolved config, secrets masked, as the run's `config.yaml` artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False))
        _client(cfg.tracking.uri).log_artifact(run_id, str(path))


def create_mlflow_run(cfg: Config, run_dir: Path) -> str:
    """Create the run's MLflow run (experiment `tracking.experiment`), log its params, tags and
    config; returns the run id. Raises TrackingError when an http(s) store does not answer or
    another store cannot be opened."""
    check_reachable(cfg.tracking.uri)
    from mlflow.entities import RunTag

    try:  # opens the store (a SQLite file, a database, a directory)
        client = _client(cfg.tracking.uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
    except Exception as e:
        reason = mask_uri_credentials(str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        what_to_do = (
            "the server wants credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "(or MLFLOW_TRACKING_TOKEN) in the environment of this process (of a cluster's nodes, for a "
            "submitted run)"
            if _UNAUTHORIZED.search(str(e))
            else "fix tracking.uri or set tracking.enabled: false"
        )
        raise TrackingError(
            f"tracking.uri {mask_uri_credentials(cfg.tracking.uri)}: the MLflow store cannot be opened "
            f"({type(e).__name__}: {reason}); {what_to_do}",
            field="tracking.uri",
        ) from None
    if exp is None:
        exp_id = client.create_experiment(cfg.tracking.experiment, tags=EXPERIMENT_KIND)
    else:
        exp_id = exp.experiment_id
        for k, v in EXPERIMENT_KIND.items():
            if k not in exp.tags:  # made before runs said what they are: a model-training one
                client.set_experiment_tag(exp_id, k, v)
    run = client.create_run(exp_id, run_name=cfg.cluster.run_name or None)
    run_id = run.info.run_id
    _log_params(client, run_id, config_params(cfg))
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in run_tags(cfg, run_dir).items()])
    log_config_artifact(cfg, run_id)
    return run_id


def run_artifact_paths(cfg: Config) -> list[str]:
    """The tokenizer, the data manifest and the quality report (`prepare` with cleaning stages) of a
    local corpus (none for a remote `data.path`)."""
    from trainer.data.storage import is_remote

    if is_remote(cfg.data.path):
        return []
    return [
        p
        for p in (
            os.path.join(cfg.data.path, n)
            for n in ("tokenizer.json", "manifest.json", "report.json", "report.png")
        )
        if os.path.isfile(p)
    ]


def log_run_artifacts(cfg: Config, run_id: str, paths: list[str] | None = None) -> list[str]:
    """Upload `paths` (default: `run_artifact_paths(cfg)`) to the run under `data/`; files that
    do not exist are skipped. Returns what was logged."""
    paths = run_artifact_paths(cfg) if paths is None else [p for p in paths if os.path.isfile(p)]
    client = _client(cfg.tracking.uri)
    for p in paths:
        client.log_artifact(run_id, p, artifact_path="data")
    # The other sources of a mixture: their quality reports, under data/sources/<name>/.
    from trainer.data.storage import is_remote

    for src in cfg.data.sources:
        if src.path == cfg.data.path or is_remote(src.path):
            continue
        name = src.name or os.path.basename(os.path.normpath(src.path))
        for n in ("report.json", "report.png"):
            p = os.path.join(src.path, n)
            if os.path.isfile(p):
                client.log_artifact(run_id, p, artifact_path=f"data/sources/{name}")
                paths.append(p)
    return paths


def reopen_mlflow_run(cfg: Config, run_id: str) -> int:
    """Set a finished/failed run back to RUNNING for another attempt (resume); returns the new
    attempt number, also written to the run's `attempt` tag."""
    check_reachable(cfg.tracking.uri)
    client = _client(cfg.tracking.uri)
    run = client.get_run(run_id)
    try:
        attempt = int(run.data.tags.get("attempt", "1")) + 1
    except ValueError:
        attempt = 2
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "attempt", str(attempt))
    if job := ray_job_id():
        client.set_tag(run_id, "ray_job_id", job)
    return attempt


def tag_ray_job(cfg: Config, run_id: str) -> str:
    """Tag the run with the Ray job id once Ray is up (the run is created before Ray starts);
    returns the id, "" when there is none. Never raises: a tag is not worth failing a run."""
    job = ray_job_id()
    if job:
        try:
            _client(cfg.tracking.uri).set_tag(run_id, "ray_job_id", job)
        except Exception:
            return ""
    return job


def log_event_artifact(cfg: Config, run_id: str, path: Path) -> None:
    """The run's event log (starts, restarts, checkpoints, preemptions) as an artifact; never raises."""
    try:
        _client(cfg.tracking.uri).log_artifact(run_id, str(path))
    except Exception as e:  # a missing artifact is not worth failing a finished run
        log.warning("could not log %s to MLflow: %s", path, e)


def log_hang_artifacts(cfg: Config, run_id: str, path: Path) -> None:
    """A hang's dump directory (stacks, summary) as artifacts under hangs/<time>/; never raises."""
    try:
        client = _client(cfg.tracking.uri)
        client.log_artifacts(run_id, str(path), artifact_path=f"hangs/{path.name}")
        client.log_metric(run_id, "hangs", float(len(list(path.parent.iterdir()))))
    except Exception as e:  # the restart matters more than the record
        log.warning("could not log %s to MLflow: %s", path, e)


def delete_mlflow_run(cfg: Config, run_id: str) -> None:
    """Delete a run that never started (MLflow keeps it restorable); never raises."""
    try:
        _client(cfg.tracking.uri).delete_run(run_id)
    except Exception as e:
        log.warning("MLflow run %s could not be deleted: %s", run_id, e)


def end_mlflow_run(cfg: Config, run_id: str, status: str) -> None:
    _client(cfg.tracking.uri).set_terminated(run_id, status)


def run_charts_url(server: str, experiment_id: str, run_id: str) -> str:
    """The page of a run's metric charts in the MLflow UI at `server`, in its model-training view."""
    base = mask_uri_credentials(server).rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{MODEL_TRAINING_VIEW}"


def run_link(uri: str, run_id: str, server: str = "") -> str:
    """The run's charts in the UI at `server` (default: `uri` itself when it is a server); "" when
    there is no server or the run cannot be found. Never raises: a link is not worth failing for."""
    server = server or (uri if uri.startswith(("http://", "https://")) else "")
    if not (server and run_id):
        return ""
    try:
        experiment_id = _client(uri).get_run(run_id).info.experiment_id
    except Exception:
        return ""
    return run_charts_url(server, experiment_id, run_id)
