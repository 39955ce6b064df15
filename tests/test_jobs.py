"""Runs as Ray Jobs on a running cluster: `ray start --head` (token auth on, bound to 127.0.0.1),
then submit / status / logs / list / stop by run name, `ray job submit` of the same training,
bad input, the shipped examples, and the sockets of the head `pretrain train` starts itself."""

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from tests.conftest import ROOT
from tests.ray_head import VENV_BIN, free_port, ray_head
from tests.run_fixtures import tiny_run


# ------------------------------------------------------------------ the shipped examples (fast)
def test_examples_parse_and_point_at_real_entry_points():
    from launch.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert "train" in commands
    cluster = yaml.safe_load((ROOT / "launch/examples/ray-cluster.yaml").read_text())
    assert cluster["cluster_name"] and cluster["head_node_type"] in cluster["available_node_types"]
    gpu_types = [
        t for t in cluster["available_node_types"].values() if t.get("resources", {}).get("GPU", 0) > 0
    ]
    assert gpu_types and any("pip install" in c for c in cluster["setup_commands"])

    rayjob = yaml.safe_load((ROOT / "launch/examples/rayjob.yaml").read_text())
    assert rayjob["kind"] == "RayJob" and rayjob["apiVersion"].startswith("ray.io/")
    entry = rayjob["spec"]["entrypoint"].split()
    assert entry[:4] == ["python", "-m", "launch.cli", "train"]
    assert (ROOT / entry[4]).is_file()
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1


# ------------------------------------------------------------------ a `ray start` head of our own
@pytest.fixture(scope="module")
def head():
    with ray_head() as h:
        yield h


def _jobs(head, *args, timeout=120):
    """`pretrain submit|status|logs|stop|list` as a user would type it."""
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=ROOT,
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _overrides(corpus, tmp_path, name, steps):
    return tiny_run(corpus, tmp_path, name, steps)


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _wait_state(head, run, states, timeout=300):
    deadline = time.time() + timeout
    out = ""
    while time.time() < deadline:
        p = _jobs(head, "status", run, "--address", head["address"])
        out = p.stdout + p.stderr
        if any(f": {s}" in p.stdout for s in states):
            return p.stdout
        time.sleep(2)
    raise AssertionError(f"{run} never reached {states}: {out}")


