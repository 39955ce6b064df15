"""Every place cluster/ reaches into a private part of Ray (checked on ray 2.60.0), and why.

Each one is kept because it saves start-up seconds on the embedded quick start, keeps the embedded
cluster on loopback, or is the only way to a piece of Ray Train we build on (the measurement of
each is in docs/benchmarks.md, "Library internals"). tests/test_library_internals.py fails loudly
when Ray changes the thing touched; at run time a Ray without it falls back to Ray's own default.
"""

from __future__ import annotations

import contextlib
import functools
import os

# Ray's config switches (`RAY_<key>` in the environment) for an embedded cluster: no idle workers
# prestarted for the driver (Ray Train's actors run in a runtime env of their own and never use
# them); no metrics export (nothing reads an embedded cluster's: no dashboard, no Prometheus); and
# local connects retried every 0.1 s instead of Ray's 1 s, ten times as often (the same 10 s
# budget): the raylet's first connect to its object store often comes before the store listens.
EMBEDDED_SYSTEM_CONFIG = {
    "prestart_worker_first_driver": False,
    "enable_metrics_collection": False,
    "raylet_client_connect_timeout_milliseconds": 100,
    "raylet_client_num_connect_attempts": 100,
}


@contextlib.contextmanager
def single_machine_mode():
    """On Linux Ray turns a 127.0.0.1 node address into the machine's own IP, so GCS, raylet,
    workers and agents would listen on every interface; Ray's single-machine mode (its default on
    macOS/Windows) keeps the node address, and so every one of those sockets, on 127.0.0.1. The
    processes started within inherit the switch; it is undone for this process after."""
    from ray._private import ray_constants

    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), ray_constants.ENABLE_RAY_CLUSTER
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]


@contextlib.contextmanager
def lean_head():
    """Start an embedded head without two Python processes Ray starts on every head: the
    autoscaler's monitor (there is no autoscaler: the cluster is this machine) and Ray's API server,
    which with `include_dashboard=False` loads only its usage-stats module, yet `ray.init` waits for
    it to come up. Ray's own switch for the first (`ray start --no-monitor`) is not an argument of
    `ray.init`. A Ray without these methods starts its head as usual."""
    from ray._private.node import Node

    saved = {name: Node.__dict__.get(name) for name in ("start_monitor", "start_api_server")}
    if None in saved.values():
        yield
        return
    Node.start_monitor = lambda self: None
    Node.start_api_server = lambda self, **kwargs: None
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(Node, name, fn)


@functools.cache
def _cluster_sized_scaling_policy():
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    class ClusterSizedScalingPolicy(FixedScalingPolicy):
        """Ray Train's fixed-size policy without its requests to the AutoscalingCoordinator, a
        detached actor (one more process, started before the workers) through which Ray Data and
        Ray Train share an autoscaling cluster. An embedded cluster has no autoscaler and no Ray Data."""

        def after_controller_start(self, train_run_context) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

        def _send_resource_request(self) -> None:
            pass

    return ClusterSizedScalingPolicy


@functools.cache
def _elastic_group_policy():
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision
    from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy

    class ElasticGroupPolicy(ElasticScalingPolicy):
        """Ray Train's elastic policy (ScalingConfig num_workers=(min, max)), with two changes:
        the size comes from `sizes()` (the largest valid layout the live nodes hold: the
        autoscaling coordinator's reservations know nothing of TP/PP or the global batch), and a
        running group is resized only when its workers ask, waiting at a commit (a report with
        `grow_key`), so that no step is lost. On a static cluster, too few nodes for the smallest
        size is decided as that size, which the capacity check then refuses with the numbers
        (Ray's policy would wait forever); the coordinator is asked only on an autoscaling one."""

        def __init__(self, scaling_config, sizes, grow_key: str):
            super().__init__(scaling_config)
            self.sizes, self.grow_key, self.autoscaling = sizes, grow_key, False

        def after_controller_start(self, train_run_context) -> None:
            self.autoscaling = max_autoscaled_resources() is not None
            if self.autoscaling:
                super().after_controller_start(train_run_context)

        def _maybe_send_resource_request(self) -> None:
            if self.autoscaling:
                super()._maybe_send_resource_request()

        def _cancel_resource_request(self) -> None:
            if self.autoscaling:
                super()._cancel_resource_request()

        def make_decision_for_non_running_worker_group(self):
            self._maybe_send_resource_request()
            n = self.sizes()
            if n:
                return self._get_resize_decision(n)
            return (
                NoopDecision()
                if self.autoscaling
                else self._get_resize_decision(self.scaling_config.min_workers)
            )

        def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
            self._maybe_send_resource_request()
            reports = [s.training_report for s in worker_group_status.worker_statuses.values()]
            if not any(r is not None and r.metrics.get(self.grow_key) for r in reports):
                return NoopDecision()
            # the workers wait at a commit: resize even to the same size rather than leave them waiting
            return self._get_resize_decision(max(self.sizes(), worker_group_state.num_workers))

    return ElasticGroupPolicy


