"""The commit protocol: a checkpoint exists when its commit record exists and checks out.

A step, `step_<N>/` in the run's store (`store.py`):
  - DeepSpeed's sharded files, written by every rank (`engine.save_checkpoint`, explicit tag, no
    `latest` file: DeepSpeed's `latest` is never trusted; `deepspeed_save.py`), each fsynced with
    its directory before the ranks move on to the commit;
  - `trainer_state_rank<r>.json`: our per-rank state (RNG states, `rng.py`), JSON so nothing is
    unpickled;
  - `commit.json`, written last by rank 0 once every rank's files are stored, atomically (temp,
    fsync, rename): step, layout, every file with its size and sha256, data position,
    fingerprints, MLflow run id.

With `checkpoint.async` (`save_async`) the same files are copied to host memory at the step and
written, fsynced, hashed and stored by a thread of each rank; at each later step the ranks exchange
a "done" flag, and at the first step where all are done rank 0 commits as above (`poll`).

Loading verifies sizes and hashes before anything is read (the hashing is spread over the ranks
that share a copy), so a truncated or replaced file is caught before DeepSpeed's loader, which
unpickles (`torch.load(weights_only=False)`), ever sees it; only files this run committed are loaded.

A save that fails on any rank (a full disk, an I/O error, an object store that stays unreachable)
fails on every rank alike within seconds: each phase ends with the ranks exchanging their outcome
(`on_all_ranks`), the uncommitted step is removed, and `CheckpointSaveError` names the path, the
space needed and free, and the newest intact commit. Retention counts only commits that verify.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch.distributed as dist

from trainer.checkpoint import deepspeed_save
from trainer.checkpoint.rng import rng_state, set_rng_state
from trainer.checkpoint.store import COMMIT, MissingObject, ObjectStoreError, Store, discard, open_store
from trainer.config import CheckpointConfig
from trainer.errors import PretrainError
from trainer.fsutil import sha256_file, write_json_atomic
from trainer.session import every_rank

log = logging.getLogger("pretrain")


class CheckpointError(PretrainError, RuntimeError):
    """A checkpoint cannot be used; the message names the file and the reason. `errnos`: the OS
    error numbers behind it, on any rank (ENOSPC, EIO, ...); `from_store`: whether the object store
    refused or could not be reached, on any rank."""

    errnos: frozenset[int] = frozenset()
    from_store: bool = False


class CheckpointSaveError(CheckpointError):
    """A step could not be saved. Every rank raises it alike, after the ranks agreed on the failure
    and removed the uncommitted step; the message names where, why, the space needed and free,
    and the newest intact commit. A restart would fail the same way: the run ends instead."""

    restartable = False
    step: int | None = None  # the step that failed


@dataclass
class Committed:
    step: int
    path: Path  # the local directory DeepSpeed reads
    record: dict  # the commit record


def _parallel(fn, items: list) -> list:
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(items))) as pool:
        return list(pool.map(fn, items))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj) -> list:
    """Every rank's `obj`, on every rank (a list of one without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _describe(e: Exception) -> str:
    """An error as one readable clause: OSError's str names the errno and the file."""
    return str(e) if isinstance(e, (PretrainError, OSError)) else repr(e)


def _human(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} bytes"


def _bytes(n: int) -> str:
    return f"{n:,} bytes ({_human(n)})"


def _mismatch(f: Path, info: dict, where: str) -> str | None:
    """Why the local file `f` is not the one the commit record lists (named `where`), or None."""
    if not f.is_file():
        return f"{where} is missing"
    size = f.stat().st_size
    if size != info["size"]:
        return f"{where} has {size} bytes, the commit record says {info['size']}"
    if sha256_file(f) != info["sha256"]:
        return f"{where} does not match its sha256 in the commit record"
    return None


# The background writer's nice value (Linux: per thread), the lowest priority: where the cores are
# busy, training's threads come first and the save takes longer; on idle cores it changes nothing.
_WRITER_NICE = 19


