"""A run survives the faults that used to leave it stuck or overwritten (issue 20, items 2, 4, 5):
a torn line in `events.jsonl`, half-written run files, a resume that would switch the checkpoint
store or has nothing to resume from, and two drivers writing one run (the run lease).

The unit tests drive the pieces in this process (and real child processes as lease holders); the
slow ones drive real `pretrain train` / `pretrain resume` runs on Ray (tiny model, 2 workers),
sharing four runs between all their cases."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.commits import newest_commit
from cluster.lease import LEASE, LeaseHeld, RunLease
from tests.conftest import ROOT
from tests.run_fixtures import hooked_env
from trainer.events import EventLog

# ---------------------------------------------------------------------------------- events.jsonl


def test_torn_event_line_is_skipped_with_a_warning_and_the_next_event_starts_a_new_line(tmp_path, caplog):
    log = EventLog(str(tmp_path))
    log.write("start", attempt=1)
    with open(tmp_path / "events.jsonl", "ab") as f:  # what a kill or a full disk mid-append leaves
        f.write(b'{"event": "checkpoint", "st')
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        assert [e["event"] for e in log.read()] == ["start"]
    assert f"{tmp_path / 'events.jsonl'}: skipping line 2" in caplog.text
    log.write("start", attempt=2)  # after the torn line: on a line of its own, not glued to it
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(
            b"\x00\x00\x00\xff\n[1, 2]\n"
        )  # zeros a crash can leave, bytes that are not UTF-8, not an event
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        assert [e.get("attempt") for e in log.read()] == [1, 2]
    assert caplog.text.count("skipping line") == 3  # the torn line, the zeros, `[1, 2]`
    assert log.attempts() == 2
    lines = (tmp_path / "events.jsonl").read_bytes().split(b"\n")
    assert lines[1] == b'{"event": "checkpoint", "st' and json.loads(lines[2])["attempt"] == 2


# ---------------------------------------------------------------------------------- atomic files


def test_run_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A crash between writing and renaming (here: the rename fails) leaves the old config.yaml and
    run.json whole, and no temp file behind."""
    from cluster.driver import write_run_record
    from tests.run_fixtures import tiny_config
    from trainer.config import load_yaml, save_config
    from trainer.fsutil import write_text_atomic

    cfg = tiny_config()
    save_config(cfg, tmp_path / "config.yaml")
    write_run_record(tmp_path, {"name": "r", "state": "running"})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    bigger = tiny_config(train={"steps": 99})
    with pytest.raises(OSError):
        save_config(bigger, tmp_path / "config.yaml")
    with pytest.raises(OSError):
        write_run_record(tmp_path, {"name": "r", "state": "failed"})
    with pytest.raises(OSError):
        write_text_atomic(str(tmp_path / "notes.txt"), "x")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    save_config(bigger, tmp_path / "config.yaml")
    assert load_yaml(tmp_path / "config.yaml")["train"]["steps"] == 99


def test_unreadable_run_record_is_one_message(tmp_path):
    from cluster.driver import read_run_record
    from cluster.errors import RunError

    (tmp_path / "run.json").write_text('{"name": "r", "mlfl')
    with pytest.raises(RunError, match=r"run\.json is not a readable run record"):
        read_run_record(tmp_path)


# ---------------------------------------------------------------------------------- the run lease


