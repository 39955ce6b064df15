"""Streamed training batches whose position is a pure function of (manifest, seed, step).

The global sample order does not depend on the layout:

* Epoch e permutes the train shards with seed (seed, e). There are S logical streams; stream s
  reads shards perm[s], perm[s + S], ... and shuffles samples within each shard it opens.
* Global sample g of the epoch is sample g // S of stream g % S. Step j of the epoch is the
  global samples [j * GB, (j + 1) * GB), GB = global batch size.
* DP rank r takes the samples of each global batch with g % dp == r (S is a multiple of dp, so
  rank r only ever reads streams s with s % dp == r: no rank reads every shard). TP and PP peers
  of one DP rank get identical batches.
* An epoch is S * (shortest stream) samples rounded down to whole global batches, the same for
  every rank, so uneven shards can never leave one rank waiting in a collective.

Resuming at step k opens each owned stream directly at its sample (skipping whole shards by
their manifest counts), so a resume reads no more than one shard per stream to get there. The
checkpoint keeps `TokenStream.state_dict(step)`; `check_resume` refuses a state written for another
manifest fingerprint, seed, stream count or global batch.

Skipped samples: a `SkipList` of global sample ranges (whole global batches, numbered over all
epochs as if nothing were skipped) that the order leaves out: step k is the k-th global batch that
is not skipped. The ranges come from `data.skip_samples` and from the anomaly rollback
(trainer/anomaly.py); they travel in the data state, so a resume on any layout leaves them out too.

Reading: each shard a rank needs is a task (epoch, stream, shard, skip, take), and the tasks are
ordered by the global index of their first sample, which is the order the batch assembly asks for
them. With `workers=W` > 0, worker thread w owns every W-th of the rank's streams and reads its
tasks in that order into a bounded queue, so the consumer always finds its next shard at the head of
the owner's queue: the batches are the same for any W. A shard is only used once its sha256 matched
(see storage.py).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from trainer.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, load_manifest
from trainer.data.storage import Retry, check_root, is_remote, join, read_shard, read_text
from trainer.errors import PretrainError

if TYPE_CHECKING:  # torch is imported where batches are made: the driver checks a corpus without it
    import torch

    from trainer.config import Config

# Default S candidates: highly composite, so dp of 1, 2, 3, 4, 6, 8, 12, 16, ... all divide.
_STREAM_CHOICES = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


class DataError(PretrainError, ValueError):
    """The corpus cannot serve this run (too small, wrong block length, bad layout)."""


def open_manifest(root: str, retry: Retry | None = None) -> Manifest:
    """The corpus manifest of a local directory, an http(s) URL or an s3://bucket/prefix."""
    check_root(root)
    if is_remote(root):
        return Manifest.from_json(read_text(root, MANIFEST_NAME, retry), where=join(root, MANIFEST_NAME))
    return load_manifest(root)


def read_blocks(root: str, info: ShardInfo, manifest: Manifest, retry: Retry | None = None) -> np.ndarray:
    """(samples, block_len) tokens of one shard in stored order, after its sha256 and size checked out."""
    where = join(root, info.name)
    samples = read_shard(root, info.name, sha256=info.sha256, size=info.bytes, retry=retry)
    tokens = [s for s in samples if s.ext == "tokens"]
    if len(tokens) != info.samples:
        raise DataError(f"{where}: has {len(tokens)} samples, manifest says {info.samples}", path=where)
    dtype = np.dtype(manifest.dtype).newbyteorder("<")
    want = manifest.block_len * dtype.itemsize
    for i, s in enumerate(tokens):
        if len(s.data) != want:
            raise DataError(
                f"{where}: sample {i} (key {s.key}) has {len(s.data)} bytes, expected {want} "
                f"({manifest.block_len} x {manifest.dtype})",
                path=where,
            )
    blocks = np.frombuffer(b"".join(s.data for s in tokens), dtype=dtype)
    return blocks.reshape(info.samples, manifest.block_len)


