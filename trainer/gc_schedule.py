"""Python's garbage collection at the same step on every rank (`train.gc_every`)."""

from __future__ import annotations

import gc
import time


class StepAlignedGC:
    """Full collections every `every` steps, at the same step on every rank.

    Python's automatic collector runs when allocations cross a threshold: at its own moment on
    each rank, mid-step, and every other rank waits for it at the next collective. Megatron-LM
    (`--manual-gc`) and torchtitan (`gc_freq`) schedule it for the same reason. Once `start()` is
    called (after the first step) the automatic collector is off and what exists is frozen (the
    model, the engine, the modules: long-lived, not garbage); each scheduled collection walks only
    what is newer, and the first one freezes its survivors too. Reference counting still frees
    objects at once; only reference cycles wait. `every` = 0 leaves Python's collector alone.
    """

    def __init__(self, every: int):
        self.every = every
        self.started = False
        self._was_enabled = gc.isenabled()
        self._first = True

    def start(self) -> None:
        """From now on collections happen only at scheduled steps; `restore()` undoes it."""
        self.started = True
        if self.every:
            gc.disable()
            gc.freeze()

    def maybe_collect(self, step: int) -> dict[str, float]:
        """After `step` (1-based) finished: {"gc_s": pause} when a collection was due, else {}."""
        if not self.started or not self.every or step % self.every:
            return {}
        t0 = time.perf_counter()
        gc.collect()
        if self._first:  # survivors of the first are long-lived too (rank 0: MLflow's modules)
            gc.freeze()
            self._first = False
        return {"gc_s": time.perf_counter() - t0}

    def restore(self) -> None:
        if self.started and self.every:
            gc.unfreeze()
            if self._was_enabled:
                gc.enable()