def _holder(run_dir: Path, seconds: float = 60, timeout: float = 30, storage: str = "") -> subprocess.Popen:
    """Another driver, as far as the lease goes: a process that holds it for `seconds`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    code = (
        "import sys, time; from cluster.lease import RunLease; "
        f"lease = RunLease({str(run_dir)!r}, {timeout}, {storage!r}, heartbeat_s=0.2); lease.acquire(); "
        f"print('held', flush=True); time.sleep({seconds}); lease.release()"
    )
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lease(run_dir: Path, host: str, pid: int, heartbeat_age_s: float) -> None:
    t = time.time() - heartbeat_age_s
    record = {"host": host, "pid": pid, "since": t - 100, "heartbeat": t, "token": "0123456789abcdef"}
    (run_dir / LEASE).write_text(json.dumps(record).ljust(1023) + "\n")


def test_a_second_driver_is_refused_naming_the_holder(tmp_path):
    holder = _holder(tmp_path)
    try:
        record = json.loads((tmp_path / LEASE).read_text())
        time.sleep(0.5)
        assert json.loads((tmp_path / LEASE).read_text())["heartbeat"] > record["heartbeat"]  # renewed
        for attempt in (RunLease(tmp_path, 30).check, RunLease(tmp_path, 30).acquire):
            with pytest.raises(LeaseHeld) as e:
                attempt()
            msg = str(e.value)
            assert f"pid {holder.pid} on host {socket.gethostname()}, since " in msg
            assert "last heartbeat 0 s ago" in msg and str(tmp_path / LEASE) in msg
        assert not (tmp_path / "events.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_released_lease_is_taken_without_a_warning(tmp_path, caplog):
    holder = _holder(tmp_path, seconds=0)
    holder.wait()
    assert not (tmp_path / LEASE).exists()
    lease = RunLease(tmp_path, 30)
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        assert lease.acquire() is None
    lease.release()
    assert "took over" not in caplog.text and not (tmp_path / LEASE).exists()


@pytest.mark.parametrize("how", ["killed driver on this host", "silent driver on another host"])
def test_a_stale_lease_is_taken_over_with_a_warning_and_an_event(tmp_path, caplog, how):
    if how == "killed driver on this host":  # a fresh heartbeat, but its pid is gone: at once
        pid, host, age = _dead_pid(), socket.gethostname(), 1.0
    else:  # a machine that is gone: only once its heartbeat is older than the timeout
        pid, host, age = 4242, "gone-host", 120.0
        _write_lease(tmp_path, host, pid, heartbeat_age_s=10.0)
        with pytest.raises(LeaseHeld, match="pid 4242 on host gone-host.*last heartbeat 10 s ago"):
            RunLease(tmp_path, 60).acquire()
    _write_lease(tmp_path, host, pid, heartbeat_age_s=age)
    lease = RunLease(tmp_path, 60)
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        previous = lease.acquire()
    try:
        assert previous["pid"] == pid and previous["host"] == host
        assert (
            f"took over the lease of run {tmp_path.name} ({tmp_path / LEASE}) from pid {pid} on host {host}"
            in caplog.text
        )
        [event] = EventLog(str(tmp_path)).read()
        assert event["event"] == "lease_taken_over" and event["previous"]["pid"] == pid
        assert json.loads((tmp_path / LEASE).read_text())["pid"] == os.getpid()
    finally:
        lease.release()


def test_a_driver_whose_lease_was_taken_over_stops(tmp_path):
    """A driver frozen past the timeout on a filesystem without shared locks finds, at its next
    heartbeat, another driver's token in the lease: it stops instead of writing on."""
    lost = []
    lease = RunLease(tmp_path, 30, heartbeat_s=0.1, on_lost=lost.append)
    lease.acquire()
    record = json.loads((tmp_path / LEASE).read_text())
    record.update(token="another", pid=1, host="elsewhere")
    with open(tmp_path / LEASE, "r+b") as f:  # in place, as that driver's write lands
        f.write(json.dumps(record).ljust(1023).encode() + b"\n")
    deadline = time.time() + 5
    while not lost and time.time() < deadline:
        time.sleep(0.05)
    assert lost and lost[0]["host"] == "elsewhere" and lease.lost
    lease.release()
    assert json.loads((tmp_path / LEASE).read_text())["token"] == "another"  # theirs, left alone


@pytest.fixture()
def s3():
    """A moto S3 server on 127.0.0.1 with bucket `ckpts`, its endpoint and fake keys in the env."""
    import boto3

    from tests.data_fixtures import aws_env, moto_s3_server

    with moto_s3_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        for k, v in aws_env(endpoint).items():
            mp.setenv(k, v)
        client = boto3.client("s3")
        client.create_bucket(Bucket="ckpts")
        yield client


