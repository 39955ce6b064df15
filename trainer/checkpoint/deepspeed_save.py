"""DeepSpeed's `save_checkpoint`, with every write it makes guarded, fsynced and listed.

DeepSpeed's save is collective: a barrier after rank 0 creates the directory, an all-reduce of the
tag, a barrier at the end (checked on deepspeed 0.19.8). A rank whose write raises (a full disk,
an I/O error) leaves the others at the next of these until the process group's timeout (30
minutes). So each write DeepSpeed makes during a save goes through a guard that keeps the first
error and skips this rank's later writes, and DeepSpeed reaches its barriers on every rank; the
error is raised when `save_checkpoint` returns, where the ranks exchange their outcomes
(`CheckpointManager.on_all_ranks`). Every file written is fsynced before the save returns, so a
commit record never lists a file that a power cut could still lose.

DeepSpeed's writes during a save: `engine.checkpoint_engine.save` (every state file; a pipeline
stage's layer files too) and `.makedirs`, and rank 0's copy of its recovery scripts
(`engine._copy_recovery_script`, private). `check_engine` fails loudly when they are not there
(tests/test_checkpoint.py calls it on a real engine).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil

from trainer.fsutil import fsync_dir

_GUARDED = ("checkpoint_engine", "_copy_recovery_script")
_NEARLY_FULL = 1 << 20  # bytes free below which a write that failed without an errno hit a full disk


def check_engine(engine) -> None:
    """RuntimeError naming the DeepSpeed version when its save no longer writes where guarded."""
    ce = getattr(engine, "checkpoint_engine", None)
    missing = [n for n in _GUARDED if not hasattr(engine, n)]
    missing += [
        f"checkpoint_engine.{m}" for m in ("save", "makedirs") if ce is not None and not hasattr(ce, m)
    ]
    if missing:
        import deepspeed

        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__}: the engine has no {', '.join(missing)}; "
            "trainer/checkpoint/deepspeed_save.py guards its checkpoint writes there (checked on 0.19.8)"
        )


class _Writes:
    """The files one rank wrote during a save, and the first write that failed."""

    def __init__(self):
        self.files: list[str] = []
        self.error: BaseException | None = None

    def run(self, fn, path: str | None):
        if self.error is not None:
            return None  # this save already failed on this rank: write nothing more
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - any failed write fails the save, reported later
            self.error = _with_path(e, path)
            return None
        if path is not None and os.path.isfile(path):
            self.files.append(path)
        return out


def _with_path(e: Exception, path: str | None) -> Exception:
    """The error of a failed write, naming the file. torch's zip writer reports a short write as a
    RuntimeError ("unexpected pos ...") without the errno: on a disk with (next to) nothing free at
    that moment it is taken for what it is, ENOSPC."""
    if isinstance(e, OSError):
        return OSError(e.errno, e.strerror or str(e), path) if path and not e.filename else e
    if path:
        try:
            free = shutil.disk_usage(os.path.dirname(path) or ".").free
        except OSError:
            return e
        if free < _NEARLY_FULL:
            why = f"{os.strerror(errno.ENOSPC)} ({free:,} bytes free when torch's writer stopped short)"
            return OSError(errno.ENOSPC, why, path)
    return e


class _GuardedEngine:
    """`checkpoint_engine` as DeepSpeed sees it during a save: its writes guarded."""

    def __init__(self, inner, writes: _Writes):
        self._inner, self._writes = inner, writes

    def save(self, state_dict, path, *args, **kwargs):
        return self._writes.run(lambda: self._inner.save(state_dict, path, *args, **kwargs), str(path))

    def makedirs(self, path, *args, **kwargs):
        return self._writes.run(lambda: self._inner.makedirs(path, *args, **kwargs), str(path))

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextlib.contextmanager
def _guarded(engine):
    check_engine(engine)
    writes = _Writes()
    inner, copy_scripts = engine.checkpoint_engine, engine._copy_recovery_script
    engine.checkpoint_engine = _GuardedEngine(inner, writes)
    engine._copy_recovery_script = lambda save_path: writes.run(lambda: copy_scripts(save_path), save_path)
    try:
        yield writes
    finally:
        engine.checkpoint_engine = inner
        del engine._copy_recovery_script  # the class's method again


def fsync_files(paths: list[str]) -> None:
    """Each file's data and the directories holding them on stable storage."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in sorted({os.path.dirname(p) for p in paths}):
        fsync_dir(d)


def save(engine, root: str, tag: str) -> list[str]:
    """`engine.save_checkpoint(root, tag)` (explicit tag, no `latest` file); the files this rank
    wrote, fsynced with their directory and `root`. Raises this rank's first failed write only
    after DeepSpeed's own collectives are done on every rank."""
    with _guarded(engine) as writes:
        engine.save_checkpoint(root, tag=tag, client_state={}, save_latest=False)
    if writes.error is not None:
        raise writes.error
    fsync_files(writes.files)
    fsync_dir(root)  # the step directory's own entry
    return writes.files
