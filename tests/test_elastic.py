"""Elastic worker groups (`cluster.min_workers`): the sizes a run may take, and a real 2-node Ray
cluster on this machine (`ray.cluster_utils.Cluster`, 1 CPU per node) whose worker node leaves
mid-run and comes back: the run shrinks to 1 worker and grows back to 2 without a person, with the
undisturbed run's losses at every step and its data position at the end."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.elastic import valid_sizes, workers_held
from tests.conftest import ROOT
from tests.run_fixtures import hooked_env, tiny_config, tiny_run
from tests.test_multinode import TwoNodes
from trainer.config import ConfigError, load_config

STEPS = 8


# ------------------------------------------------------------------ sizes (no Ray)
def test_valid_sizes_keep_tp_pp_the_global_batch_and_the_streams():
    cfg = tiny_config(
        cluster={"num_workers": 8, "min_workers": 2},
        parallel={"tp": 2, "zero_stage": 1, "micro_batch_size": 1, "global_batch_size": 12},
        model={"vocab_size": 256},
    )
    # multiples of tp=2 whose dp (n/2) divides the 12 micro batches and the streams
    assert valid_sizes(cfg, num_streams=12) == [8, 6, 4, 2]
    assert valid_sizes(cfg, num_streams=4) == [8, 4, 2]  # dp 3 does not divide 4 streams
    assert valid_sizes(tiny_config(cluster={"num_workers": 2}), num_streams=4) == [2]  # not elastic


def test_with_elastic_model_parallel_a_size_without_room_for_tp_lowers_it():
    from cluster.elastic import at_size, valid_layouts

    cfg = tiny_config(
        cluster={"num_workers": 4, "min_workers": 1, "elastic_model_parallel": True},
        parallel={"tp": 2, "zero_stage": 1, "micro_batch_size": 1, "global_batch_size": 12},
        model={"vocab_size": 256},
    )
    # TP=2 wherever it fits; 3 and 1 workers only hold TP=1
    assert valid_layouts(cfg, num_streams=12) == {4: (2, 1), 3: (1, 1), 2: (2, 1), 1: (1, 1)}
    assert valid_layouts(cfg, num_streams=4) == {4: (2, 1), 2: (2, 1), 1: (1, 1)}  # dp 3: 4 streams
    layouts = {"4": [2, 1], "1": [1, 1]}  # as the workers get them (JSON)
    assert at_size(cfg, layouts, 4) is cfg
    one = at_size(cfg, layouts, 1)
    assert (one.parallel.tp, one.parallel.pp, one.dp(1), one.grad_accum(1)) == (1, 1, 1, 12)
    off = tiny_config(
        cluster={"num_workers": 4, "min_workers": 2},
        parallel={"tp": 2, "zero_stage": 1, "micro_batch_size": 1, "global_batch_size": 12},
        model={"vocab_size": 256},
    )
    assert valid_layouts(off, num_streams=12) == {4: (2, 1), 2: (2, 1)}  # TP stays: 3 is not a size


def test_workers_held_follows_the_placement_strategy():
    nodes, need = [{"CPU": 3.0}, {"CPU": 1.0}, {"GPU": 1.0}], {"CPU": 1.0}
    held = {
        s: workers_held(tiny_config(cluster={"placement_strategy": s}), need, nodes)
        for s in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    }
    assert held == {"PACK": 4, "SPREAD": 4, "STRICT_PACK": 3, "STRICT_SPREAD": 2}


@pytest.mark.parametrize(
    "cluster, message",
    [
        ({"num_workers": 2, "min_workers": 3}, "cluster.min_workers (3) must be <= cluster.num_workers (2)"),
        ({"num_workers": 4, "min_workers": 3}, "cluster.min_workers (3) must be a multiple of parallel.tp"),
    ],
)
def test_bad_min_workers_names_the_field(cluster, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        tiny_config(cluster=cluster, parallel={"micro_batch_size": 1, "global_batch_size": 4})
    assert e.value.field == "cluster.min_workers"


def test_the_policy_grows_only_when_the_workers_wait_at_a_commit_and_never_waits_below_min():
    """cluster/library_internals.py's ElasticGroupPolicy, driven as Ray Train's controller drives it."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision
    from ray.train.v2._internal.execution.training_report import _TrainingReport
    from ray.train.v2._internal.execution.worker_group.poll import WorkerStatus

    from cluster.elastic import GROW_KEY
    from cluster.library_internals import ElasticGroupPolicy

    held = {"now": 2}
    policy = ElasticGroupPolicy(ScalingConfig(num_workers=(2, 4)), lambda: held["now"], GROW_KEY)
    assert policy.make_decision_for_non_running_worker_group().num_workers == 2  # what the nodes hold
    held["now"] = 0  # below min_workers on a static cluster: the min, which the capacity check refuses
    assert policy.make_decision_for_non_running_worker_group().num_workers == 2

    group = type("Group", (), {"num_workers": 2})()

    def status(metrics):
        report = _TrainingReport(None, metrics, False) if metrics is not None else None
        return type(
            "Status", (), {"worker_statuses": {0: WorkerStatus(running=True, training_report=report)}}
        )()

    held["now"] = 4
    assert isinstance(policy.make_decision_for_running_worker_group(group, status(None)), NoopDecision)
    assert isinstance(
        policy.make_decision_for_running_worker_group(group, status({"loss": 1.0})), NoopDecision
    )
    grown = policy.make_decision_for_running_worker_group(group, status({GROW_KEY: 4}))
    assert isinstance(grown, ResizeDecision) and grown.num_workers == 4
    held["now"] = 0  # the nodes went again meanwhile: restart at the same size, never leave them waiting
    assert policy.make_decision_for_running_worker_group(group, status({GROW_KEY: 4})).num_workers == 2


