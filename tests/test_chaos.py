"""Chaos: real faults in real runs (`pretrain` on a local Ray cluster, 2 workers, DeepSpeed ZeRO-3,
gloo), each checked for how the run ends, what the user sees, what stays on disk, and that after the
fault is cleared `pretrain resume` finishes with the losses of an undisturbed run (exact).

The runs share one undisturbed reference run (module scope). Faults that need root (a tmpfs mounted
with `size=` is a real ENOSPC) are skipped without it; CI runs as root."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.run_fixtures import committed, hooked_env, run_pretrain, step_dirs, tiny_run

pytestmark = pytest.mark.slow

STEPS, EVERY = 8, 2  # saves at 2, 4, 6, 8; keep 2


def pretrain(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_pretrain(*args, extra_env=env, timeout=timeout)


def train_args(
    corpus: str, tmp_path: Path, name: str, *more: str, storage: Path | None = None, **kw
) -> list[str]:
    sets = tiny_run(corpus, tmp_path, name, STEPS, f"checkpoint.every={EVERY}", *more, **kw)
    if storage is not None:
        sets = [
            s if not s.startswith("cluster.storage_path=") else f"cluster.storage_path={storage}"
            for s in sets
        ]
    return ["train", "configs/tiny-cpu.yaml", *[a for s in sets for a in ("--set", s)]]


def losses(run: Path) -> dict[int, float]:
    return {int(k): v for k, v in json.loads((run / "summary.json").read_text())["losses"].items()}


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]


def test_full_disk_at_a_save_stops_the_run_then_resume_finishes_it(corpus, tmp_path, small_disk, undisturbed):
    """ENOSPC at the third save (step 6): every rank stops within seconds (no barrier waits out the
    process group's timeout), step 6 is removed, the run ends with exit 2, `state: failed` and one
    message, last, naming the path, the space needed and free and the newest intact commit; Ray Train
    does not restart the group. Once there is space, `pretrain resume` finishes it exactly."""
    disk, remount = small_disk
    run = disk / "full"
    with CommitWatch(run / "checkpoints") as watch:
        p = pretrain(*train_args(corpus, tmp_path, "full", storage=disk))
    ended = time.time()
    assert watch.first is not None and watch.gaps == [], watch.gaps  # a verified commit at every moment
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    step_6 = run / "checkpoints" / "step_6"
    assert last.startswith(
        f"pretrain: error: run full failed: checkpoint step 6 could not be saved to {step_6}: rank "
    )
    assert "[Errno 28] No space left on device" in last
    needed, free = (
        int(n.replace(",", ""))
        for n in re.search(
            r"a step needs about ([\d,]+) bytes .*; ([\d,]+) bytes \(.*\) free of ", last
        ).groups()
    )
    assert free < needed < 5 * 2**20
    step_4 = run / "checkpoints" / "step_4"
    assert f"the uncommitted step 6 was removed; the newest intact checkpoint is step 4 ({step_4})" in last
    assert re.search(  # where the ranks' tracebacks are, when the full disk took them
        rf"free space there or move the run to a larger disk(; tracebacks in {run}/errors)?; "
        rf"continue it with `pretrain resume {run}`$",
        last,
    ), last
    assert "Traceback" not in p.stderr  # one message, no traceback
    record = json.loads((run / "run.json").read_text())
    assert record["state"] == "failed" and record["error"] == last.removeprefix("pretrain: error: ")
    assert step_dirs(run) == committed(run) == [2, 4]  # the partial step 6 is gone
    log = events(run)
    assert [e["event"] for e in log].count("start") == 1  # Ray Train did not restart the group
    (failed,) = [e for e in log if e["event"] == "checkpoint_failed"]
    assert failed["step"] == 6
    stopped, after_4 = (
        ended - failed["time"],
        failed["time"] - [e for e in log if e["event"] == "checkpoint"][-1]["time"],
    )
    print(
        f"\nENOSPC at step 6: failed {after_4:.1f} s after step 4's commit (two steps and the save);", end=" "
    )
    print(f"the run stopped {stopped:.1f} s after the ranks agreed, with one message:\n{last}")

    remount("50m")  # the fault cleared
    with CommitWatch(run / "checkpoints") as watch:
        r = pretrain("resume", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert watch.gaps == [], watch.gaps
    assert "resumed from committed checkpoint step 4" in r.stdout + r.stderr
    got = losses(run)
    assert sorted(got) == list(range(1, 9)) and all(got[k] == undisturbed[k] for k in got), (
        got,
        undisturbed,
    )  # exact
    assert json.loads((run / "run.json").read_text())["state"] == "succeeded"
    assert committed(run) == [6, 8]


def test_io_error_at_a_save_with_on_error_continue_trains_on(corpus, tmp_path, undisturbed):
    """EIO writing rank 1's optimizer partition of step 4 (a test hook in every process: only that
    file, only that rank), with `checkpoint.on_error: continue`: both ranks learn of it at once, the
    run warns, logs `checkpoint_failed` and the `checkpoint_failures` metric, trains on unchanged and
    commits step 6 and 8."""
    env = hooked_env(PRETRAIN_TEST_FAIL_WRITES="*/step_4/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    run = tmp_path / "runs" / "eio"
    with CommitWatch(run / "checkpoints") as watch:
        p = pretrain(
            *train_args(corpus, tmp_path, "eio", "checkpoint.on_error=continue", tracking=True), env=env
        )
    assert p.returncode == 0, p.stderr[-3000:]
    assert watch.first is not None and watch.gaps == [], watch.gaps  # a verified commit at every moment
    out = p.stdout + p.stderr
    step_4 = run / "checkpoints" / "step_4"
    assert f"checkpoint step 4 could not be saved to {step_4}: rank 1: [Errno 5] Input/output error" in out
    assert "training goes on (checkpoint.on_error: continue), the next save is at step 6" in out
    assert losses(run) == undisturbed  # the failed save changed nothing
    assert step_dirs(run) == committed(run) == [6, 8]
    log = events(run)
    (failed,) = [e for e in log if e["event"] == "checkpoint_failed"]
    saved = [e for e in log if e["event"] == "checkpoint"]
    assert failed["step"] == 4 and [e["step"] for e in saved] == [2, 6, 8]
    assert [e["event"] for e in log].count("start") == 1
    after_2, until_6 = failed["time"] - saved[0]["time"], saved[1]["time"] - failed["time"]
    print(f"\nEIO at step 4, on_error: continue: failed {after_2:.1f} s after step 2's commit;", end=" ")
    print(f"step 6 committed {until_6:.1f} s later")

    from mlflow.tracking import MlflowClient

    run_id = json.loads((run / "run.json").read_text())["mlflow_run_id"]
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(
        run_id, "checkpoint_failures"
    )
    assert [(m.step, m.value) for m in history] == [(4, 1.0)]


def verified_commit(ck: Path) -> bool:
    """Whether some `step_N` under `ck` has a commit.json whose listed files all exist with their
    recorded sizes (what a resume needs before it hashes them)."""
    try:
        steps = [p for p in ck.iterdir() if p.name.startswith("step_")]
    except OSError:
        return False
    for step in steps:
        try:
            files = json.loads((step / "commit.json").read_text())["files"]
            if all((step / name).stat().st_size == info["size"] for name, info in files.items()):
                return True
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return False


class CommitWatch:
    """Samples `verified_commit` every 0.1 s in a thread while a run goes on; `gaps` are the times
    (seconds after the first commit was seen) at which no verified commit existed."""

    def __init__(self, ck: Path):
        self.ck, self.samples, self.first, self.gaps = ck, 0, None, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            ok, now = verified_commit(self.ck), time.monotonic()
            if ok and self.first is None:
                self.first = now
            if self.first is not None:
                self.samples += 1
                if not ok:
                    self.gaps.append(round(now - self.first, 2))
            self._stop.wait(0.1)

    def __enter__(self) -> CommitWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# phase -> (rank killed, the step the restarted group resumes from). All at the save of step 6,
# whose retention removes step 2 (keep 2).
KILLS = {
    "written": (1, 4),  # rank 1's files of step 6 written, not committed: step 4 is the newest
    "committed": (0, 6),  # step 6's commit.json written, step 2 not yet removed
    "retention": (0, 6),  # step 2's commit.json and one of its files removed, the rest not
}


@pytest.mark.parametrize("phase", list(KILLS))
def test_sigkill_of_a_rank_at_each_phase_of_a_save(corpus, tmp_path, undisturbed, phase):
    """SIGKILL of one rank at a phase of the save of step 6 (a test hook in every process, once per
    run): Ray Train restarts the group (cluster.max_failures), which resumes from the newest
    verified commit and finishes with exit 0 and the losses of an undisturbed run (exact). A
    thread samples the checkpoints every 0.1 s: once the first commit exists, at every sample some
    step has a commit.json whose files all exist with their recorded sizes. (A retention that
    removed the newest commit, or a commit.json written before the files, shows as a gap.)"""
    rank, resumed = KILLS[phase]
    env = hooked_env(PRETRAIN_TEST_KILL_AT=f"{phase}:6:{rank}")
    run = tmp_path / "runs" / "kill"
    with CommitWatch(run / "checkpoints") as watch:
        p = pretrain(*train_args(corpus, tmp_path, "kill"), env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "test-killed").is_file()  # the hook did kill a rank
    log = events(run)
    assert [e["resumed_from"] for e in log if e["event"] == "start"] == [0, resumed]  # restarted once
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1)), got  # the whole run's history: both attempts
    assert all(got[k] == undisturbed[k] for k in got), (got, undisturbed)  # exact
    assert json.loads((run / "run.json").read_text())["state"] == "succeeded"
    assert step_dirs(run) == committed(run) == [6, 8]  # leftovers of the kill removed
    assert watch.first is not None and watch.samples > 10, watch.samples
    assert watch.gaps == [], f"no verified commit at {watch.gaps} s after the first commit"
    print(f"\nSIGKILL of rank {rank} at {phase} of step 6: {watch.samples} samples, no gap")


def test_commit_watch_sees_a_moment_without_a_verified_commit(tmp_path):
    """The checker the SIGKILL cases rely on: a step counts only with its commit.json and every
    listed file at its recorded size, and a moment with none (a retention that deleted the only
    intact commit, or a truncated file under the newest commit) is recorded as a gap."""
    ck = tmp_path / "checkpoints"
    step = ck / "step_4"
    step.mkdir(parents=True)
    (step / "a.pt").write_bytes(b"12345")
    assert not verified_commit(ck)  # no commit.json yet: the files alone are no checkpoint
    (step / "commit.json").write_text(json.dumps({"files": {"a.pt": {"size": 5}}}))
    assert verified_commit(ck)
    (step / "a.pt").write_bytes(b"123")
    assert not verified_commit(ck)  # a file shorter than its record
    (step / "a.pt").write_bytes(b"12345")
    with CommitWatch(ck) as watch:
        while watch.first is None:
            time.sleep(0.05)
        (step / "commit.json").unlink()  # the only commit gone, as a wrong retention would do
        time.sleep(0.35)
    assert watch.gaps, watch.samples


def test_a_damaged_commit_is_skipped_then_saved_again_when_training_reaches_it(corpus, tmp_path):
    """A committed step whose file is later damaged (here: step 8's largest file cut short) is never
    loaded: `pretrain resume` falls back to step 6, trains past 8, writes step 8 again, and retention
    counts verified commits only. The losses equal an undisturbed run's (exact), and at every moment
    some commit verifies."""
    total = STEPS + 2  # the first attempt stops at STEPS (train.stop_at): the same LR schedule
    run = tmp_path / "runs" / "dmg"
    p = pretrain(
        *train_args(
            corpus, tmp_path, "dmg", "checkpoint.keep=3", f"train.steps={total}", f"train.stop_at={STEPS}"
        )
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert committed(run) == [4, 6, 8]
    victim = max((run / "checkpoints" / "step_8").iterdir(), key=lambda f: f.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with CommitWatch(run / "checkpoints") as watch:
        p = pretrain("resume", str(run))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ignoring checkpoint step 8" in p.stdout + p.stderr
    assert [e["resumed_from"] for e in events(run) if e["event"] == "start"] == [0, 6]
    got = losses(run)
    assert sorted(got) == list(range(1, total + 1)), got  # the whole run's history: both attempts
    ref = tmp_path / "runs" / "ref-longer"
    p = pretrain(*train_args(corpus, tmp_path, "ref-longer", f"train.steps={total}"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert all(got[k] == losses(ref)[k] for k in got), (got, losses(ref))  # exact
    assert committed(run) == step_dirs(run) == [6, 8, 10] and verified_commit(run / "checkpoints")
    record = json.loads((run / "checkpoints" / "step_8" / "commit.json").read_text())
    assert victim.stat().st_size == record["files"][victim.name]["size"]  # step 8 was written again
    assert watch.gaps == [], f"no verified commit at {watch.gaps} s"