def default_num_streams(num_shards: int) -> int:
    """About 4 shards per stream: an epoch is S x the shortest stream, so one short shard (the
    last one `prepare` writes) must not be a whole stream on its own."""
    return max(s for s in _STREAM_CHOICES if s <= max(1, num_shards // 4))


def _rng(*seed: int) -> np.random.Generator:
    return np.random.default_rng(list(seed))


class SkipList:
    """Global sample ranges [start, end) the order leaves out, each a whole number of global batches
    and numbered as if nothing were skipped; kept sorted and merged."""

    def __init__(self, global_batch: int, ranges=()):
        self.global_batch = global_batch
        self._steps: list[tuple[int, int]] = []  # the same ranges in global batches
        for a, b in ranges:
            self.add(a, b)

    def add(self, start: int, end: int, where: str = "data.skip_samples") -> None:
        gb = self.global_batch
        if not (0 <= start < end) or start % gb or end % gb:
            raise DataError(
                f"{where}: [{start}, {end}) must be a non-empty range of global sample numbers whose "
                f"ends are multiples of parallel.global_batch_size ({gb}): whole steps are skipped",
                field=where,
            )
        merged = sorted([*self._steps, (start // gb, end // gb)])
        self._steps = []
        for a, b in merged:
            if self._steps and a <= self._steps[-1][1]:
                self._steps[-1] = (self._steps[-1][0], max(b, self._steps[-1][1]))
            else:
                self._steps.append((a, b))

    @property
    def ranges(self) -> list[list[int]]:
        """The ranges as global sample numbers, [[start, end], ...] (JSON-ready)."""
        return [[a * self.global_batch, b * self.global_batch] for a, b in self._steps]

    @property
    def samples(self) -> int:
        return sum(b - a for a, b in self._steps) * self.global_batch

    def unskipped_step(self, step: int) -> int:
        """The global batch (counted as if nothing were skipped) that step `step` trains on."""
        for a, b in self._steps:
            if a > step:
                break
            step += b - a
        return step

    def step_samples(self, step: int) -> tuple[int, int]:
        """The global sample range [start, end) of step `step`."""
        u = self.unskipped_step(step)
        return u * self.global_batch, (u + 1) * self.global_batch

    def segments(self, step: int) -> Iterator[tuple[int, int | None]]:
        """From step `step` on: the runs [first, end) of global batches that are not skipped
        (counted as if nothing were skipped; end None = endless)."""
        u = self.unskipped_step(step)
        for a, b in self._steps:
            if b <= u:
                continue
            yield u, a
            u = b
        yield u, None


@dataclass(frozen=True)
class DataPosition:
    """Where the stream is: epoch and step within it, plus the global step it corresponds to."""

    epoch: int
    step_in_epoch: int
    step: int

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "step": self.step}


class EpochPlan:
    """Shard order and stream layout of one epoch (identical on every rank)."""

    def __init__(
        self,
        shard_samples: list[int],
        num_streams: int,
        global_batch: int,
        seed: int,
        epoch: int,
        shuffle: bool = True,
    ):
        n = len(shard_samples)
        perm = _rng(seed, epoch, 0).permutation(n) if shuffle else np.arange(n)
        self.stream_shards = [[int(i) for i in perm[s::num_streams]] for s in range(num_streams)]
        lengths = [sum(shard_samples[i] for i in shards) for shards in self.stream_shards]
        per_stream = min(lengths)
        self.steps = (per_stream * num_streams) // global_batch
        self.seed, self.epoch = seed, epoch


@dataclass(frozen=True)
class _ShardTask:
    """The part of one shard that one stream consumes in one epoch, in the order it is needed."""

    epoch: int
    stream: int
    shard: int  # index into the split's shards
    skip: int  # leading samples of the shuffled shard not used (consumed before a resume point)
    take: int  # samples used after `skip`
    first_g: int  # global sample index (within the epoch) of its first used sample


class TokenStream:
    """Micro batches of (inputs, targets), each (micro_batch, seq_len) int64, for one DP rank.

    `workers` > 0 reads and decodes shards in that many background threads, worker w owning every
    W-th of this rank's streams and reading its shards ahead in the order they will be needed. The
    output is the same whatever `workers` is: workers only change who reads, never the order.
    """

    def __init__(
        self,
        root: str,
        manifest,
        *,
        seq_len: int,
        micro_batch: int,
        global_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        num_streams: int = 0,
        split: str = "train",
        workers: int = 0,
        shuffle: bool = True,
        read_ahead: int = 2,
        retry: Retry | None = None,
        skip=(),
    ):
        check_root(root)
        self.root, self.manifest = root, manifest
        self.shards = manifest.splits[split].shards
        self.seq_len, self.micro_batch, self.global_batch = seq_len, micro_batch, global_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.shuffle, self.read_ahead, self.retry = shuffle, max(1, read_ahead), retry
        self.dtype = np.dtype(manifest.dtype).newbyteorder("<")
        self.num_streams = num_streams or default_num_streams(len(self.shards))
        if workers < 0:
            raise DataError(f"data loader workers must be >= 0, got {workers}", field="data.loader_workers")
        if seq_len + 1 > manifest.block_len:
            raise DataError(
                f"data.seq_len ({seq_len}) needs blocks of seq_len+1 tokens, but the corpus at {root} "
                f"stores blocks of {manifest.block_len}; lower data.seq_len or re-run `pretrain prepare` "
                f"with --block-len {seq_len + 1}",
                field="data.seq_len",
                path=root,
            )
        if self.num_streams > len(self.shards):
            raise DataError(
                f"data.num_streams ({self.num_streams}) exceeds the {len(self.shards)} train shards in {root}",
                field="data.num_streams",
                path=root,
            )
        if self.num_streams % dp_size:
            raise DataError(
                f"data.num_streams ({self.num_streams}) must be a multiple of the data-parallel size "
                f"({dp_size}); set data.num_streams to a multiple of {dp_size}",
                field="data.num_streams",
            )
        if global_batch % (micro_batch * dp_size):
            raise DataError(
                f"global batch {global_batch} is not a multiple of micro_batch*dp",
                field="parallel.global_batch_size",
            )
        self._counts = [s.samples for s in self.shards]
        self.skip = SkipList(global_batch, skip)  # global sample ranges the order leaves out
        # This rank's streams, and the worker (if any) that reads each.
        self.owned_streams = list(range(dp_rank, self.num_streams, dp_size))
        self.workers = min(workers, len(self.owned_streams))
        if self._plan(0).steps < 1:
            raise DataError(
                f"the corpus at {root} has too few samples for one global batch of {global_batch} "
                f"over {self.num_streams} streams; prepare more data or lower parallel.global_batch_size",
                field="parallel.global_batch_size",
                path=root,
            )

    def _plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(
            self._counts, self.num_streams, self.global_batch, self.seed, epoch, shuffle=self.shuffle
        )

    # ------------------------------------------------------------------ positions
    def position(self, step: int) -> DataPosition:
        """Position after `step` optimizer steps (pure function of manifest, seed, skips, step)."""
        epoch, left = self._unskipped_position(self.skip.unskipped_step(step))
        return DataPosition(epoch, left, step)

    def _unskipped_position(self, u: int) -> tuple[int, int]:
        """(epoch, global batch within it) of global batch `u`, counted as if nothing were skipped."""
        epoch = 0
        while True:
            n = self._plan(epoch).steps
            if u < n:
                return epoch, u
            epoch, u = epoch + 1, u - n

    def state_dict(self, step: int) -> dict:
        """The data state after `step` optimizer steps: all a checkpoint needs to resume the stream."""
        return {
            **self.position(step).state_dict(),
            "seed": self.seed,
            "num_streams": self.num_streams,
            "global_batch": self.global_batch,
            "shuffle": self.shuffle,
            "manifest_fingerprint": self.manifest.fingerprint,
            "skipped_samples": self.skip.ranges,
        }

    def check_resume(self, state: dict, force: bool = False) -> int:
        """The step to pass to `batches()` to resume from `state` (a `state_dict()`).

        Raises DataError if the state was written for another corpus or sample order (manifest
        fingerprint, seed, num_streams, global batch): resuming would repeat and skip samples.
        With `force`, the mismatch is accepted and the stream restarts from the state's step in
        this stream's own order. The DP size may differ: the global order does not depend on it."""
        if not isinstance(state.get("step"), int) or state["step"] < 0:
            raise DataError(
                f"not a data state (needs a 'step' >= 0, as TokenStream.state_dict writes): {state}"
            )
        if state.get("global_batch") == self.global_batch:  # ranges skipped before stay skipped
            for a, b in state.get("skipped_samples") or ():
                self.skip.add(a, b, where="the checkpoint's skipped_samples")
        mine = self.state_dict(state["step"])
        fields = ("manifest_fingerprint", "seed", "num_streams", "global_batch", "shuffle")
        theirs = {"shuffle": True, **state}  # states written before `shuffle` existed were shuffled
        diffs = [
            f"{k}: checkpoint {theirs.get(k)!r}, now {mine[k]!r}" for k in fields if theirs.get(k) != mine[k]
        ]
        if diffs and not force:
            raise DataError(
                f"cannot resume the data stream of {self.root}: it differs from the checkpoint's "
                f"({'; '.join(diffs)}). A different manifest fingerprint means the corpus was "
                "re-prepared or another corpus is configured; point data.path back at the original "
                "corpus and restore the other settings, or force the resume to accept a different "
                "sample order (samples may repeat or be skipped)",
                field="data.path",
                path=self.root,
            )
        pos = (state.get("epoch"), state.get("step_in_epoch"))
        if (
            not diffs
            and pos != (mine["epoch"], mine["step_in_epoch"])
            and state.get("skipped_samples") != mine["skipped_samples"]
        ):
            raise DataError(
                f"data.skip_samples {mine['skipped_samples']} skips samples before the checkpoint's "
                f"position (step {mine['step']}, which skipped {state.get('skipped_samples') or []}); "
                "only samples after the resumed step can be added",
                field="data.skip_samples",
            )
        if not diffs and pos != (mine["epoch"], mine["step_in_epoch"]):
            raise DataError(
                f"corrupt data state: step {mine['step']} is epoch {mine['epoch']} step "
                f"{mine['step_in_epoch']} of this corpus, the checkpoint says epoch {pos[0]} step {pos[1]}"
            )
        return mine["step"]

    # ------------------------------------------------------------------ schedule
    def _tasks(self, plan: EpochPlan, first_step: int) -> list[_ShardTask]:
        """The shard reads of this rank for one epoch from `first_step`, in the order they are needed."""
        S, GB = self.num_streams, self.global_batch
        g0, g_end = first_step * GB, plan.steps * GB
        tasks = []
        for s in self.owned_streams:
            start = max(0, -(-(g0 - s) // S))  # first stream index needed: ceil((g0 - s) / S)
            end = max(0, -(-(g_end - s) // S))  # stream indices < end are used in this epoch
            c = 0
            for shard in plan.stream_shards[s]:
                n = self._counts[shard]
                skip = max(0, start - c)
                take = min(n, end - c) - skip
                if take > 0:
                    tasks.append(_ShardTask(plan.epoch, s, shard, skip, take, (c + skip) * S + s))
                c += n
                if c >= end:
                    break
        tasks.sort(key=lambda t: t.first_g)
        return tasks

    def _epochs(self, u: int) -> Iterator[tuple[EpochPlan, int]]:
        epoch, first = self._unskipped_position(u)  # u: global batch counted as if nothing were skipped
        while True:
            yield self._plan(epoch), first
            epoch, first = epoch + 1, 0

    # ------------------------------------------------------------------ reading
    def _load(self, task: _ShardTask) -> np.ndarray:
        """(take, seq_len + 1) int64: the used samples of one shard, verified, in shuffled order."""
        blocks = read_blocks(self.root, self.shards[task.shard], self.manifest, self.retry)
        n = len(blocks)
        order = _rng(self.seed, task.epoch, 1, task.shard).permutation(n) if self.shuffle else np.arange(n)
        rows = order[task.skip : task.skip + task.take]
        return blocks[rows, : self.seq_len + 1].astype(np.int64)

    def _worker(self, w: int, start: int, out: queue.Queue, stop: threading.Event) -> None:
        """Read the shards of worker w's streams in need order, `read_ahead` ahead of the consumer."""
        mine = set(self.owned_streams[w :: self.workers])
        try:
            for plan, first in self._epochs(start):
                for task in self._tasks(plan, first):
                    if task.stream not in mine:
                        continue
                    try:
                        item: tuple = (task, self._load(task))
                    except BaseException as e:  # raised in the consumer when it reaches this shard
                        item = (task, e)
                    if not _put(out, item, stop) or isinstance(item[1], BaseException):
                        return
        except BaseException as e:  # a bug in planning: surface it rather than hang the consumer
            _put(out, (None, e), stop)

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless micro batches from `start_step`; GB / (mb * dp) of them make one optimizer step.
        Skipped ranges are not read: each run of unskipped global batches is opened at its start."""
        per_step = self.global_batch // (self.micro_batch * self.dp_size)
        for first, end in self.skip.segments(start_step):
            run = self._unskipped_batches(first)
            if end is None:
                yield from run
                return
            try:
                yield from itertools.islice(run, (end - first) * per_step)
            finally:
                run.close()  # stops its reader threads

    def _unskipped_batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless micro batches from global batch `start`, counted as if nothing were skipped."""
        stop = threading.Event()
        queues: list[queue.Queue] = []
        owner: dict[int, int] = {}
        for w in range(self.workers):
            queues.append(queue.Queue(maxsize=self.read_ahead))
            for s in self.owned_streams[w :: self.workers]:
                owner[s] = w
            threading.Thread(
                target=self._worker, args=(w, start, queues[w], stop), daemon=True, name=f"data-{w}"
            ).start()

        def fetch(task: _ShardTask) -> np.ndarray:
            if not queues:
                return self._load(task)
            got, rows = queues[owner[task.stream]].get()
            if isinstance(rows, BaseException):
                raise rows
            assert got == task, (got, task)  # workers read in exactly the consumer's order
            return rows

        try:
            for plan, first in self._epochs(start):
                yield from self._epoch_batches(plan, first, fetch)
        finally:
            stop.set()

    def _epoch_batches(
        self, plan: EpochPlan, first_step: int, fetch
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        S, GB, dp, mb = self.num_streams, self.global_batch, self.dp_size, self.micro_batch
        pending: dict[int, deque[_ShardTask]] = {s: deque() for s in self.owned_streams}
        for task in self._tasks(plan, first_step):
            pending[task.stream].append(task)
        chunk: dict[int, np.ndarray] = {}
        at: dict[int, int] = {s: 0 for s in self.owned_streams}
        buf: list[np.ndarray] = []
        import torch

        for g in range(first_step * GB + self.dp_rank, plan.steps * GB, dp):
            s = g % S
            rows = chunk.get(s)
            if rows is None or at[s] == len(rows):
                rows = chunk[s] = fetch(pending[s].popleft())
                at[s] = 0
            buf.append(rows[at[s]])
            at[s] += 1
            if len(buf) == mb:
                arr = torch.from_numpy(np.stack(buf))  # (mb, T+1)
                buf = []
                yield arr[:, :-1].contiguous(), arr[:, 1:].contiguous()


def train_stream(
    cfg: Config, manifest: Manifest, dp_rank: int, dp_size: int, workers: int = 0
) -> TokenStream:
    """The training stream of one DP rank for a run's config (the driver checks dp_rank 0 with it)."""
    return TokenStream(
        cfg.data.path,
        manifest,
        seq_len=cfg.data.seq_len,
        micro_batch=cfg.parallel.micro_batch_size,
        global_batch=cfg.parallel.global_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.train.seed,
        num_streams=cfg.data.num_streams,
        workers=workers,
        skip=[tuple(r) for r in cfg.data.skip_samples],
    )


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """q.put(item) unless `stop` is set first (the consumer went away); True if it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def prefetched(it: Iterator, depth: int) -> Iterator:
    """Run `it` in a daemon thread, `depth` items ahead (I/O and decode overlap the step)."""
    if depth <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()  # stop: the consumer closed this (a rollback)

    def work() -> None:
        try:
            for item in it:
                if not _put(q, item, stop):
                    break
            else:
                _put(q, done, stop)
        except BaseException as e:  # surfaced in the consumer
            _put(q, e, stop)
        finally:
            getattr(it, "close", lambda: None)()

    threading.Thread(target=work, daemon=True, name="data-prefetch").start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class ValStream:
    """Validation micro batches: the val split in stored order, sample g to DP rank g % dp."""

    def __init__(
        self,
        root: str,
        manifest,
        *,
        seq_len: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        retry: Retry | None = None,
    ):
        check_root(root)
        self.root, self.manifest, self.retry = root, manifest, retry
        self.shards = manifest.splits["val"].shards if "val" in manifest.splits else []
        self.seq_len, self.mb, self.r, self.dp = seq_len, micro_batch, dp_rank, dp_size

    def batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first n micro batches of this rank (the same n for every rank; cycles if short)."""
        total = sum(s.samples for s in self.shards)
        need = n * self.mb * self.dp
        if total == 0:
            raise DataError(f"the corpus at {self.root} has no validation split", path=self.root)
        import torch

        out, buf, g = [], [], 0
        while len(out) < n:
            for info in self.shards:
                for block in read_blocks(self.root, info, self.manifest, self.retry):
                    if g % self.dp == self.r:
                        buf.append(block[: self.seq_len + 1])
                        if len(buf) == self.mb:
                            arr = torch.from_numpy(np.stack(buf).astype(np.int64))
                            out.append((arr[:, :-1].contiguous(), arr[:, 1:].contiguous()))
                            buf = []
                    g += 1
                    if g >= need or len(out) == n:
                        return out
        return out
