"""A weighted mixture of prepared corpora, streamed in an order that is a pure function of
(manifests, weights, seed, position).

Three pure parts, then the reader:

* `MixSchedule`: which source global sample G (counted from the start of training) comes from.
  The weights are made the smallest integers in the same ratio (`mix_weights`, 0.7/0.3 -> 7/3);
  their sum P is the period. One period is built once with Tijdeman's chairman-assignment rule
  (Tijdeman 1980: each source's count stays within 1 - 1/(2K-2) of weight/sum * position at every
  point), and it repeats exactly, since each period holds every source's integer weight. So
  source k's count among the first G samples is (G // P) * m_k + count_k(G % P): a closed form,
  and a resume at any step is a lookup, never a replay.
* `SourceOrder`: the j-th sample (j = 0, 1, ... over all its epochs) of one source. Each source has
  its own epochs, as a single corpus does (shard permutation per epoch over its own S streams,
  samples shuffled within each shard), seeded by (seed, source index): a source that runs out starts
  its next epoch without touching another's order.
* Global sample G of step j is [j * GB, (j + 1) * GB); DP rank r takes G % dp == r, as for one
  corpus, so the batches do not depend on the layout.

`MixedStream.samples()` yields (source, index) positions before any shard is read: the one place
to drop or remap samples (a skip list) without touching the schedule. Unlike one corpus, a rank's
samples come from every stream of every source, so each rank reads every shard it needs a sample of
(with many DP ranks, most shards). `data.loader_workers` threads read the next shards ahead in the
order they are needed (the batches never depend on it), and `data.prefetch` applies as for one corpus.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from trainer.config import mix_weights, source_name
from trainer.data.manifest import Manifest
from trainer.data.storage import Retry, check_root
from trainer.data.stream import (
    DataError,
    EpochPlan,
    SkipList,
    default_num_streams,
    open_manifest,
    read_blocks,
    train_stream,
)
from trainer.errors import PretrainError

if TYPE_CHECKING:
    import torch

    from trainer.config import Config


# Every rank holds the open shard of each stream of every source (it takes samples from all of them),
# so a source's streams are capped: about 4 shards a stream as for one corpus, at most this many.
MAX_SOURCE_STREAMS = 64


class MixSchedule:
    """Which source each global sample comes from, for integer weights `m` (period P = sum(m))."""

    def __init__(self, weights: list[int]):
        self.m = np.asarray(weights, dtype=np.int64)
        self.period = int(self.m.sum())
        self.order = _chairman_order(weights)  # (P,) source of each sample of a period
        self.cum = np.zeros((self.period + 1, len(weights)), dtype=np.int64)  # (P+1, K) counts before r
        self.cum[1:] = np.cumsum(np.eye(len(weights), dtype=np.int64)[self.order], axis=0)

    def counts(self, g: int) -> np.ndarray:
        """(K,) samples of each source among the first `g` global samples."""
        q, r = divmod(g, self.period)
        return q * self.m + self.cum[r]

    def at(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For global samples `g` (int array): their source and their index within that source."""
        q, r = np.divmod(g, self.period)
        src = self.order[r]
        return src, q * self.m[src] + self.cum[r, src]