class _Persisting:
    """This rank's part of a background save: the rank's writer thread (`_Writer`) writes the
    snapshot and this rank's state file, fsyncs them, hashes and stores them. `result()` is
    {name: {size, sha256}}, or raises the error that stopped it."""

    def __init__(self, manager: CheckpointManager, step: int, meta: dict, snap, state: dict):
        self.step, self.meta, self.buffers = step, meta, snap.buffers
        self._manager, self._snap, self._state = manager, snap, state
        self._files: dict | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()

    def _run(self) -> None:
        m = self._manager
        try:
            if self._error is not None:  # the copy failed
                raise self._error
            path = m.store.step_dir(self.step)
            written = [Path(p) for p in self._snap.write()]
            state = path / f"trainer_state_rank{m.rank}.json"
            try:
                write_json_atomic(str(state), self._state)
            except OSError as e:  # a failed write() names no file: name it
                raise OSError(e.errno, e.strerror, e.filename or str(state)) from None
            files = {}
            for f in sorted({*written, state}):
                if f.parent == path and f.is_file():
                    files[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
                    m.store.publish(self.step, f.name)
            self._files = files
        except BaseException as e:  # noqa: BLE001 - reported to every rank at the commit
            self._error = e
        finally:
            self._snap = None  # the host copy is freed as soon as it is written
            self._done.set()

    def copy(self) -> None:
        """The snapshot's deferred copies into host memory; a failure is this save's error."""
        try:
            self._snap.copy()
        except BaseException as e:  # noqa: BLE001 - reported to every rank at the commit
            self._error = e

    def wait_copied(self) -> None:
        snap = self._snap
        if snap is not None:
            snap.wait_copied()

    def done(self) -> bool:
        return self._done.is_set()

    def join(self) -> None:
        self._done.wait()

    def result(self) -> dict:
        if self._error is not None:
            raise self._error
        return self._files or {}


class _Writer:
    """One rank's background save threads, started at the first background save and kept for the
    later ones until `stop()` (a save in the step path hands over a job instead of starting a
    thread): one copies a snapshot into host memory at normal priority, since the next optimizer
    step waits for it; one writes at the lowest priority."""

    def __init__(self):
        self._copies: queue.SimpleQueue[_Persisting | None] = queue.SimpleQueue()
        self._writes: queue.SimpleQueue[_Persisting | None] = queue.SimpleQueue()
        self._started = False

    def submit(self, job: _Persisting) -> _Persisting:
        if not self._started:
            threading.Thread(target=self._copy, name="checkpoint-copy", daemon=True).start()
            threading.Thread(target=self._write, name="checkpoint-writer", daemon=True).start()
            self._started = True
        self._copies.put(job)
        return job

    def stop(self) -> None:
        """The threads leave once the jobs handed over are done."""
        if self._started:
            self._copies.put(None)
            self._started = False

    def _copy(self) -> None:
        while (job := self._copies.get()) is not None:
            job.copy()
            self._writes.put(job)
        self._writes.put(None)

    def _write(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _WRITER_NICE)
        except (AttributeError, OSError):  # not Linux: the writer keeps the process's priority
            pass
        while (job := self._writes.get()) is not None:
            job._run()


class CheckpointManager:
    """Saves, finds, verifies and loads the committed checkpoints of one run; keeps the last K.
    Every public method is collective: all ranks call it."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: CheckpointConfig,
        rank: int,
        world_size: int,
        store: Store | None = None,
    ):
        self.store = store or open_store(run_dir, cfg.storage)
        self.root = self.store.root
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self._saved: set[int] = set()  # steps this manager committed
        self._hashed: set[int] = set()  # steps whose files this process hashed against their commit
        self.newest: Committed | None = None  # the newest commit this process made or verified
        self._in_flight: _Persisting | None = None  # a background save not committed yet
        self._host_buffers: list = []  # the last background save's host memory, filled again by the next
        self._writer = _Writer()

    # ------------------------------------------------------------------ collectives
    def on_all_ranks(self, fn) -> list:
        """fn() on every rank; every rank's result, or CheckpointError on every rank when fn raised
        on any (so no rank is left waiting in a collective for one that failed)."""
        try:
            out, err = fn(), None
        except Exception as e:
            err = (
                f"rank {self.rank}: {_describe(e)}",
                getattr(e, "errno", None),
                isinstance(e, ObjectStoreError),
            )
            out = None
        parts = _gather((out, err))
        errors = [e for _, e in parts if e]
        if errors:
            shown = [m for m, *_ in errors[:3]] + (
                [f"and {len(errors) - 3} more ranks"] if len(errors) > 3 else []
            )
            error = CheckpointError("; ".join(shown))
            error.errnos = frozenset(n for _, n, _ in errors if isinstance(n, int))
            error.from_store = any(store for *_, store in errors)
            raise error
        return [o for o, _ in parts]

    def _from_rank0(self, fn):
        """fn() run on rank 0 only; its result on every rank."""
        return self.on_all_ranks(fn if self.rank == 0 else lambda: None)[0]

    def copy_peers(self) -> list[int]:
        """The ranks that share this rank's local copy of a step: every rank, or where each node
        holds its own copy, the ranks of this node (same hostname: one disk)."""
        if not self.store.copy_per_node:
            return list(range(self.world_size))
        hosts = _gather(socket.gethostname())
        return [r for r, h in enumerate(hosts) if h == hosts[self.rank]]

    # ------------------------------------------------------------------ save: written, committed
    def save(self, engine, step: int, meta: dict) -> float:
        """Every rank writes its shards and fsyncs them, the files are hashed and stored, then rank
        0 commits. Returns the seconds taken. Each phase ends with the ranks exchanging their
        outcome, so a write that fails on one rank fails the save on every rank within seconds:
        the uncommitted step is removed and CheckpointSaveError raised on every rank alike."""
        t0 = time.perf_counter()
        self.finish_async()
        if step in self._saved:  # the final step right after a periodic save of it
            return 0.0
        try:
            self.on_all_ranks(partial(self._clear, step))
            self.on_all_ranks(partial(self._write, engine, step))  # fsynced: before commit.json
            self._commit(step, self._store_files(step), meta)
        except CheckpointError as e:  # raised on every rank alike
            raise self._save_failed(step, e) from None
        _barrier()
        return time.perf_counter() - t0

    def _commit(self, step: int, files: dict, meta: dict) -> None:
        """Collective, once every rank's files of `step` are stored: rank 0 writes commit.json last,
        then retention."""
        path = self.store.step_dir(step)
        record = {**meta, "step": step, "files": files, "time": time.time(), "world_size": self.world_size}

        def commit() -> None:
            if self.rank == 0:
                write_json_atomic(str(path / COMMIT), record)
                self.store.publish(step, COMMIT)

        self.on_all_ranks(commit)
        self._saved.add(step)
        self._hashed.add(step)
        self.newest = Committed(step, path, record)
        if self.rank == 0:
            self._retain(step)
        self.store.evict(step)

    # ------------------------------------------------------------------ save: in the background
    def save_async(self, engine, step: int, meta: dict) -> float:
        """Collective: every rank copies its state of `step` to host memory and a background
        thread writes, fsyncs, hashes and stores its files while training goes on; `poll()` at a
        later step commits it once every rank is done. A save still in flight is finished first
        (at most one at a time). Returns the seconds training stood still (the state dicts; the bytes
        of host tensors are copied after, before the next optimizer step changes them). A failed
        copy raises CheckpointSaveError on every rank, as `save` does."""
        self.finish_async()
        t0 = time.perf_counter()
        if step in self._saved:
            return 0.0
        held: list[deepspeed_save.Snapshot] = []
        state = {"step": step, "rng": rng_state()}  # this step's RNG, before training moves it on
        try:
            self.on_all_ranks(partial(self._clear, step))
            self.on_all_ranks(
                lambda: held.append(
                    deepspeed_save.snapshot(
                        engine, str(self.root), self.store.step_dir(step).name, self._host_buffers
                    )
                )
            )
        except CheckpointError as e:
            raise self._save_failed(step, e) from None
        self._in_flight = self._writer.submit(_Persisting(self, step, meta, held[0], state))
        return time.perf_counter() - t0

    def wait_copied(self) -> None:
        """Returns once the background save in flight, if any, holds its own copy of the state:
        called before anything changes the state (the next optimizer step, a load)."""
        if self._in_flight is not None:
            self._in_flight.wait_copied()

    def in_flight(self) -> int | None:
        """The step a background save is writing, or None."""
        return None if self._in_flight is None else self._in_flight.step

    def poll(self, wait: bool = False) -> Committed | None:
        """Collective, at a step boundary while a background save is in flight (the same steps on
        every rank): when every rank has persisted it (with `wait`, after this rank's is done),
        commit it and return it; else None and training goes on. A failed background write fails
        the save on every rank: the step is removed and CheckpointSaveError raised."""
        job = self._in_flight
        if job is None:
            return None
        if wait:
            job.join()
        if not every_rank(job.done()):
            return None
        self._in_flight, self._host_buffers = None, job.buffers
        try:
            files = {n: info for part in self.on_all_ranks(job.result) for n, info in part.items()}
            self._commit(job.step, files, job.meta)
        except CheckpointError as e:
            raise self._save_failed(job.step, e) from None
        return self.newest

    def finish_async(self) -> Committed | None:
        """Collective: the background save in flight, if any, waited for and committed."""
        return self.poll(wait=True)

    def stop_writer(self) -> None:
        """At the end of training: the background writer thread leaves once its jobs are done."""
        self._writer.stop()

    def _clear(self, step: int) -> None:
        """Before writing `step`: a commit of it from an earlier attempt (one a resume skipped as
        bad) stops existing, and every rank removes a partial or stale local copy."""
        self._hashed.discard(step)
        if self.rank == 0:
            self.store.uncommit(step)
            self.root.mkdir(parents=True, exist_ok=True)
        discard(self.store.step_dir(step))

    def _write(self, engine, step: int) -> None:
        """This rank's DeepSpeed shards (its write errors held back until DeepSpeed's collectives
        are done, `deepspeed_save.py`) and its own state, each file fsynced with the directory."""
        path = self.store.step_dir(step)
        deepspeed_save.save(engine, str(self.root), path.name)
        state = path / f"trainer_state_rank{self.rank}.json"
        try:
            write_json_atomic(str(state), {"step": step, "rng": rng_state()})  # fsyncs it and the directory
        except OSError as e:  # a failed write() names no file: name it
            raise OSError(e.errno, e.strerror, e.filename or str(state)) from None

    def _store_files(self, step: int) -> dict:
        """{name: {size, sha256}} of every file of the step, each hashed and stored by one of the
        ranks that see it: on a shared disk the i % world split; with node-local disks a rank of
        the node that wrote it."""
        path = self.store.step_dir(step)
        listings = self.on_all_ranks(
            lambda: sorted(p.name for p in path.iterdir() if p.is_file() and p.name != COMMIT)
        )
        mine = []
        for i, name in enumerate(sorted(set().union(*listings))):
            have = [r for r, names in enumerate(listings) if name in names]
            if have[i % len(have)] == self.rank:
                mine.append(name)

        def one(name: str) -> tuple[str, dict]:
            f = path / name
            info = {"size": f.stat().st_size, "sha256": sha256_file(f)}
            self.store.publish(step, name)
            return name, info

        return {n: info for part in self.on_all_ranks(lambda: _parallel(one, mine)) for n, info in part}

    # ------------------------------------------------------------------ save: failed
    def _save_failed(self, step: int, error: CheckpointError) -> CheckpointSaveError:
        """Collective, after the ranks agreed that `step` failed: remove it, and the one message."""
        written = self._space(step)
        not_removed = self._remove_uncommitted(step, store_too=not error.from_store)
        free = None if error.from_store else self._free()  # a disk's space says nothing about S3
        out = CheckpointSaveError(
            "; ".join(self._failure(step, error, written, free, not_removed)), path=self.store.where(step)
        )
        out.errnos, out.from_store, out.step = error.errnos, error.from_store, step
        return out

    def _failure(
        self, step: int, error: CheckpointError, written: int, free: tuple | None, not_removed: str | None
    ) -> list[str]:
        """The clauses of a failed save's message: where and why, the space, what became of the
        step, the newest intact commit, what to do."""
        parts = [f"checkpoint step {step} could not be saved to {self.store.where(step)}: {error}"]
        if free is not None:  # the local disk every rank writes to (with S3: the staging area)
            needed = [(written, f"step {step}'s files written before the failure")]
            if self.newest is not None:
                size = sum(int(f["size"]) for f in self.newest.record.get("files", {}).values())
                needed.append((size, f"the size of step {self.newest.step}"))
            size, what = max(needed)
            total, left, disk = free
            parts.append(
                f"a step needs about {_bytes(size)}: {what}; {_bytes(left)} free of {_human(total)} at {disk}"
            )
        if not_removed is not None:
            parts.append(
                f"the uncommitted step {step} could not be removed ({not_removed}); a later save removes it"
            )
        elif error.from_store:
            parts.append(
                f"the local copy of the uncommitted step {step} was removed; its uploads go with a later save"
            )
        else:
            parts.append(f"the uncommitted step {step} was removed")
        if self.newest is None:
            parts.append("no checkpoint is committed yet (a resume starts at step 0)")
        else:
            newest = self.newest.step
            parts.append(f"the newest intact checkpoint is step {newest} ({self.store.where(newest)})")
        if error.errnos & {errno.ENOSPC, errno.EDQUOT}:
            parts.append("free space there or move the run to a larger disk")
        elif errno.EIO in error.errnos:
            parts.append("check that disk (an I/O error)")
        elif error.from_store:
            parts.append("check the object store (endpoint, credentials, permissions)")
        return parts

    def _space(self, step: int) -> int:
        """Collective: bytes the failed step's files took, on every disk that holds a copy."""
        path = self.store.step_dir(step)

        def written() -> tuple[str, int]:
            try:
                return socket.gethostname(), sum(p.stat().st_size for p in path.iterdir() if p.is_file())
            except OSError:
                return socket.gethostname(), 0

        by_host = dict(_gather(written()))
        return sum(by_host.values()) if self.store.copy_per_node else max(by_host.values())

    def _remove_uncommitted(self, step: int, store_too: bool) -> str | None:
        """Collective: the failed step stops existing on every local disk and, with `store_too`,
        in the store (not when the store itself failed: a later save's retention removes what
        reached it); why not, when it could not be removed."""

        def remove() -> None:
            if self.rank == 0 and store_too:
                self.store.uncommit(step)
                if not self.store.in_place:  # uploads that made it before the failure
                    names = self.store.steps().get(step, {})
                    if names:
                        self.store.delete(step, sorted(names))
            discard(
                self.store.step_dir(step)
            )  # every rank: safe on a shared disk, needed on a node-local one

        try:
            self.on_all_ranks(remove)
        except CheckpointError as e:
            return str(e)
        return None

    def _free(self) -> tuple[int, int, str] | None:
        """(total, free bytes, where) of the local disk the ranks write checkpoints to."""
        d = self.root
        while not d.exists() and d != d.parent:
            d = d.parent
        try:
            usage = shutil.disk_usage(d)
        except OSError:
            return None
        return usage.total, usage.free, str(self.root)

    # ------------------------------------------------------------------ retention
    def _retain(self, newest: int) -> None:
        """Rank 0, after `newest` was committed: keep it and the `keep - 1` newest older commits
        that verify, and `keep_every`'s multiples; delete the other older commits (those found not
        to verify among them) and uncommitted leftovers older than `newest`. Commits newer than
        `newest` (a run resumed before a damaged step) are left for the save that reaches them. A
        failure is a warning, retried at the next save.

        Cost: the stored sizes of each step looked at, always (the listing has them); its sha256 on
        local or shared disks only for steps this process has not hashed yet, i.e. at most once
        per step and process: the steps it saved or resumed from are hashed already, so a run's
        steady state hashes nothing more, and a restart hashes at most `keep - 1` older steps."""
        try:
            steps = self.store.steps()
            older = sorted((s for s, names in steps.items() if COMMIT in names and s < newest), reverse=True)
            pinned = {s for s in older if self.cfg.keep_every and s % self.cfg.keep_every == 0}
            kept = [newest]
            for s in older:
                if len(kept) >= self.cfg.keep:
                    break
                problems = self._at_rest(s, steps[s])
                if not problems:
                    kept.append(s)
                    continue
                log.warning(
                    "checkpoint step %d does not verify, so it is not one of the %d kept (%s); %s",
                    s,
                    self.cfg.keep,
                    "; ".join(problems),
                    "kept as a multiple of checkpoint.keep_every" if s in pinned else "removed",
                )
            drop = [s for s in older if s not in kept and s not in pinned]
            drop += [s for s, names in steps.items() if COMMIT not in names and s < newest]
            for s in sorted(drop):
                self._hashed.discard(s)
                self.store.delete(s, sorted(steps[s]))
        except (ObjectStoreError, OSError, ValueError, KeyError, TypeError) as e:
            log.warning(
                "checkpoint retention in %s failed (will retry at the next save): %s", self.store.where(), e
            )

    def _at_rest(self, step: int, listed: dict[str, int]) -> list[str]:
        """What is wrong with a stored commit, checked cheaply: its record and the stored sizes
        always; the sha256 of each file once per process, where the store holds the files in place
        (a local or shared disk: no download). An object store's own checksums guard its objects,
        so a stored step there is checked by sizes only."""
        try:
            record = json.loads(self.store.read(step, COMMIT))
            files = record["files"]
        except MissingObject:
            return [f"{self.store.where(step, COMMIT)} is missing"]
        except (ValueError, KeyError, TypeError) as e:
            return [f"{self.store.where(step, COMMIT)} is not a readable commit record ({e!r})"]
        problems = []
        for name, info in sorted(files.items()):
            size = listed.get(name)
            if size != info["size"]:
                what = (
                    "is missing"
                    if size is None
                    else f"has {size} bytes, the commit record says {info['size']}"
                )
                problems.append(f"{self.store.where(step, name)} {what}")
        if problems or not self.store.in_place or step in self._hashed:
            return problems
        path = self.store.step_dir(step)
        problems = [
            p for n in sorted(files) if (p := _mismatch(path / n, files[n], self.store.where(step, n)))
        ]
        if not problems:
            self._hashed.add(step)
        return problems

    # ------------------------------------------------------------------ find: verified
    def committed(self) -> list[int]:
        """The steps whose commit record is in the store, oldest first (not verified yet)."""
        return sorted(s for s, names in self._from_rank0(self.store.steps).items() if COMMIT in names)

    def latest(self) -> Committed | None:
        """The newest committed checkpoint whose files check out (the same on all ranks); a bad
        one is skipped with a warning that names its bad files."""
        steps = self._from_rank0(self.store.steps)
        for step in sorted((s for s, names in steps.items() if COMMIT in names), reverse=True):
            record, problems = self._check(step, steps[step])
            if problems:
                log.warning(
                    "ignoring checkpoint step %d: %s; falling back to the previous one",
                    step,
                    "; ".join(problems),
                )
                continue
            return self._verified(step, record)
        return None

    def verify(self, step: int) -> Committed:
        """Committed step `step`, checked as `latest()` checks it; CheckpointError naming every
        problem when it does not check out (it is refused, not skipped)."""
        steps = self._from_rank0(self.store.steps)
        if COMMIT not in steps.get(step, {}):
            raise CheckpointError(
                f"{self.store.where(step, COMMIT)} does not exist: step {step} is not committed"
            )
        record, problems = self._check(step, steps[step])
        if problems:
            raise CheckpointError(f"refusing checkpoint step {step}: {'; '.join(problems)}")
        return self._verified(step, record)

    def _verified(self, step: int, record: dict) -> Committed:
        self._hashed.add(step)
        found = Committed(step, self.store.step_dir(step), record)
        if self.newest is None or step >= self.newest.step:
            self.newest = found
        return found

    def _read_commit(self, step: int) -> bytes | None:
        try:
            return self.store.read(step, COMMIT)
        except MissingObject:
            return None  # deleted since the listing (retention by another job of this run)

    def _check(self, step: int, listed: dict[str, int]) -> tuple[dict, list[str]]:
        """(the step's commit record, what is wrong with the step: nothing when it checks out).
        The stored sizes are compared first, so a step that cannot be whole is not fetched."""
        where = self.store.where(step, COMMIT)
        raw = self._from_rank0(partial(self._read_commit, step))
        if raw is None:
            return {}, [f"{where} is missing"]
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
                raise ValueError("no files table")
        except ValueError as e:
            return {}, [f"{where} is not a readable commit record ({e})"]
        problems = []
        for name, info in sorted(record["files"].items()):
            size = listed.get(name)
            if size is None:
                problems.append(f"{self.store.where(step, name)} is missing")
            elif size != info["size"]:
                problems.append(
                    f"{self.store.where(step, name)} has {size} bytes, the commit record says {info['size']}"
                )
        return record, problems or self._check_copy(step, record)

    def _check_copy(self, step: int, record: dict) -> list[str]:
        """Make this node's local copy of the step the committed one and hash it; the ranks that
        share the copy split the files. A file that matches its sha256 is kept; any other is
        fetched (where the store has another copy) and checked again. Problems on every rank."""
        path = self.store.step_dir(step)
        peers = self.copy_peers()
        mine = [n for i, n in enumerate(sorted(record["files"])) if i % len(peers) == peers.index(self.rank)]

        def one(name: str) -> str | None:
            info, where = record["files"][name], self.store.where(step, name)
            problem = _mismatch(path / name, info, where)
            if problem is None:
                return None
            try:
                if not self.store.fetch(step, name):
                    return problem
            except MissingObject:
                return f"{where} is missing"
            return _mismatch(path / name, info, where)

        return [p for part in self.on_all_ranks(lambda: [p for p in _parallel(one, mine) if p]) for p in part]

    # ------------------------------------------------------------------ load: read back
    def load(self, engine, found: Committed) -> dict:
        """Restore DeepSpeed's state and this rank's RNG from a verified checkpoint written by the
        same layout (`resume.py` converts any other). Returns the commit record."""
        self.wait_copied()  # a background save's copy of the state this load replaces
        load_path, _ = engine.load_checkpoint(
            str(self.root), tag=found.path.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {found.path}")
        state_file = found.path / f"trainer_state_rank{self.rank}.json"
        if state_file.exists():  # absent when resuming on a different layout
            try:
                state = json.loads(state_file.read_text())
            except ValueError as e:
                raise CheckpointError(
                    f"{state_file} is not our JSON state file ({e}); refusing to load it"
                ) from None
            set_rng_state(state["rng"])
        return found.record
