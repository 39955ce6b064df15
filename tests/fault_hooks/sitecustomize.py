"""Test-only fault injection, for tests that start real processes (`pretrain` and the Ray workers it
starts): a directory holding this file first on PYTHONPATH makes every Python process import it at
start-up. With `PRETRAIN_TEST_FAIL_WRITES=<glob>` set, a `torch.save` to a path matching the glob
(DeepSpeed writes every checkpoint file with it) writes the first half of the file and then fails
with EIO, as a failing disk does. In-process tests call `fail_saves` directly.

With `PRETRAIN_TEST_KILL_AT=<phase>:<step>:<rank>` set, that rank SIGKILLs itself at that phase of
the save of that step, once per run (a marker file `test-killed` in the run directory keeps the
restarted group alive): `written` (its files written, before the commit), `committed` (rank 0:
commit.json written, before retention), `retention` (rank 0: the first old step's commit.json and
one of its files deleted, the rest not yet), `background` (`checkpoint.async`: in the thread that
writes the step, after its first file, while training goes on).

With `PRETRAIN_TEST_STALL_AT=<step>:<rank>` set, that rank stops in the middle of that step (once
per run: it creates the marker `test-stalled` in the run directory, then sleeps until the test
creates `test-continue` there), so that a test can act at a known point of a run of any speed.

With `PRETRAIN_TEST_SLOW_RANK=<rank>:<seconds>` set, that rank waits that long for every step's
data (a slow loader or node: a straggler). With `PRETRAIN_TEST_OOM_AT=<n>:<rank>` set, that rank's
n-th loss computation (0-based; one per micro batch) raises `torch.OutOfMemoryError`, as a GPU out of
memory does. With `PRETRAIN_TEST_PREPARE_KILL_AFTER=<n>` set, a `pretrain prepare` process SIGKILLs
itself right after writing its n-th completion record (trainer/data/pipeline.py: the tokenize units'
records, one per input, then the shards'). With `PRETRAIN_TEST_MLFLOW_AFTER_WORKERS=ok|fail` set, the
driver creates the MLflow run only after it has asked for the worker group, or fails to create it
then. Nothing in the project imports this module."""

from __future__ import annotations

import errno
import fnmatch
import functools
import importlib.abc
import importlib.util
import io
import os
import signal
import sys
import time

ENV = "PRETRAIN_TEST_FAIL_WRITES"
KILL_ENV = "PRETRAIN_TEST_KILL_AT"
STALL_ENV = "PRETRAIN_TEST_STALL_AT"
SLOW_ENV = "PRETRAIN_TEST_SLOW_RANK"
OOM_ENV = "PRETRAIN_TEST_OOM_AT"
PREPARE_KILL_ENV = "PRETRAIN_TEST_PREPARE_KILL_AFTER"
MLFLOW_LATE_ENV = "PRETRAIN_TEST_MLFLOW_AFTER_WORKERS"


