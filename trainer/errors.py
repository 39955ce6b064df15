"""The one error type for expected failures: a message for the user, what it names, an exit code.

Every failure a user can fix (a config field, a corpus file, storage, a CLI argument) raises a
subclass, which keeps its other base (`ValueError`, `OSError`, `RuntimeError`) for callers that catch
that; the CLI turns any of them into one message and its exit code (`launch/errors.py`).
"""

from __future__ import annotations


class PretrainError(Exception):
    """An expected failure. `field` is the config field or CLI option to change, `path` the file or
    URL at fault (either may be empty); the message already names them for the user."""

    exit_code = 2
    restartable = True
    """False for a failure every rank raised alike, after agreeing on it, that a restart would only
    repeat (a full disk at a save): the launcher ends the run instead of restarting its ranks."""

    def __init__(self, *args, field: str = "", path: str = "", exit_code: int | None = None):
        super().__init__(*args)
        self.field, self.path = field, path
        if exit_code is not None:
            self.exit_code = exit_code
