"""The streamed loader on real shards: round trip, exact resume, exactly-once, layout independence,
local/HTTP/S3 sources, and bad input named precisely."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from tests.conftest import ROOT
from tests.data_fixtures import (
    aws_env,
    http_server,
    identity_corpus,
    moto_s3_server,
    one_stream,
    sample_ids,
    upload_dir,
)
from tests.run_fixtures import tiny_config
from trainer.data.manifest import ManifestError, load_manifest, write_manifest
from trainer.data.prepare import EOS_TOKEN, prepare
from trainer.data.storage import Retry, StorageError, read_shard
from trainer.data.stream import DataError, EpochPlan, TokenStream, ValStream, open_manifest

BLOCK = 9  # identity corpus block length: seq_len 8
FAST = Retry(tries=2, backoff_s=0.01, timeout_s=5)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    """103 train blocks in shards of 8: 13 shards, the last with 7 samples; 13 is no multiple of S=4."""
    out = tmp_path_factory.mktemp("uneven") / "corpus"
    m = identity_corpus(out, train_blocks=103, samples_per_shard=8, block_len=BLOCK)
    assert [s.samples for s in m.splits["train"].shards] == [8] * 12 + [7]
    return str(out)


def _stream(root: str, manifest=None, **kw) -> TokenStream:
    opts = dict(seq_len=BLOCK - 1, micro_batch=2, global_batch=8, dp_rank=0, dp_size=1, seed=7, num_streams=4)
    opts.update(kw)
    return TokenStream(root, manifest or open_manifest(root), **opts)


def _take(stream: TokenStream, start_step: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = stream.batches(start_step)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=True)
    )


def _per_step(stream: TokenStream) -> int:
    return stream.global_batch // (stream.micro_batch * stream.dp_size)


# ---- round trip ---------------------------------------------------------------------------------


def test_text_round_trips_through_prepare_and_the_loader(tmp_path):
    rng = np.random.default_rng(0)
    words = "the of and to in data model stream shard token naïve café ☃ {x: 1} def return".split()
    docs = [" ".join(rng.choice(words, size=int(rng.integers(30, 80)))) + "\n" for _ in range(40)]
    texts = tmp_path / "docs"
    texts.mkdir()
    for i, d in enumerate(docs):
        (texts / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    m = prepare(
        [str(texts)], str(tmp_path / "out"), vocab_size=300, block_len=17, samples_per_shard=5, workers=1
    )
    root = str(tmp_path / "out")
    n_train = m.splits["train"].samples

    # One stream, no shuffle, one sample per step: the train split in stored order, then val.
    s = one_stream(root, m, seq_len=16, batch=1, shuffle=False)
    assert s._plan(0).steps == n_train  # nothing dropped
    train = [torch.cat([x[0], y[0, -1:]]) for x, y in _take(s, 0, n_train)]
    val = ValStream(root, m, seq_len=16, micro_batch=1, dp_rank=0, dp_size=1).batches(m.splits["val"].samples)
    ids = torch.cat(train + [torch.cat([x[0], y[0, -1:]]) for x, y in val]).tolist()

    text = Tokenizer.from_file(os.path.join(root, "tokenizer.json")).decode(ids, skip_special_tokens=False)
    got = text.split(EOS_TOKEN)
    # prepare drops only the tail that does not fill a block (< 17 tokens): part of the last document.
    assert got[:-1] == docs[: len(got) - 1]
    assert len(got) == len(docs) and docs[-1].startswith(got[-1].rstrip("\ufffd"))


# ---- resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_gives_the_batches_of_an_uninterrupted_run(uneven, workers):
    m = open_manifest(uneven)
    reference = _stream(uneven, m, dp_size=2, dp_rank=1)  # inline, uninterrupted
    per_step = _per_step(reference)
    epoch_steps = reference._plan(0).steps
    total = 3 * epoch_steps + 2
    full = _take(reference, 0, total * per_step)
    assert _equal(_take(_stream(uneven, m, dp_size=2, dp_rank=1, workers=workers), 0, len(full)), full)

    for k in (3, epoch_steps - 1, epoch_steps, epoch_steps + 5, 2 * epoch_steps):
        state = reference.state_dict(k)
        assert state["epoch"] == k // epoch_steps and state["step_in_epoch"] == k % epoch_steps
        resumed = _stream(uneven, open_manifest(uneven), dp_size=2, dp_rank=1, workers=workers)
        step = resumed.check_resume(state)
        assert step == k
        assert _equal(_take(resumed, step, (total - k) * per_step), full[k * per_step :]), k


def test_resume_state_is_small_and_complete(uneven):
    s = _stream(uneven)
    state = s.state_dict(s._plan(0).steps + 1)
    assert state == {
        "epoch": 1,
        "step_in_epoch": 1,
        "step": s._plan(0).steps + 1,
        "seed": 7,
        "num_streams": 4,
        "global_batch": 8,
        "shuffle": True,
        "manifest_fingerprint": open_manifest(uneven).fingerprint,
        "skipped_samples": [],  # global sample ranges the order leaves out
    }


def test_resume_against_another_manifest_is_refused_unless_forced(uneven, tmp_path):
    other = tmp_path / "other"
    identity_corpus(other, train_blocks=103, samples_per_shard=6, block_len=BLOCK)  # same text, re-cut
    state = _stream(uneven).state_dict(5)
    moved = _stream(str(other))
    with pytest.raises(DataError, match=r"manifest_fingerprint: checkpoint '\w+', now '\w+'.*force"):
        moved.check_resume(state)
    assert moved.check_resume(state, force=True) == 5
    with pytest.raises(DataError, match=r"seed: checkpoint 7, now 8"):
        _stream(uneven, seed=8).check_resume(state)
    with pytest.raises(DataError, match=r"global_batch: checkpoint 8, now 16"):
        _stream(uneven, global_batch=16).check_resume(state)
    # Another DP size is fine: the global order does not depend on it.
    assert _stream(uneven, dp_size=2, dp_rank=1).check_resume(state) == 5


# ---- exactly once, layout independence ------------------------------------------------------------


def test_every_sample_is_seen_exactly_once_per_epoch_across_dp_ranks(uneven):
    m = open_manifest(uneven)
    counts = [s.samples for s in m.splits["train"].shards]
    S, GB = 4, 8
    plan = EpochPlan(counts, S, GB, seed=7, epoch=0)
    # The epoch is S * (shortest stream) samples, rounded down to whole global batches.
    shortest = min(sum(counts[i] for i in shards) for shards in plan.stream_shards)
    dropped = sum(counts) - (S * shortest // GB) * GB
    assert plan.steps * GB == sum(counts) - dropped
    # 13 shards over 4 streams: 4+3+3+3 shards. With seed 7 the 7-sample shard falls into the stream
    # of 4 shards, so the streams hold 31, 24, 24, 24 samples: 4 * 24 = 96 = 12 steps of 8, 7 dropped.
    assert sorted(sum(counts[i] for i in shards) for shards in plan.stream_shards) == [24, 24, 24, 31]
    assert plan.steps == 12 and dropped == 7

    seen = {}
    for r in range(2):
        s = _stream(uneven, m, dp_size=2, dp_rank=r, workers=r)
        n = plan.steps * _per_step(s)
        batches = _take(s, 0, n + _per_step(s))
        seen[r] = [i for x, _ in batches[:n] for i in sample_ids(x, BLOCK)]
        # The next step belongs to epoch 1 (whose order differs): the rank did not run over.
        assert len(batches) == n + _per_step(s)
    assert len(seen[0]) == len(seen[1]) == plan.steps * GB // 2  # equal batch counts per rank
    everything = seen[0] + seen[1]
    assert len(set(everything)) == len(everything) == sum(counts) - dropped
    assert set(everything) <= set(range(sum(counts)))


def test_dp_ranks_together_see_the_single_rank_batches(uneven):
    m = open_manifest(uneven)
    steps = 20  # crosses an epoch boundary
    one = _stream(uneven, m, micro_batch=4)
    single = _take(one, 0, steps * _per_step(one))
    ranks = [_stream(uneven, m, dp_size=2, dp_rank=r, micro_batch=2) for r in range(2)]
    per_rank = [_take(s, 0, steps * _per_step(s)) for s in ranks]
    for step in range(steps):
        global_rows = torch.cat([x for x, _ in single[step * 2 : step * 2 + 2]])  # (GB, T)
        rank_rows = [torch.cat([x for x, _ in per_rank[r][step * 2 : step * 2 + 2]]) for r in range(2)]
        # Sample g of the step goes to rank g % 2: the same global order, split.
        assert torch.equal(global_rows[0::2], rank_rows[0]) and torch.equal(global_rows[1::2], rank_rows[1])


def test_shuffle_is_deterministic_from_the_seed(uneven):
    m = open_manifest(uneven)
    a, b, c = (_take(_stream(uneven, m, seed=seed), 0, 12) for seed in (1, 1, 2))
    assert _equal(a, b) and not _equal(a, c)
    first_epoch = [i for x, _ in a for i in sample_ids(x, BLOCK)]
    assert first_epoch != sorted(first_epoch)


# ---- sources ------------------------------------------------------------------------------------


def test_http_serves_the_same_batches_as_a_local_directory(uneven):
    m = open_manifest(uneven)
    local = _take(_stream(uneven, m, dp_size=2, dp_rank=1), 0, 40)
    with http_server(uneven) as url:
        assert open_manifest(url) == m
        for workers in (0, 2):
            assert _equal(_take(_stream(url, dp_size=2, dp_rank=1, workers=workers), 0, 40), local)
        val = ValStream(url, m, seq_len=8, micro_batch=1, dp_rank=0, dp_size=1).batches(2)
        assert _equal(val, ValStream(uneven, m, seq_len=8, micro_batch=1, dp_rank=0, dp_size=1).batches(2))


@pytest.mark.slow  # moto's import and start take a few seconds
def test_s3_serves_the_same_batches_as_a_local_directory(uneven, monkeypatch):
    pytest.importorskip("boto3")
    pytest.importorskip("moto")
    m = open_manifest(uneven)
    local = _take(_stream(uneven, m), 0, 40)
    with moto_s3_server() as endpoint:
        for k, v in aws_env(endpoint).items():
            monkeypatch.setenv(k, v)
        upload_dir(uneven, "corpora", "identity/v1")
        root = "s3://corpora/identity/v1"
        assert open_manifest(root) == m
        for workers in (0, 2):
            assert _equal(_take(_stream(root, workers=workers), 0, 40), local)
        with pytest.raises(StorageError, match=r"s3://corpora/identity/missing/manifest.json: S3 NoSuchKey"):
            open_manifest("s3://corpora/identity/missing", retry=FAST)


def test_dead_s3_endpoint_fails_fast_naming_the_object(monkeypatch):
    pytest.importorskip("boto3")
    for k, v in aws_env(f"http://127.0.0.1:{_closed_port()}").items():
        monkeypatch.setenv(k, v)
    t0 = time.monotonic()
    with pytest.raises(
        StorageError, match=r"cannot read s3://corpora/x/manifest.json after 2 tries: .*Connect"
    ):
        open_manifest("s3://corpora/x", retry=FAST)
    assert time.monotonic() - t0 < 3


def test_s3_without_boto3_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(StorageError, match=r"needs boto3.*pretrain\[s3\]"):
        open_manifest("s3://bucket/corpus")


# ---- bad input ----------------------------------------------------------------------------------


def _copy(root: str, tmp_path: Path) -> tuple[str, object]:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return str(dst), load_manifest(str(dst))


def _member_offsets(path: str) -> list[int]:
    """Byte offset of each sample's data in a shard written by prepare."""
    import tarfile

    with tarfile.open(path) as tar:
        return [m.offset_data for m in tar]


