"""The one place where a training worker meets Ray: builds a `Session` and calls the loop."""

from __future__ import annotations

import os
import warnings


def worker_main(loop_config: dict) -> None:
    if not loop_config["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*is deprecated")
    import ray.train

    from trainer.config import from_dict
    from trainer.loop import train
    from trainer.session import Session

    ctx = ray.train.get_context()
    session = Session(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        local_world_size=ctx.get_local_world_size(),
        run_dir=loop_config["run_dir"],
        mlflow_run_id=loop_config["mlflow_run_id"],
    )
    train(from_dict(loop_config["config"]), session)
