"""The one place a run decides to stop early: SIGTERM on any rank or the launcher's notice."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist


class Preemption:
    """SIGTERM (a preempted node, `kill`, a scheduler's stop) asks for a checkpoint and a clean stop.

    The handler only sets a flag; ranks agree on it with a MAX all-reduce at logged steps, so every
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

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def should_stop(self, device: torch.device, check_now: bool) -> bool:
        """Collective when `check_now` (the same steps on every rank): stop after this step?"""
        return check_now and (self.agreed(device) or self._launcher_notice())

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
