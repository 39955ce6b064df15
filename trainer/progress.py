"""What each rank tells the hang watchdog (cluster/watchdog.py), read from outside the ranks.

Every rank keeps `<run_dir>/progress/rank<r>.json` current: its pid, the step it is in, the phase
of that step (start, data, forward, backward, optimizer, pipeline, eval, checkpoint), when that
phase began, when it last finished a step and the median of its recent step times. The watchdog
reads these files from the driver, so it sees a rank that cannot run any Python any more: its
file simply stops changing. Imports no torch (the driver reads these records too).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import deque

# A phase's place in a step: of two ranks in the same step, the one in an earlier phase is behind.
PHASES = ("start", "data", "forward", "backward", "optimizer", "pipeline", "eval", "checkpoint")
# Phases whose length is not a step's: the watchdog allows them its start-up timeout.
LONG_PHASES = ("start", "eval", "checkpoint")
RECORD_BYTES = 1024  # each report overwrites one fixed-size record in place


def progress_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, "progress", f"rank{rank}.json")


class Progress:
    """This rank's progress record. Each report is one `pwrite` of a padded JSON record (no fsync):
    a few microseconds, and a reader never sees half of it on a local filesystem (a torn read on a
    shared one is retried by the watchdog at its next look)."""

    def __init__(self, run_dir: str, rank: int, window: int = 50, on_phase=None):
        self.rank, self.fd, self.on_phase = rank, -1, on_phase  # on_phase(phase, steps_done)
        self.step, self.phase, self.phase_since = 0, "start", time.time()
        self.steps_done, self.step_done_at, self.step_began = 0, 0.0, time.time()
        self.durations: deque[float] = deque(maxlen=window)
        if run_dir:
            os.makedirs(os.path.join(run_dir, "progress"), exist_ok=True)
            self.fd = os.open(progress_path(run_dir, rank), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._write()

    def enter(self, phase: str, step: int | None = None) -> None:
        """This rank begins `phase` (of `step`, 0-based, when given)."""
        if step is not None:
            self.step = step
        self.phase, self.phase_since = phase, time.time()
        self._write()
        if self.on_phase is not None:
            self.on_phase(phase, self.steps_done)

    def begin_step(self, step: int) -> None:
        self.step_began = time.time()
        self.enter("data", step)

    def step_done(self) -> None:
        now = time.time()
        self.durations.append(now - self.step_began)
        self.steps_done, self.step_done_at = self.steps_done + 1, now
        self._write()

    def median_step_s(self) -> float:
        return statistics.median(self.durations) if self.durations else 0.0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _write(self) -> None:
        if self.fd < 0:
            return
        record = {
            "rank": self.rank,
            "pid": os.getpid(),
            "step": self.step,
            "phase": self.phase,
            "phase_since": self.phase_since,
            "steps_done": self.steps_done,
            "step_done_at": self.step_done_at,
            "median_step_s": self.median_step_s(),
        }
        data = json.dumps(record).encode()
        os.pwrite(self.fd, data.ljust(RECORD_BYTES), 0)


def read_progress(run_dir: str, rank: int) -> dict | None:
    """A rank's last record, or None when it has none (yet) or it does not parse (read mid-write)."""
    try:
        with open(progress_path(run_dir, rank), "rb") as f:
            record = json.loads(f.read().decode())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


STOP_RECORD = "stopped.json"  # <run_dir>/stopped.json: one rank's failure that ends the whole group


def record_group_stop(run_dir: str, record: dict) -> None:
    """One rank's failure that a restart would repeat (out of memory) while its peers wait for it
    in a collective: the record the launcher ends the run with instead of restarting the group."""
    from trainer.fsutil import write_json_atomic

    if run_dir:
        write_json_atomic(os.path.join(run_dir, STOP_RECORD), record)


def group_stopped(run_dir: str) -> dict | None:
    """The record of a rank's failure that ends the run (`record_group_stop`), if there is one."""
    try:
        with open(os.path.join(run_dir, STOP_RECORD)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
