"""The one place where a training worker meets Ray: builds a `Session` and calls the loop."""

from __future__ import annotations

import os
import socket
import time
import traceback
import warnings

STOPPED_BY = "stopped_by"  # the key of a worker's return value that ends the run with an error
MLFLOW_ERROR = "mlflow_error"  # run.json's key for the driver's failure to create the MLflow run
MLFLOW_WAIT_S = 600.0  # how long a worker waits for the driver to record the MLflow run


def worker_main(loop_config: dict) -> dict | None:
    started_at = time.time()  # start-up is timed from here (trainer.events.StartupClock)
    if not loop_config["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*is deprecated")
    import ray.train

    from cluster.errors import save_traceback
    from trainer.config import from_dict
    from trainer.errors import PretrainError
    from trainer.loop import train
    from trainer.progress import record_group_stop
    from trainer.session import Session

    class RaySession(Session):
        grow = None  # cluster.elastic.GrowAtCommit in an elastic run

        def committed(self, step: int) -> None:
            if self.grow is not None:
                self.grow.at_commit(step)

        def preemption_requested(self) -> bool:
            # Ray Train's notice of a node being reclaimed (spot instances, drains); a collective,
            # called by every rank at the same logged steps.
            get_info = getattr(ray.train, "get_preemption_info", None)
            return get_info is not None and get_info() is not None

    mlflow_run_id = loop_config["mlflow_run_id"]
    if mlflow_run_id is None:  # the driver was still creating it when the group started
        mlflow_run_id = wait_for_mlflow_run(loop_config["run_dir"])
        if isinstance(mlflow_run_id, dict):  # it failed: every rank stops here, before training
            return mlflow_run_id
    ctx = ray.train.get_context()
    session = RaySession(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        local_world_size=ctx.get_local_world_size(),
        run_dir=loop_config["run_dir"],
        mlflow_run_id=mlflow_run_id,
        extra={"worker_started_at": started_at},
    )
    record_worker(session.run_dir, session.rank, ctx)
    cfg = from_dict(loop_config["config"])
    if loop_config.get("elastic_sizes"):
        from cluster.elastic import GroupSizes, GrowAtCommit, at_size, resized_from

        sizes = GroupSizes(cfg, loop_config["elastic_sizes"], loop_config["use_gpu"])
        cfg = at_size(cfg, loop_config.get("elastic_layouts", {}), session.world_size)
        session.grow = GrowAtCommit(sizes, session.world_size, session.rank)
        if session.rank == 0 and (resized := resized_from(session.run_dir, session.world_size)):
            session.extra["resized"] = resized
    try:
        train(cfg, session)
    except PretrainError as e:
        # The full traceback goes to <run>/errors/; Ray prints the short one raised here, and Ray
        # Train restarts the group (up to cluster.max_failures).
        save_traceback(session.run_dir, f"rank{session.rank}", traceback.format_exc())
        if e.restartable:
            raise e.with_traceback(None) from None
        # Every rank raised it alike (agreed) and a restart would only repeat it: the group ends
        # here, and the driver reads rank 0's return value (Ray Train's Result.return_value).
        stopped = {STOPPED_BY: type(e).__name__, "message": str(e), "field": e.field, "path": e.path}
        if getattr(e, "alone", False):  # this rank's alone (out of memory), its peers wait for it:
            record_group_stop(session.run_dir, stopped)  # the driver ends the run with this record,
            raise  # once Ray Train has ended the group, before it could restart it
        return stopped
    return None


def wait_for_mlflow_run(run_dir: str, timeout_s: float = MLFLOW_WAIT_S) -> str | dict:
    """The MLflow run id the driver records in run.json once it has created the run, or, when that
    failed, the return value that ends the group without a restart."""
    import json

    path, deadline = os.path.join(run_dir, "run.json"), time.monotonic() + timeout_s
    while True:
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):  # written atomically: only missing or unreadable, not torn
            record = {}
        if MLFLOW_ERROR in record:
            return {STOPPED_BY: "TrackingError", "message": record[MLFLOW_ERROR], "field": "tracking.uri"}
        if isinstance(record.get("mlflow_run_id"), str):
            return record["mlflow_run_id"]
        if time.monotonic() > deadline:
            from cluster.errors import RunError

            raise RunError(
                f"the driver did not record the run's MLflow run in {path} within {timeout_s:.0f} s"
            )
        time.sleep(0.05)


def record_worker(run_dir: str, rank: int, ctx) -> None:
    """`<run_dir>/workers/rank<r>.json`: where this rank runs (node, host, pid), for placement
    checks and for finding a rank's logs; rewritten by every (re)start of the worker group."""
    import ray

    from trainer.fsutil import write_json_atomic

    os.makedirs(os.path.join(run_dir, "workers"), exist_ok=True)
    write_json_atomic(
        os.path.join(run_dir, "workers", f"rank{rank}.json"),
        {
            "rank": rank,
            "world_size": ctx.get_world_size(),  # this group's (an elastic run's changes)
            "local_rank": ctx.get_local_rank(),
            "node_rank": ctx.get_node_rank(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
        },
    )
