"""Weighted mixing (`data.sources`): what the schedule and the mixed reader cost.

    python benchmarks/mixing.py [--out DIR] [--seconds 2] [--rounds 5]

Prints, from one run:
  * the time to build the mixture's period (Tijdeman's rule, once per rank at start) for 2 and 6
    sources, at a short period (weights 7:3) and at the longest accepted (65,536 samples);
  * tokens/s on one core of the loader over a 2-source mixture (MixedStream, weights 0.7/0.3) against
    the one-corpus loader (TokenStream) over the larger source, on the same shards (the Python
    stdlib's top-level modules split in two, one tokenizer, blocks of 2049 tokens); and of DP rank 0
    of 4 over the same mixture, which reads every shard for a quarter of its samples. The three run
    interleaved `--rounds` times; medians.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import sysconfig
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.config import SourceConfig, mix_weights  # noqa: E402
from trainer.data.mixing import MixedStream, MixSchedule, Source  # noqa: E402
from trainer.data.prepare import prepare  # noqa: E402
from trainer.data.stream import TokenStream, open_manifest  # noqa: E402

BLOCK_LEN = 2049
SAMPLES_PER_SHARD = 64
SEQ = BLOCK_LEN - 1


def schedule_build_s(weights: list[float]) -> tuple[int, float]:
    m = mix_weights([SourceConfig(path="x", weight=w) for w in weights])
    t0 = time.perf_counter()
    schedule = MixSchedule(m)
    return schedule.period, time.perf_counter() - t0


def tokens_per_s(batches, seconds: float) -> float:
    next(batches)  # the first shard's read is start-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, _ = next(batches)
        n += x.numel()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)

    for weights in ([7, 3], [7, 3, 2, 1, 1, 1], [1, 65535], [30001, 20000, 10000, 5000, 500, 35]):
        period, s = schedule_build_s(weights)
        print(f"schedule: {len(weights)} sources, period {period}: built in {s * 1000:.1f} ms")

    out = args.out or tempfile.mkdtemp(prefix="bench-mix-")
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    quiet = open(os.devnull, "w")  # prepare's progress goes to stderr
    stderr, sys.stderr = sys.stderr, quiet
    try:
        a = os.path.join(out, "a")
        prepare(files[::2], a, vocab_size=8192, block_len=BLOCK_LEN, samples_per_shard=SAMPLES_PER_SHARD)
        b = os.path.join(out, "b")
        tok = os.path.join(a, "tokenizer.json")
        prepare(files[1::2], b, tokenizer=tok, block_len=BLOCK_LEN, samples_per_shard=SAMPLES_PER_SHARD)
    finally:
        sys.stderr = stderr
    ma, mb = open_manifest(a), open_manifest(b)
    print(
        f"corpora: {ma.splits['train'].samples} and {mb.splits['train'].samples} samples of {BLOCK_LEN} tokens"
    )

    gb = 32
    single = TokenStream(a, ma, seq_len=SEQ, micro_batch=8, global_batch=gb, dp_rank=0, dp_size=1, seed=0)
    sources = [Source("a", a, ma, 7), Source("b", b, mb, 3)]

    def mixed(dp: int) -> MixedStream:
        return MixedStream(
            sources, seq_len=SEQ, micro_batch=8, global_batch=gb, dp_rank=0, dp_size=dp, seed=0
        )

    runs: dict[str, list[float]] = {"one": [], "mix": [], "mix4": []}
    for _ in range(args.rounds):  # interleaved, median: this shared machine's speed drifts
        runs["one"].append(tokens_per_s(single.batches(), args.seconds))
        runs["mix"].append(tokens_per_s(mixed(1).batches(), args.seconds))
        runs["mix4"].append(tokens_per_s(mixed(4).batches(), args.seconds))
    one, mix, mix4 = (statistics.median(runs[k]) for k in ("one", "mix", "mix4"))
    print(f"one corpus (TokenStream):   {one:,.0f} tokens/s")
    print(f"mixture 0.7/0.3, dp 1:      {mix:,.0f} tokens/s  ({mix / one:.2f}x one corpus)")
    print(f"mixture 0.7/0.3, rank 0/4:  {mix4:,.0f} tokens/s  ({mix4 / one:.2f}x one corpus)")


if __name__ == "__main__":
    main()