def _failing(save, pattern: str):
    def patched(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and fnmatch.fnmatch(os.fspath(f), pattern):
            buf = io.BytesIO()
            save(obj, buf, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(f))
        return save(obj, f, *args, **kwargs)

    return patched


def fail_saves(pattern: str):
    """Make `torch.save` to files matching `pattern` fail with EIO; returns the undo."""
    import torch

    real = torch.save
    torch.save = _failing(real, pattern)
    return lambda: setattr(torch, "save", real)


class _PatchTorchOnImport(importlib.abc.MetaPathFinder):
    """Patches torch.save right after `import torch`, in whichever process imports it."""

    def __init__(self, pattern: str):
        self.pattern = pattern

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            module.save = _failing(module.save, self.pattern)

        spec.loader.exec_module = exec_and_patch
        return spec


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs `patch(module)` right after `import <name>`, in whichever process imports it."""

    def __init__(self, name: str, patch):
        self.name, self.patch = name, patch

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            self.patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _kill_once(run_dir) -> None:
    """SIGKILL this process unless a rank of this run was killed already (the marker file)."""
    try:
        os.close(os.open(os.path.join(run_dir, "test-killed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at(manager_module, spec: str) -> None:
    """Patch `CheckpointManager` so that rank `rank` SIGKILLs itself at `phase` of the save of
    `step` (see the module docstring); `spec` is `<phase>:<step>:<rank>`."""
    phase, step, rank = spec.split(":")
    step, rank = int(step), int(rank)
    cls = manager_module.CheckpointManager
    if phase not in ("written", "committed", "retention", "background"):
        raise ValueError(f"{KILL_ENV}: unknown phase {phase!r}")

    def here(self, at: int) -> bool:
        return at == step and self.rank == rank

    write, retain = cls._write, cls._retain

    @functools.wraps(write)
    def _write(self, engine, at):
        write(self, engine, at)
        if phase == "written" and here(self, at):
            _kill_once(self.root.parent)

    @functools.wraps(retain)
    def _retain(self, newest):
        if not here(self, newest):
            return retain(self, newest)
        if phase == "committed":
            _kill_once(self.root.parent)
        store, delete = self.store, self.store.delete

        def delete_then_die(at, names):  # as a kill in the middle of the store's delete leaves it
            store.uncommit(at)
            data = sorted(n for n in names if n != manager_module.COMMIT)
            if data:
                os.unlink(store.step_dir(at) / data[0])
            _kill_once(self.root.parent)
            delete(at, names)

        store.delete = delete_then_die
        try:
            return retain(self, newest)
        finally:
            store.delete = delete

    cls._write, cls._retain = _write, _retain
    persisting = getattr(manager_module, "_Persisting", None)
    if phase == "background" and persisting is not None:
        run = persisting._run

        @functools.wraps(run)
        def _run(self):
            if here(self._manager, self.step):
                snap, write = self._snap, self._snap.write

                def write_then_die():  # as a kill in the middle of the background write leaves it
                    first = next(w for w, _ in snap.files if w is not None)
                    first()
                    _kill_once(self._manager.root.parent)
                    return write()

                snap.write = write_then_die
            return run(self)

        persisting._run = _run


def stall_at(loop_module, spec: str) -> None:
    """Patch `train_step` so that rank `rank` stops for good at 0-based `step` (see the docstring)."""
    step, rank = (int(x) for x in spec.split(":"))
    train_step = loop_module.train_step

    @functools.wraps(train_step)
    def patched(t, at, micro):
        if at == step and t.session.rank == rank and t.session.run_dir:
            try:
                os.close(os.open(os.path.join(t.session.run_dir, "test-stalled"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return train_step(t, at, micro)
            while not os.path.exists(os.path.join(t.session.run_dir, "test-continue")):
                time.sleep(0.1)
        return train_step(t, at, micro)

    loop_module.train_step = patched


def slow_rank(loop_module, spec: str) -> None:
    """Patch the loop so that rank `rank` waits `seconds` for every step's data."""
    rank, seconds = spec.split(":")
    rank, seconds = int(rank), float(seconds)
    fetch = loop_module.Trainer.next_micro_batches

    @functools.wraps(fetch)
    def patched(self):
        if self.session.rank == rank:
            time.sleep(seconds)
        return fetch(self)

    loop_module.Trainer.next_micro_batches = patched


def oom_at(loop_module, spec: str) -> None:
    """Patch the loss so that rank `rank`'s `n`-th computation of it raises torch.OutOfMemoryError."""
    n, rank = (int(x) for x in spec.split(":"))
    loss = loop_module.cross_entropy
    calls = [0]

    @functools.wraps(loss)
    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] - 1 == n and int(os.environ.get("RANK", "0")) == rank:
            import torch

            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB"
            )
        return loss(*args, **kwargs)

    loop_module.cross_entropy = patched


def prepare_kill_after(pipeline_module, n: int) -> None:
    """Patch the prepare units' record writer: SIGKILL this process after its n-th record."""
    real = pipeline_module._record
    written = [0]

    def patched(path, record):
        real(path, record)
        written[0] += 1
        if written[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    pipeline_module._record = patched


def mlflow_after_workers(driver_module, outcome: str) -> None:
    """Patch the driver so that it creates the MLflow run only once it has asked Ray Train for the
    worker group (the run's `workers_requested` event), and then fails with TrackingError when
    `outcome` is "fail"; a driver that waits for the MLflow run before that fails after 120 s."""
    real = driver_module._create_mlflow_run

    def patched(cfg, run_dir):
        events, deadline = os.path.join(run_dir, "events.jsonl"), time.time() + 120
        while not (os.path.exists(events) and "workers_requested" in open(events).read()):
            if time.time() > deadline:
                raise RuntimeError("no worker group was requested before the MLflow run existed")
            time.sleep(0.05)
        if outcome == "fail":
            from trainer.errors import PretrainError

            raise PretrainError(f"tracking.uri {cfg.tracking.uri}: injected failure", field="tracking.uri")
        return real(cfg, run_dir)

    driver_module._create_mlflow_run = patched


def _patch_loop(module) -> None:
    if os.environ.get(STALL_ENV):
        stall_at(module, os.environ[STALL_ENV])
    if os.environ.get(SLOW_ENV):
        slow_rank(module, os.environ[SLOW_ENV])
    if os.environ.get(OOM_ENV):
        oom_at(module, os.environ[OOM_ENV])


if os.environ.get(ENV):
    sys.meta_path.insert(0, _PatchTorchOnImport(os.environ[ENV]))
if os.environ.get(KILL_ENV):
    sys.meta_path.insert(
        0, _PatchOnImport("trainer.checkpoint.manager", lambda m: kill_at(m, os.environ[KILL_ENV]))
    )
if any(os.environ.get(v) for v in (STALL_ENV, SLOW_ENV, OOM_ENV)):
    sys.meta_path.insert(0, _PatchOnImport("trainer.loop", _patch_loop))
if os.environ.get(MLFLOW_LATE_ENV):
    sys.meta_path.insert(
        0, _PatchOnImport("cluster.driver", lambda m: mlflow_after_workers(m, os.environ[MLFLOW_LATE_ENV]))
    )
if os.environ.get(PREPARE_KILL_ENV):
    sys.meta_path.insert(
        0,
        _PatchOnImport(
            "trainer.data.pipeline", lambda m: prepare_kill_after(m, int(os.environ[PREPARE_KILL_ENV]))
        ),
    )
