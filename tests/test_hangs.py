"""A rank that hangs, a rank that straggles, a rank out of memory: real processes, real signals.

The hang watchdog (cluster/watchdog.py) watches the ranks' progress records (trainer/progress.py)
from the driver; these tests stop a rank with SIGSTOP, so it can run no Python at all."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.run_fixtures import hooked_env, tiny_config, tiny_run
from trainer.config import load_config
from trainer.events import EventLog
from trainer.loop import train


def _rank_process(run_dir: Path, rank: int, phase: str) -> subprocess.Popen:
    """A process that reports as `rank` (two finished steps, then `phase` of step 3) and then
    waits forever in that phase."""
    code = textwrap.dedent(
        f"""
        import time
        from trainer.progress import Progress
        p = Progress({str(run_dir)!r}, {rank})
        for step in range(2):
            p.begin_step(step); p.enter("forward"); p.step_done()
        p.begin_step(2); p.enter({phase!r})
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ}
    )
    assert proc.stdout.readline().strip() == "ready"
    (run_dir / "workers").mkdir(exist_ok=True)
    (run_dir / "workers" / f"rank{rank}.json").write_text(
        json.dumps({"rank": rank, "world_size": 2, "pid": proc.pid})
    )
    return proc


def test_watchdog_dumps_every_rank_names_the_stopped_one_and_ends_the_group(tmp_path):
    from cluster.watchdog import HangWatchdog

    cfg = tiny_config(train={"hang_timeout_s": 1.0}, cluster={"num_workers": 2})
    procs = [_rank_process(tmp_path, 0, "backward"), _rank_process(tmp_path, 1, "data")]
    try:
        os.kill(procs[1].pid, signal.SIGSTOP)  # rank 1 can run nothing now, not even a signal handler
        hung: list[Path] = []
        watchdog = HangWatchdog(cfg, tmp_path, on_hang=hung.append)
        assert watchdog.check(time.time()) is None  # armed now: a hang counts from here at the earliest
        dump = watchdog.check(time.time() + 2.0)
        assert dump is not None and hung == [dump] and dump.parent == tmp_path / "hangs"
        summary = json.loads((dump / "summary.json").read_text())
        assert summary["behind"] == [1]
        assert summary["ranks"]["1"]["process"] == "stopped" and summary["ranks"]["1"]["phase"] == "data"
        assert summary["ranks"]["0"]["phase"] == "backward" and summary["ranks"]["0"]["step"] == 3
        for rank, proc in enumerate(procs):  # py-spy read both, the stopped one too
            stacks = (dump / f"rank{rank}.txt").read_text()
            assert f"rank {rank} pid {proc.pid}" in stacks and "<module>" in stacks, stacks
        for proc in procs:  # the whole group ended (SIGKILL ends a stopped process too)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        (event,) = [e for e in EventLog(str(tmp_path)).read() if e["event"] == "hang"]
        assert event["behind"] == [1] and event["dump"] == str(dump)
        assert watchdog.check(time.time() + 10.0) is None  # once per group
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_hang_timeout_is_generous_at_start_and_follows_the_step_time_after():
    from cluster.watchdog import hang_timeout

    cfg = tiny_config(
        train={"hang_startup_timeout_s": 600, "hang_step_multiple": 10, "hang_timeout_floor_s": 30}
    )
    running = {"steps_done": 5, "phase": "forward", "median_step_s": 2.0}
    assert hang_timeout(cfg, [running, {**running, "steps_done": 0}]) == 600  # a rank before its first step
    assert hang_timeout(cfg, [running, {**running, "phase": "checkpoint"}]) == 600
    assert hang_timeout(cfg, [running, running]) == 30  # 10 x 2 s, under the floor
    assert hang_timeout(cfg, [{**running, "median_step_s": 9.0}] * 2) == 90


def _group_timeout_s() -> float:
    import torch
    from torch.distributed import distributed_c10d as c10d

    return c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def test_collective_timeout_is_long_until_the_first_step_is_done_then_short(tmp_path):
    from tests.test_loop import affine_stream
    from trainer.session import Session

    seen = []  # the world group's timeout when each step's data is fetched

    def batches():
        for batch in affine_stream(0):
            seen.append(_group_timeout_s())
            yield batch

    cfg = tiny_config(
        model={"vocab_size": 64},
        train={"steps": 5, "hang_startup_timeout_s": 999},
        cluster={"collective_timeout_s": 77},
        checkpoint={"every": 2},
    )
    train(cfg, Session(run_dir=str(tmp_path)), batches=batches())
    # Two micro batches a step; the checkpoints of steps 2 and 4 set 999 and the next step 77 again.
    assert seen[::2] == [999, 77, 77, 77, 77] and seen[1::2] == seen[::2], seen
    record = json.loads((tmp_path / "progress" / "rank0.json").read_text())
    assert record["steps_done"] == 5 and record["phase"] == "checkpoint" and record["pid"] == os.getpid()


