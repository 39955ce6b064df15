"""DeepSpeed's `save_checkpoint`, with every write it makes guarded, fsynced and listed.

DeepSpeed's save is collective: a barrier after rank 0 creates the directory, an all-reduce of the
tag, a barrier at the end (checked on deepspeed 0.19.8). A rank whose write raises (a full disk,
an I/O error) leaves the others at the next of these until the process group's timeout (30
minutes). So each write DeepSpeed makes during a save goes through a guard that keeps the first
error and skips this rank's later writes, and DeepSpeed reaches its barriers on every rank; the
error is raised when `save_checkpoint` returns, where the ranks exchange their outcomes
(`CheckpointManager.on_all_ranks`). Every file written is fsynced before the save returns, so a
commit record never lists a file that a power cut could still lose.

Where DeepSpeed writes during a save, and how the guard gets there, is in
`trainer/library_internals.py` (`checkpoint_writes_through`).
"""

from __future__ import annotations

import errno
import os
import shutil

from trainer import library_internals
from trainer.fsutil import fsync_dir

_NEARLY_FULL = 1 << 20  # bytes free below which a write that failed without an errno hit a full disk


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
    writes = _Writes()
    with library_internals.checkpoint_writes_through(engine, writes.run):
        engine.save_checkpoint(root, tag=tag, client_state={}, save_latest=False)
    if writes.error is not None:
        raise writes.error
    fsync_files(writes.files)
    fsync_dir(root)  # the step directory's own entry
    return writes.files
