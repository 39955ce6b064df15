"""The resumable tokenize and shard stages of `pretrain prepare` (without cleaning stages).

The work is cut into units that depend only on the inputs and options: one unit per input file
(tokenize it) and one per shard (cut its blocks from the token stream and write the tar). Any
process or Ray task can run a unit; each leaves a completion record, written last, so the output
bytes never depend on who ran which unit or when, and a killed preparation redoes only the units
without a record. `Runner` says who runs them: `local_runner` here, a Ray one in cluster/prepare.py.

Work directory (`.<out>.prepare-<key>` next to `out`; the key hashes the inputs and options):

    tokenizer.json                trained or copied first
    unit-000003.tokens / .docs    input 3's EOS-separated ids (manifest dtype) / per-document counts
    unit-000003.json              its record {documents, tokens}: the unit is done iff it exists
    train-000000.tar              a shard (written as .partial, then renamed), then
    train-000000.json             its record (the manifest's ShardInfo)
"""

from __future__ import annotations

import io
import itertools
import json
import multiprocessing as mp
import os
import tarfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np

from trainer.data.manifest import ShardInfo
from trainer.fsutil import sha256_file, write_json_atomic

Runner = Callable[..., Iterator[Any]]
"""`runner(fn, arglist, gil_bound=False)` runs `fn(*args, threads=n)` for every args of the list,
anywhere, and yields the results in the order of the list; closing the iterator early cancels what
has not run. `gil_bound`: `fn` is mostly Python (the cleaning filters), so units sharing a machine
need processes, not threads; `fn` and the args are then pickled."""

# Tokenization work unit inside one input: big enough to amortize the call, small enough to spread.
_BATCH_DOCS = 512
_BATCH_CHARS = 1 << 20


def unit_name(index: int) -> str:
    return f"unit-{index:06d}"


def read_record(path: str) -> dict | None:
    """A completion record, or None when the unit has not finished."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _record(path: str, record: dict) -> None:
    """Write a unit's completion record (atomically, after its data): the unit is done from here."""
    write_json_atomic(path, record)


# ---- tokenize one input -----------------------------------------------------------------------


def tokenize_unit(
    work: str,
    index: int,
    read: Callable[[], Iterator[str]],
    tokenizer: str,
    eos: int,
    dtype: str,
    threads: int = 1,
) -> dict[str, int]:
    """Tokenize the documents `read()` yields (unit `index`) into `work`; returns its record
    {documents, tokens, max_id} (the driver refuses ids that do not fit `dtype`).

    Documents are read in this thread and encoded by `threads` threads (the tokenizer releases the
    GIL), each followed by `eos`; a literal "<|endoftext|>" inside a text stays text."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # our threads, not Rayon's, use the cores given
    from tokenizers import Tokenizer

    name = os.path.join(work, unit_name(index))
    done = read_record(name + ".json")
    if done is not None:
        return done
    tok = Tokenizer.from_file(tokenizer)
    tok.encode_special_tokens = True
    np_dtype = np.dtype("<u2" if dtype == "uint16" else "<u4")

    def encode(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = [e.ids for e in tok.encode_batch_fast(docs, add_special_tokens=False)]
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum()))
        return np.insert(flat, np.cumsum(lens), eos), lens.astype("<u4")

    docs_n = tokens_n = max_id = 0
    with (
        open(name + ".tokens.partial", "wb") as ft,
        open(name + ".docs.partial", "wb") as fd,
        ThreadPoolExecutor(max(1, threads)) as pool,
    ):
        pending: deque = deque()

        def drain(keep: int) -> None:
            nonlocal docs_n, tokens_n, max_id
            while len(pending) > keep:
                ids, lens = pending.popleft().result()
                max_id = max(max_id, int(ids.max())) if ids.size else max_id
                ft.write(ids.astype(np_dtype).tobytes())
                fd.write(lens.tobytes())
                docs_n += lens.size
                tokens_n += ids.size

        for batch in batches(d for d in read() if d):
            pending.append(pool.submit(encode, batch))
            drain(2 * max(1, threads))
        drain(0)
        for f in (ft, fd):
            f.flush()
            os.fsync(f.fileno())
    os.replace(name + ".tokens.partial", name + ".tokens")
    os.replace(name + ".docs.partial", name + ".docs")
    record = {"documents": docs_n, "tokens": tokens_n, "max_id": max_id}
    _record(name + ".json", record)
    return record


def batches(
    docs: Iterator[str], max_docs: int = _BATCH_DOCS, max_chars: int = _BATCH_CHARS
) -> Iterator[list[str]]:
    """`docs` in lists of at most `max_docs` documents or about `max_chars` characters."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def used_tokens(work: str, index: int, record: dict, max_docs: int | None) -> tuple[int, int]:
    """(documents, tokens) of unit `index` that count when only `max_docs` documents may be used."""
    if max_docs is None or record["documents"] <= max_docs:
        return record["documents"], record["tokens"]
    lens = np.fromfile(os.path.join(work, unit_name(index) + ".docs"), dtype="<u4", count=max_docs)
    return max_docs, int(lens.sum(dtype=np.int64)) + max_docs


