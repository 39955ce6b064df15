"""A worker group across nodes: a 2-node Ray cluster on this machine (`ray.cluster_utils.Cluster`,
1 CPU per node), a SPREAD run whose 2 workers land on both nodes and train the same losses as
one plain process; a config the cluster can never hold is refused with the numbers, and so is
the restart of a run whose node left mid-run."""

import json
from pathlib import Path

import pytest

from cluster.capacity import CapacityError, check_capacity, shortfall, worker_resources
from tests.conftest import ROOT
from tests.run_fixtures import tiny_config, tiny_run
from trainer.config import load_config
from trainer.loop import train

STEPS = 6


# ------------------------------------------------------------------ the capacity arithmetic (no Ray)
def _cfg(**cluster):
    # a global batch that every worker count here divides (dp = num_workers)
    return tiny_config(cluster=cluster, parallel={"micro_batch_size": 1, "global_batch_size": 192})


def test_gpu_request_on_a_cpu_cluster_names_the_numbers():
    cfg = _cfg(num_workers=64, use_gpu="true")
    need = worker_resources(cfg, use_gpu=True)
    assert need == {"CPU": 1.0, "GPU": 1.0}
    why = shortfall(cfg, need, [{"CPU": 8.0}, {"CPU": 8.0}], {"CPU": 16.0})
    assert why.startswith("cluster.num_workers=64 x 1 GPU needs 64 GPUs; the cluster has 0"), why


def test_workers_must_fit_whole_on_nodes():
    nodes = [{"CPU": 3.0}, {"CPU": 3.0}]  # 6 CPUs in all, but only 2 whole 2-CPU workers
    assert "hold 2 whole workers" in shortfall(
        _cfg(num_workers=3, cpus_per_worker=2), {"CPU": 2.0}, nodes, {"CPU": 6.0}
    )
    assert shortfall(_cfg(num_workers=2, cpus_per_worker=2), {"CPU": 2.0}, nodes, {"CPU": 6.0}) == ""
    assert "STRICT_PACK" in shortfall(
        _cfg(num_workers=2, placement_strategy="STRICT_PACK"), {"CPU": 2.0}, nodes, {"CPU": 6.0}
    )
    assert "STRICT_SPREAD needs 3 nodes" in shortfall(
        _cfg(num_workers=3, placement_strategy="STRICT_SPREAD"), {"CPU": 1.0}, nodes, {"CPU": 6.0}
    )
    assert "no node can hold one worker" in shortfall(
        _cfg(num_workers=1, cpus_per_worker=4), {"CPU": 4.0}, [{"CPU": 2.0}] * 3, {"CPU": 6.0}
    )


# ------------------------------------------------------------------ a real 2-node cluster
_HOST_CLUSTER = """
import json, socket, sys
from ray.cluster_utils import Cluster
def free_port():  # Ray's fixed defaults (dashboard 8265, agent 52365) collide with other Rays here
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
c = Cluster(initialize_head=True,
            head_node_args={"num_cpus": 1, "object_store_memory": 150 * 2**20, "include_dashboard": True,
                            "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()})
c.add_node(num_cpus=1, object_store_memory=150 * 2**20)
c.wait_for_nodes()
def report():
    print(json.dumps({"address": c.address, "head": c.head_node.node_id,
                      "node_ids": [n.node_id for n in c.list_all_nodes()]}), flush=True)
report()
for command in sys.stdin:  # one command a line, until the test module is done
    if command.strip() == "remove":  # the non-head node goes away (drivers attach to the head)
        c.remove_node(next(iter(c.worker_nodes)))
    elif command.strip() == "add":
        c.add_node(num_cpus=1, object_store_memory=150 * 2**20)
    c.wait_for_nodes()  # until the GCS agrees on the nodes alive
    report()
c.shutdown()
"""