def test_truncated_shard_names_the_shard_and_the_sample(uneven, tmp_path):
    root, m = _copy(uneven, tmp_path)
    info = m.splits["train"].shards[4]
    path = os.path.join(root, info.name)
    cut = _member_offsets(path)[3] + 5  # inside sample 3's tokens
    with open(path, "r+b") as f:
        f.truncate(cut)
    with pytest.raises(
        StorageError, match=rf"{info.name}: truncated or corrupt shard at sample 3, after key 0*34\b"
    ):
        read_shard(root, info.name, sha256=info.sha256, size=info.bytes)
    with pytest.raises(StorageError, match=rf"{info.name}: truncated .* at sample 3"):
        for _ in _stream(root, m, shuffle=False, num_streams=1).batches(0):
            pass
    with (
        http_server(root) as url,
        pytest.raises(StorageError, match=rf"{url}/{info.name}: truncated .* sample 3"),
    ):
        read_shard(url, info.name, sha256=info.sha256, size=info.bytes, retry=FAST)


def test_corrupt_tar_header_names_the_shard_and_the_sample(uneven, tmp_path):
    root, m = _copy(uneven, tmp_path)
    info = m.splits["train"].shards[0]
    path = os.path.join(root, info.name)
    header = _member_offsets(path)[2] - 512
    data = bytearray(Path(path).read_bytes())
    data[header + 3] ^= 0xFF  # a byte of the member name: the header checksum no longer adds up
    Path(path).write_bytes(bytes(data))
    with pytest.raises(StorageError, match=rf"{info.name}: truncated or corrupt shard at sample 2.*checksum"):
        read_shard(root, info.name)


