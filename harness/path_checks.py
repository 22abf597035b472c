"""Checks of the folders and stores a sweep reads from or writes to (data roots, output and
cache folders, SLURM logs, Optuna storages, the MLflow store), found before any job runs and
without making anything."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config_errors import ConfigError, Gathering

if TYPE_CHECKING:
    from harness.config import SweepConfig


def relative_note(path: str) -> str:
    """For a relative path: that it is read from the current folder, not the sweep file's (the
    usual surprise when a command runs from elsewhere)."""
    return "" if Path(path).is_absolute() else f" (relative paths are read from the current folder, {Path.cwd()})"


def check_data_roots(cfg: SweepConfig, file: str) -> None:
    """Every task that reads its images from a data folder (its factory takes ``data_root``: the
    real datasets of :mod:`tasks.vision8`) has one that exists, from its ``options`` or the
    top-level ``data_root``; one whose factory has a default for it may have none. Checked with the sweep file, so the error names the file, the field
    and the value, not a job at run time. Tasks without the option (embedded, generated) cost a
    signature lookup each."""
    import inspect

    from tasks.base import resolve_task

    found = Gathering()  # every task's, a line each (a shared top-level data_root's too: it names the task)
    for i, t in enumerate(cfg.tasks):
        try:
            param = inspect.signature(resolve_task(t.name)).parameters.get("data_root")
        except (KeyError, TypeError, ValueError):  # check_tasks reports bad names; builtins lack a signature
            continue
        if param is None:
            continue
        where, root = _data_root_field(cfg, i)
        if root is None and param.default is not inspect.Parameter.empty:
            continue  # built without one, as the run builds it
        if root is None:
            found.errors.append(ConfigError(file, "data_root", f"task {t.name!r} reads its images from a data "
                                            f"folder: set data_root (or tasks.{i}.options.data_root)", show_value=False))
            continue
        path = Path(str(root)).expanduser()
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else f"does not exist{relative_note(str(root))}"
            found.errors.append(ConfigError(file, where, f"data folder of task {t.name!r} {what}", root))
    found.raise_any()


def _data_root_field(cfg: SweepConfig, i: int) -> tuple[str, Any]:
    """(field, value) of task ``i``'s data folder: its ``options.data_root``, else the top-level one."""
    options = cfg.tasks[i].options
    if "data_root" in options:
        return f"tasks.{i}.options.data_root", options["data_root"]
    return "data_root", cfg.data_root