def test_a_resize_is_a_size_change_within_one_driver(tmp_path):
    from cluster.elastic import resized_from
    from trainer.events import EventLog

    log = EventLog(str(tmp_path))
    log.write("workers_requested", workers=2)
    log.write("start", world_size=2)
    log.write("checkpoint", step=4)
    assert resized_from(str(tmp_path), 2) is None  # a restart at the same size
    resized = resized_from(str(tmp_path), 1)
    assert resized["from_workers"] == 2 and resized["to_workers"] == 1 and resized["since"] > 0
    log.write("workers_requested", workers=1)  # `pretrain resume --set cluster.num_workers=1`
    assert resized_from(str(tmp_path), 1) is None


# ------------------------------------------------------------------ a real 2-node cluster
STALL = {"PRETRAIN_TEST_STALL_AT": "4:0"}  # rank 0 holds in 0-based step 4, once per marker file


@pytest.fixture(scope="module")
def two_nodes():
    # Ray workers inherit the environment of their node's raylet, not the driver's: the nodes carry
    # the hook, which acts only in a run directory the test marks
    with pytest.MonkeyPatch.context() as env:
        for key, value in hooked_env(**STALL).items():
            env.setenv(key, value)
        cluster = TwoNodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _wait_for(path: Path, proc, err: Path, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, err.read_text()[-4000:]
        assert time.monotonic() < deadline, f"no {path.name} after {timeout_s} s\n" + err.read_text()[-4000:]
        time.sleep(0.2)


def _events(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        pytest.param([], id="dp"),
        # TP=2 over the 2 workers: 1 worker holds no TP=2 layout, so it trains at TP=1 and back
        pytest.param(["parallel.tp=2", "cluster.elastic_model_parallel=true"], id="tp"),
    ],
)
def test_a_node_leaves_and_returns_the_run_shrinks_and_grows_with_the_same_losses(
    corpus, tmp_path, two_nodes, layout
):
    """2 workers, one per node (SPREAD, 1 CPU each). Rank 0 holds at step 5 (0-based 4, after the
    commit of step 4); the worker node is removed: the group fails, Ray Train's elastic policy
    restarts it on the 1 worker the cluster holds, resuming from step 4 with twice the accumulation.
    It holds at step 5 again; the node is added back and the run let go: at its commit of step 6 the
    1-worker group finds room for 2 and waits there, and Ray Train restarts it at 2 workers, which
    train to the end. Nobody resumes anything by hand."""
    name = "elastic"
    overrides = tiny_run(corpus, tmp_path, name, STEPS, "optim.lr=3e-3", tracking=True) + [
        f"cluster.address={two_nodes.address}",
        "cluster.num_workers=2",
        "cluster.min_workers=1",
        "cluster.elastic_check_s=0",  # every commit asks whether the cluster holds more workers
        "cluster.cpus_per_worker=1",
        "cluster.placement_strategy=SPREAD",
        "checkpoint.every=2",
        "checkpoint.keep=4",
        *layout,
    ]
    run_dir = Path(tmp_path) / "runs" / name
    stalled, go_on = run_dir / "test-stalled", run_dir / "test-continue"
    out, err = Path(tmp_path) / "stdout.txt", Path(tmp_path) / "stderr.txt"
    env = {**os.environ, **hooked_env(**STALL)}
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "train", "configs/tiny-cpu.yaml"]
            + [a for o in overrides for a in ("--set", o)],
            cwd=ROOT,
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        _wait_for(stalled, proc, err)  # 2 workers, step 4 committed, rank 0 held in step 5
        placed = {json.loads((run_dir / "workers" / f"rank{r}.json").read_text())["node_id"] for r in (0, 1)}
        assert placed == two_nodes.node_ids, placed
        stalled.unlink()  # the 1-worker group holds at the same step again
        two_nodes.remove_worker_node()
        removed_at = time.time()
        _wait_for(stalled, proc, err)
        assert [e["world_size"] for e in _events(run_dir, "start")] == [2, 1]
        two_nodes.add_worker_node()
        go_on.touch()
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if len(two_nodes.node_ids) < 2:
            two_nodes.add_worker_node()
    assert rc == 0, err.read_text()[-4000:]

    starts = _events(run_dir, "start")
    assert [(e["world_size"], e["resumed_from"]) for e in starts] == [(2, 0), (1, 4), (2, 6)], starts
    resizes = _events(run_dir, "resize")
    assert [(e["from_workers"], e["to_workers"], e["step"]) for e in resizes] == [(2, 1, 4), (1, 2, 6)]
    assert all(e["lost_s"] > 0 for e in resizes), resizes
    # the shrink's lost_s includes the test's holds; from the node's removal to the new group's start:
    print("shrink: node removed -> 1-worker group training", round(starts[1]["time"] - removed_at, 3), "s")
    print("seconds lost per resize:", [(e["from_workers"], e["to_workers"], e["lost_s"]) for e in resizes])
    for e in (run_dir / "events.jsonl").read_text().splitlines():  # where the time went (-s shows it)
        print(e[:400])

    # MLflow: the group size at each start, and every step's loss (the ones the shrunk group redid too)
    # within 1e-5 of one undisturbed process's on the same data
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    workers = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "workers"))
    assert workers == [(4, 1.0), (6, 2.0)], workers  # logged at each restart
    assert len(client.get_metric_history(run_id, "resize_lost_s")) == 2

    from trainer.loop import train

    plain = [
        o for o in overrides if not o.startswith(("cluster.", "tracking.", "checkpoint.", "parallel.tp"))
    ]
    single = train(load_config(ROOT / "configs/tiny-cpu.yaml", plain + ["cluster.num_workers=1"]))
    logged = client.get_metric_history(run_id, "loss")
    assert sorted({m.step for m in logged}) == list(range(1, STEPS + 1))
    for m in logged:
        assert m.value == pytest.approx(single.losses[m.step], abs=1e-5), (m.step, m.value, single.losses)

    # the data position at the end is the undisturbed run's: every sample consumed once, in order
    from trainer.data.stream import open_manifest, train_stream

    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", plain + ["cluster.num_workers=1"])
    commit = json.loads((run_dir / "checkpoints" / f"step_{STEPS}" / "commit.json").read_text())
    expected = train_stream(cfg, open_manifest(cfg.data.path), 0, 1).state_dict(STEPS)
    assert commit["data"] == json.loads(json.dumps(expected)), (commit["data"], expected)