def test_s3_lease_stops_a_driver_that_does_not_share_the_run_directory(tmp_path, s3, caplog):
    """Two machines, each with its own run directory, writing one checkpoint prefix: the lease
    object (conditional puts) refuses the second; a killed holder's object is taken over."""
    storage, where = "s3://ckpts/team", "s3://ckpts/team/shared/lease.json"
    holder = _holder(tmp_path / "a" / "shared", storage=storage)
    mine = tmp_path / "b" / "shared"
    mine.mkdir(parents=True)
    try:
        stored = json.loads(s3.get_object(Bucket="ckpts", Key="team/shared/lease.json")["Body"].read())
        assert stored["pid"] == holder.pid
        for attempt in (RunLease(mine, 30, storage).check, RunLease(mine, 30, storage).acquire):
            with pytest.raises(LeaseHeld, match=f"pid {holder.pid} on host .*lease {where}"):
                attempt()
        assert list(mine.iterdir()) == []  # its own file lease given back, nothing else written
    finally:
        holder.kill()
        holder.wait()
    lease = RunLease(mine, 30, storage, on_lost=lambda holder: None)
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        assert lease.acquire()["pid"] == holder.pid
    assert f"took over the lease of run shared ({where}) from pid {holder.pid}" in caplog.text
    stored = json.loads(s3.get_object(Bucket="ckpts", Key="team/shared/lease.json")["Body"].read())
    assert stored["token"] == lease.token
    lease.release()
    assert "Contents" not in s3.list_objects_v2(Bucket="ckpts", Prefix="team/shared/")


def test_s3_lease_taken_over_elsewhere_stops_its_old_holder(tmp_path, s3):
    lost = []
    lease = RunLease(tmp_path / "r", 30, "s3://ckpts/lost", heartbeat_s=0.1, on_lost=lost.append)
    (tmp_path / "r").mkdir()
    lease.acquire()
    theirs = {"host": "elsewhere", "pid": 7, "since": 1.0, "heartbeat": time.time(), "token": "theirs"}
    s3.put_object(Bucket="ckpts", Key="lost/r/lease.json", Body=json.dumps(theirs).encode())
    deadline = time.time() + 5
    while not lost and time.time() < deadline:
        time.sleep(0.05)
    lease.release()
    assert lost and lost[0]["host"] == "elsewhere"
    assert (
        s3.get_object(Bucket="ckpts", Key="lost/r/lease.json")["Body"].read() == json.dumps(theirs).encode()
    )


# ---------------------------------------------------------------------------------- commits


def _fake_step(root: Path, step: int, files: dict[str, bytes], commit: bool = True) -> None:
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    if commit:
        table = {n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()}
        (d / "commit.json").write_text(json.dumps({"step": step, "files": table}))


