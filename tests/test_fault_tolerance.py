"""Failures on a real local Ray cluster with 2 workers (DeepSpeed ZeRO-3, gloo): stop and resume,
a worker killed mid-run, the whole driver killed and `pretrain resume`."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from tests.run_fixtures import hooked_env, tiny_run
from tests.test_checkpoint import fp32_master
from trainer.config import load_config
from trainer.loop import train

pytestmark = pytest.mark.slow


def _overrides(corpus, tmp_path, name, steps, every):
    return tiny_run(corpus, tmp_path, name, steps, f"checkpoint.every={every}", tracking=True)


def _args(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _summary(tmp_path, name):
    return json.loads((Path(tmp_path) / "runs" / name / "summary.json").read_text())


def _losses(summary):
    return {int(k): v for k, v in summary["losses"].items()}


def test_stop_and_resume_is_bitwise_exact(corpus, tmp_path, pretrain_cli):
    full = pretrain_cli("train", "configs/tiny-cpu.yaml", *_args(_overrides(corpus, tmp_path, "full", 8, 2)))
    assert full.returncode == 0, full.stderr[-3000:]
    part = pretrain_cli(
        "train",
        "configs/tiny-cpu.yaml",
        *_args(_overrides(corpus, tmp_path, "part", 8, 2) + ["train.stop_at=4"]),
    )
    assert part.returncode == 0, part.stderr[-3000:]
    assert _summary(tmp_path, "part")["steps"] == 4
    shutil.copytree(tmp_path / "runs" / "part", tmp_path / "runs" / "part-dp1")  # resumed on 1 worker below

    # A resume that would change the model is refused before anything starts, naming the field, and
    # leaves the run as it was: the resume right after continues it.
    before = (tmp_path / "runs" / "part" / "config.yaml").read_text()
    refused = pretrain_cli("resume", str(tmp_path / "runs" / "part"), "--set", "model.d_model=128")
    assert refused.returncode == 2 and "--set model.d_model" in refused.stderr, refused.stderr[-2000:]
    assert "start a new run" in refused.stderr
    assert (tmp_path / "runs" / "part" / "config.yaml").read_text() == before

    resumed = pretrain_cli("resume", str(tmp_path / "runs" / "part"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from committed checkpoint step 4" in resumed.stdout + resumed.stderr

    a, b = _losses(_summary(tmp_path, "full")), _losses(_summary(tmp_path, "part"))
    assert sorted(b) == list(range(1, 9))  # the whole run's history: both attempts
    assert all(a[k] == b[k] for k in b), (a, b)  # bitwise
    wa = fp32_master(tmp_path / "runs" / "full" / "checkpoints" / "step_8")
    wb = fp32_master(tmp_path / "runs" / "part" / "checkpoints" / "step_8")
    assert len(wa) == len(wb) >= 2 and all(
        x.equal(y) for x, y in zip(wa, wb, strict=True)
    )  # both ZeRO-3 partitions

    # One MLflow run across the stop and the resume, one value per step.
    from mlflow.tracking import MlflowClient

    run_id = json.loads((tmp_path / "runs" / "part" / "run.json").read_text())["mlflow_run_id"]
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(run_id, "loss")
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(1, 9)) and len(set(steps)) == len(steps)

    # The same stopped run resumed on 1 worker instead of 2: the dp2 ZeRO-3 checkpoint is converted,
    # accumulation goes 1 -> 2 for the same global batch, and the losses continue the uninterrupted
    # run's (the summation order differs, so within 1e-5, not bitwise).
    dp1 = pretrain_cli("resume", str(tmp_path / "runs" / "part-dp1"), "--set", "cluster.num_workers=1")
    assert dp1.returncode == 0, dp1.stderr[-3000:]
    assert (
        "was written by dp2 tp1 pp1 ZeRO-3; converting it for dp1 tp1 pp1 ZeRO-3" in dp1.stdout + dp1.stderr
    )
    c = _losses(_summary(tmp_path, "part-dp1"))
    assert sorted(c) == list(range(1, 9)) and all(abs(a[k] - c[k]) < 1e-5 for k in c), (a, c)


def _ray_worker_pids(run_dir: Path) -> list[int]:
    """This run's training workers (each records its pid in <run>/workers/), none of another run's."""
    return [json.loads(f.read_text())["pid"] for f in sorted((run_dir / "workers").glob("rank*.json"))]


def _wait_for_stall(run_dir: Path, proc, timeout=240):
    """Until a rank stops at PRETRAIN_TEST_STALL_AT (tests/fault_hooks), whatever the run's speed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "test-stalled").exists():
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no rank reached the stall within {timeout}s")


