"""Committed checkpoints in one plain process (DeepSpeed ZeRO-3, gloo world of 1): exact resume,
and every way a checkpoint can be bad on disk."""

import json
import logging
import os
import pickle
import shutil
import time

import pytest
import torch

from tests.run_fixtures import committed, step_dirs, tiny_config
from trainer.checkpoint import COMMIT, CheckpointError
from trainer.loop import train
from trainer.session import Session

STEPS = 6


def _cfg(corpus, **train_):
    return tiny_config(
        data={"path": corpus}, train={"steps": STEPS, **train_}, checkpoint={"every": 2, "keep": 2}
    )


def fp32_master(ckpt_dir):
    """The fp32 master weights of every rank's ZeRO partition in a committed checkpoint (test-only
    read of our own files: DeepSpeed's format is a pickle)."""
    out = []
    for name in sorted(os.listdir(ckpt_dir)):
        if name.endswith("optim_states.pt"):
            state = torch.load(os.path.join(ckpt_dir, name), weights_only=False)["optimizer_state_dict"]
            out += list(state["fp32_flat_groups"])
    return out


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("full")
    result = train(_cfg(corpus), Session(run_dir=str(run)))
    return result, run


def test_exact_resume_bitwise(corpus, tmp_path, uninterrupted):
    full, full_dir = uninterrupted
    first = train(_cfg(corpus, stop_at=3), Session(run_dir=str(tmp_path)))  # stops at 3, commits step 3
    assert sorted(first.losses) == [1, 2, 3]
    second = train(_cfg(corpus), Session(run_dir=str(tmp_path)))
    assert sorted(second.losses) == [4, 5, 6]
    for step, loss in second.losses.items():
        assert loss == full.losses[step]  # bitwise
    a, b = (
        fp32_master(full_dir / "checkpoints" / f"step_{STEPS}"),
        fp32_master(tmp_path / "checkpoints" / f"step_{STEPS}"),
    )
    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _stopped_run(corpus, tmp_path):
    train(_cfg(corpus, stop_at=4), Session(run_dir=str(tmp_path)))  # commits step_2 and step_4
    return tmp_path / "checkpoints"


def test_uncommitted_checkpoint_is_ignored(corpus, tmp_path, uninterrupted, caplog):
    ck = _stopped_run(corpus, tmp_path)
    # A save killed mid-write: files but no commit record.
    shutil.copytree(ck / "step_4", ck / "step_5")
    os.remove(ck / "step_5" / COMMIT)
    with caplog.at_level(logging.INFO, logger="pretrain"):
        resumed = train(_cfg(corpus), Session(run_dir=str(tmp_path)))
    assert "resumed from committed checkpoint step 4" in caplog.text
    assert resumed.losses == {k: v for k, v in uninterrupted[0].losses.items() if k > 4}


def test_truncated_file_falls_back_to_previous_commit(corpus, tmp_path, uninterrupted, caplog):
    ck = _stopped_run(corpus, tmp_path)
    victim = next(p for p in (ck / "step_4").iterdir() if p.name.endswith("model_states.pt"))
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with caplog.at_level(logging.INFO, logger="pretrain"):
        resumed = train(_cfg(corpus), Session(run_dir=str(tmp_path)))
    assert str(victim) in caplog.text and "falling back" in caplog.text
    assert "resumed from committed checkpoint step 2" in caplog.text
    assert resumed.losses == {k: v for k, v in uninterrupted[0].losses.items() if k > 2}


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if ever unpickled


@pytest.mark.parametrize("target", ["model_states.pt", "trainer_state_rank0.json"])
def test_malicious_pickle_is_never_unpickled(corpus, tmp_path, target, caplog):
    ck = _stopped_run(corpus, tmp_path)
    marker = tmp_path / "pwned"
    victim = next(p for p in (ck / "step_4").iterdir() if p.name.endswith(target))
    victim.write_bytes(pickle.dumps(_Boom(str(marker))))
    with caplog.at_level(logging.INFO, logger="pretrain"):
        train(_cfg(corpus), Session(run_dir=str(tmp_path)))
    assert not marker.exists()
    assert "does not match its sha256" in caplog.text or "bytes, the commit record says" in caplog.text
    assert "resumed from committed checkpoint step 2" in caplog.text


def test_retention_keeps_the_last_k(uninterrupted):
    _, run = uninterrupted
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_4", "step_6"]
    assert all((run / "checkpoints" / k / COMMIT).is_file() for k in kept)
    assert not (run / "checkpoints" / "latest").exists()  # DeepSpeed's pointer file is never written


def test_the_commit_record_is_as_readable_as_the_checkpoint(uninterrupted):
    """Whoever may read a checkpoint's files (a shared filesystem, another user's eval job) may read
    the record that says it is complete: both get the mode any new file gets."""
    _, run = uninterrupted
    step = run / "checkpoints" / "step_6"
    data = [p for p in step.rglob("*") if p.is_file() and p.name != COMMIT]
    assert data and {p.stat().st_mode & 0o777 for p in data} == {(step / COMMIT).stat().st_mode & 0o777}
    assert (run / "summary.json").stat().st_mode & 0o777 == data[0].stat().st_mode & 0o777