def test_checksum_mismatch_names_the_shard_and_releases_none_of_it(uneven, tmp_path):
    root, m = _copy(uneven, tmp_path)
    info = m.splits["train"].shards[0]
    path = os.path.join(root, info.name)
    data = bytearray(Path(path).read_bytes())
    data[_member_offsets(path)[5]] ^= 0x01  # one token id of sample 5: the tar still parses
    Path(path).write_bytes(bytes(data))
    assert len(read_shard(root, info.name)) == info.samples  # unverified, it reads fine
    with pytest.raises(StorageError, match=rf"{info.name}: sha256 \w+ does not match the manifest"):
        read_shard(root, info.name, sha256=info.sha256, size=info.bytes)
    # Shard 0 is the first read of stream 0: the error comes before any batch.
    it = _stream(root, m, shuffle=False).batches(0)
    with pytest.raises(StorageError, match=info.name):
        next(it)


def test_sample_of_the_wrong_size_names_shard_and_key(uneven, tmp_path):
    root, m = _copy(uneven, tmp_path)
    m.block_len = BLOCK + 1  # a manifest that disagrees with the shards (fingerprint aside)
    s = _stream(root, m, seq_len=BLOCK - 1, shuffle=False, num_streams=1)
    with pytest.raises(DataError, match=r"train-000000.tar: sample 0 \(key 0+\) has 18 bytes, expected 20"):
        next(s.batches(0))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dead_url_fails_fast_naming_the_url():
    url = f"http://127.0.0.1:{_closed_port()}/corpus"
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=rf"cannot read {url}/manifest.json after 2 tries: .*refused"):
        open_manifest(url, retry=FAST)
    assert time.monotonic() - t0 < 2