def test_newest_commit_is_the_newest_whose_files_are_all_there(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    assert newest_commit(tmp_path / "run", "") is None
    _fake_step(root, 2, {"a.pt": b"12345"})
    _fake_step(root, 4, {"a.pt": b"12345", "b.pt": b"xy"})
    _fake_step(root, 6, {"a.pt": b"1"}, commit=False)  # a save that did not finish
    assert newest_commit(tmp_path / "run", "") == 4
    (root / "step_4" / "b.pt").write_bytes(b"x")  # truncated
    assert newest_commit(tmp_path / "run", "") == 2


def test_newest_commit_reads_what_the_s3_store_wrote(tmp_path, s3, monkeypatch):
    """The driver's torch-free reading of an S3 store agrees with `trainer/checkpoint/store.py`."""
    from cluster.errors import RunError
    from trainer.checkpoint.store import COMMIT, S3Store

    run_dir = tmp_path / "myrun"
    storage = "s3://ckpts/team"
    assert newest_commit(run_dir, storage) is None
    store = S3Store(storage, run_dir.name, run_dir / "checkpoints")
    _fake_step(run_dir / "checkpoints", 3, {"w.pt": b"weights"})
    for name in ("w.pt", COMMIT):
        store.publish(3, name)
    shutil.rmtree(run_dir / "checkpoints")  # a node without the local copy
    assert newest_commit(run_dir, storage) == 3
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing answers
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(RunError, match="cannot list the run's checkpoints in s3://ckpts/team/myrun/"):
        newest_commit(run_dir, storage)


# ---------------------------------------------------------------------------------- real runs

STEPS, EVERY = 40, 10  # long enough to find the first run training between two commits


def _cli(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    return p, time.perf_counter() - t


def _sets(corpus: str, tmp: Path, name: str, *more: str) -> list[str]:
    from tests.run_fixtures import tiny_run

    return [
        a
        for o in tiny_run(corpus, tmp, name, STEPS, f"checkpoint.every={EVERY}", *more)
        for a in ("--set", o)
    ]


def _losses(run_dir: Path) -> dict[int, float]:
    return {int(k): v for k, v in json.loads((run_dir / "summary.json").read_text())["losses"].items()}


def _train_workers(driver_pid: int) -> list:
    """The Ray Train workers this driver started (its embedded Ray's; never another run's)."""
    import psutil

    out = []
    for p in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file of a run directory."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict:
    """Every real run of the slow tests, in order; what each test asserts is gathered here.

    1. `long`: `pretrain train`, 40 steps, a commit every 10. Once it has committed step 10, its
       workers are frozen (SIGSTOP: it is mid-training, whatever the machine's speed) and
       `pretrain resume long` is tried, which without the lease would start a second worker group
       from step 10: refused, naming the holder. The workers go on (SIGCONT).
    2. `torn`: the same config stopped at step 20, half an event appended to its events.jsonl, then
       `pretrain resume torn` to step 40.
    3. refusals on the finished `long`: a switch of checkpoint.storage; --from-scratch.
    4. `fresh`: `long`'s config and run files without its checkpoints, holding a stale lease of a
       killed driver: `pretrain resume` refused (no commit); with --from-scratch it trains 1..40.
    """
    tmp = tmp_path_factory.mktemp("runsafety")
    out: dict = {"tmp": tmp}
    config = str(ROOT / "configs/tiny-cpu.yaml")
    long_dir = tmp / "runs" / "long"

    t = time.perf_counter()
    # rank 0 holds still in step EVERY + 1 (tests/fault_hooks) until test-continue exists
    env = {**os.environ, **hooked_env(PRETRAIN_TEST_STALL_AT=f"{EVERY}:0")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "train", config, *_sets(corpus, tmp, "long")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (long_dir / "test-stalled").exists():
        assert proc.poll() is None and time.perf_counter() - t < 400, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    try:
        workers = _train_workers(proc.pid)
        out["long_lease"] = json.loads((long_dir / LEASE).read_text())
        out["mid_run"] = (
            len(workers) == 2
            and (long_dir / "checkpoints" / f"step_{EVERY}" / "commit.json").exists()
            and json.loads((long_dir / "summary.json").read_text())["steps"] < STEPS  # the history so far
        )
        out["second"] = _cli("resume", str(long_dir))
    finally:
        (long_dir / "test-continue").touch()
    stdout, stderr = proc.communicate(timeout=600)
    out["long"] = (proc.returncode, stdout + stderr, time.perf_counter() - t)

    torn_dir = tmp / "runs" / "torn"
    p, _ = _cli("train", config, *_sets(corpus, tmp, "torn", f"train.stop_at={STEPS // 2}"))
    assert p.returncode == 0, p.stderr[-3000:]
    out["torn_first"] = _losses(torn_dir)
    with open(torn_dir / "events.jsonl", "ab") as f:
        f.write(b'{"event": "checkpoint", "save_s": 0.02, "st')
    out["torn_resume"] = _cli("resume", str(torn_dir))

    before = _snapshot(long_dir)
    out["switch"] = _cli("resume", str(long_dir), "--set", "checkpoint.storage=s3://bucket/team")
    out["scratch_with_commit"] = _cli("resume", str(long_dir), "--from-scratch")
    out["long_unchanged"] = _snapshot(long_dir) == before

    fresh_dir = tmp / "runs" / "fresh"
    fresh_dir.mkdir()
    for name in ("config.yaml", "run.json", "events.jsonl"):
        shutil.copy(long_dir / name, fresh_dir / name)
    _write_lease(fresh_dir, socket.gethostname(), _dead_pid(), heartbeat_age_s=2.0)
    before = _snapshot(fresh_dir)
    out["no_commit"] = _cli("resume", str(fresh_dir))
    out["fresh_unchanged"] = _snapshot(fresh_dir) == before
    out["from_scratch"] = _cli("resume", str(fresh_dir), "--from-scratch")
    for key in ("second", "torn_resume", "switch", "scratch_with_commit", "no_commit", "from_scratch"):
        last = (out[key][0].stderr.strip().splitlines() or [""])[-1]
        print(f"{key}: exit {out[key][0].returncode} in {out[key][1]:.1f} s: {last}")  # pytest -s shows it
    return out


@pytest.mark.slow
def test_second_driver_is_refused_and_the_first_run_finishes_untouched(runs):
    p, seconds = runs["second"]
    assert runs["mid_run"], "the first run was not caught between two commits"
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    lease = runs["long_lease"]
    assert (
        f"pretrain: error: run long is being written by another driver: pid {lease['pid']} on host {lease['host']}"
        in p.stderr
    )
    assert "last heartbeat" in p.stderr and "Traceback" not in p.stderr and seconds < 30
    code, output, _ = runs["long"]
    assert code == 0, output[-3000:]
    long_dir = runs["tmp"] / "runs" / "long"
    assert sorted(_losses(long_dir)) == list(range(1, STEPS + 1))
    assert (
        sorted(p.name for p in (long_dir / "checkpoints").glob("step_*/commit.json")) == ["commit.json"] * 2
    )
    assert newest_commit(long_dir, "") == STEPS
    record = json.loads((long_dir / "run.json").read_text())
    assert record["state"] == "succeeded" and "resumes" not in record
    assert not (long_dir / LEASE).exists()  # released at the end


@pytest.mark.slow
def test_torn_event_line_then_resume_finishes_with_the_same_losses(runs):
    p, _ = runs["torn_resume"]
    assert p.returncode == 0, p.stderr[-3000:]
    assert "events.jsonl: skipping line" in p.stdout + p.stderr
    assert f"resumed from committed checkpoint step {STEPS // 2}" in p.stdout + p.stderr
    long, torn = _losses(runs["tmp"] / "runs" / "long"), _losses(runs["tmp"] / "runs" / "torn")
    assert sorted(torn) == list(range(1, STEPS + 1))  # the whole run's history: both attempts
    assert all(long[k] == torn[k] for k in torn), (long, torn)  # bitwise
    assert all(long[k] == v for k, v in runs["torn_first"].items())
    events = EventLog(str(runs["tmp"] / "runs" / "torn")).read()
    assert [e["attempt"] for e in events if e["event"] == "start"] == [1, 2]


@pytest.mark.slow
def test_storage_switch_on_resume_is_refused_and_changes_nothing(runs):
    p, seconds = runs["switch"]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    long_dir = runs["tmp"] / "runs" / "long"
    assert (
        "pretrain: error: --set checkpoint.storage=s3://bucket/team: run long's committed checkpoints"
        in p.stderr
    )
    assert f"(newest: step {STEPS}) are in {long_dir / 'checkpoints'}" in p.stderr
    assert "Resume without changing checkpoint.storage" in p.stderr and seconds < 30
    p, _ = runs["scratch_with_commit"]
    assert (
        p.returncode == 2 and f"--from-scratch: run long has a committed checkpoint (step {STEPS}" in p.stderr
    )
    assert runs["long_unchanged"]


@pytest.mark.slow
def test_resume_without_a_commit_is_refused_unless_from_scratch(runs):
    fresh_dir = runs["tmp"] / "runs" / "fresh"
    p, _ = runs["no_commit"]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert (
        f"pretrain: error: run fresh has no committed checkpoint in {fresh_dir / 'checkpoints'}" in p.stderr
    )
    assert "--from-scratch" in p.stderr and runs["fresh_unchanged"]
    p, _ = runs["from_scratch"]
    assert p.returncode == 0, p.stderr[-3000:]
    assert _losses(fresh_dir) == _losses(runs["tmp"] / "runs" / "long")  # step 0 on: the same run again
    # The lease the killed driver left was taken over, said so, and released at the end.
    assert f"took over the lease of run fresh ({fresh_dir / LEASE}) from pid" in p.stdout + p.stderr
    assert "that process is gone" in p.stdout + p.stderr
    assert [e["event"] for e in EventLog(str(fresh_dir)).read()].count("lease_taken_over") == 1
    assert not (fresh_dir / LEASE).exists()
    assert json.loads((fresh_dir / "run.json").read_text())["state"] == "succeeded"