def test_resume_with_a_different_model_is_refused(corpus, tmp_path):
    _stopped_run(corpus, tmp_path)
    changed = tiny_config(data={"path": corpus}, model={"d_model": 128}, train={"steps": STEPS})
    with pytest.raises(CheckpointError, match="model section"):
        train(changed, Session(run_dir=str(tmp_path)))


def test_sigterm_commits_a_checkpoint_and_stops(corpus, tmp_path, uninterrupted):
    import signal

    from trainer.data.stream import TokenStream, open_manifest

    cfg = _cfg(corpus, log_every=1)
    manifest = open_manifest(corpus)
    stream = TokenStream(
        corpus, manifest, seq_len=32, micro_batch=4, global_batch=8, dp_rank=0, dp_size=1, seed=cfg.train.seed
    )

    def batches():
        for i, b in enumerate(stream.batches(0)):
            if i == 5:  # during step 3 (2 micro batches per step)
                os.kill(os.getpid(), signal.SIGTERM)
            yield b

    stopped = train(cfg, Session(run_dir=str(tmp_path)), batches=batches(), manifest=manifest)
    assert stopped.steps == 3 and (tmp_path / "checkpoints" / "step_3" / COMMIT).is_file()
    resumed = train(cfg, Session(run_dir=str(tmp_path)))
    assert resumed.losses == {k: v for k, v in uninterrupted[0].losses.items() if k > 3}


# ---------------------------------------------------------------------------------- faults at a save


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_io_error_at_a_save(corpus, tmp_path, uninterrupted, on_error, caplog):
    """A file of step 4 whose write fails with EIO (DeepSpeed's optimizer partition): stop raises one
    CheckpointSaveError naming the file, the space and the newest intact commit, with step 4 removed;
    continue warns, trains on unchanged and commits at the next interval."""
    from tests.fault_hooks.sitecustomize import fail_saves
    from trainer.checkpoint import CheckpointSaveError
    from trainer.events import EventLog

    undo = fail_saves("*/step_4/*optim_states.pt")
    try:
        cfg = tiny_config(
            data={"path": corpus},
            train={"steps": STEPS},
            checkpoint={"every": 2, "keep": 2, "on_error": on_error},
        )
        if on_error == "stop":
            with pytest.raises(CheckpointSaveError) as e:
                train(cfg, Session(run_dir=str(tmp_path)))
            message = str(e.value)
            assert not e.value.restartable
            ck = tmp_path / "checkpoints"
            assert message.startswith(f"checkpoint step 4 could not be saved to {ck / 'step_4'}: rank 0: ")
            assert "[Errno 5] Input/output error" in message and "optim_states.pt" in message
            assert "a step needs about " in message and " free of " in message
            assert f"the newest intact checkpoint is step 2 ({ck / 'step_2'})" in message
            assert "the uncommitted step 4 was removed" in message
            assert step_dirs(tmp_path) == committed(tmp_path) == [2]
            failed = [ev for ev in EventLog(str(tmp_path)).read() if ev["event"] == "checkpoint_failed"]
            assert [ev["step"] for ev in failed] == [4] and failed[0]["error"] == message
        else:
            with caplog.at_level(logging.WARNING, logger="pretrain"):
                result = train(cfg, Session(run_dir=str(tmp_path)))
            assert "Input/output error" in caplog.text and "the next save is at step 6" in caplog.text
            assert result.losses == uninterrupted[0].losses  # the failed save changed nothing
            assert (
                step_dirs(tmp_path) == committed(tmp_path) == [2, STEPS]
            )  # 4 failed; 6 committed at the next interval
    finally:
        undo()


def test_retention_counts_only_commits_that_verify(corpus, tmp_path, uninterrupted, caplog):
    """Step 4 damaged at rest (same size, other bytes: only its sha256 tells). The resume skips it;
    retention never counts it as one of the `keep` commits, so the older good ones it would have
    replaced stay, and it is removed; a damaged step reached again by training is saved again."""
    from trainer.checkpoint import CheckpointManager

    ck = _stopped_run(corpus, tmp_path)  # step_2, step_4
    victim = next(p for p in (ck / "step_4").iterdir() if p.name.endswith("optim_states.pt"))
    victim.write_bytes(bytes(victim.stat().st_size))
    cfg = tiny_config(data={"path": corpus}, train={"steps": STEPS}, checkpoint={"every": 3, "keep": 2})
    with caplog.at_level(logging.INFO, logger="pretrain"):
        resumed = train(cfg, Session(run_dir=str(tmp_path)))  # resumes at 2, saves 3 and 6
    # Before: retention counted the damaged step 4, deleting step 3 and 2: [4 (damaged), 6].
    assert step_dirs(tmp_path) == [3, 6]
    assert "resumed from committed checkpoint step 2" in caplog.text
    assert "checkpoint step 4 does not verify, so it is not one of the 2 kept" in caplog.text
    assert resumed.losses == {k: v for k, v in uninterrupted[0].losses.items() if k > 2}
    manager = CheckpointManager(tmp_path, cfg.checkpoint, rank=0, world_size=1)
    assert [manager.verify(s).step for s in (3, 6)] == [3, 6]

    # Damaged again, and reached again by training: saved again, and it verifies.
    victim = next(p for p in (ck / "step_6").iterdir() if p.name.endswith("optim_states.pt"))
    victim.write_bytes(bytes(victim.stat().st_size))
    train(_cfg(corpus), Session(run_dir=str(tmp_path)))  # resumes at 3, saves 4 and 6
    assert step_dirs(tmp_path) == [4, 6] and manager.verify(6).step == 6


