"""Checkpoints: a checkpoint exists when its commit record exists and checks out.

Where each step of a checkpoint's life lives:

  decided     checkpointer.py       `Checkpointer.maybe_save(step)`: every N steps, at the end, or
                                    when a stop was asked for (SIGTERM)
  written     manager.py            `CheckpointManager.save`: every rank's DeepSpeed files and its
              deepspeed_save.py     RNG states (rng.py) into `<run_dir>/checkpoints/step_<N>/`,
                                    each write guarded and fsynced; a failed save fails on every
                                    rank alike and removes the uncommitted step
              (checkpoint.async)    or `save_async`: the state copied to host memory at the step
                                    boundary (`deepspeed_save.snapshot`), written by a thread,
                                    committed by `poll` at a later step once every rank is done
  committed   manager.py, store.py  each file hashed and stored, then `commit.json` last (sizes,
                                    sha256, layout, data position, fingerprints); retention keeps
                                    the last K; the `Store` is the run dir or S3
  verified    manager.py            `CheckpointManager.latest`/`verify`: the stored sizes, then
                                    every file's sha256, before anything is unpickled
  read back   resume.py             `resume()`: the newest verified commit, checked against the
                                    config and corpus, loaded as written (same layout) or
              reshard.py            converted to a layout-free form and loaded (another layout),
              deepspeed_format.py   which reads DeepSpeed's files (also for trainer/export.py)
"""

from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.deepspeed_format import consolidate, optimizer_step_count
from trainer.checkpoint.manager import CheckpointError, CheckpointManager, CheckpointSaveError, Committed
from trainer.checkpoint.resume import RESUME_INVARIANT, resume
from trainer.checkpoint.store import (
    COMMIT,
    LocalStore,
    MissingObject,
    ObjectStoreError,
    S3Store,
    Store,
    open_store,
)
from trainer.fsutil import sha256_file

__all__ = [
    "COMMIT",
    "RESUME_INVARIANT",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointSaveError",
    "Checkpointer",
    "Committed",
    "LocalStore",
    "MissingObject",
    "ObjectStoreError",
    "S3Store",
    "Store",
    "consolidate",
    "open_store",
    "optimizer_step_count",
    "resume",
    "sha256_file",
]