def _start(corpus, tmp_path, name, steps, every, stall: str):
    """`pretrain train` in a subprocess whose rank stops for good at `stall` (<0-based step>:<rank>)."""
    env = {**os.environ, **hooked_env(PRETRAIN_TEST_STALL_AT=stall)}
    cmd = [
        sys.executable,
        "-m",
        "launch.cli",
        "train",
        "configs/tiny-cpu.yaml",
        *_args(_overrides(corpus, tmp_path, name, steps, every)),
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _reference(corpus, tmp_path, name, steps, every):
    cfg = load_config(
        ROOT / "configs/tiny-cpu.yaml",
        _overrides(corpus, tmp_path, name, steps, every) + ["cluster.num_workers=1", "data.prefetch=0"],
    )
    return train(cfg).losses


def test_killed_worker_is_restarted_and_the_run_matches(corpus, tmp_path):
    steps = 30
    proc = _start(corpus, tmp_path, "kw", steps, 5, stall="12:1")  # in step 13, after commit 10
    run_dir = tmp_path / "runs" / "kw"
    _wait_for_stall(run_dir, proc)
    assert (run_dir / "checkpoints" / "step_10" / "commit.json").exists()
    pids = _ray_worker_pids(run_dir)
    assert len(pids) == 2, "no Ray Train worker found"
    os.kill(pids[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    got = _losses(_summary(tmp_path, "kw"))
    ref = _reference(corpus, tmp_path, "ref", steps, 5)
    assert got[steps] == pytest.approx(ref[steps], abs=1e-5)
    assert _summary(tmp_path, "kw")["resumed_from"] == 10


def test_killed_driver_then_pretrain_resume(corpus, tmp_path, pretrain_cli):
    steps = 30
    proc = _start(corpus, tmp_path, "kd", steps, 5, stall="12:0")
    run_dir = tmp_path / "runs" / "kd"
    _wait_for_stall(run_dir, proc)
    # The driver and everything it started (its embedded Ray's daemons, Ray Train's actors, the
    # workers), at once, and nothing of any other Ray on the machine. Ray puts each worker in a
    # process group of its own and ends it only when it notices that the raylet is gone, seconds
    # later: meanwhile it would train on, here to the end of the run.
    started = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for p in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
    p = pretrain_cli("resume", str(run_dir))
    assert p.returncode == 0, p.stderr[-3000:]
    summary = _summary(tmp_path, "kd")
    assert summary["steps"] == steps and summary["resumed_from"] == 10
    ref = _reference(corpus, tmp_path, "ref", steps, 5)
    assert _losses(summary)[steps] == pytest.approx(ref[steps], abs=1e-5)

    from mlflow.tracking import MlflowClient

    record = json.loads((run_dir / "run.json").read_text())
    assert record["state"] == "succeeded" and record["resumes"] == 1
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(
        record["mlflow_run_id"], "loss"
    )
    by_step: dict = {}
    for m in history:
        by_step.setdefault(m.step, set()).add(m.value)
    assert sorted(by_step) == list(range(1, steps + 1))  # every logged step, across both attempts
    assert all(len(v) == 1 for v in by_step.values())  # no step holds two different values
