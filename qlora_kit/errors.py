"""The one exception type for user mistakes.

Anything the user can fix (a bad recipe key, a missing file, an offline hub id) is raised as
`UserError`; the CLI prints it without a traceback and exits with code 2. Everything else is a
bug or a runtime failure and exits with code 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, with what to do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"
