"""Committed checkpoints: a checkpoint exists when its commit record exists and checks out.

Layout: `<run_dir>/checkpoints/step_<N>/`
  - DeepSpeed's sharded files, written by every rank (`engine.save_checkpoint`, explicit tag,
    no `latest` file: DeepSpeed's `latest` is never trusted);
  - `trainer_state_rank<r>.json`: our per-rank state (RNG states), JSON so nothing is unpickled;
  - `commit.json`, written last by rank 0 after a barrier, atomically (temp, fsync, rename): step,
    layout, every file with its size and sha256, data position, fingerprints, MLflow run id.

Loading verifies sizes and hashes before anything is read (the hashing is spread over the
ranks), so a truncated or replaced file is caught before DeepSpeed's loader, which unpickles
(`torch.load(weights_only=False)`), ever sees it; only files this run committed are loaded.

With `checkpoint.storage: s3://bucket/prefix` committed checkpoints live in object storage
(`trainer/checkpoint_s3.py`, `s3://bucket/prefix/<run name>/step_<N>/`) and the local directory
above is a staging area and cache: every rank writes and hashes its files there exactly as above,
uploads its share, and rank 0 uploads `commit.json` last; only the newest step stays on local disk,
so a restart on the same node does not download it again. Resume trusts the store: the newest step
whose `commit.json` is there and whose listed objects have their recorded sizes is downloaded into
each node's cache (files already there and matching their sha256 are kept) and verified before
DeepSpeed reads it. Ray Train's checkpoint machinery is not used; the commit record decides.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer.checkpoint_s3 import MissingObject, ObjectStoreError
from trainer.config import CheckpointConfig
from trainer.fsutil import write_json_atomic

log = logging.getLogger("pretrain")
COMMIT = "commit.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and the reason."""


