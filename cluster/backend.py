"""How Ray Train starts our worker group: torch.distributed's rendezvous as environment variables,
and, on the embedded cluster, no autoscaler requests. Neither imports torch.

Ray's own `TorchConfig` creates the process group in its backend, so the driver and Ray Train's
controller import torch only to hold its config (1.5-2 CPU-seconds each, in series before any
worker starts on a 2-core machine). Here the backend gives every worker what `torchrun` gives it
(MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK) and the
training loop creates the process group itself (`Session.ensure_process_group`), as it does
under torchrun: one path for both launchers.

A worker group on one Ray node (every embedded run) rendezvouses on loopback: MASTER_ADDR 127.0.0.1,
rank 0's store bound to it alone (PRETRAIN_STORE_BIND; torch's own env:// store would listen on
every interface), and gloo's and NCCL's sockets on the loopback interface unless GLOO_SOCKET_IFNAME
/ NCCL_SOCKET_IFNAME say otherwise. A group across nodes keeps torch's env:// rendezvous at rank
0's node address, which the other nodes must reach (docs/security.md).
"""

from __future__ import annotations

import os
import socket

from ray.train.backend import Backend, BackendConfig

STORE_BIND_ENV = "PRETRAIN_STORE_BIND"  # trainer.session.STORE_BIND_ENV (that module imports torch)


class TorchEnvConfig(BackendConfig):
    @property
    def backend_cls(self):
        return TorchEnvBackend


class TorchEnvBackend(Backend):
    # As with Ray's TorchConfig: each rank sees all GPUs its node gives the worker group (and picks
    # its own by LOCAL_RANK), so NCCL can see its peers for P2P and NVLink.
    share_cuda_visible_devices = True

    def on_start(self, worker_group, backend_config: BackendConfig) -> None:
        addr, port = worker_group.execute_single(0, _address_and_free_port)  # on rank 0's node
        one_node = len(set(worker_group.execute(_node_id))) == 1
        worker_group.execute(_set_rendezvous_env, addr=addr, port=port, one_node=one_node)


def _address_and_free_port() -> tuple[str, int]:
    """This node's address and a port free on it now (for rank 0's rendezvous store)."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _set_rendezvous_env(addr: str, port: int, one_node: bool) -> None:
    import ray.train

    os.environ.update(rendezvous_env(ray.train.get_context(), addr, port, one_node))


def rendezvous_env(ctx, addr: str, port: int, one_node: bool) -> dict[str, str]:
    """torchrun's variables for this worker (`ctx`: Ray Train's context), given rank 0's node
    address and a free port there; when every rank runs on one Ray node, those that keep the
    group's sockets on loopback. (Ray's LOCAL_WORLD_SIZE counts the ranks on one node *address*:
    two Ray nodes of one machine, as in tests/test_multinode.py, would pass for one node.)"""
    env = {
        "MASTER_ADDR": addr,
        "MASTER_PORT": str(port),
        "RANK": str(ctx.get_world_rank()),
        "WORLD_SIZE": str(ctx.get_world_size()),
        "LOCAL_RANK": str(ctx.get_local_rank()),
        "LOCAL_WORLD_SIZE": str(ctx.get_local_world_size()),
        "NODE_RANK": str(ctx.get_node_rank()),
    }
    if one_node:
        env.update({"MASTER_ADDR": "127.0.0.1", STORE_BIND_ENV: "127.0.0.1"})
        lo = loopback_interface()
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # a person's own choice stands
            env[var] = os.environ.get(var) or lo
    return env


def loopback_interface() -> str:
    """The name of the interface that holds 127.0.0.1 ("lo" on Linux, "lo0" on macOS)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address.startswith("127.") for a in addrs):
            return name
    return "lo"