def __getattr__(name: str):
    """Ray Train's internals are imported when first used, not with this module: the driver starts
    Ray before it imports Ray Train (cluster/driver.py `run_training`)."""
    if name == "ClusterSizedScalingPolicy":
        return _cluster_sized_scaling_policy()
    if name == "ElasticGroupPolicy":  # cluster/elastic.py's sizes in Ray Train's elastic policy
        return _elastic_group_policy()
    if name == "ControllerCallback":  # capacity.py's hook into Ray Train's controller
        from ray.train.v2._internal.execution.callback import ControllerCallback

        return ControllerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Default Ray Train callbacks a run drops (matched by class name: on a Ray that names them
# otherwise, nothing is dropped; the test checks these names still exist).
DATASETS_CALLBACK = "DatasetsCallback"
PLACEMENT_GROUP_CLEANER = "PlacementGroupCleanerCallback"


def trainer_class(embedded: bool, elastic_sizes=None, grow_key: str = ""):
    """Ray Train's DataParallelTrainer, for our torch-free backend (cluster/backend.py), less what
    would only cost start-up here:

    - Ray Datasets' default callback (unless given datasets, which we never are): it starts a
      DatasetManager actor, one more process before the workers may begin;
    - on the embedded cluster, the placement group cleaner. That detached actor removes the worker
      group's placement group if the controller dies while the cluster lives on, which an embedded
      cluster, ending with this process, never does. It finds the controller through the state API
      of whichever Ray it detects on the machine: without a dashboard it dies with a traceback, and
      with someone's `ray start` cluster on the machine it asks that one, hears that our controller
      is gone, and removes the running workers' placement group;
    - on the embedded cluster, the fixed scaling policy's requests to the autoscaling coordinator.

    With `elastic_sizes` (a callable: the group size the cluster holds now), Ray Train's elastic
    policy becomes ElasticGroupPolicy, sized by it.
    """
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    policy = _cluster_sized_scaling_policy()
    dropped = {PLACEMENT_GROUP_CLEANER} if embedded else set()

    class Trainer(DataParallelTrainer):
        def _create_default_callbacks(self):
            skip = dropped if self.datasets else dropped | {DATASETS_CALLBACK}
            return [cb for cb in super()._create_default_callbacks() if type(cb).__name__ not in skip]

        def _initialize_and_run_controller(self, **kwargs):
            if embedded and type(kwargs.get("scaling_policy")) is FixedScalingPolicy:
                kwargs["scaling_policy"] = policy(self.scaling_config)
            if elastic_sizes is not None and self.scaling_config.elasticity_enabled:
                kwargs["scaling_policy"] = _elastic_group_policy()(
                    self.scaling_config, elastic_sizes, grow_key
                )
            return super()._initialize_and_run_controller(**kwargs)

    return Trainer


def max_autoscaled_resources() -> dict[str, float] | None:
    """The most an autoscaling cluster can grow to, per resource; None for a static cluster (the
    same source Ray Train's own check reads)."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # no cluster config (a static cluster) or the GCS cannot say
        return None
