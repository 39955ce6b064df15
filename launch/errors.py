"""The one place an expected failure becomes what the user sees: one message, last, on stderr, and
the error's exit code (2 for bad input). Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable

from trainer.errors import PretrainError

log = logging.getLogger("pretrain")


def run_command(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`fn(args)`, its expected failures reported; its exit code."""
    try:
        return fn(args)
    except PretrainError as e:
        return report(e)


def report(e: PretrainError) -> int:
    """Print `e` as the command's last line; its exit code. The traceback goes to the run's
    `errors/` (when the error happened in a run) and shows only at log level DEBUG."""
    log.debug("the traceback of the error below:", exc_info=e)
    message = str(e)
    run_dir = getattr(e, "run_dir", "")
    if run_dir and not getattr(e, "traceback_saved", False):
        from cluster.errors import save_traceback

        if where := save_traceback(run_dir, "pretrain", "".join(traceback.format_exception(e))):
            message += f"; traceback: {where}"
    sys.stdout.flush()
    print(f"pretrain: error: {message}", file=sys.stderr, flush=True)
    return e.exit_code