def test_missing_url_is_not_retried(uneven):
    with http_server(uneven) as url:
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=rf"cannot read {url}/nope/manifest.json: HTTP 404"):
            open_manifest(f"{url}/nope", retry=Retry(tries=3, backoff_s=5))
        assert time.monotonic() - t0 < 2


def test_transient_http_errors_are_retried(uneven):
    failures = {"left": 2}

    class Flaky(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            if failures["left"] > 0:
                failures["left"] -= 1
                self.send_error(503, "busy")
                return
            super().do_GET()

    with http_server(uneven, Flaky) as url:
        assert open_manifest(url, retry=Retry(tries=3, backoff_s=0.01)) == open_manifest(uneven)
        failures["left"] = 3
        with pytest.raises(StorageError, match=r"after 3 tries: HTTP 503"):
            open_manifest(url, retry=Retry(tries=3, backoff_s=0.01))


@pytest.mark.slow  # the CLI's imports take a few seconds
def test_dead_url_fails_the_cli_fast_naming_the_url(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/corpus"
    env = dict(os.environ, PRETRAIN_DATA_TRIES="2", PRETRAIN_DATA_BACKOFF_S="0.01")
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "train", "configs/tiny-cpu.yaml", "--set", f"data.path={url}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert f"cannot read {url}/manifest.json after 2 tries" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "root", ["pipe:curl -s http://example.com/corpus", "PIPE:cat shards", "gs://bucket/x"]
)
def test_pipe_and_unknown_schemes_are_refused(root, uneven):
    with pytest.raises(StorageError, match=r"run shell commands|unsupported scheme"):
        open_manifest(root)
    with pytest.raises(StorageError, match="refused|unsupported"):
        _stream(root, open_manifest(uneven))
    with pytest.raises(StorageError):
        read_shard(root, "train-000000.tar")


@pytest.mark.parametrize(
    "field, name, problem",
    [
        ("name", "/etc/passwd", "is an absolute path"),
        ("name", "../outside/train-000000.tar", "leaves the corpus with '..'"),
        ("name", "train/../../train-000000.tar", "leaves the corpus with '..'"),
        ("name", "..\\train-000000.tar", "leaves the corpus with '..'"),
        ("name", "C:\\data\\train-000000.tar", "is an absolute path"),
        ("name", "http://example.com/train-000000.tar", "is not a plain relative path"),
        ("name", "./train-000000.tar", "is not a plain relative path"),
        ("name", "train//000000.tar", "is not a plain relative path"),
        ("name", "", "is not a plain relative path"),
        ("tokenizer_file", "/root/.ssh/id_rsa", "is an absolute path"),
    ],
)
def test_manifest_file_names_outside_the_corpus_are_refused(uneven, tmp_path, field, name, problem):
    root, m = _copy(uneven, tmp_path)
    if field == "name":
        m.splits["train"].shards[0].name = name
        at = r"splits\.train\.shards\[0\]: field 'name'"
    else:
        m.tokenizer_file = name
        at = "field 'tokenizer_file'"
    path = write_manifest(root, m.seal())  # re-sealed: the fingerprint checks out, as a forger's would
    with pytest.raises(ManifestError, match=rf"^{re.escape(path)}: {at} {problem}: ") as e:
        load_manifest(root)
    assert e.value.path == path


def test_manifest_file_names_are_checked_on_remote_corpora_too(uneven, tmp_path):
    root, m = _copy(uneven, tmp_path)
    m.splits["val"].shards[0].name = "../../etc/passwd"
    write_manifest(root, m.seal())
    with (
        http_server(root) as url,
        pytest.raises(
            ManifestError, match=rf"^{url}/manifest.json: splits.val.shards\[0\]: field 'name' leaves"
        ),
    ):
        open_manifest(url, retry=FAST)


def test_stopping_early_releases_the_worker_threads(uneven):
    import threading

    before = threading.active_count()
    for _ in range(3):
        _take(_stream(uneven, workers=2), 0, 3)
    deadline = time.monotonic() + 2
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


@pytest.mark.parametrize("new_dp", [1, 4])
def test_an_epoch_resumed_on_another_dp_size_sees_every_sample_once(uneven, new_dp):
    """A run stopped after 5 steps on dp2 and resumed on dp1 or dp4 (global batch 8 throughout):
    the epoch's 96 samples are each seen exactly once, in the uninterrupted run's steps."""
    m, stop, steps = open_manifest(uneven), 5, 12  # 12 steps of 8 = the epoch (see above)
    one = _stream(uneven, m, micro_batch=8)
    epoch = [sorted(sample_ids(x, BLOCK)) for x, _ in _take(one, 0, steps)]
    before = [_stream(uneven, m, dp_size=2, dp_rank=r) for r in range(2)]
    state = before[0].state_dict(stop)
    after = [_stream(uneven, m, dp_size=new_dp, dp_rank=r, micro_batch=8 // new_dp) for r in range(new_dp)]
    start = after[0].check_resume(state)
    assert start == stop
    got = [[] for _ in range(steps)]
    for streams, first, n in ((before, 0, stop), (after, start, steps - stop)):
        for s in streams:
            for i, (x, _) in enumerate(_take(s, first, n * _per_step(s))):
                got[first + i // _per_step(s)] += sample_ids(x, BLOCK)
    assert [sorted(g) for g in got] == epoch  # same samples in the same steps: none twice, none skipped
    flat = [i for g in got for i in g]
    assert len(flat) == len(set(flat)) == 96


def test_export_reads_the_tokenizer_only_from_inside_the_corpus(uneven, tmp_path):
    """`pretrain export` copies the corpus's tokenizer into the model directory: a forged manifest
    pointing it outside the corpus is refused, never followed."""
    from trainer.export import tokenizer_path

    root, m = _copy(uneven, tmp_path)
    (tmp_path / "secret.json").write_text("{}")
    m.tokenizer_file = "../secret.json"
    write_manifest(root, m.seal())
    with pytest.raises(ManifestError, match="field 'tokenizer_file' leaves the corpus"):
        tokenizer_path(tiny_config(data={"path": root}))
