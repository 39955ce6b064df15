"""Loader and prepare throughput on one real corpus (the Python stdlib's top-level modules).

    python benchmarks/loader.py [--out DIR] [--seconds 3]

Prints, from one run on the same shards:
  * `pretrain prepare` tokens/s on all cores: once training the BPE tokenizer, once reusing it
    (tokenize + shard only);
  * the loader's tokens/s on one core (TokenStream, workers=0, torch.set_num_threads(1)), over one
    stream (`tests.data_fixtures.one_stream`): shards read, sha256-verified, untarred, shuffled and
    batched into int64 tensors;
  * plain reads of the same tar files (no decoding), the physical limit of this disk / page cache;
  * their ratio. Both reads run with a warm page cache (the shard files were just written).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import sysconfig
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.data_fixtures import one_stream  # noqa: E402
from trainer.data.prepare import prepare  # noqa: E402
from trainer.data.stream import open_manifest  # noqa: E402

BLOCK_LEN = 2049  # seq_len 2048
SAMPLES_PER_SHARD = 64  # ~256 KB shards: enough shards for several streams on a ~5 MB corpus


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_prepare(files: list[str], out: str) -> dict:
    quiet = open(os.devnull, "w")  # prepare's progress goes to stderr
    stderr, sys.stderr = sys.stderr, quiet
    try:
        trained, t_train = timed(
            lambda: prepare(
                files, out, vocab_size=8192, block_len=BLOCK_LEN, samples_per_shard=SAMPLES_PER_SHARD
            )
        )
        tok = os.path.join(os.path.dirname(out), "tokenizer.json")
        shutil.copyfile(os.path.join(out, "tokenizer.json"), tok)
        again = out + "-reuse"
        _, t_reuse = timed(
            lambda: prepare(
                files, again, tokenizer=tok, block_len=BLOCK_LEN, samples_per_shard=SAMPLES_PER_SHARD
            )
        )
        shutil.rmtree(again)
    finally:
        sys.stderr = stderr
        quiet.close()
    tokens = trained.source["tokens"]
    return {"tokens": tokens, "train_s": t_train, "reuse_s": t_reuse}


def read_raw(paths: list[str]) -> int:
    n = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
    return n


def bench_raw(paths: list[str], tokens_per_pass: int, seconds: float) -> float:
    read_raw(paths)  # warm
    passes, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        read_raw(paths)
        passes += 1
    return passes * tokens_per_pass / (time.perf_counter() - t0)


def bench_loader(root: str, workers: int, seconds: float) -> float:
    m = open_manifest(root)
    stream = one_stream(root, m, seq_len=BLOCK_LEN - 1, batch=8, workers=workers)
    it = stream.batches(0)
    next(it)  # threads started, first shards read
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, y = next(it)
        tokens += x.shape[0] * (x.shape[1] + 1)  # tokens of the stored samples delivered
    rate = tokens / (time.perf_counter() - t0)
    it.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="where to write the corpus (default: a temp dir, removed)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time of each read benchmark")
    args = ap.parse_args()

    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    work = args.out or tempfile.mkdtemp(prefix="loader-bench-")
    root = os.path.join(work, "corpus")
    if os.path.exists(root):
        shutil.rmtree(root)
    cores = os.cpu_count() or 1
    try:
        p = bench_prepare(files, root)
        m = open_manifest(root)
        shards = m.splits["train"].shards
        paths = [os.path.join(root, s.name) for s in shards]
        tokens_per_pass = sum(s.tokens for s in shards)
        mb = sum(s.bytes for s in shards) / 1e6

        torch.set_num_threads(1)
        raw = bench_raw(paths, tokens_per_pass, args.seconds)
        loader = bench_loader(root, 0, args.seconds)
        loader2 = bench_loader(root, 2, args.seconds)

        print(f"corpus: {len(files)} files from {stdlib}, {p['tokens']:,} tokens")
        print(
            f"shards: {len(shards)} train shards, {mb:.1f} MB, {m.block_len} tokens x "
            f"{SAMPLES_PER_SHARD} samples each, {m.dtype}"
        )
        print(
            f"prepare, train BPE 8192 + tokenize + shard, {cores} cores: {p['tokens'] / p['train_s']:>12,.0f} tok/s"
            f"  ({p['train_s']:.1f} s)"
        )
        print(
            f"prepare, reuse tokenizer (tokenize + shard), {cores} cores: {p['tokens'] / p['reuse_s']:>12,.0f} tok/s"
            f"  ({p['reuse_s']:.1f} s)"
        )
        print(f"plain reads of the shard files (no decoding):      {raw:>12,.0f} tok/s")
        print(f"loader, workers=0, 1 torch thread:                  {loader:>12,.0f} tok/s")
        print(f"loader / plain reads:                               {loader / raw:>12.3f}")
        print(f"loader, workers=2 (threads), for reference:        {loader2:>12,.0f} tok/s")
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
