"""How Ray Train starts our worker group: torch.distributed's rendezvous as environment variables,
and, on the embedded cluster, no autoscaler requests. Neither imports torch.

Ray's own `TorchConfig` creates the process group in its backend, so the driver and Ray Train's
controller import torch only to hold its config (1.5-2 CPU-seconds each, in series before any
worker starts on a 2-core machine). Here the backend gives every worker what `torchrun` gives it
(MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK) and the
training loop creates the process group itself (`Session.ensure_process_group`), as it does
under torchrun: one path for both launchers.
"""

from __future__ import annotations

import os

from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy


class TorchEnvConfig(BackendConfig):
    @property
    def backend_cls(self):
        return TorchEnvBackend


class TorchEnvBackend(Backend):
    # As with Ray's TorchConfig: each rank sees all GPUs its node gives the worker group (and picks
    # its own by LOCAL_RANK), so NCCL can see its peers for P2P and NVLink.
    share_cuda_visible_devices = True

    def on_start(self, worker_group, backend_config: BackendConfig) -> None:
        from ray.train._internal.utils import get_address_and_port

        addr, port = worker_group.execute_single(0, get_address_and_port)  # rank 0's node, a free port
        worker_group.execute(_set_rendezvous_env, addr=addr, port=port)


def _set_rendezvous_env(addr: str, port: int) -> None:
    import ray.train

    ctx = ray.train.get_context()
    os.environ.update(
        {
            "MASTER_ADDR": addr,
            "MASTER_PORT": str(port),
            "RANK": str(ctx.get_world_rank()),
            "WORLD_SIZE": str(ctx.get_world_size()),
            "LOCAL_RANK": str(ctx.get_local_rank()),
            "LOCAL_WORLD_SIZE": str(ctx.get_local_world_size()),
            "NODE_RANK": str(ctx.get_node_rank()),
        }
    )


class ClusterSizedScalingPolicy(FixedScalingPolicy):
    """Ray Train's fixed-size policy without its requests to the AutoscalingCoordinator, a detached
    actor (one more process, 2 CPU-seconds, started before the workers) through which Ray Data and
    Ray Train share an autoscaling cluster. An embedded cluster has no autoscaler and no Ray Data."""

    def after_controller_start(self, train_run_context) -> None:
        pass

    def _maybe_send_resource_request(self) -> None:
        pass

    def _send_resource_request(self) -> None:
        pass
