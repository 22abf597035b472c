"""MLflow: one parent run per sweep, one nested run per job; only the driver writes.

Runs are found again by tags (the digest of what the sweep measures, each job's cache key), so
a rerun of a sweep continues the same parent run and logs every job exactly once.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from harness.config import SweepConfig
from harness.errors import HarnessError, WriteRefused, storage_problem
from harness.failpoints import failpoint

if TYPE_CHECKING:
    from harness.results import TrialCounts

SWEEP_TAG = "harness.sweep_digest"
#: On a sweep's parent run: "sweep" once ``harness sweep`` ran in it, "tune:<label>" while only
#: ``harness tune`` did (``harness report`` prefers a parent holding a whole sweep).
SCOPE_TAG = "harness.scope"
JOB_TAG = "harness.job_key"
#: On a sweep's parent run: the output folder of the driver that last opened it, whose lock tells
#: whether that driver is still running (see :meth:`Tracker._end_stale_runs`).
OUTPUT_TAG = "harness.output_dir"
#: Tells a generalization-block job's run from a main-protocol one.
PROTOCOL_TAG = "harness.protocol"
#: On a tuning run: its study's finished trials (``.failed`` and ``.pruned`` beside it), and the
#: job key of the best setting's run on test, whose table row they go with.
TRIALS_TAG = "harness.trials"
FINAL_KEY_TAG = "harness.final_key"
#: A ``tune`` block's settings a rerun may change and still extend the same study: MLflow params
#: cannot change, so they are tags of the tuning run (``tune.n_trials``, ...), the latest run's.
TUNE_TAGGED = ("n_trials", "n_parallel", "pruner")
#: On a failed job's, trial's or study's run: why it failed.
FAILURE_TAG = "harness.failure_reason"
#: On a finished job's run whose robustness study, run inside the job, failed: why (its
#: traceback is the run's ``traceback.txt``). The run is replaced once a rerun's study succeeds.
STUDY_FAILURE_TAG = "harness.study_failure_reason"
#: How :class:`Tracker` holds such a run's state: finished, yet to be logged again.
STUDY_FAILED = "STUDY_FAILED"
#: On a pruned trial's run: the last step it reported before it was stopped.
PRUNED_AT_TAG = "harness.pruned_at_step"
#: The git commit of the code that logged a run (the parent run and each job run), when known.
GIT_COMMIT_TAG = "mlflow.source.git.commit"


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b.c': 'value'} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = str(d)[:6000]
    return out


def quoted(value: str) -> str:
    """``value`` as a string of an MLflow search filter: in single quotes, or in double ones when it
    holds a single quote (a study's name may); MLflow has no escape, so not both."""
    return f'"{value}"' if "'" in value else f"'{value}'"


def curve_points(series: list) -> list[tuple[int, float]]:
    """(step, value) of a curve: a dense list (step = index) or sparse [step, value] pairs; a
    value a result file holds as null (a NaN step: see ``finite_json``) is NaN again."""
    def value(v: Any) -> float:
        return math.nan if v is None else float(v)

    return [(int(v[0]), value(v[1])) if isinstance(v, (list, tuple)) else (i, value(v)) for i, v in enumerate(series)]


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def seed_sqlite_store(uri: str, cache_dir: Path) -> bool:
    """Start a new SQLite tracking store as a copy of an empty, migrated one kept in the cache.

    MLflow creates a store by running its schema migrations (67 in 3.17.2): seconds for every new output
    folder. The template is built once per MLflow version (again if it is found damaged: a
    truncated copy would break every new sweep); the copy's Default experiment gets an artifact
    location inside the new store's folder. Returns whether a store was seeded (not when another
    process seeded it first)."""
    if not uri.startswith("sqlite:///"):
        return False
    db = Path(uri.removeprefix("sqlite:///"))
    if db.exists():
        return False
    import mlflow

    template = cache_dir / "mlflow" / f"empty-store-{mlflow.__version__}.db"
    if not _is_empty_store(template):
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        template.parent.mkdir(parents=True, exist_ok=True)
        tmp = template.with_name(f".{template.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            SqlAlchemyStore(f"sqlite:///{tmp}", str(template.parent / "mlruns")).engine.dispose()
            os.replace(tmp, template)
        except Exception as exc:
            problem = storage_problem(exc, str(template))
            if problem:  # SQLite's words name no file: this one
                raise WriteRefused(problem) from exc
            raise
        finally:
            tmp.unlink(missing_ok=True)
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(template, tmp)
        con = sqlite3.connect(tmp)
        try:
            with con:
                con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                            (str(db.parent / "mlruns" / "0"),))
        finally:
            con.close()
        return _publish_new(tmp, db)
    finally:
        tmp.unlink(missing_ok=True)


def _publish_new(tmp: Path, db: Path) -> bool:
    """Move the seeded copy ``tmp`` to ``db`` unless ``db`` exists by now: a sweep sharing the
    store (its ``tracking_uri``) may have seeded it, and already logged to it, since it was found
    missing; replacing it would lose those runs. A hard link fails where the name is taken, in
    one step; a filesystem without hard links gets the check and the move."""
    try:
        os.link(tmp, db)
    except FileExistsError:
        return False
    except OSError:
        if db.exists():
            return False
        os.replace(tmp, db)
    return True


def folder_in_use(out: Path) -> bool:
    """Whether a driver holds output folder ``out``'s lock (``.sweep.lock``, held while a sweep
    runs there; the OS drops it with its process). Tried, not taken: released at once. A lock
    file that cannot be opened is taken as held: its runs are then left alone."""
    from filelock import FileLock, Timeout

    path = out / ".sweep.lock"
    if not path.is_file():
        return False
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except (Timeout, OSError):
        return True
    lock.release()
    return False


def is_own_store(uri: str, out: Path) -> bool:
    """Whether ``uri`` is the output folder's own SQLite file, ``<out>/mlflow.db``."""
    own = (out / "mlflow.db").resolve()
    return uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite:///")).resolve() == own


def drop_metrics(db: Path, run_id: str, keep: set[str]) -> None:
    """Delete run ``run_id``'s metrics not in ``keep`` from the SQLite store ``db`` (history and
    latest value), which no MLflow call can do."""
    with closing(sqlite3.connect(db)) as con, con:
        stale = [key for (key,) in con.execute("SELECT key FROM latest_metrics WHERE run_uuid = ?", (run_id,))
                 if key not in keep]
        for table in ("metrics", "latest_metrics"):
            con.executemany(f"DELETE FROM {table} WHERE run_uuid = ? AND key = ?", [(run_id, k) for k in stale])


def drop_params(db: Path, run_id: str, keys: set[str]) -> None:
    """Delete run ``run_id``'s params ``keys`` from the SQLite store ``db``: a param cannot be
    changed or deleted through MLflow."""
    with closing(sqlite3.connect(db)) as con, con:
        con.executemany("DELETE FROM params WHERE run_uuid = ? AND key = ?", [(run_id, k) for k in sorted(keys)])


def replace_params(db: Path, run_id: str, prefix: str, params: Mapping[str, str]) -> None:
    """Run ``run_id``'s params whose keys start with ``prefix`` become ``params`` in the SQLite
    store ``db``, which no MLflow call can do."""
    with closing(sqlite3.connect(db)) as con, con:
        con.execute("DELETE FROM params WHERE run_uuid = ? AND substr(key, 1, ?) = ?", (run_id, len(prefix), prefix))
        con.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)",
                        [(k[:250], v, run_id) for k, v in params.items()])


