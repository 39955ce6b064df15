"""The MLflow run of a training run: created once by the driver, appended to by one worker."""

from __future__ import annotations

from pathlib import Path

from trainer.config import Config


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def create_mlflow_run(cfg: Config, run_dir: Path) -> str:
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
    run = client.create_run(exp_id, run_name=cfg.cluster.run_name, tags={"pretrain.run_dir": str(run_dir)})
    params = [Param(k, v[:6000]) for k, v in sorted(flatten(cfg.to_dict()).items())]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    client.log_batch(
        run.info.run_id,
        tags=[
            RunTag(
                "layout",
                f"dp{cfg.dp()}-tp{cfg.parallel.tp}-pp{cfg.parallel.pp}-zero{cfg.parallel.zero_stage}",
            )
        ],
    )
    client.log_artifact(run.info.run_id, str(run_dir / "config.yaml"))
    return run.info.run_id


def end_mlflow_run(cfg: Config, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(cfg.tracking.uri).set_terminated(run_id, status)