def _chairman_order(m: list[int]) -> np.ndarray:
    """One period of Tijdeman's rule for integer weights m: at each step the sources that are not
    ahead of their share by more than 1 - 1/(2K-2) are eligible, and the one whose next sample is due
    first is chosen (ties: the lower index). Exact integer arithmetic, so every machine agrees."""
    k, period = len(m), sum(m)
    if k == 1:
        return np.zeros(period, dtype=np.int64)
    d = 2 * k - 2  # sigma = 1 - 1/d
    # Deadlines (c*d + d - 1) / m_i, compared as integers over the common denominator lcm(m).
    over = [math.lcm(*m) // w for w in m]
    c = [0] * k
    out = np.empty(period, dtype=np.int64)
    for n in range(1, period + 1):
        best, best_key = -1, None
        for i in range(k):
            if d * (n * m[i] - c[i] * period) >= period:  # behind by at least 1/d of a sample
                key = (c[i] * d + d - 1) * over[i]
                if best_key is None or key < best_key:
                    best, best_key = i, key
        assert best >= 0, (m, n)  # Tijdeman: some source is always eligible
        c[best] += 1
        out[n - 1] = best
    return out


def _source_seed(seed: int, index: int) -> int:
    """Each source's own seed: two sources never share an order, and neither depends on the other."""
    return int(np.random.SeedSequence([seed, 0x6D6978, index]).generate_state(1)[0])


class SourceOrder:
    """Sample j of one source over its epochs: (epoch, stream, shard, row of the stored shard).

    Every epoch has the same length, S x the fewest samples any stream can get (the n // S smallest
    shards), whatever that epoch's permutation: the epoch of sample j is j // length, a closed form
    at any position. A stream that got more samples leaves the rest unused, as the shortest stream
    does for one corpus."""

    def __init__(self, manifest: Manifest, seed: int):
        self.counts = [s.samples for s in manifest.splits["train"].shards]
        self.num_streams = min(default_num_streams(len(self.counts)), MAX_SOURCE_STREAMS)
        self.seed = seed
        fewest = sum(sorted(self.counts)[: len(self.counts) // self.num_streams])
        self.epoch_len = self.num_streams * fewest
        self._epochs: dict[int, tuple[list[list[int]], list[list[int]]]] = {}  # a few recent ones

    def _epoch(self, e: int) -> tuple[list[list[int]], list[list[int]]]:
        """Epoch e's shards of each stream and their cumulative sample counts."""
        if e not in self._epochs:
            if len(self._epochs) >= 4:  # the reader moves forward: the oldest is done with
                del self._epochs[min(self._epochs)]
            plan = EpochPlan(self.counts, self.num_streams, 1, self.seed, e)  # its shard permutation
            acc = [
                np.concatenate([[0], np.cumsum([self.counts[i] for i in sh])]).tolist()
                for sh in plan.stream_shards
            ]
            self._epochs[e] = (plan.stream_shards, acc)
        return self._epochs[e]

    def locate(self, j: int) -> tuple[int, int, int, int]:
        """(epoch, stream, shard, t) of sample j: it is row t of the shard in `shuffled_rows` order."""
        e, i = divmod(j, self.epoch_len)
        s, t = i % self.num_streams, i // self.num_streams
        shards, acc = self._epoch(e)
        pos = bisect.bisect_right(acc[s], t) - 1
        return e, s, shards[s][pos], t - acc[s][pos]

    def shuffled_rows(self, epoch: int, shard: int) -> np.ndarray:
        """The order in which one epoch uses a shard's rows."""
        rng = np.random.default_rng([self.seed, epoch, 1, shard])
        return rng.permutation(self.counts[shard])


@dataclass(frozen=True)
class Source:
    """One opened source of the mixture."""

    name: str
    root: str
    manifest: Manifest
    weight: int  # integer weight in the mixture's ratio


def open_sources(cfg: Config, retry: Retry | None = None) -> list[Source]:
    """The mixture's sources, each manifest read and checked: present, readable, long enough
    blocks, and all tokenized with one tokenizer (DataError naming the source otherwise)."""
    d = cfg.data
    out: list[Source] = []
    for i, (src, weight) in enumerate(zip(d.sources, mix_weights(d.sources), strict=True)):
        where, name = f"data.sources[{i}]", source_name(src)
        try:
            check_root(src.path)
            manifest = open_manifest(src.path, retry)
        except PretrainError as e:
            raise DataError(
                f"{where} ({name}): {e}", field=f"{where}.path", path=e.path or src.path
            ) from None
        if d.seq_len + 1 > manifest.block_len:
            raise DataError(
                f"{where} ({name}) at {src.path} stores blocks of {manifest.block_len} tokens; data.seq_len "
                f"({d.seq_len}) needs {d.seq_len + 1}: lower data.seq_len or re-prepare it with "
                f"--block-len {d.seq_len + 1}",
                field="data.seq_len",
                path=src.path,
            )
        if manifest.splits["train"].samples == 0:
            raise DataError(f"{where} ({name}) at {src.path} has no training samples", field=f"{where}.path")
        if out:
            first = out[0].manifest
            mine = (manifest.tokenizer_sha256, manifest.vocab_size, manifest.eos_id)
            theirs = (first.tokenizer_sha256, first.vocab_size, first.eos_id)
            if mine != theirs:
                raise DataError(
                    f"{where} ({name} at {src.path}) was tokenized with another tokenizer than "
                    f"data.sources[0] ({out[0].name} at {out[0].root}): tokenizer sha256 {mine[0][:12]} "
                    f"vs {theirs[0][:12]}, vocab {mine[1]} vs {theirs[1]}; prepare every source with the "
                    "same `pretrain prepare --tokenizer tokenizer.json`",
                    field=f"{where}.path",
                    path=src.path,
                )
        out.append(Source(name, src.path, manifest, weight))
    return out


def mixture_fingerprint(sources: list[Source]) -> str:
    """A hash of what fixes the mixture's order besides the seed: names, manifests, weights."""
    body = [[s.name, s.manifest.fingerprint, s.weight] for s in sources]
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()[:16]


class MixedStream:
    """Micro batches of (inputs, targets), each (micro_batch, seq_len) int64, for one DP rank of a
    weighted mixture; the same interface as `TokenStream` (batches, state_dict, check_resume)."""

    def __init__(
        self,
        sources: list[Source],
        *,
        seq_len: int,
        micro_batch: int,
        global_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        workers: int = 0,
        read_ahead: int = 2,
        retry: Retry | None = None,
        skip=(),
    ):
        if workers < 0:
            raise DataError(f"data loader workers must be >= 0, got {workers}", field="data.loader_workers")
        if global_batch % (micro_batch * dp_size):
            raise DataError(
                f"global batch {global_batch} is not a multiple of micro_batch*dp",
                field="parallel.global_batch_size",
            )
        self.sources, self.retry = sources, retry
        self.workers, self.read_ahead = workers, max(1, read_ahead)
        self.seq_len, self.micro_batch, self.global_batch = seq_len, micro_batch, global_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.schedule = MixSchedule([s.weight for s in sources])
        self.orders = [SourceOrder(s.manifest, _source_seed(seed, i)) for i, s in enumerate(sources)]
        self.fingerprint = mixture_fingerprint(sources)
        self.skip = SkipList(global_batch, skip)  # global sample ranges the order leaves out (stream.py)

    # ------------------------------------------------------------------ positions
    def samples_used(self, step: int) -> dict[str, int]:
        """Samples taken from each source in the first `step` optimizer steps."""
        counts = self.schedule.counts(self.skip.unskipped_step(step) * self.global_batch)
        return {s.name: int(c) for s, c in zip(self.sources, counts, strict=True)}

    def window_metrics(self, first_step: int, end_step: int) -> dict[str, float]:
        """`tokens/<source>`: tokens trained on from each source in steps [first_step, end_step)."""
        gb = self.global_batch
        got = self.schedule.counts(end_step * gb) - self.schedule.counts(first_step * gb)
        return {f"tokens/{s.name}": float(n * self.seq_len) for s, n in zip(self.sources, got, strict=True)}

    def state_dict(self, step: int) -> dict:
        """The data state after `step` optimizer steps: all a checkpoint needs to resume the stream."""
        return {
            "step": step,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "manifest_fingerprint": self.fingerprint,
            "sources": {
                s.name: {"manifest": s.manifest.fingerprint, "weight": s.weight} for s in self.sources
            },
            "samples_used": self.samples_used(step),
            "skipped_samples": self.skip.ranges,
        }

    def check_resume(self, state: dict, force: bool = False) -> int:
        """The step to resume at from `state`; DataError if it was written for another mixture
        (sources, manifests, weights), seed or global batch, unless `force`. The DP size may differ."""
        if not isinstance(state.get("step"), int) or state["step"] < 0:
            raise DataError(f"not a data state (needs a 'step' >= 0): {state}")
        if state.get("global_batch") == self.global_batch:  # ranges skipped before stay skipped
            for a, b in state.get("skipped_samples") or ():
                self.skip.add(a, b, where="the checkpoint's skipped_samples")
        mine = self.state_dict(state["step"])
        fields = ("manifest_fingerprint", "seed", "global_batch", "sources")
        diffs = [
            f"{k}: checkpoint {state.get(k)!r}, now {mine[k]!r}" for k in fields if state.get(k) != mine[k]
        ]
        if diffs and not force:
            raise DataError(
                f"cannot resume the data mixture: it differs from the checkpoint's ({'; '.join(diffs)}); "
                "restore data.sources (paths, weights, names) and the seed, or force the resume to accept "
                "a different sample order (samples may repeat or be skipped)",
                field="data.sources",
            )
        return mine["step"]

    # ------------------------------------------------------------------ reading
    def samples(self, start_step: int) -> Iterator[tuple[int, int]]:
        """(source, index within the source) of this rank's samples from `start_step` on, in order."""
        gb, dp = self.global_batch, self.dp_size
        step = start_step
        while True:
            u = self.skip.unskipped_step(step)  # skipped global batches are never read
            g = np.arange(u * gb + self.dp_rank, (u + 1) * gb, dp, dtype=np.int64)
            src, idx = self.schedule.at(g)
            yield from zip(src.tolist(), idx.tolist(), strict=True)
            step += 1

    def _shard_reads(self, start_step: int) -> Iterator[tuple[int, int, int, int]]:
        """(source, stream, epoch, shard) of each shard this rank opens from `start_step`, in the
        order `batches` needs them (each once: a stream moves on, never back)."""
        reading: dict[tuple[int, int], tuple[int, int]] = {}
        for k, j in self.samples(start_step):
            epoch, stream, shard, _ = self.orders[k].locate(j)
            if reading.get((k, stream)) != (epoch, shard):
                reading[(k, stream)] = (epoch, shard)
                yield k, stream, epoch, shard

    def _load(self, k: int, epoch: int, shard: int) -> np.ndarray:
        """(samples, block_len) blocks of one shard of source k, verified, in the epoch's shuffled order."""
        src = self.sources[k]
        blocks = read_blocks(src.root, src.manifest.splits["train"].shards[shard], src.manifest, self.retry)
        return blocks[self.orders[k].shuffled_rows(epoch, shard)]

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless micro batches from `start_step`; GB / (mb * dp) of them make one optimizer step.
        With `workers` > 0, that many threads read the next shards ahead, in the order they are needed."""
        import torch

        reads = self._shard_reads(start_step)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mix-data") if self.workers else None
        ahead: deque[tuple[tuple[int, int, int, int], Future]] = deque()

        def next_shard() -> tuple[tuple[int, int, int, int], np.ndarray]:
            if pool is None:
                key = next(reads)
                return key, self._load(key[0], key[2], key[3])
            while len(ahead) < self.workers * self.read_ahead:
                key = next(reads)
                ahead.append((key, pool.submit(self._load, key[0], key[2], key[3])))
            key, future = ahead.popleft()
            return key, future.result()  # a failed read raises here, when its shard is reached

        # Per source and stream, the shard it is reading: ((epoch, shard), its blocks in shuffled order).
        held: dict[tuple[int, int], tuple[tuple[int, int], np.ndarray]] = {}
        buf: list[np.ndarray] = []
        try:
            for k, j in self.samples(start_step):
                epoch, stream, shard, t = self.orders[k].locate(j)
                if held.get((k, stream), ((-1, -1),))[0] != (epoch, shard):
                    key, blocks = next_shard()
                    assert key == (k, stream, epoch, shard), (key, k, stream, epoch, shard)  # same walk
                    held[(k, stream)] = ((epoch, shard), blocks)
                buf.append(held[(k, stream)][1][t, : self.seq_len + 1].astype(np.int64))
                if len(buf) == self.micro_batch:
                    arr = torch.from_numpy(np.stack(buf))  # (mb, T+1)
                    buf = []
                    yield arr[:, :-1].contiguous(), arr[:, 1:].contiguous()
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


def corpus_stream(cfg: Config, manifest: Manifest, dp_rank: int, dp_size: int, workers: int = 0):
    """The training stream of one DP rank: the mixture of `data.sources`, else the corpus `manifest`
    (of data.path)."""
    if not cfg.data.sources:
        return train_stream(cfg, manifest, dp_rank, dp_size, workers)
    return MixedStream(
        open_sources(cfg),
        seq_len=cfg.data.seq_len,
        micro_batch=cfg.parallel.micro_batch_size,
        global_batch=cfg.parallel.global_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.train.seed,
        workers=workers,
        skip=[tuple(r) for r in cfg.data.skip_samples],
    )