def relocate_copied_store(uri: str, out: Path) -> str | None:
    """Point a copied output folder's store at its own artifacts.

    MLflow keeps absolute artifact locations, so an output folder copied (``cp -a``) to extend
    a sweep would go on writing artifacts into the original folder, and lose them with it.
    Only ``<out>/mlflow.db`` is touched: its experiments' ``<folder>/mlartifacts`` and
    ``<folder>/mlruns`` locations are moved to ``out``. An experiment of another sweep that logs
    to this store through its ``tracking_uri`` (its artifacts in its own folder, which still
    holds them, and none of them here) is no copy and keeps its location. Returns the old
    folder when it moved."""
    db = out / "mlflow.db"
    if not is_own_store(uri, out) or not db.is_file():
        return None
    here = out.resolve()
    moved = None
    with sqlite3.connect(db) as con:
        for exp_id, location in con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall():
            as_uri = location.startswith("file://")
            path = Path(location.removeprefix("file://"))
            parts = path.parts
            tops = [i for i, part in enumerate(parts) if part in ("mlartifacts", "mlruns")]
            if not tops:
                continue
            old = Path(*parts[:tops[-1]])
            if old == here:
                continue
            new_location = (here / Path(*parts[tops[-1]:]))
            if path.exists() and _holds_artifacts_of(con, exp_id, location, new_location) is False:
                continue  # another folder's sweep logging here: its artifacts lie there, not copied here
            new = new_location.as_uri() if as_uri else str(new_location)
            con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, exp_id))
            con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE experiment_id = ? "
                        "AND substr(artifact_uri, 1, ?) = ?", (new, len(location) + 1, exp_id, len(location), location))
            moved = old
    con.close()
    if moved:  # MLflow caches each run's artifact location per process, by run id
        from mlflow.tracking._tracking_service import utils

        getattr(utils, "_artifact_repos_cache", {}).clear()
    return str(moved) if moved else None


