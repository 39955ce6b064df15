"""Every private part of torch, DeepSpeed and Ray we touch (trainer/library_internals.py,
cluster/library_internals.py) is still there and still shaped as we use it.

A library that changes one of them would otherwise leave a run that only starts slower (the
start-up patches fall back to the library's own path) or a wrong number (the grad-norm record):
these fail loudly, naming what moved. tests/test_startup.py checks the outcomes (what a rank
imports and starts); tests/test_jobs.py and tests/test_security.py what the embedded head starts
and where it listens."""

import pytest

from tests.test_startup import run_python


def test_torch_still_has_what_the_dynamo_deferral_replaces():
    import torch._compile

    from trainer import library_internals

    # defer_dynamo() recognises torch's marker by its closure; AdamW steps through __wrapped__.
    marker = torch._compile._disable_dynamo(lambda: None)
    assert marker.__code__.co_freevars == ("fn", "recursive"), marker.__code__.co_freevars
    assert library_internals._ADAM_STEP is not None, "torch.optim.AdamW.step lost __wrapped__"
    assert callable(torch.compiler.disable) and hasattr(torch, "_disable_dynamo")


def test_deepspeed_still_has_what_we_touch():
    code = """
    import sys
    import torch
    from trainer import library_internals
    from trainer.engine import setup_deepspeed
    from trainer.session import Session

    Session().ensure_process_group("gloo")
    setup_deepspeed(torch.device("cpu"))  # imports DeepSpeed the way a rank does
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS
    from deepspeed.utils import groups, zero_to_fp32
    missing = [name for owner, name in [
        (DeepSpeedEngine, "clip_fp32_gradients"),            # keep_fp32_grad_norm replaces it
        (DeepSpeedEngine, "get_global_grad_norm"),
        (DeepSpeedEngine, "_take_model_step"),                 # guard_model_step wraps it
        (DeepSpeedEngine, "zero_grad"),                        # discard_gradients (and tests/test_anomaly.py)
        (DeepSpeedZeroOptimizer, "_release_preflattened_grad_buffers"),
        (DeepSpeedZeroOptimizer, "_lazy_init_hp_params_optimizer_state"),  # link_hp_optimizer_state
        (DeepSpeedZeroOptimizer, "get_grad_norm_direct"),      # multi_tensor_zero_step replaces them
        (DeepSpeedZeroOptimizer, "unscale_and_clip_grads"),
        (DeepSpeedZeroOptimizer, "_model_parallel_all_reduce"),
        (zero_to_fp32, "_get_fp32_state_dict_from_zero2_checkpoint"),     # fp32_state_dict_from_zero
        (zero_to_fp32, "_get_fp32_state_dict_from_zero3_checkpoint"),
        (zero_to_fp32, "parse_optim_states"),
        (groups, "mpu"),                                        # reset_stale_mpu
    ] if not hasattr(owner, name)]
    print(missing)
    print(library_internals.AdamW in ZERO_SUPPORTED_OPTIMIZERS)
    # without_mlflow: the autotuner saw MLflow as not installed, and MLflow still imports after
    from deepspeed.autotuning import autotuner
    print(autotuner.has_mlflow, "mlflow" in sys.modules)
    # skip_shm_comm_build: the CPU comm backend found the op marked unbuildable, built nothing
    print(deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm"))
    """
    out = _python(code)
    assert out == ["[]", "True", "False False", "False"], out


def test_a_stale_mpu_is_not_inherited_and_checkpoint_writes_are_where_we_route_them():
    """DeepSpeed keeps the last engine's mpu in a module global: an engine built without one after
    an engine with one must not see the old process groups."""
    out = _python(
        """
        import torch
        from deepspeed.utils import groups
        from trainer.config import from_dict
        from trainer.engine import initialize
        from trainer.model import Transformer
        from trainer.session import Session

        class Mpu:  # a one-rank model-parallel grid, as Topology.mpu gives
            def get_model_parallel_rank(self): return 0
            def get_model_parallel_world_size(self): return 1
            def get_model_parallel_group(self): return torch.distributed.group.WORLD
            def get_data_parallel_rank(self): return 0
            def get_data_parallel_world_size(self): return 1
            def get_data_parallel_group(self): return torch.distributed.group.WORLD

        cfg = from_dict({"model": {"vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 2,
                                   "max_seq_len": 16}, "data": {"seq_len": 16},
                         "parallel": {"micro_batch_size": 2, "global_batch_size": 2},
                         "train": {"precision": "fp32"}, "cluster": {"num_workers": 1}})
        Session().ensure_process_group("gloo")
        initialize(cfg, Transformer(cfg.model), 1, torch.device("cpu"), mpu=Mpu())
        print(groups.mpu is not None)
        engine, _ = initialize(cfg, Transformer(cfg.model), 1, torch.device("cpu"))
        print(groups.mpu is None)
        from trainer.library_internals import check_checkpoint_writers
        check_checkpoint_writers(engine)  # where every checkpoint write of a save goes
        print("writers ok")
        """
    )
    assert out == ["True", "True", "writers ok"], out


