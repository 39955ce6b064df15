"""Committed checkpoints in S3-compatible object storage (`checkpoint.storage: s3://...`), against a
real S3 server (moto) on 127.0.0.1 reached through boto3 with the standard AWS variables, in one plain
process (DeepSpeed ZeRO-3, gloo world of 1): exact resume on a node without the local copy, bad and
half-uploaded commits, retention in the bucket."""

import logging
import shutil
from pathlib import Path

import pytest
import torch

from tests.data_fixtures import aws_env, moto_s3_server
from tests.run_fixtures import tiny_config
from tests.test_checkpoint import fp32_master
from trainer.checkpoint import COMMIT
from trainer.checkpoint.store import S3Store as S3Checkpoints
from trainer.config import ConfigError
from trainer.loop import train
from trainer.session import Session

STEPS = 6
BUCKET = "ckpts"
STORAGE = f"s3://{BUCKET}/team/pretrain"


def _run_dir(parent, name: str) -> str:
    """A run directory named `name` (the run name in the bucket), created as the driver does."""
    (parent / name).mkdir()
    return str(parent / name)


def _cfg(corpus, checkpoint=None, **train_):
    return tiny_config(
        data={"path": corpus},
        train={"steps": STEPS, **train_},
        checkpoint={"every": 2, "keep": 2, "storage": STORAGE, **(checkpoint or {})},
    )


@pytest.fixture(scope="module")
def s3():
    """A boto3 client of a fresh moto S3 server whose endpoint and fake credentials are in the env."""
    import boto3

    with moto_s3_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        for k, v in aws_env(endpoint).items():
            mp.setenv(k, v)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client


def _objects(s3, run: str) -> dict[str, int]:
    """{"step_N/file": size} of a run's checkpoint objects."""
    base = f"team/pretrain/{run}/"
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=base):
        for o in page.get("Contents", []):
            out[o["Key"][len(base) :]] = o["Size"]
    return out


def _steps(objects: dict[str, int], committed: bool = True) -> list[int]:
    return sorted({int(k.split("/")[0][5:]) for k in objects if not committed or k.endswith("/" + COMMIT)})


def _copy_run(s3, src: str, dst: str) -> None:
    """A second run whose checkpoint objects are a copy of `src`'s (and nothing on local disk)."""
    for key in _objects(s3, src):
        s3.copy_object(
            Bucket=BUCKET,
            Key=f"team/pretrain/{dst}/{key}",
            CopySource={"Bucket": BUCKET, "Key": f"team/pretrain/{src}/{key}"},
        )


@pytest.fixture(scope="module")
def uninterrupted(corpus, s3, tmp_path_factory):
    """6 steps, a checkpoint every step, keep 2 plus every multiple of 3."""
    run = _run_dir(tmp_path_factory.mktemp("full"), "full")
    cfg = _cfg(corpus, checkpoint={"every": 1, "keep_every": 3})
    return train(cfg, Session(run_dir=run)), Path(run)


@pytest.fixture(scope="module")
def stopped(corpus, s3, tmp_path_factory):
    """A run stopped at step 4: step_2 and step_4 committed in the bucket."""
    run = _run_dir(tmp_path_factory.mktemp("stopped"), "stopped")
    train(_cfg(corpus, stop_at=4), Session(run_dir=run))
    assert _steps(_objects(s3, "stopped")) == [2, 4]
    return "stopped"


def test_retention_in_the_bucket(s3, uninterrupted):
    _, run = uninterrupted
    objects = _objects(s3, "full")
    assert _steps(objects, committed=False) == _steps(objects) == [3, 5, 6]
    # The run dir keeps config and events; of the checkpoints, only the newest staging copy (a cache).
    local = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert local == ["step_6"]
    commit = (run / "checkpoints" / "step_6" / COMMIT).read_bytes()
    assert s3.get_object(Bucket=BUCKET, Key=f"team/pretrain/full/step_6/{COMMIT}")["Body"].read() == commit


def test_exact_resume_bitwise_on_a_new_node(corpus, s3, tmp_path, uninterrupted):
    full, full_dir = uninterrupted
    run = Path(_run_dir(tmp_path, "resumed"))
    first = train(_cfg(corpus, stop_at=3), Session(run_dir=str(run)))
    assert sorted(first.losses) == [1, 2, 3]
    shutil.rmtree(run / "checkpoints")  # a new node: nothing staged or cached
    second = train(_cfg(corpus), Session(run_dir=str(run)))
    assert sorted(second.losses) == [4, 5, 6]
    for step, loss in second.losses.items():
        assert loss == full.losses[step]  # bitwise
    a = fp32_master(full_dir / "checkpoints" / f"step_{STEPS}")
    b = fp32_master(run / "checkpoints" / f"step_{STEPS}")
    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert _steps(_objects(s3, "resumed")) == [4, 6]