def check_dataset_folders(cfg: SweepConfig, file: str) -> None:
    """What ``validate`` and ``--dry-run`` check beyond :func:`check_data_roots`: each of the
    eight datasets (:mod:`tasks.vision8`) is found in its data folder as the run finds it (its
    layout, class folders, non-empty splits; files listed, no image decoded), so a wrong, empty
    or half-copied folder is one error naming the field and folder, not the run's first."""
    from tasks.base import TaskDataError, resolve_task
    from tasks.vision8 import SPECS

    found = Gathering()
    for i, t in enumerate(cfg.tasks):
        if t.name not in SPECS:
            continue
        where, root = _data_root_field(cfg, i)
        try:
            resolve_task(t.name)(**{**t.options, "data_root": str(root)})
        except TaskDataError as exc:
            found.errors.append(ConfigError(file, where, str(exc), root))
        except TypeError as exc:  # an option the factory does not take
            found.errors.append(ConfigError(file, f"tasks.{i}.options", f"bad options for task {t.name!r}: {exc}",
                                            t.options))
    found.raise_any()


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` (the output or the cache folder) cannot be one: a file stands at it or
    above it; None when it can."""
    for p in (folder, *folder.parents):
        if p.exists():
            return None if p.is_dir() else ("is a file, not a folder" if p == folder else f"{p} is a file, not a folder")
    return None


def check_output_dir(cfg: SweepConfig, file: str) -> None:
    """The output folder can be one: checked with the sweep file (``validate`` included), not by
    the first write into it."""
    out = cfg.resolved_output_dir()
    problem = folder_problem(out)
    if problem:
        raise ConfigError(file, "output_dir", problem, str(out))


def check_storage_files(cfg: SweepConfig, file: str) -> None:
    """Each study's journal or SQLite file can be made where ``tune.storage`` puts it, found
    without making it (``validate`` writes nothing) and before the sweep builds its models: a
    file standing where its folder goes; for SQLite, which makes the database file but not its
    folder, a missing folder; a database server, one that does not take a connection (down,
    refused, a wrong password), connected to and closed, making no table."""
    for i, m in enumerate(cfg.methods):
        if not (m.tune and m.tune.storage):
            continue
        problem = storage_file_problem(m.tune.storage)
        if problem:
            raise ConfigError(file, f"methods.{i}.tune.storage", f"cannot open it: {problem}", m.tune.storage)
        problem = None if m.tune.storage.startswith("journal:") else database_problem(m.tune.storage)
        if problem:
            raise ConfigError(file, f"methods.{i}.tune.storage", f"cannot connect: {problem}", m.tune.storage)


#: Seconds a database server storage has to answer a connection (:func:`database_problem`).
CONNECT_TIMEOUT_S = 10

#: Each driver's keywords for how long it waits on a server (an unknown driver waits as it does): the
#: MySQL drivers' ``connect_timeout`` covers the TCP connection only, so a server that accepts it and
#: never answers the handshake held ``validate`` forever without ``read_timeout``.
_TIMEOUT_KEYWORDS = {"psycopg2": ("connect_timeout",), "psycopg": ("connect_timeout",), "pg8000": ("timeout",),
                     "pymysql": ("connect_timeout", "read_timeout"), "mysqldb": ("connect_timeout", "read_timeout"),
                     "mariadbconnector": ("connect_timeout", "read_timeout"),
                     "mysqlconnector": ("connection_timeout",)}


def database_problem(spec: str) -> str | None:
    """Why the database server of ``spec`` (an Optuna storage or MLflow store URL whose driver is
    installed) takes no connection, in the driver's words, or None; SQLite is a file
    (:func:`storage_file_problem`). Without it a server that is down or refuses the login passed
    ``validate`` and failed the sweep; MLflow retried it for minutes, or waited on a silent one forever."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    url = make_url(spec)
    if url.get_backend_name() == "sqlite":
        return None
    keywords = _TIMEOUT_KEYWORDS.get(url.get_driver_name(), ())
    engine = create_engine(url, poolclass=NullPool, connect_args={k: CONNECT_TIMEOUT_S for k in keywords})
    try:
        with engine.connect():
            return None
    except Exception as exc:  # noqa: BLE001  (each driver raises its own errors; SQLAlchemy wraps most)
        return driver_words(str(getattr(exc, "orig", None) or exc)) or type(exc).__name__
    finally:
        engine.dispose()


def driver_words(message: str) -> str:
    """The first line of a driver's error, for a one-line refusal; a line holding only an error
    code (mysql-connector's ``3024:``) is joined to the next one, cut after its first sentence,
    as the driver wraps it mid-sentence."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return ""
    if not any(c.isalpha() for c in lines[0]) and len(lines) > 1:
        rest = lines[1]
        return f"{lines[0]} {rest[:rest.index('. ') + 1] if '. ' in rest else rest}"
    return lines[0]


def storage_file_problem(spec: str) -> str | None:
    """Why the file of storage ``spec`` (valid, :func:`optuna_storage_problem`) cannot be made, or None."""
    if spec.startswith("journal:"):
        path = Path(spec[len("journal:"):]).expanduser()
    else:
        from sqlalchemy.engine import make_url

        url = make_url(spec)
        if url.get_backend_name() != "sqlite":
            return None
        path = Path(url.database)
        if not path.parent.exists():
            home = "; a database URL does not expand ~: write the full path" if str(path).startswith("~") else ""
            return f"folder {path.parent} does not exist (SQLite makes the database file, not its folder{home})"
    if path.is_dir():
        return f"{path} is a folder, not a file"
    problem = folder_problem(path.parent)
    return f"its folder {path.parent}: {problem}" if problem else None


def check_slurm_log_dir(cfg: SweepConfig, file: str) -> None:
    """On SLURM the output folder holds the jobs' logs, whose paths SLURM reads as patterns
    (``%j``, ``%x``; a backslash stops them): with such a character the logs would go elsewhere, or
    nowhere, and the jobs fail before they start. A line break would end the batch script's line
    that names the logs, and the rest of the path would run as a command. Part of
    :func:`validate_config`, so code that validates and runs a sweep without the CLI is refused too."""
    out = cfg.resolved_output_dir()
    if cfg.executor.kind == "slurm" and any(c in str(out) for c in "\n\r"):
        raise ConfigError(file, "output_dir", "holds a line break, which would end its line of the jobs' batch "
                          "script: the rest of the path would run there as a shell command; rename it", str(out))
    odd = [c for c in "%\\" if c in str(out)]
    if cfg.executor.kind == "slurm" and odd:
        raise ConfigError(file, "output_dir", f"holds {odd[0]!r}, which SLURM reads in the jobs' log paths as a "
                          "pattern (%j, %x, ...): the jobs would fail before they start; rename it", str(out))


def check_cache_dir(cfg: SweepConfig, file: str) -> None:
    """The cache folder (``cache_dir``, ``$HARNESS_CACHE`` or ``~/.cache/harness``) can be one: a
    file standing at it or above it would fail the first cache write mid-run with a traceback."""
    cache = cfg.resolved_cache_dir()
    problem = folder_problem(cache)
    if problem:
        where = "cache_dir" if cfg.cache_dir else ("cache_dir ($HARNESS_CACHE)" if os.environ.get("HARNESS_CACHE")
                                                   else "cache_dir (default)")
        raise ConfigError(file, where, problem, str(cache))


def tracking_file_problem(uri: str) -> str | None:
    """Why ``uri`` cannot be an MLflow store because of the file it names: the SQLite database's
    path given without ``sqlite:///``, which MLflow takes for a folder store, a ``sqlite:///``
    file that is no database (damaged, overwritten), or one whose folder cannot be made (a file
    stands at it or above it); MLflow fails on each at its first use, mid-sweep, with a
    traceback. None otherwise."""
    from urllib.parse import urlparse

    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        # its folder is made at the first log, after the first jobs: a file standing there failed the sweep then
        blocked = next((f for f in (db.parent, *db.parent.parents) if f.exists()), None)
        if blocked is not None and not blocked.is_dir():
            return f"{blocked} is a file, not a folder"
        return _sqlite_problem(db)
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return None
    path = Path(os.path.expanduser(parsed.path if parsed.scheme else uri))
    if not path.is_file():
        return None
    return f"is a file, not an MLflow store; a SQLite database is given as sqlite:///{path.resolve()}"


def _sqlite_problem(db: Path) -> str | None:
    """Why the existing file ``db`` is no SQLite database, or None (absent, or one)."""
    import sqlite3

    if not db.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(db)) as con:  # it exists: reading creates nothing
            con.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.OperationalError:  # locked by a writer, unreadable: a database all the same
        return None
    except sqlite3.DatabaseError as exc:
        return f"{db} is not an SQLite database ({exc}); move it aside, and the next sweep starts a new store"
    return None


def check_tracking_uri(cfg: SweepConfig, file: str) -> None:
    """The tracking store MLflow will open can be one (:func:`tracking_file_problem`), named by
    the setting that chose it: ``tracking_uri``, MLFLOW_TRACKING_URI, or the output folder's own."""
    uri = cfg.resolved_tracking_uri()
    problem = tracking_file_problem(uri)
    if not problem:
        return
    if cfg.tracking_uri:
        raise ConfigError(file, "tracking_uri", problem, uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError(file, "tracking_uri", f"unset, and MLFLOW_TRACKING_URI {uri!r}: {problem}", show_value=False)
    raise ConfigError(file, "output_dir", f"its MLflow store {problem}", show_value=False)
