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
    """A log that a kill or a full disk may leave with a torn last line: each event is one
    `os.write` of one whole line on a file opened with O_APPEND (whole lines from several writers
    never interleave), a write after a torn line starts a new line, and the reader skips any line
    that does not parse, with a warning. Nothing that decides how a run resumes may depend on this
    file being well formed."""

    def __init__(self, run_dir: str, enabled: bool = True):
        self.path = os.path.join(run_dir, "events.jsonl") if run_dir and enabled else ""

    def read(self) -> list[dict]:
        """Every event that parses, in order; a torn or garbled line is skipped with a warning
        naming the file and the line."""
        if not self.path:
            return []
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        events = []
        for number, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                event = json.loads(raw.decode())
            except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
                event = None
            if not isinstance(event, dict):
                log.warning(
                    "%s: skipping line %d, which is not a whole event (a write cut short by a kill "
                    "or a full disk?): %r",
                    self.path,
                    number,
                    raw[:80],
                )
                continue
            events.append(event)
        return events

    def attempts(self) -> int:
        """How many times training has started in this run before now."""
        return sum(1 for e in self.read() if e.get("event") == "start")

    def write(self, event: str, **fields) -> None:
        if not self.path:
            return
        line = json.dumps({"time": time.time(), "event": event, **fields}, sort_keys=True) + "\n"
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = (
                        "\n" + line
                    )  # the last write was cut short: leave its fragment on a line of its own
                os.write(fd, line.encode())  # one write of whole lines: concurrent appends never interleave
                os.fsync(fd)
            finally:
                os.close(fd)
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
