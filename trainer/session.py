"""What the training loop needs from whoever started it (Ray Train, torchrun, or nothing).

`trainer/` never imports ray: `cluster/ray_session.py` implements this for Ray Train workers;
`LocalSession` serves a single plain process and `torchrun`.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

# The one address rank 0's rendezvous store listens on, set by a launcher whose ranks all reach it
# there (cluster/backend.py: 127.0.0.1 for a worker group on one node). Unset: torch's env://
# rendezvous, whose store listens on every interface, as under torchrun.
STORE_BIND_ENV = "PRETRAIN_STORE_BIND"


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

    def ensure_process_group(self, backend: str, timeout_s: float = 1800.0) -> None:
        """A launcher (Ray Train, torchrun) normally created it; a plain process gets a world of 1.
        `timeout_s`: how long a collective may wait for a peer at start-up (trainer/timeouts.py
        shortens it once steps run)."""
        if dist.is_initialized():
            return
        if "MASTER_ADDR" in os.environ and "RANK" in os.environ:  # torchrun, Ray (cluster/backend.py)
            timeout = timedelta(seconds=timeout_s)
            if int(os.environ["RANK"]) != 0:
                wait_for_listener(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), timeout_s)
            if os.environ.get(STORE_BIND_ENV):
                rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
                store = rendezvous_store(os.environ[STORE_BIND_ENV], timeout)
                dist.init_process_group(
                    backend, store=store, rank=rank, world_size=world_size, timeout=timeout
                )
            else:
                dist.init_process_group(backend, timeout=timeout)
            return
        if self.world_size != 1:
            raise RuntimeError("a multi-process session needs a process group from its launcher")
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=timeout_s)
        )

    def preemption_requested(self) -> bool:
        """The launcher's own notice that this run's nodes are about to go (collective)."""
        return False

    def committed(self, step: int) -> None:
        """A checkpoint of `step` was committed (every rank calls it): a launcher may end the group
        here to restart it at another size (cluster/elastic.py), nothing being lost."""

    def report(self, metrics: dict) -> None:
        """Hand final metrics to the launcher (Ray Train's Result); nothing to do locally."""


def rendezvous_store(bind: str, timeout: timedelta) -> dist.TCPStore:
    """torch's env:// rendezvous store (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE), except that
    rank 0's server listens on `bind` alone. Given a host, torch's TCPStore server still binds every
    interface (torch 2.13: `*:port`); given a socket already bound (`master_listen_fd`, a public
    argument), it listens on that socket."""
    env = os.environ
    rank, world_size, port = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["MASTER_PORT"])
    listen_fd = None
    if rank == 0:
        sock = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((bind, port))
            sock.listen(max(world_size, 128))
        except OSError:
            sock.close()
            raise
        listen_fd = sock.detach()  # the store's server owns it now, and closes it
    # The server does not wait for the clients: init_process_group's rendezvous does.
    return dist.TCPStore(
        env["MASTER_ADDR"],
        port,
        world_size,
        rank == 0,
        timeout=timeout,
        wait_for_workers=False,
        master_listen_fd=listen_fd,
    )


def wait_for_listener(host: str, port: int, timeout_s: float, poll_s: float = 0.01) -> None:
    """Return once `host:port` accepts a connection: rank 0's store is up. A TCPStore client that
    comes first retries only after 250-750 ms (torch's backoff), idle time on every start-up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise dist.DistStoreError(
                    f"rank 0's rendezvous store at {host}:{port} (MASTER_ADDR:MASTER_PORT) accepted no "
                    f"connection within {timeout_s:g} s: {e}"
                ) from None
            time.sleep(poll_s)


def session_from_env() -> Session:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single plain process."""
    env = os.environ
    return Session(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
    )


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on some rank (collective: one all-reduce of one number)."""
    return _agreed(flag, dist.ReduceOp.MAX)


def every_rank(flag: bool) -> bool:
    """Whether `flag` holds on every rank (collective: one all-reduce of one number)."""
    return _agreed(flag, dist.ReduceOp.MIN)


def _agreed(flag: bool, op: dist.ReduceOp) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=op)
    return bool(t.item())
