"""Can the Ray cluster ever hold the worker group? Checked once Ray is up, before Ray Train
asks for a placement group it would wait on forever, and again by the Ray Train controller before
every restart of the worker group (a node may have left the cluster since).

A static cluster (`ray start`, KubeRay without autoscaling) is judged by its nodes as they are
now: the request is refused at once, with the numbers. An autoscaling cluster (cluster launcher,
KubeRay autoscaler) publishes its node types and their max counts; a request above that maximum
is refused at once, one below it gets `timeout_s` to be scaled up to before it is refused.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace

import ray

from cluster.errors import CapacityError
from cluster.library_internals import ControllerCallback, max_autoscaled_resources
from trainer.config import Config

# How long an autoscaling cluster may take to add the nodes a run needs (cloud GPU nodes take minutes).
DEFAULT_SCALE_UP_TIMEOUT_S = float(os.environ.get("PRETRAIN_SCALE_UP_TIMEOUT_S", "900"))


def worker_resources(cfg: Config, use_gpu: bool) -> dict[str, float]:
    """What one worker reserves, as Ray Train's ScalingConfig asks for it."""
    cl = cfg.cluster
    need = {"CPU": float(cl.cpus_per_worker), **{k: float(v) for k, v in cl.resources_per_worker.items()}}
    if use_gpu:
        need.setdefault("GPU", 1.0)
    return {k: v for k, v in need.items() if v > 0}


def fits_on(node: dict[str, float], need: dict[str, float]) -> int:
    """How many workers one node can hold."""
    return min(math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in need.items())


def shortfall(
    cfg: Config, need: dict[str, float], nodes: list[dict[str, float]], totals: dict[str, float]
) -> str:
    """ "" when the nodes can hold `cluster.num_workers` workers of `need` under the placement
    strategy, else why not, with the numbers."""
    cl = cfg.cluster
    n = cl.num_workers
    short = [
        f"cluster.num_workers={n} x {per:g} {key} needs {per * n:g} {key}s; the cluster has {totals.get(key, 0.0):g}"
        for key, per in sorted(need.items(), key=lambda kv: kv[0] != "GPU")  # the scarce one first
        if per * n > totals.get(key, 0.0) + 1e-9
    ]
    if short:
        return "; ".join(short)
    per_node = [fits_on(node, need) for node in nodes]
    shown = ", ".join(f"{k}={v:g}" for k, v in need.items())
    if not any(per_node):
        return f"no node can hold one worker ({shown}); the largest nodes have {_largest(nodes, need)}"
    if cl.placement_strategy == "STRICT_PACK" and max(per_node) < n:
        return (
            f"cluster.placement_strategy=STRICT_PACK puts all {n} workers ({shown} each) on one node; "
            f"the largest node holds {max(per_node)}"
        )
    if cl.placement_strategy == "STRICT_SPREAD" and sum(1 for k in per_node if k) < n:
        return (
            f"cluster.placement_strategy=STRICT_SPREAD needs {n} nodes that each hold a worker ({shown}); "
            f"the cluster has {sum(1 for k in per_node if k)}"
        )
    if sum(per_node) < n:
        return (
            f"cluster.num_workers={n} workers ({shown} each) do not fit: the nodes hold "
            f"{sum(per_node)} whole workers between them ({', '.join(map(str, per_node))} per node)"
        )
    return ""


def _largest(nodes: list[dict[str, float]], need: dict[str, float]) -> str:
    return ", ".join(f"{k}={max((nd.get(k, 0.0) for nd in nodes), default=0.0):g}" for k in need)


def alive_nodes(ray) -> list[dict[str, float]]:
    return [dict(nd.get("Resources", {})) for nd in ray.nodes() if nd.get("Alive")]


def check_capacity(
    cfg: Config, ray, use_gpu: bool | None = None, timeout_s: float | None = None, poll_s: float = 5.0
) -> None:
    """Raise CapacityError when the (connected) cluster cannot ever hold the worker group; on an
    autoscaling cluster wait up to `timeout_s` for it to scale up first."""
    if use_gpu is None:
        use_gpu = cfg.cluster.use_gpu == "true" or (
            cfg.cluster.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0
        )
    need = worker_resources(cfg, use_gpu)
    why = shortfall(cfg, need, alive_nodes(ray), ray.cluster_resources())
    if not why:
        return
    ceiling = max_autoscaled_resources()
    if ceiling is None:
        raise CapacityError(f"{why}; ask for fewer or smaller workers, or add nodes to the cluster")
    for key, per in need.items():
        if per * cfg.cluster.num_workers > ceiling.get(key, 0) + 1e-9:
            raise CapacityError(
                f"{why}, and its autoscaler can grow it to at most {ceiling.get(key, 0):g} {key}; "
                "ask for fewer or smaller workers, or raise the node types' max_workers"
            )
    timeout_s = DEFAULT_SCALE_UP_TIMEOUT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        why = shortfall(cfg, need, alive_nodes(ray), ray.cluster_resources())
        if not why:
            return
    raise CapacityError(
        f"{why}, and the autoscaler did not add the nodes within {timeout_s:g} s; check `ray status` "
        "for pending or failed nodes (quota, instance type), or set PRETRAIN_SCALE_UP_TIMEOUT_S"
    )


class CapacityCheckBeforeStart(ControllerCallback):
    """Runs in the Ray Train controller: before each (re)start of the worker group, on a static
    cluster, the check above. Without it, a worker group that lost its node is restarted into a
    placement group that can never be placed, and Ray Train retries that start forever. The
    CapacityError it raises is not one Ray Train retries: `fit()` raises it, in a ControllerError.
    An autoscaling cluster is left to replace the node while Ray Train waits for it."""

    def __init__(self, cfg: Config, use_gpu: bool):
        self.cfg, self.use_gpu = cfg, use_gpu

    def before_controller_execute_resize_decision(self, resize_decision) -> None:
        if max_autoscaled_resources() is None:
            # the group size decided (an elastic run's may be below cluster.num_workers)
            n = resize_decision.num_workers
            cl = replace(self.cfg.cluster, num_workers=n)
            try:
                check_capacity(replace(self.cfg, cluster=cl), ray, use_gpu=self.use_gpu)
            except CapacityError as e:
                if n == self.cfg.cluster.num_workers:
                    raise
                raise CapacityError(
                    f"{e} (the smallest group of this elastic run: cluster.min_workers={n})"
                ) from None