def test_checkpoint_files_are_fsynced_before_the_commit(corpus, tmp_path, monkeypatch):
    """Every file a commit record lists, and its directory, reach stable storage before commit.json
    is written (a power cut after the commit never loses a file the commit vouches for)."""
    synced = []
    fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    train(tiny_config(data={"path": corpus}, train={"steps": 2}), Session(run_dir=str(tmp_path)))
    step = tmp_path / "checkpoints" / "step_2"
    files = json.loads((step / COMMIT).read_text())["files"]
    commit = next(i for i, p in enumerate(synced) if os.path.basename(p).startswith(f".{COMMIT}."))
    before = synced[:commit]
    for name in files:  # written in place, or through a temp file renamed into place
        assert str(step / name) in before or any(
            os.path.dirname(p) == str(step) and os.path.basename(p).startswith(f".{name}.") for p in before
        ), name
    assert str(step) in before and str(step.parent) in before  # the entries in their directories


def test_consolidation_reads_only_the_files_the_commit_lists(corpus, tmp_path):
    """A file beside a verified step's files, matching DeepSpeed's names but not in its commit record,
    is never opened (here: a pickle that would run code), by export or by the layout conversion."""
    from trainer.checkpoint import CheckpointManager, consolidate

    ck = _stopped_run(corpus, tmp_path)
    marker = tmp_path / "pwned"
    (ck / "step_4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(
        pickle.dumps(_Boom(str(marker)))
    )
    cfg = _cfg(corpus)
    found = CheckpointManager(tmp_path, cfg.checkpoint, rank=0, world_size=1).verify(4)
    from trainer.config import resolve_model_config
    from trainer.data.stream import open_manifest

    model_cfg = resolve_model_config(cfg, open_manifest(corpus)).model
    sd = consolidate(found.path, found.record, model_cfg)
    assert sd and not marker.exists()


def test_object_store_down_at_a_save_stops_with_one_message(corpus, tmp_path, monkeypatch):
    """checkpoint.storage on S3 (a real S3 server, moto) that goes away during step 3: the save of
    step 4 fails once botocore's retries are spent, on every rank alike; the message names the
    object and the newest intact commit, and the local staging copy of step 4 is gone."""
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.data_fixtures import aws_env
    from trainer.checkpoint import CheckpointSaveError
    from trainer.data.stream import TokenStream, open_manifest

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for k, v in aws_env(f"http://{host}:{port}").items():
        monkeypatch.setenv(k, v)
    boto3.client("s3").create_bucket(Bucket="ckpts")
    run = tmp_path / "s3run"
    run.mkdir()
    cfg = tiny_config(
        data={"path": corpus},
        train={"steps": STEPS},
        checkpoint={"every": 2, "keep": 2, "storage": "s3://ckpts/team"},
    )
    manifest = open_manifest(corpus)
    stream = TokenStream(
        corpus, manifest, seq_len=32, micro_batch=4, global_batch=8, dp_rank=0, dp_size=1, seed=cfg.train.seed
    )
    stopped_at = []

    def batches():
        for i, b in enumerate(stream.batches(0)):
            if i == 5:  # during step 3 (2 micro batches per step): the store goes away
                server.stop()
                stopped_at.append(time.monotonic())
            yield b

    with pytest.raises(CheckpointSaveError) as e:
        train(cfg, Session(run_dir=str(run)), batches=batches(), manifest=manifest)
    took = time.monotonic() - stopped_at[0]
    message = str(e.value)
    step_4 = "s3://ckpts/team/s3run/step_4/"
    assert message.startswith(f"checkpoint step 4 could not be saved to {step_4}: rank 0: {step_4}"), message
    assert "Could not connect to the endpoint URL" in message
    assert "the newest intact checkpoint is step 2 (s3://ckpts/team/s3run/step_2/)" in message
    assert message.endswith("check the object store (endpoint, credentials, permissions)")
    assert not (run / "checkpoints" / "step_4").exists()
    print(f"object store down -> CheckpointSaveError in {took:.1f} s: {message}")
