"""What a user sees of a run on this machine, through the real `pretrain` commands: the progress on
each metrics line, the summary of a resumed run, `pretrain runs` and `pretrain status RUN`, and an
expected failure on the workers ending in one message with its tracebacks kept in the run."""

import json
import re
import shutil

import pytest

from tests.run_fixtures import hooked_env, run_pretrain, tiny_run

PROGRESS = re.compile(r"\| (\d+)% of 4 steps, (\d+s|\d+m\d\ds|\d+h\d\dm) left$")


def _metric_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.search(r"step \d+ \| loss", line)]


@pytest.mark.slow
def test_resumed_run_progress_summary_runs_and_status(corpus, tmp_path):
    sets = [a for o in tiny_run(corpus, tmp_path, "r1", 4, tracking=True) for a in ("--set", o)]
    first = run_pretrain("train", "configs/tiny-cpu.yaml", *sets, "--set", "train.stop_at=2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout + first.stderr
    assert "\x1b[" not in out  # output to a pipe or file: Ray's prefixes carry no colour codes
    lines = _metric_lines(out)
    assert len(lines) == 2, out[-3000:]
    # each metrics line: percent of train.steps done, and the time left at the current speed
    assert [PROGRESS.search(line).group(1) for line in lines] == ["25", "50"], lines
    run_dir = tmp_path / "runs" / "r1"
    first_losses = json.loads((run_dir / "summary.json").read_text())["losses"]
    assert sorted(first_losses) == ["1", "2"]

    resumed = run_pretrain("resume", "r1", "--storage-path", str(tmp_path / "runs"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [PROGRESS.search(line).group(1) for line in _metric_lines(resumed.stdout)] == ["75", "100"]

    # summary.json: the whole run's history (both attempts' losses, as in MLflow) and the attempts
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(summary["losses"]) == ["1", "2", "3", "4"]
    assert {k: summary["losses"][k] for k in first_losses} == first_losses
    assert [(a["attempt"], a["resumed_from"], a["steps"]) for a in summary["attempts"]] == [
        (1, 0, 2),
        (2, 2, 4),
    ]
    from mlflow.tracking import MlflowClient

    record = json.loads((run_dir / "run.json").read_text())
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(
        record["mlflow_run_id"], "loss"
    )
    assert {str(m.step): m.value for m in history} == pytest.approx(summary["losses"])

    # `pretrain runs`: name, state, step/steps, newest commit, last loss, MLflow run
    listed = run_pretrain("runs", "--storage-path", str(tmp_path / "runs"))
    assert listed.returncode == 0, listed.stderr
    row = next(line.split() for line in listed.stdout.splitlines() if line.startswith("r1 "))
    assert row[:5] == ["r1", "succeeded", "4/4", "4", f"{summary['final_loss']:.4f}"], listed.stdout
    assert row[-1] == record["mlflow_run_id"], listed.stdout

    # `pretrain status RUN` of a local run (no --address)
    status = run_pretrain(
        "status", "r1", "--storage-path", str(tmp_path / "runs"), extra_env={"RAY_ADDRESS": ""}
    )
    assert status.returncode == 0, status.stderr
    assert (
        f"r1: succeeded, step 4/4, newest commit step 4, last loss {summary['final_loss']:.4f}"
        in status.stdout.splitlines()
    ), status.stdout
    assert f"run files: {run_dir}" in status.stdout


@pytest.mark.slow
def test_expected_failure_on_the_workers_one_message_last(corpus, tmp_path):
    bad = tmp_path / "corpus"
    shutil.copytree(corpus, bad)
    for shard in bad.glob("*.tar"):  # every shard fails its checksum on the workers
        with open(shard, "r+b") as f:
            f.seek(600)
            f.write(b"garbage")
    sets = [a for o in tiny_run(str(bad), tmp_path, "bad", 4) for a in ("--set", o)]
    p = run_pretrain("train", "configs/tiny-cpu.yaml", *sets, "--set", "cluster.max_failures=0")
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    run_dir = tmp_path / "runs" / "bad"
    last = p.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"pretrain: error: run bad failed: {bad}/train-\d+\.tar: sha256 \w+ does not match the manifest .*"
        rf"; tracebacks in {run_dir}/errors; continue it with `pretrain resume {run_dir}`",
        last,
    ), last
    out = p.stdout + p.stderr
    assert "\x1b[" not in out
    assert "Training failed due to worker errors" not in out and "[FailurePolicy]" not in out
    assert len(out.splitlines()) < 40, out  # the workers' short errors, not their whole tracebacks
    saved = {f.name.split("-")[-1]: f.read_text() for f in (run_dir / "errors").iterdir()}
    assert {"rank0.txt", "rank1.txt", "driver.txt"} <= set(saved), saved.keys()
    assert "Traceback (most recent call last)" in saved["rank0.txt"] and "read_shard" in saved["rank0.txt"]
    assert json.loads((run_dir / "run.json").read_text())["state"] == "failed"


def test_duration_reads_like_a_time_left():
    from trainer.metrics import duration

    assert [duration(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


def test_console_prints_a_line_per_logged_step_and_none_for_a_checkpoint_alone():
    import io

    from trainer.metrics import ConsoleLogger

    out = io.StringIO()
    console = ConsoleLogger(out, steps=300)
    console.log({"checkpoint_save_s": 0.4}, 25)  # a save's metrics at a step: no bare "step 25" line
    console.log({"loss": 4.5, "step_time_s": 0.5}, 25)
    assert out.getvalue() == "step 25 | loss 4.5 | step_time_s 0.5 | 8% of 300 steps, 2m18s left\n"


@pytest.mark.slow
def test_sigterm_to_the_driver_stops_the_run_cleanly_and_resume_continues_it(corpus, tmp_path):
    """`pretrain stop` or a scheduler sends the driver SIGTERM while the workers train: within
    seconds one message, exit 2, `state: stopped`, no process of the run left; resume continues."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.conftest import ROOT

    overrides = tiny_run(corpus, tmp_path, "term", 12, "checkpoint.every=5")
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "train", "configs/tiny-cpu.yaml"]
        + [a for o in overrides for a in ("--set", o)],
        cwd=ROOT,
        env={**os.environ, **hooked_env(PRETRAIN_TEST_STALL_AT="7:0")},  # rank 0 holds in step 8
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    run_dir = tmp_path / "runs" / "term"
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "test-stalled").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        started = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)  # before: the driver trained on, SIGTERM swallowed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"pretrain: error: run term stopped by SIGTERM; continue it with `pretrain resume {run_dir}`"
    )
    assert json.loads((run_dir / "run.json").read_text())["state"] == "stopped"
    time.sleep(2)
    assert not [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    resumed = run_pretrain("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "run.json").read_text())["state"] == "succeeded"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["resumed_from"] == 5
