"""`pretrain prepare`'s units (trainer/data/pipeline.py) give the same bytes whoever runs them: one
process, several, a 2-node Ray cluster (`--address`), inputs listed in another order, another
tokenization batch size; and a preparation killed (SIGKILL, at a known record) resumes, redoing only
the units without a completion record."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest

from tests.run_fixtures import hooked_env, run_pretrain
from trainer.data import pipeline
from trainer.data import prepare as prepare_mod
from trainer.data.manifest import load_manifest
from trainer.data.prepare import prepare

WORDS = "the of and to in is was for on that with as by at from this data model token shard".split()
OPTS = ["--vocab-size", "300", "--block-len", "33", "--samples-per-shard", "4", "--val-blocks", "2"]


@pytest.fixture
def inputs(tmp_path: Path) -> list[str]:
    """Five inputs of uneven sizes: four JSON Lines files and a text file."""
    rng = random.Random(0)
    paths = []
    for i, n_docs in enumerate([7, 1, 12, 4]):
        p = tmp_path / f"in-{i}.jsonl"
        with open(p, "w") as f:
            for _ in range(n_docs):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
                f.write(json.dumps({"text": text + "."}) + "\n")
        paths.append(str(p))
    (tmp_path / "notes.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(80)))
    return [*paths, str(tmp_path / "notes.txt")]


def _prepare(inputs: list[str], out: Path, **kw):
    return prepare(
        inputs,
        str(out),
        vocab_size=300,
        block_len=33,
        samples_per_shard=4,
        val_blocks=2,
        **{"workers": 1, **kw},
    )


def _shards(out: Path) -> dict[str, str]:
    m = load_manifest(str(out))
    return {s.name: s.sha256 for split in m.splits.values() for s in split.shards}


def test_same_bytes_for_any_worker_count_batch_size_and_input_order(inputs, tmp_path, monkeypatch):
    one = _prepare(inputs, tmp_path / "one")
    assert one.source["documents"] == 25 and len(_shards(tmp_path / "one")) >= 5
    many = _prepare(inputs, tmp_path / "many", workers=3)  # 3 processes of the 5 units
    shuffled = list(reversed(inputs))
    monkeypatch.setattr(pipeline, "_BATCH_DOCS", 2)  # another tokenization batch size
    other = _prepare(shuffled, tmp_path / "shuffled")
    for m, out in ((many, "many"), (other, "shuffled")):
        assert m.fingerprint == one.fingerprint
        assert _shards(tmp_path / out) == _shards(tmp_path / "one")
        for name in _shards(tmp_path / "one"):
            assert (tmp_path / out / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_a_big_json_lines_file_is_several_units_with_the_same_bytes(inputs, tmp_path, monkeypatch):
    whole = _prepare(inputs, tmp_path / "whole")
    monkeypatch.setattr(prepare_mod, "UNIT_BYTES", 97)  # cuts inside lines, some ranges hold none
    split = _prepare(inputs, tmp_path / "split", workers=2)
    units = prepare_mod._unit_reads(sorted(inputs), "text")
    assert len(units) > 20 and sum(len(list(read())) for read in units) == 25  # every document once
    assert split.fingerprint == whole.fingerprint
    assert _shards(tmp_path / "split") == _shards(tmp_path / "whole")


@pytest.mark.slow
def test_ray_cluster_of_two_nodes_gives_the_local_bytes(inputs, tmp_path):
    from tests.test_multinode import TwoNodes

    local = _prepare(inputs, tmp_path / "local")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    cluster = TwoNodes()
    try:
        p = run_pretrain(
            "prepare", *inputs, "--out", str(tmp_path / "ray"), *OPTS, "--address", cluster.address
        )
        # Bad input found by a task (the tokenizer is given: the driver reads no input): the one
        # message naming the file, exit 2.
        tok = ["--tokenizer", str(tmp_path / "local" / "tokenizer.json")]
        failed = run_pretrain(
            "prepare",
            *inputs,
            str(bad),
            "--out",
            str(tmp_path / "bad"),
            *OPTS,
            *tok,
            "--address",
            cluster.address,
        )
    finally:
        cluster.shutdown()
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert f"{bad}:2: invalid JSON" in failed.stderr and "RayTaskError" not in failed.stderr
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"[prepare] on the Ray cluster at {cluster.address}: 2 nodes, 2 CPUs" in p.stderr
    assert p.stdout.strip() == str(tmp_path / "ray" / "manifest.json")
    assert load_manifest(str(tmp_path / "ray")).fingerprint == local.fingerprint
    assert _shards(tmp_path / "ray") == _shards(tmp_path / "local")


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_after, units_done, shards_done",
    [(2, 2, 0), (7, 5, 2)],  # records: one per input (5), then one per shard
    ids=["while tokenizing", "while writing shards"],
)
def test_killed_prepare_resumes_redoing_only_unfinished_units(
    inputs, tmp_path, kill_after, units_done, shards_done
):
    reference = _prepare(inputs, tmp_path / "reference")
    out = tmp_path / "out"
    args = ["prepare", *inputs, "--out", str(out), *OPTS, "--workers", "1"]
    p = run_pretrain(*args, extra_env=hooked_env(PRETRAIN_TEST_PREPARE_KILL_AFTER=str(kill_after)))
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert not (out / "manifest.json").exists()
    (work,) = tmp_path.glob(".out.prepare-*")
    kept = [f"unit-{i:06d}.tokens" for i in range(units_done)] + [
        f"train-{i:06d}.tar" for i in range(shards_done)
    ]
    inodes = {n: os.stat(work / n).st_ino for n in kept}
    assert not (work / f"unit-{units_done:06d}.json").exists() or units_done == 5
    assert not (work / f"train-{shards_done:06d}.json").exists()

    p = run_pretrain(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming {work}: {units_done}/5 input units tokenized, {shards_done} shards written" in p.stderr
    assert load_manifest(str(out)).fingerprint == reference.fingerprint
    assert _shards(out) == _shards(tmp_path / "reference")
    # What was finished before the kill was kept (the shards moved in as they were), not redone.
    assert {n: os.stat(out / n).st_ino for n in kept if n.endswith(".tar")} == {
        n: i for n, i in inodes.items() if n.endswith(".tar")
    }
    assert not work.exists()