@pytest.mark.slow
def test_submit_status_logs_list(corpus, tmp_path, head):
    a = head["address"]
    p = _jobs(
        head,
        "submit",
        "configs/tiny-cpu.yaml",
        *_sets(_overrides(corpus, tmp_path, "sub1", 4)),
        "--address",
        a,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "submitted run sub1 (Ray job id sub1)" in p.stdout
    assert not (ROOT / ".pretrain-submit").exists()  # the staged config is gone once uploaded

    assert "sub1: " in _wait_state(head, "sub1", ["pending", "running", "succeeded"])
    _wait_state(head, "sub1", ["succeeded"])
    logs = _jobs(head, "logs", "sub1", "--address", a)
    assert logs.returncode == 0 and "step 4" in logs.stdout, logs.stdout[-3000:] + logs.stderr
    listed = _jobs(head, "list", "--address", a)
    assert listed.returncode == 0 and any(
        line.split()[:2] == ["sub1", "succeeded"] for line in listed.stdout.splitlines()
    ), listed.stdout
    record = json.loads((tmp_path / "runs" / "sub1" / "run.json").read_text())
    assert record["state"] == "succeeded"

    again = _jobs(
        head,
        "submit",
        "configs/tiny-cpu.yaml",
        *_sets(_overrides(corpus, tmp_path, "sub1", 4)),
        "--address",
        a,
    )
    assert again.returncode == 2 and "run sub1 already exists" in again.stderr, again.stderr
    # stopping a finished run: one clear message
    p = _jobs(head, "stop", "sub1", "--address", a)
    assert p.returncode == 2 and "not running" in p.stderr and "Traceback" not in p.stderr, p.stderr


def _in_project_dir(work, cmd_args, head):
    """`pretrain ...` typed in the user's own project directory `work` (not this repository)."""
    env = {
        **head["env"],
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *cmd_args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_submit_checks_paths_and_the_run_lands_where_train_puts_it(corpus, tmp_path, head):
    """Relative data.path, storage_path and SQLite tracking.uri: a head on this machine gets them
    as absolute paths, so the run shows in the project's runs/ and mlflow.db like a `pretrain train`
    run; a head elsewhere, or a corpus that does not serve the config, is refused before submitting."""
    work = tmp_path / "project"
    (work / "data").mkdir(parents=True)
    (work / "data" / "pystd").symlink_to(corpus)
    sets = [
        o
        for o in tiny_run(corpus, tmp_path, "rel1", 3)
        if not o.startswith(("data.path", "cluster.storage_path", "tracking."))
    ]
    sets += ["data.path=data/pystd", "cluster.storage_path=runs", "tracking.uri=sqlite:///mlflow.db"]
    submit = ["submit", str(ROOT / "configs/tiny-cpu.yaml"), *_sets(sets)]

    elsewhere = _in_project_dir(work, [*submit, "--address", "http://ray-head.invalid:8265"], head)
    assert elsewhere.returncode == 2, elsewhere.stdout + elsewhere.stderr
    assert elsewhere.stderr.startswith("pretrain: error: data.path=data/pystd is relative"), elsewhere.stderr
    assert (
        "cluster.storage_path=runs" in elsewhere.stderr
        and "tracking.uri=sqlite:///mlflow.db" in elsewhere.stderr
    )
    assert len(elsewhere.stderr.strip().splitlines()) == 1

    a = head["address"]
    wrong = _in_project_dir(
        work, [*submit, "--set", "data.seq_len=64", "--set", "model.max_seq_len=64", "--address", a], head
    )
    assert wrong.returncode == 2 and "data.seq_len (64) needs blocks of seq_len+1 tokens" in wrong.stderr, (
        wrong.stderr
    )
    assert "rel1" not in _jobs(head, "list", "--address", a).stdout  # nothing was submitted

    p = _in_project_dir(work, [*submit, "--address", a], head)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"run files: {work / 'runs' / 'rel1'}" in p.stdout
    _wait_state(head, "rel1", ["succeeded", "failed"])
    record = json.loads((work / "runs" / "rel1" / "run.json").read_text())
    assert record["state"] == "succeeded", _jobs(head, "logs", "rel1", "--address", a).stdout[-3000:]
    assert record["tracking_uri"] == f"sqlite:///{work}/mlflow.db"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.run_name == "rel1" and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3]
    assert (
        client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"]
        == "custom_model_development"
    )


@pytest.mark.slow
def test_stop_a_long_run(corpus, tmp_path, head):
    a = head["address"]
    p = _jobs(
        head,
        "submit",
        "configs/tiny-cpu.yaml",
        *_sets(_overrides(corpus, tmp_path, "long", 100000)),
        "--address",
        a,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    records = tmp_path / "runs" / "long" / "workers"
    deadline = time.time() + 240
    while not (records.is_dir() and len(list(records.glob("rank*.json"))) == 2):
        assert time.time() < deadline, _jobs(head, "logs", "long", "--address", a).stdout[-3000:]
        time.sleep(1)
    pids = [json.loads(f.read_text())["pid"] for f in records.glob("rank*.json")]
    assert all(psutil.pid_exists(pid) for pid in pids)

    p = _jobs(head, "stop", "long", "--address", a)
    assert p.returncode == 0 and "long: stopped" in p.stdout, p.stdout + p.stderr
    assert "long: stopped" in _wait_state(head, "long", ["stopped"], timeout=30)
    deadline = time.time() + 60
    while any(psutil.pid_exists(pid) for pid in pids):  # its workers are gone with their driver
        assert time.time() < deadline, f"workers {pids} still alive after stop"
        time.sleep(1)


@pytest.mark.slow
def test_ray_job_submit_of_pretrain_train(corpus, tmp_path, head):
    """Ray's own CLI: the driver inside the job joins the cluster instead of starting one."""
    cmd = [
        os.path.join(VENV_BIN, "ray"),
        "job",
        "submit",
        "--address",
        head["address"],
        "--submission-id",
        "rayjob1",
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "-m",
        "launch.cli",
        "train",
        "configs/tiny-cpu.yaml",
        *_sets(_overrides(corpus, tmp_path, "rayjob1", 3)),
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=400)
    assert p.returncode == 0 and "succeeded" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    assert "done: 3 steps" in p.stdout
    # one cluster: the driver joined it (no second head), so the job API sees the run by name
    assert "rayjob1: succeeded" in _jobs(head, "status", "rayjob1", "--address", head["address"]).stdout


@pytest.mark.slow
def test_bad_input_one_clear_message(head):
    dead = f"http://127.0.0.1:{free_port()}"
    for args, expected in (
        (("status", "x", "--address", dead), "no Ray job API answers at"),
        (("list", "--address", dead), "no Ray job API answers at"),
        (("status", "no-such-run", "--address", head["address"]), "no run 'no-such-run'"),
        (("logs", "no-such-run", "--address", head["address"]), "no run 'no-such-run'"),
        (("stop", "no-such-run", "--address", head["address"]), "no run 'no-such-run'"),
    ):
        p = _jobs(head, *args)
        assert p.returncode == 2 and expected in p.stderr, (args, p.stderr)
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


# ------------------------------------------------------------------ the head `pretrain train` starts
_PROBE = """
import json, sys, time, psutil
from cluster.driver import start_ray
from tests.run_fixtures import tiny_config
ray = start_ray(tiny_config())
ray.get([ray.remote(lambda: 1).remote()])  # a worker process too
time.sleep(3)
pids = {p.pid for p in psutil.Process().children(recursive=True)} | {psutil.Process().pid}
socks = [
    [c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()]
    for c in psutil.net_connections("tcp")
    if c.status == psutil.CONN_LISTEN and c.pid in pids
]
scripts = [a.rsplit("/", 1)[-1] for p in psutil.Process().children(recursive=True) for a in p.cmdline()[:3]]
ray.shutdown()
print(json.dumps([socks, scripts]))
"""


@pytest.mark.slow
def test_embedded_head_listens_on_loopback_only():
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    }
    p = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert p.returncode == 0, p.stderr[-3000:]
    socks, scripts = json.loads(p.stdout.strip().splitlines()[-1])
    # Ray's API server and the autoscaler's monitor are not started (each a second of CPU, and
    # ray.init waited for the first)
    assert "dashboard.py" not in scripts and "monitor.py" not in scripts, scripts
    assert "log_monitor.py" in scripts, scripts  # worker output still reaches the driver
    names = {name for _, _, name in socks}
    assert {"gcs_server", "raylet"} <= names and len(socks) >= 5, socks
    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    assert all(ip in loopback for ip, _, _ in socks), [s for s in socks if s[0] not in loopback]


def test_submit_waits_for_a_head_whose_job_agent_is_still_starting():
    """Right after `ray start --head` the job API answers "No available agent to submit job, please
    try again later" for a few seconds: submit retries that (and only that) instead of failing."""
    from cluster.jobs import _submit_when_agent_ready

    answers = iter(
        [RuntimeError("Request failed with status code 500: No available agent to submit job")] * 2
    )

    def submit():
        err = next(answers, None)
        if err:
            raise err
        return "job-1"

    assert _submit_when_agent_ready(submit, wait_s=10) == "job-1"
    with pytest.raises(RuntimeError, match="quota"):
        _submit_when_agent_ready(lambda: (_ for _ in ()).throw(RuntimeError("quota exceeded")), wait_s=10)
