"""Errors the CLI turns into a line each (bad input, exit code 2, never a traceback)."""

from __future__ import annotations

import difflib
import errno
from typing import Any, Iterable

#: errno values that say the disk or the folder refused a write, not that the code is wrong.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG}
#: The same refusals in the words of libraries that wrap them in their own exceptions (SQLite
#: under MLflow's store, safetensors' Rust writer).
_STORAGE_WORDS = ("database or disk is full", "attempt to write a readonly database", "no space left on device",
                  "disk quota exceeded", "read-only file system", "storagefull", "file too large",
                  "disk i/o error")


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


class KeyRefused(ValueError):
    """A validator of a mapping refusing the value of one of its keys: pydantic names the mapping
    (``tasks.0.options``); the line names the key's field and its value, as for any other field."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the valid name closest to a misspelt ``name`` (case aside),
    or ``""`` when none is close: a typo's error then says what was meant."""
    match = closest_name(name, candidates)
    return f"; did you mean {match!r}?" if match is not None else ""


def closest_name(name: str, candidates: Iterable[str]) -> str | None:
    """The valid name :func:`did_you_mean` names for a misspelt ``name``, or None when none is close."""
    by_lower: dict[str, str] = {}
    for c in candidates:
        by_lower.setdefault(str(c).lower(), str(c))
    name = str(name).lower()
    match = difflib.get_close_matches(name, list(by_lower), n=1, cutoff=0.77)
    if not match and len(name) >= 3:  # short names: one slip is a large share of the letters
        match = [c for c in by_lower if _one_slip(name, c)][:1]
    return by_lower[match[0]] if match else None


def _one_slip(a: str, b: str) -> bool:
    """``a`` and ``b`` differ by one typing slip: two adjacent letters swapped (``daer``,
    ``dare``), or one letter changed, missing or extra."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                   and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def last_line(message: str | None, empty: str) -> str:
    """The last non-blank line of ``message`` (where a traceback or a wrapped error puts its
    reason), or ``empty`` when it has none: a one-line error never ends in an IndexError."""
    lines = (message or "").strip().splitlines()
    return lines[-1].strip() if lines else empty


def storage_problem(exc: BaseException, store: str | None = None) -> str | None:
    """``"cannot write <file>: <why>"`` when ``exc`` (or an exception it was raised from) is a
    write the disk or the folder refused (full, over quota, read-only; ``cannot access`` for no
    permission, which a read meets too), else None: such a failure says what to free or fix,
    not a traceback. ``store`` names the MLflow tracking store, whose SQLite errors name no file."""
    seen: set[int] = set()
    worded = None
    while exc is not None and id(exc) not in seen and not isinstance(exc, HarnessError):
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            where = exc.filename2 or exc.filename  # a copy's destination, else the file written
            verb = "cannot access" if exc.errno == errno.EACCES else "cannot write"
            return f"{verb} {where}: {exc.strerror}" if where else f"{verb}: {exc.strerror}"
        text = str(exc).strip()
        if worded is None and any(w in text.lower() for w in _STORAGE_WORDS):
            first = text.splitlines()[0][:300]
            if "sqlite" in f"{type(exc).__module__} {text}".lower():  # SQLite's words name no file
                first = f"{store or 'the MLflow store'}: {first}"
            worded = f"cannot write {first}"
        exc = exc.__cause__ if exc.__suppress_context__ else (exc.__cause__ or exc.__context__)
    return worded


class WriteRefused(HarnessError):
    """The disk or the folder refused a write (full, over quota, read-only, no permission); the
    message is :func:`storage_problem`'s. Not bad input: the command exits 1."""

    exit_code = 1