@pytest.mark.parametrize("damage", ["deleted", "truncated", "corrupted"])
def test_bad_object_falls_back_to_previous_commit(
    corpus, s3, tmp_path, stopped, uninterrupted, damage, caplog
):
    name = f"bad-{damage}"
    _copy_run(s3, stopped, name)
    victim = next(k for k in _objects(s3, name) if k.startswith("step_4/") and k.endswith("model_states.pt"))
    key = f"team/pretrain/{name}/{victim}"
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    if damage == "deleted":
        s3.delete_object(Bucket=BUCKET, Key=key)
    elif damage == "truncated":
        s3.put_object(Bucket=BUCKET, Key=key, Body=body[: len(body) // 2])
    else:  # same size, other bytes: only the sha256 after the download catches it
        s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(len(body)))
    with caplog.at_level(logging.INFO, logger="pretrain"):
        resumed = train(_cfg(corpus), Session(run_dir=_run_dir(tmp_path, name)))
    assert f"s3://{BUCKET}/{key}" in caplog.text and "falling back" in caplog.text
    assert "resumed from committed checkpoint step 2" in caplog.text
    assert resumed.losses == {k: v for k, v in uninterrupted[0].losses.items() if k > 2}


def test_upload_interrupted_before_commit_is_ignored(corpus, s3, tmp_path, stopped, uninterrupted, caplog):
    name = "interrupted"
    _copy_run(s3, stopped, name)
    # step_5: every file uploaded, the job killed before commit.json.
    for key in _objects(s3, name):
        if key.startswith("step_4/") and not key.endswith(COMMIT):
            s3.copy_object(
                Bucket=BUCKET,
                Key=f"team/pretrain/{name}/step_5/{key[len('step_4/') :]}",
                CopySource={"Bucket": BUCKET, "Key": f"team/pretrain/{name}/{key}"},
            )
    assert _steps(_objects(s3, name), committed=False) == [2, 4, 5]
    with caplog.at_level(logging.INFO, logger="pretrain"):
        resumed = train(_cfg(corpus), Session(run_dir=_run_dir(tmp_path, name)))
    assert "resumed from committed checkpoint step 4" in caplog.text
    assert resumed.losses == {k: v for k, v in uninterrupted[0].losses.items() if k > 4}
    objects = _objects(s3, name)
    assert _steps(objects) == [4, 6] and _steps(objects, committed=False) == [4, 6]  # step_5 cleaned up


def test_restart_on_the_same_node_uses_the_local_copy(corpus, s3, tmp_path, uninterrupted, monkeypatch):
    run = Path(_run_dir(tmp_path, "same-node"))
    train(_cfg(corpus, stop_at=4), Session(run_dir=str(run)))
    downloads = []
    real = S3Checkpoints.download
    monkeypatch.setattr(S3Checkpoints, "download", lambda self, *a: downloads.append(a) or real(self, *a))
    resumed = train(_cfg(corpus), Session(run_dir=str(run)))
    assert downloads == []
    assert resumed.losses == {k: v for k, v in uninterrupted[0].losses.items() if k > 4}


@pytest.mark.parametrize("storage", ["gs://bucket/x", "s3://", "/mnt/ckpt"])
def test_storage_must_be_s3(storage):
    with pytest.raises(ConfigError, match="checkpoint.storage"):
        tiny_config(checkpoint={"storage": storage})


def test_resume_on_another_layout_from_the_bucket_on_a_new_node(corpus, s3, tmp_path, uninterrupted, caplog):
    """Stopped at 3 under ZeRO-3, resumed under ZeRO-1 on a node with nothing staged: the step is
    downloaded, verified, converted, and the run continues the uninterrupted one."""
    full, _ = uninterrupted
    run = Path(_run_dir(tmp_path, "relayout"))
    train(_cfg(corpus, stop_at=3), Session(run_dir=str(run)))
    shutil.rmtree(run / "checkpoints")
    caplog.set_level(logging.INFO, logger="pretrain")
    second = train(
        tiny_config(
            data={"path": corpus},
            parallel={"zero_stage": 1},
            train={"steps": STEPS},
            checkpoint={"every": 2, "keep": 2, "storage": STORAGE},
        ),
        Session(run_dir=str(run)),
    )
    assert sorted(second.losses) == [4, 5, 6]
    assert all(abs(second.losses[s] - full.losses[s]) < 1e-5 for s in second.losses), (
        second.losses,
        full.losses,
    )
    assert "written by dp1 tp1 pp1 ZeRO-3; converting it for dp1 tp1 pp1 ZeRO-1" in caplog.text
