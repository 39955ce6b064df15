"""Corpora and servers for the loader tests: real shards from prepare(), a real HTTP server and a real
S3-compatible server (moto) on 127.0.0.1, reached through the clients a user would use. Plain
functions (no pytest, no environment changes): the benchmarks use them too."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from trainer.data.manifest import Manifest
from trainer.data.prepare import EOS_TOKEN, prepare
from trainer.data.stream import TokenStream

STDLIB = Path(os.path.dirname(os.__file__))
STDLIB_FILES = (
    "json/decoder.py",
    "json/encoder.py",
    "textwrap.py",
    "string.py",
    "fnmatch.py",
    "glob.py",
    "bisect.py",
    "heapq.py",
)


def stdlib_corpus(out: Path) -> Manifest:
    """A real corpus (the tests' `corpus`): a few stdlib modules, BPE vocab 512, blocks of 33 tokens
    (seq_len 32), 32 samples a shard, 16 val blocks."""
    files = [str(STDLIB / name) for name in STDLIB_FILES]
    return prepare(
        files, str(out), vocab_size=512, block_len=33, samples_per_shard=32, val_blocks=16, workers=1
    )


def one_stream(root: str, manifest: Manifest, *, seq_len: int, batch: int, **kw) -> TokenStream:
    """The loader of one DP rank over ONE logical stream, a step being one micro batch of `batch`
    samples (seed 0): an epoch uses every sample (with more streams it is S x the shortest one)."""
    return TokenStream(
        root,
        manifest,
        seq_len=seq_len,
        micro_batch=batch,
        global_batch=batch,
        dp_rank=0,
        dp_size=1,
        seed=0,
        num_streams=1,
        **kw,
    )


def identity_corpus(
    out: Path, *, train_blocks: int, samples_per_shard: int, block_len: int = 9, val_blocks: int = 2
) -> Manifest:
    """A corpus whose block j holds the token ids j*block_len+1 ... (j+1)*block_len, so every sample
    names itself: `sample_id(row) == j`. Built by prepare() with a word-level tokenizer (w0 -> 1, ...)."""
    n_tokens = (train_blocks + val_blocks) * block_len
    vocab = {EOS_TOKEN: 0, **{f"w{i}": i + 1 for i in range(n_tokens)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out.parent.mkdir(parents=True, exist_ok=True)
    tok_file = out.parent / f"{out.name}-tokenizer.json"
    tok.save(str(tok_file))
    text = out.parent / f"{out.name}-words.txt"
    # The trailing EOS makes the stream one token longer than the blocks: dropped as the tail.
    text.write_text(" ".join(f"w{i}" for i in range(n_tokens)))
    return prepare(
        [str(text)],
        str(out),
        tokenizer=str(tok_file),
        block_len=block_len,
        samples_per_shard=samples_per_shard,
        val_blocks=val_blocks,
        workers=1,
    )


def sample_ids(rows, block_len: int) -> list[int]:
    """The block index of each (inputs) row of an identity corpus."""
    return [int(r[0] - 1) // block_len for r in rows]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def http_server(directory: str, handler: type = _QuietHandler) -> Iterator[str]:
    """Serve `directory` over HTTP on 127.0.0.1; yields the base URL."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=directory)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto's standalone S3-compatible server on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def aws_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables a user sets for an S3-compatible store."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def upload_dir(directory: str, bucket: str, prefix: str) -> None:
    """Upload every file of `directory` to s3://bucket/prefix/ with boto3 (endpoint from the env)."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for name in sorted(os.listdir(directory)):
        s3.upload_file(os.path.join(directory, name), bucket, f"{prefix}/{name}")


def identity_corpora(
    out: Path, train_blocks: list[int], *, samples_per_shard: int, block_len: int = 9, val_blocks: int = 2
) -> list[str]:
    """Corpora that share one word-level tokenizer (a mixture's sources): corpus i holds blocks whose
    token ids run on from corpus i-1's, so `sample_ids` names both the corpus and the block. Returns
    their directories, `<out>/src<i>`."""
    sizes = [(n + val_blocks) * block_len for n in train_blocks]
    n_tokens = sum(sizes)
    vocab = {EOS_TOKEN: 0, **{f"w{i}": i + 1 for i in range(n_tokens)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    roots, first = [], 0
    for i, size in enumerate(sizes):
        text = out / f"src{i}-words.txt"
        text.write_text(" ".join(f"w{j}" for j in range(first, first + size)))
        first += size
        prepare(
            [str(text)],
            str(out / f"src{i}"),
            tokenizer=str(out / "tokenizer.json"),
            block_len=block_len,
            samples_per_shard=samples_per_shard,
            val_blocks=val_blocks,
            workers=1,
        )
        roots.append(str(out / f"src{i}"))
    return roots
