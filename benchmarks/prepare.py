"""Throughput of `pretrain prepare`'s cleaning and near-duplicate stages, MinHash against libraries.

    python benchmarks/prepare.py [--mb 8] [--json out.json]

Prints MB of text per CPU-second on one core of each cleaning filter (default thresholds) on
sentence-like documents that pass them all (so every rule is evaluated), and, on the same synthetic documents (English-like words, 200-2,000 per document), MB of text
per CPU-second on one core for each MinHash implementation that is importable, each computing
112 (14 bands x 8 rows) MinHash values over the 5-word shingles of every document:

  * rensa (chosen): the stage of trainer/data/dedup.py (normalize, shingle, RMinHash, band keys);
  * datasketch (`pip install datasketch`): MinHash(num_perm=112).update_batch on the same shingles;
  * numpy (ours): 64-bit word hashes combined into shingle hashes, 112 seeded (a x + b) mod 2^61-1.

CPU time (time.process_time), not wall time, so that other work on a shared machine does not
count. rensa and datasketch read the same shingles (normalized words, joined by spaces).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from trainer.data.dedup import MinHasher, hash64, normalize, shingles  # noqa: E402

NUM_PERM = 112  # 14 bands x 8 rows
SHINGLE = 5


def make_documents(megabytes: float, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(50_000)]
    docs, size = [], 0
    while size < megabytes * 1e6:
        words = rng.choices(vocab, k=rng.randint(200, 2000))
        text = " ".join(words) + "."
        docs.append(text)
        size += len(text.encode())
    return docs


def chosen(docs: list[str]) -> None:
    """The stage itself: normalize, shingle, rensa MinHash, band keys."""
    hasher = MinHasher(bands=14, rows=8, shingle_words=SHINGLE)
    for d in docs:
        hasher.band_keys(d)


def datasketch_minhash(docs: list[str]) -> None:
    from datasketch import MinHash

    for d in docs:
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch([s.encode() for s in shingles(d, SHINGLE)])
        m.digest()


_MASK61 = np.uint64((1 << 61) - 1)


def numpy_minhash(docs: list[str]) -> None:
    """Ours in numpy: 64-bit word hashes (blake2b), shingle hashes combined in uint64, then
    min over (a x + b) mod 2^61-1 for 112 seeded (a, b)."""
    rng = np.random.default_rng(0)
    a = rng.integers(1, (1 << 61) - 1, NUM_PERM, dtype=np.uint64)
    b = rng.integers(0, (1 << 61) - 1, NUM_PERM, dtype=np.uint64)
    for d in docs:
        words = normalize(d).split()
        ids = {w: hash64(w.encode()) for w in set(words)}
        w = np.fromiter((ids[x] for x in words), dtype=np.uint64, count=len(words))
        k = min(SHINGLE, len(w))
        h = np.zeros(len(w) - k + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(k):
                h = h * np.uint64(0x100000001B3) + w[j : len(w) - k + 1 + j]
            x = (np.unique(h) & _MASK61)[:, None]
            (((x * a[None, :]) + b[None, :]) & _MASK61).min(axis=0)


IMPLEMENTATIONS = {
    "rensa (chosen)": (chosen, "rensa"),
    "datasketch": (datasketch_minhash, "datasketch"),
    "numpy (ours)": (numpy_minhash, None),
}


def clean_rates(megabytes: float) -> dict[str, float]:
    """MB per CPU-second of each rule filter and of all of them in a row."""
    from tests.test_clean import Writer
    from trainer.data.clean import clean_document, make_recipe

    w = Writer(0)
    docs, size = [], 0
    while size < megabytes * 1e6:
        docs.append(w.doc(lines=20))
        size += len(docs[-1].encode())
    recipe = make_recipe(filters="min_length,gopher_quality,gopher_repetition,c4,fineweb")
    rates = {}
    for f in recipe.filters:
        t0 = time.process_time()
        for d in docs:
            f(d)
        rates[f.name] = size / 1e6 / (time.process_time() - t0)
    t0 = time.process_time()
    for d in docs:
        clean_document(d, recipe.filters)
    rates["all five"] = size / 1e6 / (time.process_time() - t0)
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=8.0, help="MB of text (default 8)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    print(f"cleaning, {args.mb:.0f} MB of documents that pass every rule, one core:")
    cleaning = clean_rates(args.mb)
    for name, rate in cleaning.items():
        print(f"  {name:<18} {rate:8.2f} MB/s per core")
    docs = make_documents(args.mb)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"{len(docs):,} documents, {mb:.1f} MB, {NUM_PERM} permutations, {SHINGLE}-word shingles, one core")
    results = {}
    for name, (fn, module) in IMPLEMENTATIONS.items():
        if module is not None:
            try:
                __import__(module)
            except ImportError:
                print(f"  {name:<14} not installed (pip install {module})")
                continue
        t0 = time.process_time()
        fn(docs)
        cpu = time.process_time() - t0
        results[name] = mb / cpu
        print(f"  {name:<14} {mb / cpu:8.2f} MB/s per core  ({cpu:.1f} CPU-s)")
    base = results.get("rensa (chosen)")
    for name, rate in results.items():
        if base and name != "rensa (chosen)":
            print(f"  rensa (chosen) / {name} = {base / rate:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"documents": len(docs), "mb": mb, "mb_per_cpu_s": results, "cleaning": cleaning}, f, indent=1
            )


if __name__ == "__main__":
    main()
