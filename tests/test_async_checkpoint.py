"""Background checkpoints (`checkpoint.async: true`): the state is copied at the step boundary,
training goes on while a thread writes and hashes the files, and the commit follows at a later step.
In one plain process (DeepSpeed ZeRO-3, gloo world of 1) against the same run saved synchronously;
the chaos cases (SIGKILL and a full disk during the background write) run `pretrain` on Ray."""

from __future__ import annotations

import itertools
import json
import threading

import pytest
import torch

from tests.run_fixtures import committed, hooked_env, step_dirs, tiny_config
from tests.test_chaos import CommitWatch, events, losses, pretrain, train_args
from trainer.checkpoint import COMMIT
from trainer.events import EventLog
from trainer.loop import train
from trainer.session import Session

STEPS = 6


def _cfg(corpus, background: bool, save_final: bool = True, **train_):
    return tiny_config(
        data={"path": corpus},
        train={"steps": STEPS, **train_},
        checkpoint={"every": 2, "keep": 2, "async": background, "save_final": save_final},
    )


def _commit(run, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step_{step}" / COMMIT).read_text())


def _read(path):
    """A checkpoint file's content (test-only read of our own files: DeepSpeed's are pickles).
    Byte comparison cannot work: torch's legacy format keys storages by memory address."""
    if path.suffix == ".pt":
        return torch.load(path, weights_only=False)
    return json.loads(path.read_text()) if path.suffix == ".json" else path.read_bytes()


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if hasattr(a, "__dict__"):  # DeepSpeed's loss scaler: an object without __eq__
        return type(a) is type(b) and _same(vars(a), vars(b))
    return a == b


@pytest.fixture(scope="module")
def saved_in_step(corpus, tmp_path_factory):
    """The reference: the same run with synchronous saves."""
    run = tmp_path_factory.mktemp("sync")
    return train(_cfg(corpus, False), Session(run_dir=str(run))), run


def test_config_key_is_async(corpus):
    cfg = _cfg(corpus, True)
    assert cfg.checkpoint.async_ is True
    assert cfg.to_dict()["checkpoint"]["async"] is True  # the resolved config reads back
    from trainer.config import ConfigError, from_dict

    assert from_dict(cfg.to_dict()).checkpoint.async_ is True
    with pytest.raises(ConfigError, match="checkpoint.async"):
        tiny_config(checkpoint={"async": "sometimes"})


def test_training_goes_on_while_the_files_are_written(corpus, tmp_path, saved_in_step, monkeypatch):
    """Step 2's files are written only once training has started step 4 (the writer waits for it):
    a save that stopped training until its files were written could never get there. The commits
    then name the synchronous run's files with its contents, and the losses are its."""
    from trainer import loop
    from trainer.checkpoint import deepspeed_save

    reached: dict[int, threading.Event] = {s: threading.Event() for s in range(STEPS)}
    steps_when_written = []
    train_step, write = loop.train_step, deepspeed_save.Snapshot.write

    def recording_step(t, step, micro):
        reached[step].set()
        return train_step(t, step, micro)

    def late_write(self):
        if not steps_when_written:  # step 2's save: held until step index 3 (the 4th step) runs
            steps_when_written.append(reached[3].wait(timeout=300))
        return write(self)

    monkeypatch.setattr(loop, "train_step", recording_step)
    monkeypatch.setattr(deepspeed_save.Snapshot, "write", late_write)
    result = train(_cfg(corpus, True), Session(run_dir=str(tmp_path)))
    assert steps_when_written == [True]
    reference, ref_run = saved_in_step
    assert result.losses == reference.losses  # bitwise
    assert step_dirs(tmp_path) == committed(tmp_path) == [4, 6]
    for step in (4, 6):
        files = _commit(tmp_path, step)["files"]
        assert sorted(files) == sorted(_commit(ref_run, step)["files"])
        for name in files:
            a, b = (r / "checkpoints" / f"step_{step}" / name for r in (tmp_path, ref_run))
            assert _same(_read(a), _read(b)), name
    log = [e for e in EventLog(str(tmp_path)).read() if e["event"].startswith("checkpoint")]
    assert [(e["event"], e["step"]) for e in log] == [
        ("checkpoint_started", 2),
        ("checkpoint", 2),  # committed at step 4, before step 4's own save began
        ("checkpoint_started", 4),
        ("checkpoint", 4),  # the final save waits for the one in flight
        ("checkpoint", 6),  # and is itself written before the run ends
    ]
    assert all(e.get("background") for e in log[1:4:2])


def test_a_late_copy_holds_the_next_optimizer_step_back(corpus, tmp_path, saved_in_step, monkeypatch):
    """The save of step 2 leaves the step path before its host copy is made: here the copy starts
    only once step index 2 is under way and takes a second. Step index 2 still finishes after the
    copy (its optimizer step waits for it), so the commit holds step 2's state: a resume from it
    gives the synchronous run's losses bitwise."""
    import time

    from trainer import loop
    from trainer.checkpoint import deepspeed_save

    order: list = []
    started = threading.Event()
    train_step, copy = loop.train_step, deepspeed_save.Snapshot.copy

    def recording_step(t, step, micro):
        if step == 2:
            started.set()
        out = train_step(t, step, micro)
        order.append(("step done", step))
        return out

    def late_copy(self):
        if "copied" not in order:  # step 2's save
            started.wait(timeout=300)
            time.sleep(1.0)  # long enough for step index 2 to reach its optimizer step
        copy(self)
        order.append("copied")

    monkeypatch.setattr(loop, "train_step", recording_step)
    monkeypatch.setattr(deepspeed_save.Snapshot, "copy", late_copy)
    train(_cfg(corpus, True, save_final=False, stop_at=3), Session(run_dir=str(tmp_path)))
    assert order.index("copied") < order.index(("step done", 2))
    assert committed(tmp_path) == [2]
    monkeypatch.undo()
    second = train(_cfg(corpus, True), Session(run_dir=str(tmp_path)))  # resumes from step 2
    assert sorted(second.losses) == [3, 4, 5, 6]
    assert all(loss == saved_in_step[0].losses[s] for s, loss in second.losses.items())


def test_a_save_in_flight_at_the_end_is_committed_and_resumes_exactly(corpus, tmp_path, saved_in_step):
    """`save_final: false`, stopped at step 5: step 4's background save is still committed when
    training ends, and a resume from it gives the synchronous run's losses bitwise."""
    train(_cfg(corpus, True, save_final=False, stop_at=5), Session(run_dir=str(tmp_path)))
    assert committed(tmp_path) == [2, 4]
    second = train(_cfg(corpus, True), Session(run_dir=str(tmp_path)))
    assert sorted(second.losses) == [5, 6]
    assert all(loss == saved_in_step[0].losses[s] for s, loss in second.losses.items())


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_io_error_in_the_background_write(corpus, tmp_path, saved_in_step, on_error):
    """EIO writing step 4's optimizer partition in the background: the save fails at its commit
    as a synchronous one does (one CheckpointSaveError naming the step, the file and the newest
    intact commit; step 4 removed), or with `on_error: continue` training goes on unchanged and
    the next save commits."""
    from tests.fault_hooks.sitecustomize import fail_saves
    from trainer.checkpoint import CheckpointSaveError

    undo = fail_saves("*/step_4/*optim_states.pt")
    try:
        cfg = _cfg(corpus, True)
        cfg.checkpoint.on_error = on_error
        if on_error == "stop":
            with pytest.raises(CheckpointSaveError) as e:
                train(cfg, Session(run_dir=str(tmp_path)))
            message, ck = str(e.value), tmp_path / "checkpoints"
            assert message.startswith(f"checkpoint step 4 could not be saved to {ck / 'step_4'}: rank 0: ")
            assert "[Errno 5] Input/output error" in message and "optim_states.pt" in message
            assert "the uncommitted step 4 was removed; the newest intact checkpoint is step 2" in message
            assert step_dirs(tmp_path) == committed(tmp_path) == [2]
        else:
            result = train(cfg, Session(run_dir=str(tmp_path)))
            assert result.losses == saved_in_step[0].losses
            assert step_dirs(tmp_path) == committed(tmp_path) == [2, 6]
        failed = [e for e in EventLog(str(tmp_path)).read() if e["event"] == "checkpoint_failed"]
        assert [e["step"] for e in failed] == [4]
    finally:
        undo()


# ---------------------------------------------------------------------------------------- chaos
# `pretrain` on a local Ray cluster, 2 workers, ZeRO-3: the helpers of tests/test_chaos.py.

ASYNC = "checkpoint.async=true"


@pytest.mark.slow
def test_sigkill_during_the_background_write(corpus, tmp_path, undisturbed):
    """Rank 1 SIGKILLed by a test hook in its writer thread after the first file of step 6, while
    training goes on: step 6 is never committed, Ray Train restarts the group, which resumes from
    step 4 and finishes with the undisturbed losses (exact); a verified commit exists at every
    moment after the first."""
    env = hooked_env(PRETRAIN_TEST_KILL_AT="background:6:1")
    run = tmp_path / "runs" / "kill"
    with CommitWatch(run / "checkpoints") as watch:
        p = pretrain(*train_args(corpus, tmp_path, "kill", ASYNC), env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "test-killed").is_file()  # the hook did kill the rank
    log = events(run)
    assert [e["event"] for e in log].count("start") == 2  # Ray Train restarted the group once
    assert "resumed from committed checkpoint step 4" in p.stdout + p.stderr
    assert [e["resumed_from"] for e in log if e["event"] == "start"] == [0, 4]
    got = losses(run)  # the whole run's history: both attempts, the restart's from step 5
    assert sorted(got) == list(range(1, 9)) and all(got[k] == undisturbed[k] for k in got), (got, undisturbed)
    assert step_dirs(run) == committed(run) == [6, 8]
    assert watch.first is not None and watch.gaps == [], watch.gaps


@pytest.mark.slow
def test_full_disk_during_the_background_write(corpus, tmp_path, small_disk):
    """ENOSPC while step 6 is written in the background: the ranks agree on it at the commit, step
    6 is removed, step 4 stays the newest commit, the run ends with exit 2 and one message, last.
    (The resume from there is the synchronous case's, tests/test_chaos.py; the exact resume after
    a background write is the SIGKILL case above.)"""
    disk, _ = small_disk
    run = disk / "full"
    with CommitWatch(run / "checkpoints") as watch:
        p = pretrain(*train_args(corpus, tmp_path, "full", ASYNC, storage=disk))
    assert p.returncode == 2, p.stderr[-3000:]
    assert watch.first is not None and watch.gaps == [], watch.gaps
    last = p.stderr.strip().splitlines()[-1]
    ck = run / "checkpoints"
    assert last.startswith(
        f"pretrain: error: run full failed: checkpoint step 6 could not be saved to {ck / 'step_6'}: rank "
    )
    assert "[Errno 28] No space left on device" in last
    assert (
        f"the uncommitted step 6 was removed; the newest intact checkpoint is step 4 ({ck / 'step_4'})"
        in last
    )
    assert "Traceback" not in p.stderr
    assert step_dirs(run) == committed(run) == [2, 4]
    assert [e["step"] for e in events(run) if e["event"] == "checkpoint_failed"] == [6]


def test_zero1_partitions_are_written_as_a_synchronous_save_writes_them(corpus, tmp_path):
    """ZeRO-1 saves its fp32 partitions as views of flat buffers: the background copy keeps them
    views of one copied storage, so each file holds as many storages as the synchronous file, with
    the same contents."""
    runs = {}
    for background in (False, True):
        cfg = tiny_config(
            data={"path": corpus},
            train={"steps": 4},
            parallel={"zero_stage": 1},
            checkpoint={"every": 2, "async": background},
        )
        run = tmp_path / str(background)
        train(cfg, Session(run_dir=str(run)))
        runs[background] = run
    for step in (2, 4):
        names = sorted(_commit(runs[False], step)["files"])
        assert names == sorted(_commit(runs[True], step)["files"])
        for name in names:
            a, b = (_read(runs[x] / "checkpoints" / f"step_{step}" / name) for x in (False, True))
            assert _same(a, b) and len(_storages(a)) == len(_storages(b)), name


def _storages(x, out=None) -> set[int]:
    """The distinct tensor storages in a loaded checkpoint file."""
    out = set() if out is None else out
    if isinstance(x, torch.Tensor):
        out.add(x.untyped_storage().data_ptr())
    elif isinstance(x, dict):
        for v in x.values():
            _storages(v, out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _storages(v, out)
    return out


def test_sigterm_with_a_save_in_flight_commits_both_and_stops(corpus, tmp_path, saved_in_step, monkeypatch):
    """SIGTERM during step 3 while step 2 is still being written in the background (its writer
    held until step 3 runs): the stop waits for step 2, commits it, then saves step 3 before
    training ends; the resume from step 3 gives the synchronous run's losses bitwise."""
    import os
    import signal

    from trainer import loop
    from trainer.checkpoint import deepspeed_save

    step_3 = threading.Event()
    train_step, write = loop.train_step, deepspeed_save.Snapshot.write

    def sigterm_in_step_3(t, step, micro):
        if step == 2 and not step_3.is_set():
            step_3.set()
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(t, step, micro)

    def late_write(self):
        step_3.wait(timeout=300)
        return write(self)

    monkeypatch.setattr(loop, "train_step", sigterm_in_step_3)
    monkeypatch.setattr(deepspeed_save.Snapshot, "write", late_write)
    stopped = train(_cfg(corpus, True), Session(run_dir=str(tmp_path)))
    assert stopped.steps == 3 and step_dirs(tmp_path) == committed(tmp_path) == [2, 3]
    monkeypatch.undo()
    resumed = train(_cfg(corpus, True), Session(run_dir=str(tmp_path)))
    assert resumed.losses == {k: v for k, v in saved_in_step[0].losses.items() if k > 3}


# ------------------------------------------------------------------------------ pipeline, 2 ranks


def _pp2_runs(rank: int, world: int, tmp: str) -> dict:
    """On one of 2 spawned gloo ranks: pp=2 ZeRO-1, 5 steps saved every 2 without a final save,
    synchronously and in the background; then the background run resumed from its step 4."""
    from tests.test_pipeline_parallel import _batches, _cfg
    from trainer.parallel.topology import Topology

    out = {}
    for background in (False, True):
        cfg = _cfg(1, 1, 2, world, checkpoint={"every": 2, "save_final": False, "async": background})
        session = Session(
            rank=rank,
            world_size=world,
            local_rank=rank,
            local_world_size=world,
            run_dir=f"{tmp}/{background}",
        )
        out[background] = train(cfg, session, batches=_batches(cfg, Topology(world, rank, 1, 2))).losses
    skipped = itertools.islice(_batches(cfg, Topology(world, rank, 1, 2)), 4 * cfg.grad_accum(world), None)
    out["resumed"] = train(cfg, session, batches=skipped).losses
    return out


@pytest.mark.slow
def test_pipeline_stages_save_in_the_background(tmp_path):
    """pp=2: every stage's layer files and optimizer partitions, written in the background, hold
    what the synchronous save writes, both runs commit steps 2 and 4, and the resume from the
    background commit of step 4 gives the synchronous run's step 5 loss bitwise."""
    from tests.test_tensor_parallel import run_world

    per_rank = run_world(2, tmp_path, _pp2_runs, str(tmp_path))
    runs = {b: tmp_path / str(b) for b in (False, True)}
    assert committed(runs[False]) == committed(runs[True]) == [2, 4]
    for step in (2, 4):
        names = sorted(_commit(runs[False], step)["files"])
        assert names == sorted(_commit(runs[True], step)["files"]) and any("layer_" in n for n in names)
        for name in names:
            a, b = (_read(runs[x] / "checkpoints" / f"step_{step}" / name) for x in (False, True))
            assert _same(a, b), name
    for got in per_rank:
        assert got[True] == got[False]
        assert sorted(got["resumed"]) == [5] and got["resumed"][5] == got[False][5]