class TwoNodes:
    """A 2-node `ray.cluster_utils.Cluster` hosted by a small child process. Ray starts its daemons
    with a preexec_fn, i.e. a real fork of the caller: from the large pytest process that fork can
    fail with ENOMEM on a 24 GiB machine, from a fresh interpreter it does not. The Cluster object
    lives there, so nodes are removed and added there too (`remove_worker_node`, `add_worker_node`)."""

    def __init__(self):
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOST_CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._read_report()
        self.address = self._report["address"]

    def _read_report(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the 2-node cluster host exited ({self.proc.wait()})")
        self._report = json.loads(line)
        self.node_ids = set(self._report["node_ids"])

    def _command(self, command: str):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        self._read_report()

    def remove_worker_node(self) -> str:
        """Take the non-head node out of the cluster; returns once the GCS counts it dead."""
        (worker,) = self.node_ids - {self._report["head"]}
        self._command("remove")
        return worker

    def add_worker_node(self):
        self._command("add")

    def shutdown(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


@pytest.fixture(scope="module")
def two_nodes():
    cluster = TwoNodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture()
def losing_a_node(two_nodes):
    """The module's cluster, whose worker node the test may remove; it is back for the next test."""
    yield two_nodes
    if len(two_nodes.node_ids) < 2:
        two_nodes.add_worker_node()


def _overrides(corpus, tmp_path, address):
    return tiny_run(corpus, tmp_path, "spread", STEPS, "optim.lr=3e-3", f"cluster.address={address}")


@pytest.mark.slow
def test_spread_run_uses_both_nodes_and_matches_single_process(corpus, tmp_path, two_nodes, pretrain_cli):
    overrides = _overrides(corpus, tmp_path, two_nodes.address)
    ray_run = overrides + [
        "cluster.num_workers=2",
        "cluster.cpus_per_worker=1",
        "cluster.placement_strategy=SPREAD",
    ]
    proc = pretrain_cli(
        "train", "configs/tiny-cpu.yaml", *[a for o in ray_run for a in ("--set", o)], timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run_dir = Path(tmp_path) / "runs" / "spread"
    workers = [json.loads((run_dir / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]
    node_ids = two_nodes.node_ids
    assert {w["node_id"] for w in workers} == node_ids and len(node_ids) == 2, (workers, node_ids)

    summary = json.loads((run_dir / "summary.json").read_text())
    ray_losses = {int(k): v for k, v in summary["losses"].items()}
    single = train(load_config(ROOT / "configs/tiny-cpu.yaml", overrides + ["cluster.num_workers=1"]))
    assert sorted(ray_losses) == sorted(single.losses) == list(range(1, STEPS + 1))
    for step, loss in single.losses.items():
        assert ray_losses[step] == pytest.approx(loss, abs=1e-5), (step, ray_losses, single.losses)


@pytest.mark.slow
def test_capacity_check_refuses_what_the_cluster_cannot_hold(two_nodes):
    import ray

    ray.init(address=two_nodes.address)
    try:
        check_capacity(_cfg(num_workers=2, placement_strategy="SPREAD"), ray)  # fits: 1 CPU on each node
        with pytest.raises(
            CapacityError, match=r"cluster.num_workers=64 x 1 GPU needs 64 GPUs; the cluster has 0"
        ):
            check_capacity(_cfg(num_workers=64, use_gpu="true"), ray)
        with pytest.raises(CapacityError, match="STRICT_PACK"):
            check_capacity(_cfg(num_workers=2, placement_strategy="STRICT_PACK"), ray)
    finally:
        ray.shutdown()


_WIRED = "check_capacity" in (ROOT / "cluster" / "driver.py").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not _WIRED, reason="cluster.driver._fit does not call check_capacity yet")
def test_train_refuses_gpus_the_cluster_lacks_with_exit_2(corpus, tmp_path, two_nodes, pretrain_cli):
    # 2 workers, not 64: the tiny corpus cannot feed dp=64, and the corpus is checked first.
    overrides = _overrides(corpus, tmp_path, two_nodes.address) + [
        "cluster.use_gpu='true'",  # quoted: YAML reads a bare true as a bool
        "cluster.num_workers=2",
    ]
    proc = pretrain_cli(
        "train", "configs/tiny-cpu.yaml", *[a for o in overrides for a in ("--set", o)], timeout=180
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "cluster.num_workers=2 x 1 GPU needs 2 GPUs; the cluster has 0" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not _WIRED, reason="cluster.driver._fit does not call check_capacity yet")
def test_a_node_leaving_mid_run_ends_the_run_with_the_capacity_it_lacks(corpus, tmp_path, losing_a_node):
    """The worker node leaves a static cluster mid-run. The worker group fails and Ray Train would
    restart it into a placement group that 1 CPU can never hold, retrying that start forever; the
    controller's capacity check refuses the restart instead, so the run ends failed, with the
    numbers, and its committed checkpoints stay for `pretrain resume`."""
    import subprocess
    import sys
    import time

    overrides = _overrides(corpus, tmp_path, losing_a_node.address) + [
        "cluster.num_workers=2",
        "cluster.cpus_per_worker=1",
        "cluster.placement_strategy=SPREAD",
        "cluster.run_name=node-loss",
        "train.steps=100000",  # still training when the node goes
        "train.log_every=10",
        "checkpoint.every=2",
    ]
    run_dir = Path(tmp_path) / "runs" / "node-loss"
    out, err = Path(tmp_path) / "stdout.txt", Path(tmp_path) / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "train", "configs/tiny-cpu.yaml"]
            + [a for o in overrides for a in ("--set", o)],
            cwd=ROOT,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 240
        while not list(run_dir.glob("checkpoints/step_*/commit.json")):
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.5)
        placed = {json.loads((run_dir / "workers" / f"rank{r}.json").read_text())["node_id"] for r in (0, 1)}
        lost = losing_a_node.remove_worker_node()
        assert lost in placed, (lost, placed)
        rc = proc.wait(timeout=180)  # a restart waiting forever on the lost node fails the test here
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr_text = err.read_text()
    assert rc == 2, stderr_text[-3000:]
    expected = (
        "pretrain: error: run node-loss failed and cannot restart its worker group: "
        "cluster.num_workers=2 x 1 CPU needs 2 CPUs; the cluster has 1"
    )
    assert expected in stderr_text, stderr_text[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["state"] == "failed" and "the cluster has 1" in record["error"], record
    assert list(run_dir.glob("checkpoints/step_*/commit.json"))  # what `pretrain resume` continues from
