"""The driver: a validated config becomes a Ray Train run (worker group, placement, restarts,
storage), with its run directory and its MLflow run created once, here, before workers start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from trainer.config import Config, save_config
from trainer.data.storage import is_remote
from trainer.fsutil import write_json_atomic

log = logging.getLogger("pretrain")


class RunError(RuntimeError):
    """The run cannot start or did not finish; the message says why and where."""


def absolutize(cfg: Config) -> Config:
    """Paths relative to the user's working directory, fixed before workers (other cwd) see them."""
    data_path = cfg.data.path if is_remote(cfg.data.path) else os.path.abspath(cfg.data.path)
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    return replace(
        cfg,
        data=replace(cfg.data, path=data_path),
        tracking=replace(cfg.tracking, uri=uri),
        cluster=replace(cfg.cluster, storage_path=os.path.abspath(cfg.cluster.storage_path)),
    )


def new_run_dir(cfg: Config) -> tuple[str, Path]:
    name = cfg.cluster.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.cluster.storage_path) / name
    if run_dir.exists():
        raise RunError(f"run {name} already exists at {run_dir}; pick another cluster.run_name")
    return name, run_dir


def write_run_record(run_dir: Path, record: dict) -> None:
    write_json_atomic(str(run_dir / "run.json"), record)


def start_ray(cfg: Config):
    # Ray Train's print patch echoes every worker line twice through the driver; plain stdout
    # forwarding (log_to_driver) already shows it once. Propagated to workers by Ray Train.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray

    if ray.is_initialized():
        return ray
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, log_to_driver=True)
    else:
        # An embedded cluster for this process only, reachable from this machine only.
        # The dashboard serves Ray's state API, which Ray Train uses to clean up after itself.
        ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            configure_logging=False,
        )
    return ray


def check_corpus(cfg: Config) -> None:
    """Fail here, before any run directory or Ray process exists, if the corpus cannot serve cfg."""
    from trainer.data.stream import TokenStream, open_manifest
    from trainer.loop import resolve_model_config

    manifest = open_manifest(cfg.data.path)
    try:
        resolve_model_config(cfg, manifest)
    except ValueError as e:
        raise RunError(str(e)) from None
    TokenStream(
        cfg.data.path,
        manifest,
        seq_len=cfg.data.seq_len,
        micro_batch=cfg.parallel.micro_batch_size,
        global_batch=cfg.parallel.global_batch_size,
        dp_rank=0,
        dp_size=cfg.dp(),
        seed=cfg.train.seed,
        num_streams=cfg.data.num_streams,
    )


def run_training(cfg: Config) -> dict:
    """Run `cfg` to completion on Ray; returns the final summary plus the run's location."""
    cfg = absolutize(cfg)
    check_corpus(cfg)
    name, run_dir = new_run_dir(cfg)
    cfg = replace(cfg, cluster=replace(cfg.cluster, run_name=name))
    run_dir.mkdir(parents=True)
    try:
        save_config(cfg, run_dir / "config.yaml")
        from cluster.tracking import create_mlflow_run

        mlflow_run_id = create_mlflow_run(cfg, run_dir) if cfg.tracking.enabled else ""
        write_run_record(
            run_dir,
            {
                "name": name,
                "mlflow_run_id": mlflow_run_id,
                "state": "running",
                "tracking_uri": cfg.tracking.uri,
            },
        )
    except Exception:
        shutil.rmtree(run_dir, ignore_errors=True)  # never leave a half-made run behind
        raise

    t0 = time.perf_counter()
    ray = start_ray(cfg)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.ray_session import worker_main

    cl = cfg.cluster
    use_gpu = cl.use_gpu == "true" or (cl.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    trainer = TorchTrainer(
        worker_main,
        train_loop_config={
            "config": cfg.to_dict(),
            "run_dir": str(run_dir),
            "mlflow_run_id": mlflow_run_id,
            "use_gpu": use_gpu,
        },
        scaling_config=ScalingConfig(
            num_workers=cl.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cl.cpus_per_worker, **cl.resources_per_worker},
            placement_strategy=cl.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=cl.storage_path,
            failure_config=FailureConfig(max_failures=cl.max_failures),
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    state = "failed"
    try:
        result = trainer.fit()
        if result.error:
            raise RunError(f"run {name} failed: {result.error}")
        summary = json.loads((run_dir / "summary.json").read_text())
        state = "succeeded"
        return {
            **summary,
            "run_name": name,
            "run_dir": str(run_dir),
            "wall_s": time.perf_counter() - t0,
            "mlflow_run_id": mlflow_run_id,
        }
    finally:
        write_run_record(
            run_dir,
            {"name": name, "mlflow_run_id": mlflow_run_id, "state": state, "tracking_uri": cfg.tracking.uri},
        )
        if cfg.tracking.enabled and mlflow_run_id:
            from cluster.tracking import end_mlflow_run

            end_mlflow_run(cfg, mlflow_run_id, "FINISHED" if state == "succeeded" else "FAILED")
