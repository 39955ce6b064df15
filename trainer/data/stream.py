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
their manifest counts), so a resume reads no more than one shard per stream to get there.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from trainer.data.manifest import MANIFEST_NAME, Manifest, load_manifest
from trainer.data.storage import is_remote, join, open_shard, read_text

# Default S candidates: highly composite, so dp of 1, 2, 3, 4, 6, 8, 12, 16, ... all divide.
_STREAM_CHOICES = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


class DataError(ValueError):
    """The corpus cannot serve this run (too small, wrong block length, bad layout)."""


def open_manifest(root: str) -> Manifest:
    """The corpus manifest of a local directory or an http(s) root."""
    if is_remote(root):
        return Manifest.from_json(read_text(root, MANIFEST_NAME), where=join(root, MANIFEST_NAME))
    return load_manifest(root)


def default_num_streams(num_shards: int) -> int:
    return max(s for s in _STREAM_CHOICES if s <= max(1, num_shards))


def _rng(*seed: int) -> np.random.Generator:
    return np.random.default_rng(list(seed))


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

    def __init__(self, shard_samples: list[int], num_streams: int, global_batch: int, seed: int, epoch: int):
        perm = _rng(seed, epoch, 0).permutation(len(shard_samples))
        self.stream_shards = [[int(i) for i in perm[s::num_streams]] for s in range(num_streams)]
        lengths = [sum(shard_samples[i] for i in shards) for shards in self.stream_shards]
        per_stream = min(lengths)
        self.steps = (per_stream * num_streams) // global_batch
        self.seed, self.epoch = seed, epoch


class TokenStream:
    """Micro batches of (inputs, targets), each (micro_batch, seq_len) int64, for one DP rank."""

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
    ):
        self.root, self.manifest = root, manifest
        self.shards = manifest.splits[split].shards
        self.seq_len, self.micro_batch, self.global_batch = seq_len, micro_batch, global_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.dtype = np.dtype(manifest.dtype).newbyteorder("<")
        self.num_streams = num_streams or default_num_streams(len(self.shards))
        if seq_len + 1 > manifest.block_len:
            raise DataError(
                f"data.seq_len ({seq_len}) needs blocks of seq_len+1 tokens, but the corpus at {root} "
                f"stores blocks of {manifest.block_len}; lower data.seq_len or re-run `pretrain prepare` "
                f"with --block-len {seq_len + 1}"
            )
        if self.num_streams > len(self.shards):
            raise DataError(
                f"data.num_streams ({self.num_streams}) exceeds the {len(self.shards)} train shards in {root}"
            )
        if self.num_streams % dp_size:
            raise DataError(
                f"data.num_streams ({self.num_streams}) must be a multiple of the data-parallel size "
                f"({dp_size}); set data.num_streams to a multiple of {dp_size}"
            )
        if global_batch % (micro_batch * dp_size):
            raise DataError(f"global batch {global_batch} is not a multiple of micro_batch*dp")
        self._counts = [s.samples for s in self.shards]
        if EpochPlan(self._counts, self.num_streams, global_batch, seed, 0).steps < 1:
            raise DataError(
                f"the corpus at {root} has too few samples for one global batch of {global_batch} "
                f"over {self.num_streams} streams; prepare more data or lower parallel.global_batch_size"
            )

    # ------------------------------------------------------------------ positions
    def position(self, step: int) -> DataPosition:
        """Position after `step` optimizer steps (pure function of manifest, seed, step)."""
        epoch, left = 0, step
        while True:
            n = EpochPlan(self._counts, self.num_streams, self.global_batch, self.seed, epoch).steps
            if left < n:
                return DataPosition(epoch, left, step)
            epoch, left = epoch + 1, left - n

    # ------------------------------------------------------------------ reading
    def _stream_samples(self, plan: EpochPlan, s: int, start: int) -> Iterator[np.ndarray]:
        """Samples of stream s from index `start`, shuffled within each shard by (seed, epoch, shard)."""
        skip = start
        for shard_idx in plan.stream_shards[s]:
            n = self._counts[shard_idx]
            if skip >= n:
                skip -= n
                continue
            blocks = self._read_shard(shard_idx)
            order = _rng(self.seed, plan.epoch, 1, shard_idx).permutation(n)
            for i in order[skip:]:
                yield blocks[i]
            skip = 0

    def _read_shard(self, shard_idx: int) -> list[np.ndarray]:
        info = self.shards[shard_idx]
        blocks = [np.frombuffer(data, dtype=self.dtype) for data in open_shard(self.root, info.name)]
        if len(blocks) != info.samples:
            raise DataError(
                f"{self.root}/{info.name}: has {len(blocks)} samples, manifest says {info.samples}"
            )
        return blocks

    def _epoch_batches(self, epoch: int, first_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = EpochPlan(self._counts, self.num_streams, self.global_batch, self.seed, epoch)
        S, GB, dp, r = self.num_streams, self.global_batch, self.dp_size, self.dp_rank
        g0 = first_step * GB
        readers = {
            s: self._stream_samples(plan, s, max(0, -(-(g0 - s) // S)))  # ceil((g0 - s) / S)
            for s in range(r, S, dp)
        }
        T, mb = self.seq_len, self.micro_batch
        buf: list[np.ndarray] = []
        for g in range(g0 + r, plan.steps * GB, dp):
            block = next(readers[g % S])
            buf.append(block[: T + 1])
            if len(buf) == mb:
                arr = torch.from_numpy(np.stack(buf).astype(np.int64))  # (mb, T+1)
                buf = []
                yield arr[:, :-1].contiguous(), arr[:, 1:].contiguous()

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless micro batches from `start_step`; GB / (mb * dp) of them make one optimizer step."""
        pos = self.position(start_step)
        epoch, first = pos.epoch, pos.step_in_epoch
        while True:
            yield from self._epoch_batches(epoch, first)
            epoch, first = epoch + 1, 0


def prefetched(it: Iterator, depth: int) -> Iterator:
    """Run `it` in a daemon thread, `depth` items ahead (I/O and decode overlap the step)."""
    if depth <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for item in it:
                q.put(item)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)
        q.put(done)

    threading.Thread(target=work, daemon=True, name="data-prefetch").start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


class ValStream:
    """Validation micro batches: the val split in stored order, sample g to DP rank g % dp."""

    def __init__(self, root: str, manifest, *, seq_len: int, micro_batch: int, dp_rank: int, dp_size: int):
        self.root, self.manifest = root, manifest
        self.shards = manifest.splits["val"].shards if "val" in manifest.splits else []
        self.seq_len, self.mb, self.r, self.dp = seq_len, micro_batch, dp_rank, dp_size
        self.dtype = np.dtype(manifest.dtype).newbyteorder("<")

    def batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first n micro batches of this rank (the same n for every rank; cycles if short)."""
        total = sum(s.samples for s in self.shards)
        need = n * self.mb * self.dp
        if total == 0:
            raise DataError(f"the corpus at {self.root} has no validation split")
        out, buf, g = [], [], 0
        while len(out) < n:
            for info in self.shards:
                for data in open_shard(self.root, info.name):
                    if g % self.dp == self.r:
                        buf.append(np.frombuffer(data, dtype=self.dtype)[: self.seq_len + 1])
                        if len(buf) == self.mb:
                            arr = torch.from_numpy(np.stack(buf).astype(np.int64))
                            out.append((arr[:, :-1].contiguous(), arr[:, 1:].contiguous()))
                            buf = []
                    g += 1
                    if g >= need or len(out) == n:
                        return out
        return out