# ---- write one shard --------------------------------------------------------------------------


def write_shard(
    work: str,
    name: str,
    first_block: int,
    n_blocks: int,
    block_len: int,
    dtype: str,
    pieces: list[tuple[int, int, int]],
    threads: int = 1,
) -> dict[str, Any]:
    """Write blocks [first_block, first_block + n_blocks) of the token stream as tar `name`; their
    tokens are `pieces` = [(unit index, start, stop)] of the units' token files, concatenated.
    Returns the shard's record (ShardInfo fields); sample key = global block index."""

    stem = os.path.join(work, name.removesuffix(".tar"))
    path = os.path.join(work, name)
    done = read_record(stem + ".json")
    if done is not None and os.path.exists(path):  # not yet moved into `out` by a killed commit
        return done
    np_dtype = np.dtype("<u2" if dtype == "uint16" else "<u4")
    parts = []
    for index, lo, hi in pieces:
        mm = np.memmap(os.path.join(work, unit_name(index) + ".tokens"), dtype=np_dtype, mode="r")
        parts.append(np.array(mm[lo:hi]))
        del mm  # one open mapping at a time
    blocks = np.concatenate(parts).reshape(n_blocks, block_len)
    with open(path + ".partial", "wb") as f:
        # The tar webdataset's TarWriter(encoder=False, mtime=0) writes, without importing it (and
        # torch with it) in every worker: fixed member times and owners give reproducible sha256s.
        with tarfile.open(fileobj=f, mode="w|") as tar:
            for i in range(n_blocks):
                data = blocks[i].tobytes()
                info = tarfile.TarInfo(f"{first_block + i:09d}.tokens")
                info.size, info.mtime, info.mode = len(data), 0.0, 0o444
                info.uname = info.gname = "bigdata"
                tar.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".partial", path)
    info = ShardInfo(
        name=name,
        samples=n_blocks,
        tokens=n_blocks * block_len,
        bytes=os.path.getsize(path),
        sha256=sha256_file(path),
    )
    record = dict(info.__dict__)
    _record(stem + ".json", record)
    return record


def shard_pieces(used: list[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int, int]]:
    """Tokens [start, stop) of the stream of units `used` = [(index, tokens used)], as pieces
    [(unit index, start, stop)] of the units' token files."""
    pieces, offset = [], 0
    for index, n in used:
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            pieces.append((index, lo - offset, hi - offset))
        offset += n
    return pieces


# ---- who runs the units -----------------------------------------------------------------------


def local_runner(workers: int) -> Runner:
    """Units on this machine, in threads of this process (the tokenizer and hashing release the GIL,
    and threads start in no time, with nothing to pickle) or, for `gil_bound` units, in spawned
    processes: `workers` cores shared by min(workers, units) units at a time, each with
    workers // that many threads."""

    def run(fn: Callable[..., Any], arglist: list[tuple], gil_bound: bool = False) -> Iterator[Any]:
        at_once = max(1, min(workers, len(arglist)))
        threads = max(1, workers // at_once)
        if at_once == 1:
            for args in arglist:
                yield fn(*args, threads=threads)
            return
        pool: Executor
        if gil_bound:
            # spawn, not fork: this process may already run the tokenizer's Rayon threads.
            pool = ProcessPoolExecutor(at_once, mp_context=mp.get_context("spawn"))
        else:
            pool = ThreadPoolExecutor(at_once, thread_name_prefix="prepare")
        try:
            futures = [pool.submit(fn, *args, threads=threads) for args in arglist]
            for future in futures:
                yield future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # the caller stopped early or failed

    return run
