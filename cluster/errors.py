"""Expected failures of a run that more than one `cluster` module raises or catches; each is a
`PretrainError`, so the CLI prints its message and exits 2."""

from __future__ import annotations

from trainer.errors import PretrainError


class RunError(PretrainError, RuntimeError):
    """The run cannot start or did not finish; the message says why and where."""


class RunStopped(RunError):
    """The driver was asked to stop (SIGTERM): the run can be continued with `pretrain resume`."""


class CapacityError(RunError):
    """The cluster cannot hold the worker group the config asks for; the message has the numbers."""
