"""Errors the CLI turns into one line and exit code 2 (bad input, never a traceback)."""

from __future__ import annotations

import difflib
from typing import Any, Iterable


class HarnessError(Exception):
    """A user-facing error: the message names the file, field or tensor at fault."""


class NotBuilt(HarnessError):
    """An input that would have to be built first (trained, converted): raised where only a
    look-up was asked for, as a dry run does to tell cached jobs without building anything."""


class FieldError(HarnessError):
    """A sweep field found at fault once the sweep runs (a SLURM option sbatch refuses): the
    message names the field and its value; the command line adds the sweep file it came from."""

    def __init__(self, field: str, message: str, value: Any = None):
        self.field, self.message, self.value = field, message, value
        got = f" (got {value!r})" if value is not None else ""
        super().__init__(f"{field}: {message}{got}")


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the valid name closest to a misspelt ``name`` (case aside),
    or ``""`` when none is close: a typo's error then says what was meant."""
    by_lower: dict[str, str] = {}
    for c in candidates:
        by_lower.setdefault(str(c).lower(), str(c))
    match = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.77)
    return f"; did you mean {by_lower[match[0]]!r}?" if match else ""
