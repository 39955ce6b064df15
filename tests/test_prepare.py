"""`pretrain prepare`: real files in tmp_path -> shards + manifest, checked byte for byte."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from launch.prepare import add_arguments, run
from trainer.data import pipeline
from trainer.data.manifest import Manifest, ManifestError, load_manifest
from trainer.data.prepare import EOS_TOKEN, PrepareError, prepare

BLOCK_LEN = 33
VOCAB = 300
WORDS = "the of and to in is was for on that with as by at from it an be this are or which data model".split()


def _doc(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + ".\n"


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[list[str], list[str]]:
    """(inputs, documents in the order prepare must read them)."""
    rng = random.Random(0)
    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    (texts / "skip.bin").write_bytes(b"\x00 not a known extension inside a directory")
    (texts / ".hidden.txt").write_text("hidden files are skipped")
    txt_docs = {
        "a.txt": _doc(rng, 60),
        # Non-ASCII and a literal EOS string: both must survive as plain text.
        "b.md": "héllo wörld ☃ " + _doc(rng, 40) + f" a literal {EOS_TOKEN} inside text ",
        "sub/c.txt": _doc(rng, 50),
    }
    for name, text in txt_docs.items():
        (texts / name).write_text(text, encoding="utf-8")
    jsonl_docs = [_doc(rng, rng.randint(20, 60)) for _ in range(15)]
    with open(tmp_path / "part.jsonl", "w") as f:
        for i, d in enumerate(jsonl_docs):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
            if i == 3:
                f.write("\n")  # blank lines are skipped
    gz_docs = [_doc(rng, rng.randint(20, 60)) for _ in range(15)]
    with gzip.open(tmp_path / "part2.jsonl.gz", "wt") as f:
        for d in gz_docs:
            f.write(json.dumps({"text": d}) + "\n")
    inputs = [str(texts), str(tmp_path / "part.jsonl"), str(tmp_path / "part2.jsonl.gz")]
    # Files are read sorted by path, whatever the order they are listed in.
    return inputs, jsonl_docs + gz_docs + list(txt_docs.values())


def _prepare(inputs: list[str], out: Path, **kw) -> Manifest:
    opts = dict(vocab_size=VOCAB, block_len=BLOCK_LEN, samples_per_shard=8, val_blocks=3, workers=1)
    opts.update(kw)
    return prepare(inputs, str(out), **opts)


def _read_blocks(out: Path, manifest: Manifest) -> tuple[list[str], np.ndarray]:
    """(keys, blocks) of train then val, read straight from the tar files."""
    import tarfile

    keys, blocks = [], []
    for split in ("train", "val"):
        for shard in manifest.splits[split].shards:
            with tarfile.open(out / shard.name) as tar:
                for member in tar:
                    key, ext = member.name.split(".", 1)
                    assert ext == "tokens"
                    keys.append(key)
                    blocks.append(np.frombuffer(tar.extractfile(member).read(), dtype="<u2"))
    return keys, np.stack(blocks)


def _expected_stream(tokenizer_file: Path, docs: list[str]) -> list[int]:
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.encode_special_tokens = True
    eos = tok.token_to_id(EOS_TOKEN)
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d, add_special_tokens=False).ids + [eos]
    return ids


def test_mixed_inputs_make_consistent_shards_and_manifest(corpus, tmp_path):
    inputs, docs = corpus
    out = tmp_path / "out"
    manifest = _prepare(inputs, out)

    assert manifest == load_manifest(str(out))
    assert sorted(os.listdir(out)) == sorted(
        ["manifest.json", "tokenizer.json"] + [s.name for sp in manifest.splits.values() for s in sp.shards]
    )
    assert manifest.dtype == "uint16" and manifest.block_len == BLOCK_LEN and manifest.eos_id == 0
    assert manifest.vocab_size <= VOCAB
    assert manifest.source["documents"] == len(docs)
    assert manifest.splits["val"].samples == 3
    assert [s.name for s in manifest.splits["train"].shards][:2] == ["train-000000.tar", "train-000001.tar"]
    for split in manifest.splits.values():
        assert split.samples == sum(s.samples for s in split.shards)
        assert split.tokens == split.samples * BLOCK_LEN
        assert all(s.samples <= 8 for s in split.shards)
        for s in split.shards:
            data = (out / s.name).read_bytes()
            assert len(data) == s.bytes and hashlib.sha256(data).hexdigest() == s.sha256
    assert manifest.tokenizer_sha256 == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()

    # Decoding every block in order gives back the documents joined by EOS, up to the dropped tail.
    _, blocks = _read_blocks(out, manifest)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    decoded = tok.decode(blocks.reshape(-1).tolist(), skip_special_tokens=False)
    full = "".join(d + EOS_TOKEN for d in docs)
    assert len(full) - len(decoded) < BLOCK_LEN * 8  # only a partial block's worth is missing
    assert decoded == full[: len(decoded)]
    n_tokens = manifest.source["tokens"]
    assert blocks.size == n_tokens - manifest.source["dropped_tail_tokens"] > n_tokens - BLOCK_LEN


def test_shards_read_with_webdataset_give_exact_ids_in_order(corpus, tmp_path):
    wds = pytest.importorskip("webdataset")
    inputs, docs = corpus
    out = tmp_path / "out"
    manifest = _prepare(inputs, out)
    stream = _expected_stream(out / "tokenizer.json", docs)

    index = 0
    for split in ("train", "val"):
        for shard in manifest.splits[split].shards:
            samples = list(wds.WebDataset(str(out / shard.name), shardshuffle=False))
            assert len(samples) == shard.samples
            for sample in samples:
                assert sample["__key__"] == f"{index:09d}"
                raw = sample["tokens"]
                assert len(raw) == BLOCK_LEN * 2
                expected = stream[index * BLOCK_LEN : (index + 1) * BLOCK_LEN]
                assert np.frombuffer(raw, dtype="<u2").tolist() == expected
                index += 1
    assert index == len(stream) // BLOCK_LEN
    # The literal "<|endoftext|>" in b.md was encoded as text: EOS appears once per document.
    assert stream.count(manifest.eos_id) == len(docs)


def test_worker_count_does_not_change_the_output(corpus, tmp_path):
    inputs, _ = corpus
    one = _prepare(inputs, tmp_path / "w1", workers=1)
    two = _prepare(inputs, tmp_path / "w2", workers=2)
    assert one.fingerprint == two.fingerprint
    assert one.splits == two.splits  # shard sha256s included: byte-identical tars
    # `created` is outside the fingerprint, so a later run of the same data still matches.
    one.created = "2000-01-01T00:00:00+00:00"
    assert one.compute_fingerprint() == two.fingerprint


def test_existing_tokenizer_is_reused(corpus, tmp_path):
    inputs, _ = corpus
    first = _prepare(inputs, tmp_path / "first")
    tok_file = tmp_path / "first" / "tokenizer.json"
    again = _prepare(inputs, tmp_path / "again", tokenizer=str(tok_file), vocab_size=100_000)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == tok_file.read_bytes()
    assert again.tokenizer_sha256 == first.tokenizer_sha256
    assert again.splits == first.splits
    assert again.source["tokenizer"] == {"file": str(tok_file)}


def test_tokenizer_without_eos_is_refused(corpus, tmp_path):
    inputs, _ = corpus
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["some text"], trainers.BpeTrainer(vocab_size=280, show_progress=False))
    path = tmp_path / "no_eos.json"
    tok.save(str(path))
    with pytest.raises(PrepareError, match=r"no_eos\.json.*<\|endoftext\|>"):
        _prepare(inputs, tmp_path / "out", tokenizer=str(path))
    with pytest.raises(PrepareError, match="missing.json"):
        _prepare(inputs, tmp_path / "out", tokenizer=str(tmp_path / "missing.json"))
    assert not (tmp_path / "out").exists()


def test_non_empty_out_is_refused_unless_overwrite(corpus, tmp_path):
    inputs, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "old-000000.tar").write_bytes(b"stale")
    with pytest.raises(PrepareError, match="--overwrite"):
        _prepare(inputs, out)
    assert sorted(os.listdir(out)) == ["notes.txt", "old-000000.tar"]
    assert (out / "old-000000.tar").read_bytes() == b"stale"

    manifest = _prepare(inputs, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (out / "old-000000.tar").exists()
    assert load_manifest(str(out)) == manifest
    # Re-running in place over our own output works and reproduces the same data.
    assert _prepare(inputs, out, overwrite=True).fingerprint == manifest.fingerprint
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out.prepare-")] == []


def test_failed_prepare_leaves_no_manifest_and_keeps_the_old_dataset(corpus, tmp_path, monkeypatch):
    inputs, _ = corpus
    out = tmp_path / "out"
    old = _prepare(inputs, out)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "write_shard", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _prepare(inputs, out, overwrite=True, block_len=17)
    assert load_manifest(str(out)) == old  # untouched: the failure happened before the commit
    with pytest.raises(RuntimeError):
        _prepare(inputs, tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "manifest.json").exists()
    # The work of each is kept for the same command to resume; it goes once that succeeds.
    assert len([p for p in os.listdir(tmp_path) if p.startswith(".fresh.prepare-")]) == 1
    monkeypatch.undo()
    assert _prepare(inputs, tmp_path / "fresh").fingerprint == old.fingerprint
    assert [p for p in os.listdir(tmp_path) if p.startswith(".fresh.prepare-")] == []


def test_bad_inputs_and_options_name_the_culprit(corpus, tmp_path):
    inputs, _ = corpus
    out = tmp_path / "out"
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(PrepareError, match="nope.txt"):
        _prepare([*inputs, missing], out)
    with pytest.raises(PrepareError, match="no inputs"):
        _prepare([], out)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PrepareError, match="no documents"):
        _prepare([str(tmp_path / "empty.txt")], out)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(PrepareError, match="emptydir"):
        _prepare([str(tmp_path / "emptydir")], out)
    with pytest.raises(PrepareError, match="matched no files"):
        _prepare([str(tmp_path / "*.nothing")], out)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(PrepareError, match=r"bad\.jsonl:2.*'text'"):
        _prepare([str(tmp_path / "bad.jsonl")], out)
    with pytest.raises(PrepareError, match="--block-len"):
        _prepare(inputs, out, block_len=1)
    with pytest.raises(PrepareError, match="--vocab-size"):
        _prepare(inputs, out, vocab_size=100)
    with pytest.raises(PrepareError, match="too little text.*--block-len 100000"):
        _prepare(inputs, out, block_len=100_000)
    assert not out.exists()


def test_tampered_or_missing_manifest_is_rejected(corpus, tmp_path):
    inputs, _ = corpus
    out = tmp_path / "out"
    with pytest.raises(ManifestError, match="manifest.json not found: run `pretrain prepare`"):
        load_manifest(str(out))
    _prepare(inputs, out)
    path = out / "manifest.json"
    raw = json.loads(path.read_text())
    raw["splits"]["train"]["shards"][0]["samples"] -= 1
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="fingerprint"):
        load_manifest(str(out))
    del raw["block_len"]
    with pytest.raises(ManifestError, match="where.json: missing field 'block_len'"):
        Manifest.from_json(json.dumps(raw), "where.json")


def test_cli_arguments_and_run(corpus, tmp_path, capsys):
    inputs, _ = corpus
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(
        [*inputs, "--out", str(out), "--vocab-size", "300", "--block-len", "17", "--val-blocks", "2"]
        + ["--workers", "1", "--max-docs", "10", "--tokenizer-sample-docs", "5"]
    )
    assert args.samples_per_shard == 256 and args.text_field == "text" and not args.overwrite
    assert run(args) == 0
    manifest = load_manifest(str(out))
    assert manifest.source["documents"] == 10 and manifest.splits["val"].samples == 2
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out / "manifest.json")
    assert "10 documents" in captured.err
    for action in parser._actions:
        assert action.help, action.dest


def test_tokenizer_loads_in_transformers(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    inputs, docs = corpus
    _prepare(inputs, tmp_path / "out")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "out" / "tokenizer.json"))
    assert hf.convert_tokens_to_ids(EOS_TOKEN) == 0
    assert hf.decode(hf.encode(docs[0])) == docs[0]


def test_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = random.Random(1)
    docs = [_doc(rng, 40) for _ in range(20)]
    pq.write_table(pa.table({"id": list(range(20)), "body": docs}), str(tmp_path / "d.parquet"))
    manifest = _prepare([str(tmp_path / "d.parquet")], tmp_path / "out", text_field="body")
    assert manifest.source["documents"] == len(docs)
    stream = _expected_stream(tmp_path / "out" / "tokenizer.json", docs)
    _, blocks = _read_blocks(tmp_path / "out", manifest)
    assert blocks.reshape(-1).tolist() == stream[: blocks.size]
    with pytest.raises(PrepareError, match=r"d\.parquet: no column 'text'"):
        _prepare([str(tmp_path / "d.parquet")], tmp_path / "out2")


def test_zstd_jsonl_is_read_or_refused_clearly(tmp_path):
    path = tmp_path / "d.jsonl.zst"
    lines = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(40)).encode()
    try:
        import zstandard
    except ImportError:
        path.write_bytes(b"\x28\xb5\x2f\xfd not really zstd")
        with pytest.raises(PrepareError, match=r"d\.jsonl\.zst.*zstandard"):
            _prepare([str(path)], tmp_path / "out")
        return
    path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    assert _prepare([str(path)], tmp_path / "out").source["documents"] == 40


def test_http_inputs_are_streamed(corpus, tmp_path):
    import functools
    import http.server
    import threading

    inputs, docs = corpus

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        urls = [f"{base}/texts/a.txt", f"{base}/part.jsonl", f"{base}/part2.jsonl.gz?x=1"]
        local = _prepare([str(tmp_path / "texts" / "a.txt"), *inputs[1:]], tmp_path / "local")
        remote = _prepare(urls, tmp_path / "remote", tokenizer=str(tmp_path / "local" / "tokenizer.json"))
        assert remote.splits == local.splits
        with pytest.raises(PrepareError, match="missing.jsonl"):
            _prepare([f"{base}/missing.jsonl"], tmp_path / "out")
    finally:
        server.shutdown()
        server.server_close()
