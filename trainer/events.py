"""The run's event log: `<run_dir>/events.jsonl`, one JSON object per line, appended by rank 0
(and by the driver, before the workers start).

Starts (with the attempt number and the step resumed from), Ray's start, the driver's request for
the worker group, where each attempt's start-up went, committed checkpoints, preemption and the end of each attempt: what happened to a
run, in order, across restarts and resumes. The driver logs the file to MLflow as an artifact.
"""

from __future__ import annotations

import json
import logging
import os
import time

log = logging.getLogger("pretrain")


class EventLog:
    def __init__(self, run_dir: str, enabled: bool = True):
        self.path = os.path.join(run_dir, "events.jsonl") if run_dir and enabled else ""

    def read(self) -> list[dict]:
        if not self.path or not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def attempts(self) -> int:
        """How many times training has started in this run before now."""
        return sum(1 for e in self.read() if e.get("event") == "start")

    def write(self, event: str, **fields) -> None:
        if not self.path:
            return
        line = json.dumps({"time": time.time(), "event": event, **fields}, sort_keys=True)
        try:
            with open(self.path, "a") as f:  # one short line per write: appends do not interleave
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full disk: the log loses a line, the run does not fail over it
            log.warning("could not append the %s event to %s: %s", event, self.path, e)


class StartupClock:
    """Where one attempt's start-up went: seconds per phase, from the worker's entry (when the
    launcher says when that was) to the first finished step, written as one `startup` event."""

    def __init__(self, since: float | None = None):
        self.since = since or time.time()
        self.last = self.since
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        """`phase` ends now; it began at the previous mark."""
        now = time.time()
        self.phases[phase] = round(now - self.last, 3)
        self.last = now

    def fields(self) -> dict:
        return {
            "since": self.since,
            "phases_s": dict(self.phases),
            "total_s": round(self.last - self.since, 3),
        }
