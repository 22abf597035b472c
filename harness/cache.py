"""Content-addressed files with atomic writes: a half-written file is never read as valid."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from harness.failpoints import failpoint


def content_key(obj: Any, length: int = 20) -> str:
    """A stable hash of JSON-serialisable data (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file in ``path``'s folder to write; moved onto ``path`` (``os.replace``, atomic
    on one filesystem) once the block ends without error, deleted if it raises. A killed writer
    leaves at most a hidden ``.tmp`` file, never a half ``path``; writers racing on one path each
    write their own temporary file, and the last replace wins whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # a folder it cannot create files in: name the file, not a temporary never made
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    try:
        try:
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide shared caches and results from other users
        finally:
            os.close(fd)
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        failpoint("cache_write")
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None:  # a refused write() names no file: name the one being written
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LockBusy(Exception):
    """Another process holds a :func:`build_lock` asked for with ``wait=False``."""


@contextlib.contextmanager
def build_lock(lock_path: str | os.PathLike, waiting: str | None = None, wait: bool = True) -> Iterator[bool]:
    """Held while one process builds what several jobs sharing a cache folder need at once (SLURM
    jobs of one sweep start together): the others wait, then read what it built instead of
    building it too. An advisory lock the OS drops with its process, so a killed builder never
    blocks the next. ``waiting`` is printed (with the lock file) when another process holds it;
    with ``wait=False`` :class:`LockBusy` is raised then instead of waiting.
    A folder the lock file cannot be written to is used unlocked. Yields whether the lock is held
    (what a builder deleting a killed builder's leftovers must know: unlocked, another's may be live)."""
    from filelock import FileLock, Timeout

    lock = FileLock(lock_path)
    try:
        Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not wait:
                raise LockBusy(str(lock_path)) from None
            if waiting:
                print(f"{waiting} (lock file {lock.lock_file})", file=sys.stderr, flush=True)
            lock.acquire()
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def make_folder(path: Path) -> list[Path]:
    """Create folder ``path`` and its missing parents; the folders made, innermost first, for a
    caller that leaves nothing there to take away again (:func:`remove_empty`)."""
    made = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    return made


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` in order (innermost first) while each is empty; the first holding
    anything (another writer's file, what a method saved) stops it, keeping the folders above."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files :func:`atomic_path` left for ``path`` (a killed writer's,
    possibly as large as the file); only safe while :func:`build_lock` guards every writer of
    ``path``. Returns the files removed."""
    path = Path(path)
    removed = []
    name = glob.escape(path.name)
    # and ``<name>.tmp<pid>``: how model files were written before they went through atomic_path
    for tmp in [*path.parent.glob(f".{name}.*.tmp"), *path.parent.glob(f"{name}.tmp[0-9]*")]:
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes, digest: bool = False) -> None:
    """``digest``: see :func:`harness.models.save_state_dict` (recorded before the rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        if digest:
            record_digest(path, tmp)


def digest_path(path: str | os.PathLike) -> Path:
    """Where :func:`record_digest` keeps ``path``'s sha256: in a ``<folder>.digests`` folder beside
    ``path``'s folder, whose listing stays the cached files."""
    path = Path(path)
    return path.parent.with_name(path.parent.name + ".digests") / f"{path.name}.sha256"


def record_digest(path: str | os.PathLike, written: str | os.PathLike | None = None) -> None:
    """Keeps the sha256 of ``written`` (default ``path``: a file about to be moved onto ``path``)
    beside ``path``, so a cache file edited in place later, its header still valid, is found."""
    from harness.models import file_digest

    atomic_write_bytes(digest_path(path), file_digest(written or path).encode())


def check_digest(path: str | os.PathLike, record: bool = True) -> None:
    """ValueError (damaged: rebuilt) when ``path`` differs from the digest recorded when it was
    written. A file cached before digests were kept gets its digest recorded now (when the cache
    can be written and ``record``): from then on an edit is found. Hashing costs ~2 ms for a 3 MB
    file, ~20 ms for 30 MB."""
    from harness.models import file_digest

    try:  # bytes: a digest file damaged past UTF-8 is a mismatch naming ``path``, not a bare codec error
        recorded = digest_path(path).read_bytes().strip()
    except FileNotFoundError:
        if record:
            with contextlib.suppress(OSError):
                record_digest(path)
        return
    if recorded != file_digest(path).encode():
        raise ValueError(f"{path}: its content differs from the sha256 recorded when it was written")


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float as None: JSON has no NaN, and strict readers (jq,
    a browser, most languages' parsers) refuse the ``NaN`` token Python writes by default."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, digest: bool = False) -> None:
    """Standard JSON (no ``NaN``: see :func:`finite_json`), key order kept: params read back as written."""
    atomic_write_bytes(path, json.dumps(finite_json(obj), indent=1, default=str, allow_nan=False).encode(), digest)


def read_json(path: str | os.PathLike) -> Any | None:
    """The parsed file, or None when it is missing or unreadable (treated as not cached)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