def _holds_artifacts_of(con: sqlite3.Connection, exp_id: Any, location: str, new_location: Path) -> bool | None:
    """Whether ``new_location`` holds an artifact folder of a run of experiment ``exp_id``
    (whose runs' artifact URIs start with ``location``): the experiment's artifacts were copied
    there. None: the experiment has no such runs (nothing tells)."""
    found = None
    for (uri,) in con.execute("SELECT artifact_uri FROM runs WHERE experiment_id = ?", (exp_id,)):
        if uri and uri.startswith(location):
            if (new_location / uri[len(location):].lstrip("/")).exists():
                return True
            found = False
    return found


def _is_empty_store(path: Path) -> bool:
    """Whether ``path`` is a sound, migrated store holding only the Default experiment."""
    if not path.is_file():
        return False
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            sound = con.execute("PRAGMA quick_check").fetchone() == ("ok",)
            migrated = sound and con.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
            return migrated and con.execute("SELECT experiment_id FROM experiments").fetchall() == [(0,)]
        finally:
            con.close()
    except sqlite3.Error:
        return False


def check_server(uri: str) -> None:
    """Fail at once on a tracking server that cannot be connected to: MLflow's client retries a
    refused connection or an unknown host with backoff (seven times by default, about four
    minutes, a warning line each) before it says so. Any HTTP answer counts as reachable; what
    the server then refuses MLflow reports itself."""
    import requests

    try:
        requests.head(uri, timeout=(10, 60), allow_redirects=False).close()
    except requests.RequestException as exc:
        reason = getattr(exc.args[0], "reason", exc) if exc.args else exc
        text = str(reason).split("): ", 1)[-1]  # urllib3 prefixes its connection object
        raise HarnessError(f"tracking_uri {uri!r}: MLflow cannot be reached ({text})") from None


#: The database servers MLflow keeps a store in (SQLite, a file, is :func:`local_store`).
_DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")


def check_database(uri: str) -> None:
    """Fail at once on a database store that takes no connection: MLflow retries a server that is
    down for about 100 s before saying so, and waits on one that never answers without end. A
    driver MLflow cannot load is left to MLflow's own message."""
    from urllib.parse import urlparse

    from sqlalchemy.exc import ArgumentError

    from harness.path_checks import database_problem

    if urlparse(uri).scheme.split("+")[0] not in _DATABASE_SCHEMES:
        return
    try:
        problem = database_problem(uri)
    except (ImportError, ArgumentError):
        return
    if problem:
        raise HarnessError(f"tracking_uri {uri!r}: MLflow cannot be reached ({problem})")


def check_reachable(uri: str) -> None:
    """Fail at once on a tracking server (:func:`check_server`) or database store
    (:func:`check_database`) that takes no connection, before MLflow's client retries it."""
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    else:
        check_database(uri)


def local_store(uri: str) -> bool:
    """Whether ``uri`` is a store in local files (an SQLite file, a folder store), which opening
    checks nothing :func:`harness.path_checks.check_tracking_uri` has not: MLflow is then opened when
    the sweep first logs, after its first jobs. Any other (a server, a database, a scheme MLflow has
    no store for) is opened at the start, so that a wrong one fails the sweep before any job."""
    from urllib.parse import urlparse

    return uri.startswith("sqlite:///") or urlparse(uri).scheme in ("", "file")