def test_ray_still_has_what_the_embedded_head_and_trainer_override():
    from ray._private import ray_constants
    from ray._private.node import Node
    from ray._private.state import state
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from cluster import library_internals

    assert hasattr(ray_constants, "ENABLE_RAY_CLUSTER")  # single_machine_mode
    assert {"start_monitor", "start_api_server"} <= set(vars(Node))  # lean_head
    assert hasattr(state, "get_max_resources_from_cluster_config")  # max_autoscaled_resources
    for name in ("_create_default_callbacks", "_initialize_and_run_controller"):  # trainer_class
        assert hasattr(DataParallelTrainer, name), name
    for name in ("after_controller_start", "_maybe_send_resource_request", "_send_resource_request"):
        assert hasattr(FixedScalingPolicy, name), name  # ClusterSizedScalingPolicy
    # The default callbacks trainer_class drops, by the names it matches.
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    assert DatasetsCallback.__name__ == library_internals.DATASETS_CALLBACK
    assert PlacementGroupCleanerCallback.__name__ == library_internals.PLACEMENT_GROUP_CLEANER


def test_ray_still_has_what_the_elastic_group_policy_overrides():
    """cluster/library_internals.py's ElasticGroupPolicy: Ray Train's elastic policy, the decisions
    and the worker reports it reads, and the (min, max) ScalingConfig it is chosen for."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision
    from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
    from ray.train.v2._internal.execution.scaling_policy.factory import create_scaling_policy
    from ray.train.v2._internal.execution.training_report import _TrainingReport
    from ray.train.v2._internal.execution.worker_group.poll import WorkerStatus
    from ray.train.v2._internal.execution.worker_group.state import WorkerGroupState

    from cluster.library_internals import ElasticGroupPolicy

    for name in (
        "make_decision_for_non_running_worker_group",
        "make_decision_for_running_worker_group",
        "_get_resize_decision",
        "after_controller_start",
        "_maybe_send_resource_request",
        "_cancel_resource_request",
    ):
        assert hasattr(ElasticScalingPolicy, name), name
    elastic = ScalingConfig(num_workers=(1, 2), elastic_resize_monitor_interval_s=5)
    assert type(create_scaling_policy(elastic)) is ElasticScalingPolicy
    assert (elastic.min_workers, elastic.max_workers, elastic.elasticity_enabled) == (1, 2, True)
    assert hasattr(WorkerGroupState, "num_workers")
    assert "training_report" in WorkerStatus.__dataclass_fields__
    assert _TrainingReport(None, {"k": 1}, False).metrics == {"k": 1}

    policy = ElasticGroupPolicy(elastic, lambda: 1, "grow")
    assert isinstance(policy.make_decision_for_non_running_worker_group(), ResizeDecision)
    status = type("Status", (), {"worker_statuses": {0: WorkerStatus(running=True)}})()
    assert isinstance(policy.make_decision_for_running_worker_group(None, status), NoopDecision)


@pytest.mark.slow
def test_the_embedded_trainer_drops_exactly_the_named_callbacks():
    """On a real embedded Ray: Ray Train's default callbacks, less the datasets callback and the
    placement group cleaner; the fixed scaling policy becomes the cluster-sized one."""
    out = _python(
        """
        from cluster.driver import start_ray, trainer_class
        from tests.run_fixtures import tiny_config
        ray = start_ray(tiny_config())
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
        from ray.train import ScalingConfig
        def noop(config): pass
        plain = DataParallelTrainer(noop, scaling_config=ScalingConfig(num_workers=1))
        ours = trainer_class()(noop, scaling_config=ScalingConfig(num_workers=1))
        names = lambda t: sorted(type(cb).__name__ for cb in t._create_default_callbacks())
        print(sorted(set(names(plain)) - set(names(ours))))
        ray.shutdown()
        """
    )
    assert out[-1] == "['DatasetsCallback', 'PlacementGroupCleanerCallback']", out


def _python(code: str) -> list[str]:
    """Output lines of `code` run in a fresh interpreter (nothing imported yet)."""
    return run_python(code, "/tmp").strip().splitlines()


def test_torch_still_lets_a_process_group_timeout_change_after_creation():
    code = """
    from datetime import timedelta
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d
    from trainer import library_internals

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=1800))
    sub = dist.new_group([0])
    library_internals.set_collective_timeout(42)
    print(sorted(g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in (c10d._get_default_group(), sub)))
    """
    assert _python(code) == ["[42.0, 42.0]"]


def test_the_zero_step_still_routes_its_norm_and_clip_where_multi_tensor_zero_step_replaces_them():
    """multi_tensor_zero_step swaps two methods on the optimizer; a DeepSpeed whose step stops calling
    them (or calls them differently) would keep its per-parameter loop with nothing failing."""
    import inspect

    import torch
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Z

    assert list(inspect.signature(Z.get_grad_norm_direct).parameters) == [
        "self",
        "gradients",
        "params",
        "norm_type",
    ]
    assert list(inspect.signature(Z.unscale_and_clip_grads).parameters) == [
        "self",
        "grad_groups_flat",
        "total_norm",
    ]
    assert "self.get_grad_norm_direct(self.averaged_gradients[i]" in inspect.getsource(Z.scaled_global_norm)
    assert "self.unscale_and_clip_grads([single_grad_partition]" in inspect.getsource(Z.step)
    assert "check_grad_overflow" in DeepSpeedBF16Config.model_fields  # the public switch engine.py sets
    # torch: one multi-tensor norm with the accumulation dtype asked for (DeepSpeed's fp64)
    norms = torch._foreach_norm([torch.ones(4), torch.ones(9)], 2, dtype=torch.float64)
    assert [n.item() for n in norms] == [2.0, 3.0] and norms[0].dtype == torch.float64
