"""Background checkpoints (`checkpoint.async: true`): the state is copied at the step boundary,
training goes on while a thread writes and hashes the files, and the commit follows at a later step.
In one plain process (DeepSpeed ZeRO-3, gloo world of 1) against the same run saved synchronously;
the chaos cases (SIGKILL and a full disk during the background write) run `pretrain` on Ray."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from tests.run_fixtures import tiny_config
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


def _committed(run) -> list[int]:
    ck = run / "checkpoints"
    return sorted(
        int(p.name[5:]) for p in ck.iterdir() if p.name.startswith("step_") and (p / COMMIT).is_file()
    )


def _step_dirs(run) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))


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
    assert _step_dirs(tmp_path) == _committed(tmp_path) == [4, 6]
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


def test_a_save_in_flight_at_the_end_is_committed_and_resumes_exactly(corpus, tmp_path, saved_in_step):
    """`save_final: false`, stopped at step 5: step 4's background save is still committed when
    training ends, and a resume from it gives the synchronous run's losses bitwise."""
    train(_cfg(corpus, True, save_final=False, stop_at=5), Session(run_dir=str(tmp_path)))
    assert _committed(tmp_path) == [2, 4]
    second = train(_cfg(corpus, True), Session(run_dir=str(tmp_path)))
    assert sorted(second.losses) == [5, 6]
    assert all(loss == saved_in_step[0].losses[s] for s, loss in second.losses.items())
