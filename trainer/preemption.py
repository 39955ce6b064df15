"""The one place a run decides to stop early: SIGTERM on any rank or the launcher's notice."""

from __future__ import annotations

import signal
import threading

from trainer.session import any_rank


class Preemption:
    """SIGTERM (a preempted node, `kill`, a scheduler's stop) asks for a checkpoint and a clean stop.

    The handler only sets a flag; ranks agree on it (`any_rank`) at logged steps, so every
    rank saves the same step. A signal handler can only be installed from the main thread: where
    the loop runs elsewhere (a Ray Train worker thread) the launcher's own handling applies.
    """

    def __init__(self, launcher_notice=lambda: False):
        self.requested = False
        self._launcher_notice = launcher_notice  # collective: the launcher's preemption notice
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self, check_now: bool) -> bool:
        """Collective when `check_now` (the same steps on every rank): stop after this step?"""
        return check_now and (any_rank(self.requested) or self._launcher_notice())

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