@dataclass
class Committed:
    step: int
    path: Path
    record: dict


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict:
    """RNG states of python, numpy and torch as JSON-safe values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(
            torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8)
        )


def _parallel(fn, items: list) -> list:
    if len(items) <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(items))) as pool:
        return list(pool.map(fn, items))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj):
    """Every rank's `obj`, on every rank (a list of one without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class CheckpointManager:
    """Saves, finds, verifies and loads the committed checkpoints of one run; keeps the last K."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, rank: int, world_size: int):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.remote = None  # S3Checkpoints when committed checkpoints live in object storage
        self._saved: set[int] = set()  # steps this manager committed (to the object store)
        if cfg.storage:
            from trainer.checkpoint_s3 import S3Checkpoints

            self.remote = S3Checkpoints(cfg.storage, os.path.basename(os.path.abspath(run_dir)))

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, meta: dict) -> float:
        """Collective: every rank writes its shards, then rank 0 commits. Returns seconds taken."""
        t0 = time.perf_counter()
        if self.remote is not None:
            return self._save_remote(engine, step, meta, t0)
        tag = f"step_{step}"
        path = self.root / tag
        if (path / COMMIT).exists():  # already committed (e.g. the final step right after a periodic save)
            return 0.0
        if self.rank == 0:
            if path.exists():  # a partial save from a crashed attempt: it was never committed
                shutil.rmtree(path)
            self.root.mkdir(parents=True, exist_ok=True)
        _barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state={}, save_latest=False)
        write_json_atomic(
            str(path / f"trainer_state_rank{self.rank}.json"), {"step": step, "rng": rng_state()}
        )
        _barrier()  # every rank's files are on storage
        files = self._hash_files(path)
        if self.rank == 0:
            write_json_atomic(str(path / COMMIT), self._commit_record(meta, step, files))
            self._retain(step)
        _barrier()
        return time.perf_counter() - t0

    def _commit_record(self, meta: dict, step: int, files: dict) -> dict:
        """What `commit.json` says, the same for local and object storage."""
        return {**meta, "step": step, "files": files, "time": time.time(), "world_size": self.world_size}

    def _hash_files(self, path: Path) -> dict:
        """{relative name: {size, sha256}}, the hashing spread over the ranks."""
        names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != COMMIT)
        mine = {
            n: {"size": (path / n).stat().st_size, "sha256": sha256_file(path / n)}
            for i, n in enumerate(names)
            if i % self.world_size == self.rank
        }
        files: dict = {}
        for part in _gather(mine):
            files.update(part)
        return files

    def _retain(self, newest: int) -> None:
        committed = sorted(s for s, p in self._step_dirs() if (p / COMMIT).exists())
        for s in committed[: -self.cfg.keep]:
            if s != newest and not (self.cfg.keep_every and s % self.cfg.keep_every == 0):
                shutil.rmtree(self.root / f"step_{s}", ignore_errors=True)

    # ------------------------------------------------------------------ find + load
    def _step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
        return sorted(out, reverse=True)

    def _problems(self, path: Path, record: dict) -> list[str]:
        """This rank's share of the verification of one checkpoint."""
        bad, to_hash = [], []
        for i, (name, info) in enumerate(sorted(record["files"].items())):
            if i % self.world_size != self.rank:
                continue
            f = path / name
            if not f.is_file():
                bad.append(f"{f} is missing")
            elif f.stat().st_size != info["size"]:
                bad.append(f"{f} has {f.stat().st_size} bytes, the commit record says {info['size']}")
            else:
                to_hash.append((f, info["sha256"]))
        for (f, want), got in zip(to_hash, _parallel(sha256_file, [f for f, _ in to_hash]), strict=True):
            if got != want:
                bad.append(f"{f} does not match its sha256 in the commit record")
        return bad

    def latest(self) -> Committed | None:
        """Collective: the newest committed checkpoint whose files check out (same on all ranks)."""
        if self.remote is not None:
            return self._latest_remote()
        for step, path in self._step_dirs():
            try:
                record = json.loads((path / COMMIT).read_text())
            except FileNotFoundError:
                continue  # never committed: a save that did not finish
            except (OSError, ValueError) as e:
                log.warning("ignoring checkpoint %s: unreadable commit record (%s)", path, e)
                continue
            problems = [p for part in _gather(self._problems(path, record)) for p in part]
            if problems:
                log.warning(
                    "ignoring checkpoint step %d: %s; falling back to the previous one",
                    step,
                    "; ".join(problems),
                )
                continue
            return Committed(step, path, record)
        return None

    # ------------------------------------------------------------------ object storage
    def _collective(self, fn) -> list:
        """Collective: fn() on every rank; every rank's result, or CheckpointError on every rank when
        fn raised on any (so no rank is left waiting in a collective for one that failed)."""
        try:
            out, err = fn(), None
        except Exception as e:
            out, err = None, f"rank {self.rank}: {e if isinstance(e, ObjectStoreError) else repr(e)}"
        parts = _gather((out, err))
        errors = [e for _, e in parts if e]
        if errors:
            raise CheckpointError("; ".join(errors))
        return [o for o, _ in parts]

    def _from_rank0(self, fn):
        """Collective: fn() run on rank 0 only; its result on every rank."""
        return self._collective(fn if self.rank == 0 else lambda: None)[0]

    def _save_remote(self, engine, step: int, meta: dict, t0: float) -> float:
        """save() with the object store: stage and hash locally, upload the shares, commit last."""
        if step in self._saved:  # committed by this run already (the final step right after a periodic save)
            return 0.0
        tag = f"step_{step}"
        path = self.root / tag

        def prepare() -> None:
            if self.rank == 0:
                # A commit from an earlier attempt (one resume skipped as bad): it stops existing now.
                self.remote.uncommit(step)
                self.root.mkdir(parents=True, exist_ok=True)
            self._discard(path)  # a partial or stale staging copy; every rank (node-local disks)

        self._collective(prepare)
        engine.save_checkpoint(str(self.root), tag=tag, client_state={}, save_latest=False)
        write_json_atomic(
            str(path / f"trainer_state_rank{self.rank}.json"), {"step": step, "rng": rng_state()}
        )
        _barrier()  # every rank's files are on its staging disk
        # Each file is hashed and uploaded by one of the ranks that see it: on a shared disk that is
        # the i % world split; with node-local disks, a rank of the node that wrote it.
        listings = _gather(sorted(p.name for p in path.iterdir() if p.is_file() and p.name != COMMIT))
        mine = []
        for i, name in enumerate(sorted(set().union(*listings))):
            have = [r for r, names in enumerate(listings) if name in names]
            if have[i % len(have)] == self.rank:
                mine.append(name)

        def push(name: str) -> tuple[str, dict]:
            f = path / name
            info = {"size": f.stat().st_size, "sha256": sha256_file(f)}
            self.remote.upload(f, step, name)
            return name, info

        files = {n: info for part in self._collective(lambda: _parallel(push, mine)) for n, info in part}

        def commit() -> None:  # after every rank's uploads: commit.json goes last
            if self.rank == 0:
                write_json_atomic(str(path / COMMIT), self._commit_record(meta, step, files))
                self.remote.upload(path / COMMIT, step, COMMIT)

        self._collective(commit)
        self._saved.add(step)
        if self.rank == 0:
            try:
                self._retain_remote(step)
            except ObjectStoreError as e:
                log.warning(
                    "checkpoint retention in %s failed (will retry at the next save): %s",
                    self.remote.url(step),
                    e,
                )
        for s, p in self._step_dirs():  # the newest stays on local disk as a cache for a restart here
            if s != step:
                self._discard(p)
        _barrier()
        return time.perf_counter() - t0

    def _discard(self, path: Path) -> None:
        """Remove a local step dir; safe when several ranks on one disk do it at once."""
        trash = path.with_name(f".trash-{path.name}-{self.rank}-{os.getpid()}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return  # not there, or another rank on this disk took it
        shutil.rmtree(trash, ignore_errors=True)

    def _retain_remote(self, newest: int) -> None:
        """Keep the last `keep` committed steps (and keep_every multiples) in the store; delete the
        objects of older ones, and of uploads older than the newest commit that never committed."""
        steps = self.remote.steps()
        committed = sorted(s for s, names in steps.items() if COMMIT in names)
        drop = [
            s
            for s in committed[: -self.cfg.keep]
            if s != newest and not (self.cfg.keep_every and s % self.cfg.keep_every == 0)
        ]
        drop += [s for s, names in steps.items() if COMMIT not in names and s < newest]
        for s in sorted(drop):
            self.remote.delete_step(s, sorted(steps[s]))

    def _read_remote_commit(self, step: int) -> bytes | None:
        try:
            return self.remote.read_bytes(step, COMMIT)
        except MissingObject:
            return None  # deleted since the listing (retention by another job of this run)

    def _latest_remote(self) -> Committed | None:
        """latest() with the object store: the listing decides which steps exist; the newest whose
        objects have their recorded sizes is downloaded into this node's cache and verified."""
        steps = self._from_rank0(self.remote.steps)
        for step in sorted((s for s, names in steps.items() if COMMIT in names), reverse=True):
            where = self.remote.url(step, COMMIT)
            raw = self._from_rank0(functools.partial(self._read_remote_commit, step))
            if raw is None:
                continue
            try:
                record = json.loads(raw)
                if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
                    raise ValueError("no files table")
            except ValueError as e:
                log.warning("ignoring checkpoint %s: unreadable commit record (%s)", where, e)
                continue
            problems = []
            for name, info in sorted(record["files"].items()):
                size = steps[step].get(name)
                if size is None:
                    problems.append(f"{self.remote.url(step, name)} is missing")
                elif size != info["size"]:
                    problems.append(
                        f"{self.remote.url(step, name)} has {size} bytes, the commit record says {info['size']}"
                    )
            path = self.root / f"step_{step}"
            problems = problems or self._fetch(path, step, record)
            if problems:
                log.warning(
                    "ignoring checkpoint step %d: %s; falling back to the previous one",
                    step,
                    "; ".join(problems),
                )
                continue
            return Committed(step, path, record)
        return None

    def _fetch(self, path: Path, step: int, record: dict) -> list[str]:
        """Collective: make `path` on every node a verified copy of the committed step. The ranks of
        a node (same hostname: one disk) split the files; a cached file that matches its sha256 is
        kept, any other is downloaded and checked. The problems found, naming the objects, on every
        rank."""
        hosts = _gather(socket.gethostname())
        peers = [r for r, h in enumerate(hosts) if h == hosts[self.rank]]
        mine = [n for i, n in enumerate(sorted(record["files"])) if i % len(peers) == peers.index(self.rank)]

        def one(name: str) -> str | None:
            info, f, url = record["files"][name], path / name, self.remote.url(step, name)
            if f.is_file() and f.stat().st_size == info["size"] and sha256_file(f) == info["sha256"]:
                return None  # cached here (this node saved or fetched it)
            try:
                self.remote.download(step, name, f)
            except MissingObject:
                return f"{url} is missing"
            if f.stat().st_size != info["size"]:
                return f"{url} has {f.stat().st_size} bytes, the commit record says {info['size']}"
            if sha256_file(f) != info["sha256"]:
                return f"{url} does not match its sha256 in the commit record"
            return None

        def fetch() -> list[str]:
            path.mkdir(parents=True, exist_ok=True)
            return [p for p in _parallel(one, mine) if p]

        return [p for part in self._collective(fetch) for p in part]

    def load(self, engine, found: Committed) -> dict:
        """Collective: restore DeepSpeed's state and this rank's RNG from a verified checkpoint."""
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
