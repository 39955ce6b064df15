"""`pretrain prepare`'s units (trainer/data/pipeline.py, and the clean units of
trainer/data/curate.py) give the same bytes whoever runs them: one process, several, a 2-node Ray
cluster (`--address`), inputs listed in another order, another tokenization batch size; and a
preparation killed (SIGKILL, at a known record) resumes, redoing only the units without a
completion record."""

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
# Cleaning and dedup stages: c4 drops lines and documents, min_length short ones, dedup the copies.
CLEAN = {"filters": "c4,min_length", "dedup": "exact,near"}
CLEAN_OPTS = ["--filters", CLEAN["filters"], "--dedup", CLEAN["dedup"]]


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


@pytest.fixture
def dirty(tmp_path: Path) -> list[str]:
    """Four inputs (three JSON Lines files and a text file) of documents of several sentences, with
    exact copies (case changed) and near copies (one word changed) of documents in other files, lines
    C4 drops, and documents too short for min_length."""
    rng = random.Random(1)

    def doc(lines: int) -> str:
        return "\n".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "." for _ in range(lines)
        )

    docs = [doc(rng.randint(6, 9)) for _ in range(24)]
    docs += [d.upper() for d in docs[:3]]  # exact duplicates
    docs += [d.replace(" ", " river ", 1) for d in docs[3:6]]  # near duplicates
    docs += [doc(5) + "\nno terminal punctuation here" for _ in range(3)]  # C4 drops a line
    docs += ["Too short.", doc(2)]  # removed
    rng.shuffle(docs)
    paths = []
    for i in range(3):
        p = tmp_path / f"dirty-{i}.jsonl"
        p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[i::4]))
        paths.append(str(p))
    (tmp_path / "dirty-notes.txt").write_text(docs[3])  # a text file: one document
    return paths + [str(tmp_path / "dirty-notes.txt")]


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
def test_cleaning_gives_the_same_bytes_however_the_inputs_are_cut_into_units(dirty, tmp_path, monkeypatch):
    whole = _prepare(dirty, tmp_path / "whole", max_docs=20, **CLEAN)
    monkeypatch.setattr(prepare_mod, "UNIT_BYTES", 1000)  # a few lines each: 3 files -> 8+ units
    split = _prepare(list(reversed(dirty)), tmp_path / "split", workers=2, max_docs=20, **CLEAN)
    assert len(prepare_mod._unit_reads(sorted(dirty), "text")) >= 8
    report = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert report["input"]["documents"] == 20 and report["removed"]["exact_dedup"]["documents"] >= 1
    assert split.fingerprint == whole.fingerprint
    assert _shards(tmp_path / "split") == _shards(tmp_path / "whole")
    assert (tmp_path / "split" / "report.json").read_bytes() == (
        tmp_path / "whole" / "report.json"
    ).read_bytes()


@pytest.mark.slow
def test_ray_cluster_of_two_nodes_gives_the_local_bytes(inputs, dirty, tmp_path):
    from tests.test_multinode import TwoNodes

    local = _prepare(inputs, tmp_path / "local")
    local_clean = _prepare(dirty, tmp_path / "local-clean", **CLEAN)
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
        # Cleaning and dedup as Ray tasks, the inputs listed in another order.
        cleaned = run_pretrain(
            "prepare",
            *reversed(dirty),
            "--out",
            str(tmp_path / "ray-clean"),
            *OPTS,
            *CLEAN_OPTS,
            "--address",
            cluster.address,
        )
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
    assert cleaned.returncode == 0, cleaned.stderr[-3000:]
    assert "[prepare] 4 clean unit tasks, 1 CPUs each" in cleaned.stderr  # the cleaning ran as Ray tasks
    assert "exact_dedup: 2 documents" in cleaned.stderr and "near_dedup: 1 documents" in cleaned.stderr
    assert load_manifest(str(tmp_path / "ray-clean")).fingerprint == local_clean.fingerprint
    assert _shards(tmp_path / "ray-clean") == _shards(tmp_path / "local-clean")
    for name in ("report.json", "report.png"):
        assert (tmp_path / "ray-clean" / name).read_bytes() == (tmp_path / "local-clean" / name).read_bytes()


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


def _unit_files(work: Path, stems: list[str]) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file of the units `stems` (clean-000001, unit-000002, ...)."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for stem in stems
        for p in sorted(work.glob(stem + ".*"))
        if not p.name.endswith(".partial")
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_after, cleaned, tokenized",
    [(2, 2, 0), (6, 4, 2)],  # records: one per input (4) cleaned, then one per input tokenized
    ids=["while cleaning", "while tokenizing the kept documents"],
)
def test_killed_prepare_with_cleaning_resumes_redoing_only_unfinished_units(
    dirty, tmp_path, kill_after, cleaned, tokenized
):
    reference = _prepare(dirty, tmp_path / "reference", **CLEAN)
    out = tmp_path / "out"
    args = ["prepare", *dirty, "--out", str(out), *OPTS, *CLEAN_OPTS, "--workers", "1"]
    p = run_pretrain(*args, extra_env=hooked_env(PRETRAIN_TEST_PREPARE_KILL_AFTER=str(kill_after)))
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    (work,) = tmp_path.glob(".out.prepare-*")
    assert not (work / f"clean-{cleaned:06d}.json").exists() or cleaned == 4
    assert not (work / f"unit-{tokenized:06d}.json").exists()
    done = [f"clean-{i:06d}" for i in range(cleaned)] + [f"unit-{i:06d}" for i in range(tokenized)]
    before = _unit_files(work, done)
    assert (
        len(before) == 4 * cleaned + 3 * tokenized
    )  # .jsonl .removed.jsonl .npz .json / .tokens .docs .json

    # Resumed and killed again once the stage's unfinished units have their records: had it redone
    # a finished unit, it would have been killed before the last one.
    left = (4 - cleaned) or (4 - tokenized)
    p = run_pretrain(*args, extra_env=hooked_env(PRETRAIN_TEST_PREPARE_KILL_AFTER=str(left)))
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert (
        f"resuming {work}: {cleaned}/4 units cleaned, {tokenized}/4 input units tokenized, 0 shards"
        in p.stderr
    )
    stage = "clean" if cleaned < 4 else "unit"
    assert all((work / f"{stage}-{i:06d}.json").exists() for i in range(4))
    assert _unit_files(work, done) == before  # finished units: the same files, not rewritten

    p = run_pretrain(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert load_manifest(str(out)).fingerprint == reference.fingerprint
    assert _shards(out) == _shards(tmp_path / "reference")
    assert (out / "report.json").read_bytes() == (tmp_path / "reference" / "report.json").read_bytes()
    assert not work.exists()
