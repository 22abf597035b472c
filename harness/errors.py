"""Errors the CLI turns into one line and exit code 2 (bad input, never a traceback)."""


class HarnessError(Exception):
    """A user-facing error: the message names the file, field or tensor at fault."""