def _args(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _start(args, **hooks):
    return subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "train", "configs/tiny-cpu.yaml", *_args(args)],
        cwd=ROOT,
        env={**os.environ, **hooked_env(**hooks)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_a_stopped_rank_is_found_dumped_and_the_run_finishes_as_undisturbed(corpus, tmp_path):
    steps, every, timeout = 16, 4, 15
    args = tiny_run(
        corpus,
        tmp_path,
        "hang",
        steps,
        f"checkpoint.every={every}",
        f"train.hang_timeout_s={timeout}",
        tracking=True,
    )
    proc = _start(args, PRETRAIN_TEST_STALL_AT="9:1")  # rank 1 holds in step 10, after commit 8
    run_dir = tmp_path / "runs" / "hang"
    deadline = time.time() + 300
    while not (run_dir / "test-stalled").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    pid = json.loads((run_dir / "workers" / "rank1.json").read_text())["pid"]
    os.kill(pid, signal.SIGSTOP)  # stuck for good: only the watchdog can end it
    stopped_at = time.time()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]

    (hang,) = [e for e in EventLog(str(run_dir)).read() if e["event"] == "hang"]
    assert hang["time"] - stopped_at <= timeout + 10
    assert hang["behind"] == [1]
    dump = Path(hang["dump"])
    summary = json.loads((dump / "summary.json").read_text())
    assert summary["ranks"]["1"]["process"] == "stopped" and summary["ranks"]["1"]["step"] == 10
    assert "stall_at" in (dump / "rank1.txt").read_text()  # where rank 1 stopped: the test hook
    assert "hang: no rank finished a step" in err and "behind: rank 1" in err

    result = json.loads((run_dir / "summary.json").read_text())
    assert result["resumed_from"] == 8
    got = {int(k): v for k, v in result["losses"].items()}
    ref_cfg = load_config(
        ROOT / "configs/tiny-cpu.yaml",
        tiny_run(corpus, tmp_path, "ref", steps, f"checkpoint.every={every}")
        + ["cluster.num_workers=1", "data.prefetch=0"],
    )
    ref = train(ref_cfg).losses
    assert sorted(got) == list(range(1, steps + 1))  # the whole run: both attempts (resumed at 8)
    assert all(got[k] == pytest.approx(ref[k], abs=1e-5) for k in got), (got, ref)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    logged = [a.path for a in client.list_artifacts(run_id, f"hangs/{dump.name}")]
    assert f"hangs/{dump.name}/summary.json" in logged and f"hangs/{dump.name}/rank1.txt" in logged


@pytest.mark.slow
def test_a_straggler_is_named_and_out_of_memory_is_one_message(corpus, tmp_path):
    args = tiny_run(corpus, tmp_path, "slow", 12, "train.straggler_windows=2", tracking=True)
    # Rank 1 waits 1 s for every step's data; its 9th loss (step 9) runs out of memory.
    proc = _start(args, PRETRAIN_TEST_SLOW_RANK="1:1.0", PRETRAIN_TEST_OOM_AT="8:1")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-3000:]
    # One message (Ray's own log of the worker's and the controller's traceback may print around it).
    (message,) = [line for line in err.splitlines() if line.startswith("pretrain: error: ")]
    assert (
        "out of memory on rank 1 in forward of step 9: CUDA out of memory. Tried to allocate 2.00 GiB"
        in message
    )
    assert "parallel.micro_batch_size (now 4" in message and "parallel.activation_checkpointing" in message
    run_dir = tmp_path / "runs" / "slow"
    assert json.loads((run_dir / "run.json").read_text())["state"] == "failed"
    assert len([e for e in EventLog(str(run_dir)).read() if e["event"] == "start"]) == 1  # no restart

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    ranks = {m.step: m.value for m in client.get_metric_history(run_id, "straggler_rank")}
    ratios = {m.step: m.value for m in client.get_metric_history(run_id, "straggler_ratio")}
    assert sorted(ranks) == list(range(1, 9)) and set(ranks.values()) == {1.0}, ranks
    assert all(r > 1.2 for r in ratios.values()), ratios
    (event,) = [e for e in EventLog(str(run_dir)).read() if e["event"] == "straggler"]
    assert event["rank"] == 1 and event["step"] == 2 and event["windows"] == 2
