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


def save_traceback(run_dir: str, who: str, text: str) -> str:
    """Write `text` (a traceback) to `<run_dir>/errors/<UTC time>-<who>.txt`, where the user's one
    message points; returns that path, or "" when it cannot be written (the message still stands)."""
    import os
    import time

    if not run_dir:  # a loop run without a run directory (tests, torchrun) keeps nothing
        return ""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = os.path.join(run_dir, "errors", f"{stamp}-{who}.txt")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
    except OSError:
        return ""
    return path
