"""What the training loop needs from whoever started it (Ray Train, torchrun, or nothing).

`trainer/` never imports ray: `cluster/ray_session.py` implements this for Ray Train workers;
`LocalSession` serves a single plain process and `torchrun`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Session:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    run_dir: str = ""
    mlflow_run_id: str = ""
    attempt: int = 0
    extra: dict = field(default_factory=dict)

    def device(self, want: str = "auto") -> torch.device:
        if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
            return torch.device("cuda", self.local_rank if torch.cuda.device_count() > 1 else 0)
        return torch.device("cpu")

    def ensure_process_group(self, backend: str) -> None:
        """A launcher (Ray Train, torchrun) normally created it; a plain process gets a world of 1."""
        if dist.is_initialized():
            return
        if "MASTER_ADDR" in os.environ and "RANK" in os.environ:  # torchrun, Ray (cluster/backend.py)
            # 30 minutes for a collective, not NCCL's default 10: ranks wait at a barrier while
            # rank 0 writes a large checkpoint or evaluates.
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
            return
        if self.world_size != 1:
            raise RuntimeError("a multi-process session needs a process group from its launcher")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)

    def preemption_requested(self) -> bool:
        """The launcher's own notice that this run's nodes are about to go (collective)."""
        return False

    def report(self, metrics: dict) -> None:
        """Hand final metrics to the launcher (Ray Train's Result); nothing to do locally."""


def session_from_env() -> Session:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single plain process."""
    env = os.environ
    return Session(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
    )
