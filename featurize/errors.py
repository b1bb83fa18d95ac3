"""The one error type users see.

A ``UserError`` means the input or environment is wrong in a way the user can fix;
the CLI prints its message on one line and exits with code 1. Any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix.

    ``details`` (JSON-able) go into the CLI's ``--json`` error object next to the message,
    e.g. the files that were skipped and why.
    """

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after the work done so far was saved; the message says what was kept and how to resume."""
