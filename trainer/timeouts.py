"""The collective timeout by phase: long while a rank may wait minutes for another one (start-up
and the first step, a checkpoint save, an evaluation: `train.hang_startup_timeout_s`), short in
steady state (`cluster.collective_timeout_s`), so that a hang the watchdog cannot end (it is off,
or the driver is gone) still fails in minutes."""

from __future__ import annotations

from trainer import library_internals
from trainer.progress import LONG_PHASES


class CollectiveTimeouts:
    """Called with each phase a rank enters (`Progress.on_phase`); sets the timeout when it changes."""

    def __init__(self, steady_s: float, long_s: float):
        self.steady_s, self.long_s = steady_s, max(long_s, steady_s)
        self.current = None  # set at the first phase: the group may predate this run (in-process runs)

    def phase(self, phase: str, steps_done: int) -> None:
        want = self.long_s if phase in LONG_PHASES or steps_done == 0 else self.steady_s
        if want != self.current:
            library_internals.set_collective_timeout(want)
            self.current = want