def allow_folder_stores() -> None:
    """Let MLflow open a folder (file) store, which it refuses unless told: a sweep may log to one
    (``tracking_uri`` a folder), and ``harness report`` and ``ui`` read what the sweep wrote."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


class Tracker:
    """The sweep's MLflow runs. MLflow is opened on first use, not at construction: its import
    and store take seconds, and a sweep's first result should not wait for them."""

    def __init__(self, cfg: SweepConfig):
        self.cfg = cfg
        self.uri = cfg.resolved_tracking_uri()
        self._client: Any = None
        self._sweep: tuple[str, dict[str, Any], str] | None = None
        self._parent_id: str | None = None
        self._logged: dict[str, tuple[str, str]] = {}  # job key -> (run id, status)
        self._names: dict[str, tuple[str, str]] = {}  # job key -> (label, run name) of its run
        self._writing: set[str] = set()  # runs this driver created or reopened (tuning runs) and may leave RUNNING
        self._creating: str | None = None  # the search filter of a run being created, until its id is held
        self._commit: tuple[str | None] | None = None  # the code's git commit, asked for once

    @property
    def commit(self) -> str | None:
        """The git commit of the code this driver runs (None outside a git checkout), tagged on
        the parent run it creates and on every job run it logs: a resumed sweep's jobs may run
        other code than the run that created its parent."""
        if self._commit is None:
            self._commit = (git_commit(),)
        return self._commit[0]

    @property
    def client(self) -> Any:
        self._open()
        return self._client

    @property
    def parent_id(self) -> str | None:
        """The sweep's parent run (created or reopened when first asked for)."""
        self._open()
        return self._parent_id

    def _open(self) -> None:
        if self._client is not None:
            return
        allow_folder_stores()
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        for name in ("alembic", "mlflow"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # it logs a store error's whole traceback, then raises it: the error is reported once, as one line
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        out = self.cfg.resolved_output_dir()
        out.mkdir(parents=True, exist_ok=True)
        seed_sqlite_store(self.uri, self.cfg.resolved_cache_dir())
        relocate_copied_store(self.uri, out)
        check_reachable(self.uri)
        if self.uri.startswith(("http://", "https://")):
            # MLflow prints two links to stdout as each run of a server ends: two lines per job
            # between the progress lines and the table, even with -q
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        try:  # a URI MLflow has no store for (a misspelt scheme): one line naming it, not its traceback
            client = MlflowClient(tracking_uri=self.uri)
        except (MlflowException, ImportError) as exc:  # ImportError: a database driver not installed
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise HarnessError(f"tracking_uri {self.uri!r}: MLflow cannot open it ({first[:300]})") from None
        name = self.cfg.experiment or self.cfg.name
        try:
            exp = client.get_experiment_by_name(name)
        except MlflowException as exc:
            raise HarnessError(f"tracking_uri {self.uri!r}: MLflow cannot be reached ({str(exc)[:200]})") from None
        self._client = client
        self.experiment_id = exp.experiment_id if exp is not None else self._create_experiment(name, out)
        if self._sweep is not None:
            self._start_sweep(*self._sweep)

    def _create_experiment(self, name: str, out: Path) -> str:
        """Experiment ``name``'s id, created with its artifacts in ``out``; or, where a sweep sharing
        the store (its ``tracking_uri`` and ``experiment``) created it since it was looked up, that
        one's, as if this sweep had started second."""
        from mlflow.exceptions import MlflowException

        artifacts = (out / "mlartifacts").resolve()
        try:
            return self._client.create_experiment(name, artifact_location=artifacts.as_uri())
        except MlflowException as exc:
            exp = self._client.get_experiment_by_name(name) if exc.error_code == "RESOURCE_ALREADY_EXISTS" else None
            if exp is None:
                raise
            return exp.experiment_id

    def start_sweep(self, digest: str, params: dict[str, Any], scope: str = "sweep") -> None:
        """The sweep's parent run: created, or reopened if a previous run of it created one,
        when MLflow is first used. A tracking server is contacted now: a wrong address should
        fail the sweep before its jobs run, not after. ``scope``: :data:`SCOPE_TAG`'s value."""
        self._sweep = (digest, params, scope)
        if self._client is not None:
            self._start_sweep(digest, params, scope)
        elif not local_store(self.uri):  # a server, a database, a URI MLflow cannot open: before any job
            self._open()

    def _start_sweep(self, digest: str, params: dict[str, Any], scope: str = "sweep") -> None:
        runs = self.client.search_runs([self.experiment_id], f"tags.`{SWEEP_TAG}` = '{digest}'",
                                       max_results=1, order_by=["attributes.start_time DESC"])
        folder = str(self.cfg.resolved_output_dir())
        if runs:
            self._parent_id = runs[0].info.run_id
            self.client.update_run(self._parent_id, status="RUNNING")
            if runs[0].data.tags.get(OUTPUT_TAG) != folder:
                self.client.set_tag(self._parent_id, OUTPUT_TAG, folder)
            if scope == "sweep" and runs[0].data.tags.get(SCOPE_TAG, "sweep") != "sweep":
                self.client.set_tag(self._parent_id, SCOPE_TAG, "sweep")
        else:
            tags = {SWEEP_TAG: digest, "harness.kind": "sweep", "mlflow.runName": self.cfg.name, SCOPE_TAG: scope,
                    OUTPUT_TAG: folder}
            if self.commit:
                tags[GIT_COMMIT_TAG] = self.commit
            self._parent_id = self._create_run(tags, SWEEP_TAG)
            self._log_params(self._parent_id, params)
        children = self.client.search_runs([self.experiment_id], f"tags.`mlflow.parentRunId` = '{self._parent_id}'",
                                           max_results=50000)
        self._logged, self._names = {}, {}
        for r in children:  # a job run a stopped driver left half-logged is logged again, whole
            if r.info.status not in ("FINISHED", "FAILED") and r.data.tags.get(JOB_TAG):
                self.client.delete_run(r.info.run_id)
            elif r.data.tags.get(JOB_TAG):
                status = STUDY_FAILED if STUDY_FAILURE_TAG in r.data.tags else r.info.status
                self._logged[r.data.tags[JOB_TAG]] = (r.info.run_id, status)
                self._names[r.data.tags[JOB_TAG]] = (r.data.tags.get("harness.label", ""), r.info.run_name)
        if is_own_store(self.uri, self.cfg.resolved_output_dir()):  # the folder's lock keeps other drivers out
            self._end_stale_runs()

    def _end_stale_runs(self) -> None:
        """Runs a killed driver left RUNNING (an earlier sweep's parent, its jobs, studies and
        trials) end KILLED: no driver is writing to them, and the UI should not say otherwise.
        Only in this folder's experiments (this sweep's, and those whose artifacts lie in this
        folder): a sweep of another folder logging to this store through its ``tracking_uri`` is
        not kept out by this folder's lock, and its runs may be live; in this sweep's experiment
        (it took the same name), those of a sweep whose folder's lock is held are left to it."""
        here = self.cfg.resolved_output_dir().resolve()

        def in_folder(location: str) -> bool:
            path = Path(location.removeprefix("file://")) if location.startswith(("file://", "/")) else None
            return path is not None and path.resolve().is_relative_to(here)

        experiments = [e.experiment_id for e in self.client.search_experiments()
                       if e.experiment_id == self.experiment_id or in_folder(e.artifact_location or "")]
        runs = self.client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=50000)
        known = {r.info.run_id: r for r in runs}
        for r in runs:
            if r.info.run_id != self._parent_id and r.data.tags.get("harness.kind") and not self._live_elsewhere(r, known):
                self.client.set_terminated(r.info.run_id, status="KILLED")

    def _live_elsewhere(self, run: Any, known: dict[str, Any]) -> bool:
        """Whether ``run`` belongs to a sweep of another output folder whose driver is running:
        a sweep logging here through its ``tracking_uri`` under this one's experiment name shares
        the experiment. Its parent run's :data:`OUTPUT_TAG` names its folder, whose lock tells."""
        from mlflow.exceptions import MlflowException

        while run.data.tags.get("mlflow.parentRunId"):  # a job's, a study's, a trial's: up to the sweep's run
            parent = run.data.tags["mlflow.parentRunId"]
            if parent not in known:
                try:
                    known[parent] = self.client.get_run(parent)
                except MlflowException:  # its parent deleted: no driver writes to it
                    return False
            run = known[parent]
        folder = run.data.tags.get(OUTPUT_TAG)
        return bool(folder) and Path(folder) != self.cfg.resolved_output_dir() and folder_in_use(Path(folder))

    def _create_run(self, tags: dict[str, str], key_tag: str) -> str:
        """Create a run, held in ``_writing`` for :meth:`abandon`. Until its id is held, the tag
        ``key_tag`` (unique to it) is what finds it: Ctrl-C may land after MLflow stored the run
        but before ``create_run`` returned its id. Only a run started from now on matches: another
        driver's run with the same tag (the same sweep on one tracking server) is not this one."""
        since = int(time.time() * 1000)
        self._creating = (f"tags.`{key_tag}` = {quoted(tags[key_tag])} and attributes.status = 'RUNNING' "
                          f"and attributes.start_time >= {since}")
        rid = self.client.create_run(self.experiment_id, tags=tags).info.run_id
        self._writing.add(rid)
        self._creating = None
        return rid

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k[:250], v) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(run_id, params=flat[i : i + 100])

    def rename(self, key: str, label: str, name: str, params: Mapping[str, Any] | None = None) -> None:
        """A logged job's run takes the label and run name the sweep now gives it (a renamed
        method keeps its jobs and runs), and in the folder's own store its ``job.params.*``
        ``params`` (a tuned best that is a job run before a default joined the space): MLflow
        cannot change a param."""
        if key in self._logged and self._names.get(key) != (label, name):
            rid = self._logged[key][0]
            self.client.set_tag(rid, "harness.label", label)
            self.client.set_tag(rid, "mlflow.runName", name)
            self._names[key] = (label, name)
            out = self.cfg.resolved_output_dir()
            if is_own_store(self.uri, out):  # an earlier harness logged the label as a param, which stays
                drop_params(out / "mlflow.db", rid, {"job.label"})
                if params is not None:
                    replace_params(out / "mlflow.db", rid, "job.params.", flatten({"job": {"params": params}}))

    def is_logged(self, key: str) -> bool:
        """Logged as finished (a failed attempt, or one whose robustness study failed, is replaced
        once the job succeeds)."""
        self._open()  # what is logged is known once the sweep's run is found
        return self._logged.get(key, (None, None))[1] == "FINISHED"

    def log_job(self, result: Any, params: dict[str, Any], config_digest: str,
                files: list[Path] | None = None, name: str | None = None) -> str | None:
        """A nested run for a finished (or failed) job; skipped if this job is already logged (a job
        failing again, or whose robustness study fails again, updates its run's reason and traceback).

        ``name``: the run's name (default the result's title); a grid point's names its setting,
        so that the points of a grid can be told apart in the UI."""
        from mlflow.entities import Metric

        self._open()  # what is logged is known once the sweep's run is found
        previous = self._logged.get(result.key)
        if previous and previous[1] == "FAILED" and result.status != "ok":
            self._refail(previous[0], result, files or [])
            return None
        if previous and previous[1] == STUDY_FAILED and result.status == "ok" and result.study_error:
            self._refail(previous[0], result, files or [], STUDY_FAILURE_TAG)
            return None
        if previous and previous[1] == "FINISHED":
            return None  # logged already
        if previous:
            self.client.delete_run(previous[0])  # the failed attempt, now superseded
        name = name or result.title
        tags = {"mlflow.parentRunId": self.parent_id, JOB_TAG: result.key, "harness.kind": result.kind,
                "harness.config_digest": config_digest, "mlflow.runName": name, "harness.label": result.label}
        if result.task:
            tags["harness.task"] = result.task
        tags[PROTOCOL_TAG] = result.protocol
        if self.commit:
            tags[GIT_COMMIT_TAG] = self.commit
        if result.error:
            tags[FAILURE_TAG] = result.error[:5000]
        if result.study_error:
            tags[STUDY_FAILURE_TAG] = result.study_error[:5000]
        if result.warnings:
            tags["harness.warnings"] = "\n".join(result.warnings)[:5000]
        tags.update({f"harness.{k}": v for k, v in result.ran_on.items()})  # from a run to its SLURM job and log
        rid = self._create_run(tags, JOB_TAG)
        self._log_params(rid, params)
        metrics = [Metric(k, float(v), 0, 0) for k, v in result.metrics.items()]
        metrics += [Metric(f"time/{k}", float(v), 0, 0) for k, v in result.timings.items()]
        for curve, series in result.artifacts.get("curves", {}).items():  # e.g. adaptation loss per step
            metrics += [Metric(curve, float(v), 0, step) for step, v in curve_points(series)]
        for i in range(0, len(metrics), 500):
            self.client.log_batch(rid, metrics=metrics[i : i + 500])
        failpoint("mlflow_log")
        for f in files or []:
            self.client.log_artifact(rid, str(f))
        status = "FINISHED" if result.status == "ok" else "FAILED"
        self.client.set_terminated(rid, status=status)
        self._writing.discard(rid)
        self._logged[result.key] = (rid, STUDY_FAILED if result.study_error else status)
        self._names[result.key] = (result.label, name)
        return rid

    def _refail(self, rid: str, result: Any, files: list[Path], tag: str = FAILURE_TAG) -> None:
        """A failed job (or robustness study, ``tag`` :data:`STUDY_FAILURE_TAG`) that failed again
        keeps its one run, with the latest attempt's reason and traceback: what the command's
        summary and ``artifacts/<key>/traceback.txt`` say."""
        reason = result.study_error if tag == STUDY_FAILURE_TAG else result.error
        if reason:
            self.client.set_tag(rid, tag, reason[:5000])
        for f in files:
            self.client.log_artifact(rid, str(f))

    def _find_or_create(self, key: str, tags: dict[str, str], finished_only: bool = False) -> tuple[str, bool]:
        """A run identified by ``harness.run_key`` (reused on rerun), and whether it is new.

        With ``finished_only`` a run left unfinished (RUNNING or KILLED: its writer was stopped)
        is replaced."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`harness.run_key` = {quoted(key)}", max_results=1)
        if runs and finished_only and runs[0].info.status not in ("FINISHED", "FAILED"):
            self.client.delete_run(runs[0].info.run_id)
            runs = []
        if runs:
            return runs[0].info.run_id, False
        return self._create_run({**tags, "harness.run_key": key}, "harness.run_key"), True

    def tuning_run(self, study: str, label: str, tune: dict[str, Any]) -> str:
        """The method's tuning run (child of the sweep run); trials nest under it. Its params are
        the ``tune`` block but :data:`TUNE_TAGGED`, which are tags set at every (re)opening."""
        from mlflow.entities import RunTag

        rid, new = self._find_or_create(f"tune:{study}", {
            "mlflow.parentRunId": self.parent_id, "harness.kind": "tune", "harness.label": label,
            "harness.study": study, "mlflow.runName": f"tune/{label}"})
        self._writing.add(rid)  # before it is reopened or its params logged
        if new:
            self._log_params(rid, {"tune": {k: v for k, v in tune.items() if k not in TUNE_TAGGED}})
        else:
            self.client.update_run(rid, status="RUNNING")
            if FAILURE_TAG in self.client.get_run(rid).data.tags:  # an earlier failed run's: this one may finish
                self.client.delete_tag(rid, FAILURE_TAG)
        self.client.log_batch(rid, tags=[RunTag(f"tune.{k}", str(tune[k])) for k in TUNE_TAGGED])
        return rid

    def log_trial(self, tune_run: str, study: str, number: int, params: dict[str, Any], result: Any,
                  state: str, objective: str, intermediate: Mapping[int, float] | None = None) -> None:
        """One run per trial, logged once (a resumed study skips trials already logged).

        ``intermediate``: the objective values the trial reported while adapting, by step, logged
        as ``intermediate/<objective>``: all a pruned trial has to show (it ends without metrics),
        its last step also as the tag :data:`PRUNED_AT_TAG`."""
        from mlflow.entities import Metric

        rid, new = self._find_or_create(f"trial:{study}#{number}", {
            "mlflow.parentRunId": tune_run, "harness.kind": "trial", "harness.trial_number": str(number),
            "harness.trial_state": state, "mlflow.runName": f"trial {number}"}, finished_only=True)
        if not new:
            return
        self._log_params(rid, {"trial": params})
        metrics = [Metric(k, float(v), 0, 0) for k, v in result.metrics.items()]
        if state == "COMPLETE":
            metrics.append(Metric("objective", float(result.metrics[objective]), 0, 0))
        steps = intermediate or {}
        metrics += [Metric(f"intermediate/{objective}", float(v), 0, int(step)) for step, v in steps.items()]
        if state == "PRUNED" and steps:
            self.client.set_tag(rid, PRUNED_AT_TAG, str(max(steps)))
        if metrics:
            self.client.log_batch(rid, metrics=metrics)
        if result.error:
            self.client.set_tag(rid, FAILURE_TAG, result.error[:5000])
        self.client.set_terminated(rid, status="FAILED" if state == "FAIL" else "FINISHED")
        self._writing.discard(rid)

    def finish_tuning_run(self, rid: str, best: dict[str, Any], best_value: float, files: list[Path],
                          counts: TrialCounts | None = None, final_key: str | None = None) -> None:
        """End the tuning run with its best setting, and what ``harness report`` needs to word its
        row: the study's trial counts and the key of the best setting's job (the row they go with)."""
        from mlflow.entities import Metric, RunTag

        # tags, not params: a resumed study with more trials may find a better setting
        tags = [RunTag(f"best.{k}", str(v)) for k, v in best.items()]
        if counts is not None:
            tags += [RunTag(TRIALS_TAG, str(counts.total)), RunTag(f"{TRIALS_TAG}.failed", str(counts.failed)),
                     RunTag(f"{TRIALS_TAG}.pruned", str(counts.pruned))]
        if final_key is not None:
            tags.append(RunTag(FINAL_KEY_TAG, final_key))
        self.client.log_batch(rid, metrics=[Metric("best_objective", float(best_value), 0, 0)], tags=tags)
        for f in files:
            self.client.log_artifact(rid, str(f), "optuna")
        self.client.set_terminated(rid, status="FINISHED")

    def fail_tuning_run(self, rid: str, reason: str) -> None:
        """End a study's run FAILED with its reason (too many failed trials, none completed)."""
        self.client.set_tag(rid, FAILURE_TAG, reason[:5000])
        self.client.set_terminated(rid, status="FAILED")

    def stop_tuning_run(self, rid: str) -> None:
        """End a study's run KILLED: its driver stopped before the study ended (other folders still
        run its trials), and a rerun reopens the run."""
        self.client.set_terminated(rid, status="KILLED")

    def log_artifact(self, path: Path, run_id: str | None = None, subdir: str | None = None) -> None:
        self.client.log_artifact(run_id or self.parent_id, str(path), subdir)

    def drop_report_artifacts(self, folder: Path) -> None:
        """The parent run's ``report/`` artifacts that ``folder`` (the output folder's report/) no
        longer holds are deleted: a renamed or removed WeMoE row's ``routing-<row>.png`` would
        otherwise stay beside the new one. Done in the folder's own store alone, as for metrics:
        its lock keeps other writers out, and its artifacts lie in the folder."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        if not is_own_store(self.uri, self.cfg.resolved_output_dir()):
            return
        run = self.client.get_run(self.parent_id)
        repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=self.uri)
        for artifact in self.client.list_artifacts(self.parent_id, "report"):
            if not artifact.is_dir and not (folder / Path(artifact.path).name).is_file():
                repo.delete_artifacts(artifact.path)

    def log_summary_metrics(self, metrics: dict[str, float]) -> None:
        """The parent run's metrics become the sweep's summary as it stands (``<label>/acc/avg``
        per row): one an earlier run logged that it lacks (a renamed or removed label's) is
        deleted, else the parent shows it beside the new ones. MLflow has no call that deletes a
        metric: that is done in the folder's own store alone, whose lock keeps other writers out;
        on another store the old metric stays. Each is logged at the time it is (step 0): of values at one
        step MLflow shows the latest logged, and at one time the largest, which a fallen row's is not."""
        from mlflow.entities import Metric

        if metrics:
            now = int(time.time() * 1000)
            self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        out = self.cfg.resolved_output_dir()
        if is_own_store(self.uri, out):
            drop_metrics(out / "mlflow.db", self.parent_id, keep=set(metrics))

    def abandon(self, status: str) -> None:
        """End the runs this driver left RUNNING (the sweep's, its studies', a job's or trial's
        it was logging) with ``status`` (KILLED after Ctrl-C, FAILED after a crash), so the UI
        does not show a stopped sweep as running forever. A rerun reopens the sweep's and
        studies' runs and logs a half-logged job again. Does nothing if MLflow was never opened."""
        if self._client is None:
            return
        stopped = {*self._writing, self._parent_id} - {None}
        if self._creating is not None:
            stopped |= {r.info.run_id for r in self._client.search_runs([self.experiment_id], self._creating)}
        for rid in stopped:
            if self._client.get_run(rid).info.status == "RUNNING":
                self._client.set_terminated(rid, status=status)

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.parent_id, status="FINISHED" if ok else "FAILED")
