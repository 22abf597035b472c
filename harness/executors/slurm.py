"""SLURM dispatch through submitit: jobs go out as job arrays; the driver waits and records.

A job is a :class:`SweepJob` call on a node: it rebuilds the Workspace from the resolved config,
runs :func:`harness.job.run_job` and returns the result as a dict. Jobs never write MLflow or
the result cache; the driver does, as for local jobs.

Every submission is recorded in ``<output_dir>/slurm/submitted.json`` (key -> SLURM job id), so
a driver that was killed, a ``--detach``ed sweep, ``harness collect`` and ``harness status`` find
jobs that are still queued, running, or finished but not yet collected, instead of submitting
them again. Only jobs that died without a usable result are resubmitted.

Long jobs survive time limits and preemption through submitit's checkpoint protocol: SweepJob is
``Checkpointable``, so on SLURM's warning signal (USR2, ``signal_delay_s`` before the limit, or
a preemption) submitit requeues it with the same arguments, and the method resumes from the
checkpoints it keeps in its workdir ``<output_dir>/work/<key>`` (on the shared filesystem).
Near the time limit a job is requeued only once it has saved something there since it started
(see :func:`requeue_only_with_progress`); one that cannot resume runs on until SLURM stops it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import submitit
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from harness.cache import atomic_write_json, read_json
from harness.config import SweepConfig
from harness.errors import FieldError, HarnessError
from harness.executors.slurm_cluster import (NO_ANSWER, exists, listed_files, max_array_size, sacct_details,
                                             slurm_states)
from harness.executors.slurm_reasons import (CONTROLLER_DOWN, ended_reason, refused_field, state_reason,
                                             submitit_reason)
from harness.executors.slurm_settings import job_settings, signal_delay_s, submitit_executor
from harness.job import RECORDED, JobResult, read_result, study_records
from harness.plan import JobSpec, check_harness_code, harness_code_id
from harness.progress import plain_warning_lines, print_warning

#: SLURM states of a job that may still produce a result.
ALIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED",
                "PREEMPTED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT"}
#: Seconds to wait for a result file after SLURM says the job ended (shared filesystems lag).
RESULT_GRACE_S = 15.0
#: A warning this much earlier than ``signal_delay_s`` before the limit is still the limit's: SLURM
#: sends it up to one scheduler pass (30 s) early, and a job's clock starts after its start-up.
SIGNAL_EARLY_S = 60
#: Seconds a job may be unknown to SLURM (accounting lags behind submission) before it counts as lost.
UNKNOWN_GRACE_S = 60.0
STDERR_TAIL_LINES = 20


class SweepJob(submitit.helpers.Checkpointable):
    """The callable each SLURM job runs: picklable, holding only the resolved config as JSON.

    Being Checkpointable, a preempted job, or a timed-out one that saved a checkpoint in its
    workdir, is requeued with the same arguments; resuming from it is the method's business.
    """

    def __init__(self, cfg_json: dict[str, Any], progress: bool = True):
        self.cfg_json = cfg_json
        self.progress = progress  # the job's log shows preparation and adaptation progress

    def __call__(self, spec_dict: dict[str, Any]) -> dict[str, Any]:
        spec = JobSpec.from_dict(spec_dict)
        print(f"harness job {spec.title} (key {spec.key})", flush=True)
        plain_warning_lines()  # before the model is built: its log's warnings read as the driver's
        try:
            check_harness_code(spec)  # before the config, which another harness may not read
            from harness.job import run_job
            from harness.runtime import configure_threads, resolve_device
            from harness.workspace import Workspace

            cfg = SweepConfig.model_validate(self.cfg_json)
            workdir = cfg.resolved_output_dir() / "work" / spec.key
            with requeue_only_with_progress(workdir, cfg.executor.timeout_min):
                ws = Workspace(cfg, progress=getattr(self, "progress", True))  # jobs pickled before it had one
                slurm_cpus = os.environ.get("SLURM_CPUS_PER_TASK")  # the job's CPUs, not the node's
                configure_threads(cfg.threads, ws.encoder_params, int(slurm_cpus) if slurm_cpus else None)
                device = resolve_device(cfg.device)
                result = run_job(spec, ws, device, workdir)
        except Exception as exc:  # the workspace itself failed on the node: still a result, not a crash
            import traceback

            result = JobResult.of(spec, "failed", error=f"{type(exc).__name__}: {exc}",
                                  error_detail=traceback.format_exc(limit=-5))
        if result.status == "failed" or result.study_error:  # the stderr log, where the driver's table points
            what = "failed" if result.status == "failed" else "finished, its robustness study failed"
            print(f"harness job {spec.title} {what}: {result.error or result.study_error}\n"
                  f"{result.error_detail or ''}".rstrip(), file=sys.stderr, flush=True)
        else:
            print(f"harness job {spec.title}: {result.status}", flush=True)
        return result.to_dict()


def _saved_files(workdir: Path) -> dict[str, tuple[int, int]]:
    """(mtime, size) of each file a method saved in its workdir; temp files of writes in
    progress (``.name...tmp``, ``name.tmpPID``) are not saved yet."""
    found: dict[str, tuple[int, int]] = {}
    for path in workdir.rglob("*") if workdir.is_dir() else ():
        if path.name.startswith(".") or ".tmp" in path.name:
            continue
        try:
            st = path.stat()
        except OSError:  # replaced while we looked
            continue
        if not path.is_dir():
            found[str(path.relative_to(workdir))] = (st.st_mtime_ns, st.st_size)
    return found


def _progress(workdir: Path) -> dict[str, tuple[int, int]]:
    """What a requeued job resumes from: the files saved in its workdir and the robustness
    evaluations it recorded (:func:`harness.job.study_records`, read back instead of run again)."""
    records = study_records(workdir)
    return {**_saved_files(workdir), **{f"{records.name}/{k}": v for k, v in _saved_files(records).items()}}


@contextlib.contextmanager
def requeue_only_with_progress(workdir: Path, timeout_min: int, poll_s: float = 1.0) -> Iterator[None]:
    """Wraps submitit's USR2 handler (checkpoint and requeue) for the job running inside.

    A warning near the time limit requeues the job only once it has saved something to resume
    from in ``workdir`` (or recorded a robustness evaluation) since it started: a job that saved
    nothing would start over and be cut at the same point, up to submitit's requeue limit. Until something is saved it keeps
    running (a watcher requeues it as soon as a checkpoint appears); if nothing is, SLURM stops
    it at the limit and the driver reports TIMEOUT. A warning earlier than that is a preemption:
    the job is requeued at once, starting over if it saved nothing. Once the block has ended
    (done or failed) the warning is ignored. Outside a submitit job (no handler installed) this
    does nothing.
    """
    handler = signal.getsignal(signal.SIGUSR2)
    if not callable(handler):
        yield
        return
    started = time.monotonic()
    before = _progress(workdir)
    waiting = threading.Event()  # a time-limit warning came before anything was saved
    done = threading.Event()

    def on_warning(signum: int, frame: Any) -> None:
        near_limit = time.monotonic() - started >= timeout_min * 60 - signal_delay_s(timeout_min) - SIGNAL_EARLY_S
        if not near_limit or _progress(workdir) != before:
            waiting.clear()
            _count_as_timeout(handler, near_limit)
            try:
                handler(signum, frame)  # submitit: checkpoint, requeue, exit
            except subprocess.CalledProcessError as exc:
                if not _stopped_by_requeue(exc):
                    raise
                # SLURM ends this instance for the requeue, scontrol with it: exit as submitit would
                # once scontrol returned, not as a failed job whose result would end the requeued one
                os.write(2, f"requeued: {' '.join(map(str, exc.cmd))} was stopped with this instance\n".encode())
                sys.exit(-1)
        elif not waiting.is_set():
            waiting.set()
            # os.write, not print: the signal may have interrupted a write to stderr
            os.write(2, f"time limit near: nothing saved in {workdir} since the job started, so a requeue would "
                        "start over; not requeued unless a checkpoint is saved before the limit\n".encode())

    def watch() -> None:  # once warned, re-sends the warning to this process when something is saved
        while not done.wait(poll_s):
            if waiting.is_set() and _progress(workdir) != before:
                os.kill(os.getpid(), signal.SIGUSR2)
                return

    signal.signal(signal.SIGUSR2, on_warning)
    watcher = threading.Thread(target=watch, name="requeue-watch", daemon=True)  # not started in a handler
    watcher.start()
    try:
        yield
    finally:
        done.set()
        # the job is over (done, failed, or being requeued): a warning now has nothing to save, and
        # once Python shuts down it would kill the process after its result is written (FAILED)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _stopped_by_requeue(exc: subprocess.CalledProcessError) -> bool:
    """Whether submitit's ``scontrol requeue`` died of SIGTERM: the requeue it asked for stops
    every process of the job, and on a busy node scontrol itself is one of them before it returns."""
    return exc.returncode == -signal.SIGTERM and [str(c) for c in exc.cmd[:2]] == ["scontrol", "requeue"]


def _count_as_timeout(handler: Callable[..., Any], near_limit: bool) -> None:
    """Has submitit count this requeue against ``executor.requeues`` only if it is the time
    limit's: submitit's own guess counts any warning after all but 10 minutes (or 80 %) of the
    limit as a timeout, so every preemption of a job of 10 minutes or less used up a requeue."""
    owner = getattr(handler, "__self__", None)  # submitit's SignalHandler
    if owner is not None and hasattr(owner, "has_timed_out"):
        owner.has_timed_out = lambda: near_limit


# ---------------------------------------------------------------------------------------
# The submission record


class SubmissionLog:
    """``<output_dir>/slurm/submitted.json``: per job key, its current SLURM job id and history.

    Written only by the driver (atomically); jobs never touch it.
    """

    def __init__(self, folder: Path):
        self.path = folder / "submitted.json"

    def load(self) -> dict[str, dict[str, Any]]:
        data = read_json(self.path) or {}
        return dict(data.get("jobs", {}))

    def record(self, entries: dict[str, dict[str, Any]]) -> None:
        jobs = self.load()
        for key, entry in entries.items():
            old = jobs.get(key, {})
            history = list(old.get("history", []))
            history.append(entry["job_id"])
            jobs[key] = {**entry, "history": history}
        atomic_write_json(self.path, {"version": 1, "jobs": jobs})


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _seconds_since(timestamp: str | None) -> float:
    """Seconds since a recorded ``_now()`` timestamp; infinite when none was recorded."""
    if not timestamp:
        return float("inf")
    return (_dt.datetime.now(_dt.timezone.utc) - _dt.datetime.fromisoformat(timestamp)).total_seconds()


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------
# The executor


@dataclass
class _Tracked:
    spec: JobSpec
    job: Any  # a submitit Job
    state: str = "PENDING"
    started: bool = False
    ended_at: float | None = None  # when SLURM first said the job ended (its result file may lag)
    unknown_since: float | None = None
    outcome: str | None = None  # "done" | "failed" once a result is known
    show_tail: bool = False
    reason: str = ""  # why SLURM keeps it pending

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)

    def log_path(self, failed: bool = False) -> Path:
        return Path(self.job.paths.stderr if failed else self.job.paths.stdout)

    def paths(self) -> tuple[Path, Path]:
        """Its result file and its log: what the driver and the tables look for."""
        return Path(self.job.paths.result_pickle), self.log_path()


@dataclass(frozen=True)
class Submission:
    """What ``--detach`` tells: the record line (progress output, silenced by ``-q``) and the
    warnings on jobs found queued again (printed even with ``-q``: those jobs will fail or run
    under settings not asked for)."""

    line: str
    warnings: list[str]
    next_steps: str = "check with `harness status`, gather results with `harness collect`"


class SlurmExecutor:
    """Runs JobSpecs as submitit job arrays (``kind: slurm``) or in-process (``kind: debug``).

    Same interface as :class:`harness.executors.local.LocalExecutor`: ``run`` yields
    ``(spec, JobResult)`` as jobs finish. ``submit`` (``--detach``) records and returns.
    """

    shows_progress = True  # its live table replaces the driver's progress bar
    single_phase = True  # references and merges go out in one array

    def __init__(self, cfg: SweepConfig, workspace: Any = None, progress: bool = False,
                 console: Console | None = None):
        self.cfg = cfg
        self.kind = cfg.executor.kind
        self.folder = cfg.resolved_output_dir() / "slurm"
        self.log = SubmissionLog(self.folder)
        self.progress = progress
        self.console = console or Console(stderr=True, emoji=False)
        self.collect_only = False
        self._executor: Any = None
        self._ended: list[_Tracked] = []  # the jobs this pass found ended: accounting is asked about them together
        self._details: dict[str, dict[str, str]] = {}

    # -- submission ----------------------------------------------------------------------
    def _submitit(self) -> Any:
        if self._executor is None:
            if self.kind == "slurm" and shutil.which("sbatch") is None:
                raise HarnessError("executor.kind slurm: sbatch is not on PATH (not on a SLURM cluster?)")
            self._executor = submitit_executor(self.cfg, self.folder, self.kind)
        return self._executor

    def _submit(self, specs: list[JobSpec]) -> list[_Tracked]:
        """Submit as job arrays of at most the cluster's MaxArraySize tasks (sbatch refuses a
        larger one), each recorded as soon as it is out."""
        size = max_array_size() if self.kind == "slurm" else max(1, len(specs))
        tracked: list[_Tracked] = []
        for start in range(0, len(specs), size):
            tracked += self._submit_array(specs[start:start + size])
        return tracked

    def _submit_array(self, specs: list[JobSpec]) -> list[_Tracked]:
        executor = self._submitit()
        said = io.StringIO()  # submitit prints a refusing sbatch's stderr; the error below quotes it once
        try:
            with contextlib.redirect_stderr(said):
                jobs = executor.map_array(SweepJob(self.cfg.model_dump(mode="json"), self.progress),
                                          [s.to_dict() for s in specs])
        except submitit.core.utils.FailedJobError as exc:  # sbatch refused (bad partition, account, ...)
            reason = " ".join(str(exc).split())
            if CONTROLLER_DOWN.search(reason):  # no option is at fault: the cluster did not answer
                raise HarnessError(f"SLURM did not take the jobs: {reason}; its controller did not answer, so "
                                   "this array was not submitted: rerun once `sinfo` answers (jobs already "
                                   "submitted are found again, not submitted twice)") from None
            field, value = refused_field(self.cfg.executor, reason)
            message = f"SLURM refused the jobs: {reason}"
            if value is None and field != "executor":
                message += " (not given: the cluster's default)"
            raise FieldError(field, message, value) from None
        except BaseException:
            sys.stderr.write(said.getvalue())
            raise
        sys.stderr.write(said.getvalue())
        if self.kind == "slurm":
            settings = job_settings(self.cfg)
            self.log.record({s.key: {"job_id": str(j.job_id), "title": s.title, "kind": s.kind,
                                     "submitted_at": _now(), "method_id": s.method_id, "task_code": s.task_code,
                                     "harness_dir": s.harness_dir, "harness_code": s.harness_code,
                                     "settings": settings}
                             for s, j in zip(specs, jobs)})
        return [_Tracked(s, j) for s, j in zip(specs, jobs)]

    def _reattach(self, specs: list[JobSpec]) -> tuple[list[_Tracked], list[JobSpec], set[str] | None]:
        """Split specs into jobs found again (queued, running, or finished with a usable result)
        and specs to submit (never submitted, or the last attempt died or failed), with the listing
        of the found jobs' folders it looked at (:func:`listed_files`), which the warnings about
        them reuse: one listing per submission, not one for each thing told of its jobs."""
        if self.kind != "slurm":
            return [], list(specs), None
        records = self.log.load()
        found = {s.key: submitit.SlurmJob(folder=self.folder, job_id=records[s.key]["job_id"])
                 for s in specs if s.key in records}
        listed = listed_files(Path(j.paths.result_pickle) for j in found.values())
        if self.collect_only:  # collect waits on every recorded job, whatever its state
            return ([_Tracked(s, found[s.key]) for s in specs if s.key in found],
                    [s for s in specs if s.key not in found], listed)
        states = slurm_states([str(j.job_id) for j in found.values() if not exists(j.paths.result_pickle, listed)])
        attach, submit = [], []
        for s in specs:
            job = found.get(s.key)
            if job is None:
                submit.append(s)
                continue
            if exists(job.paths.result_pickle, listed):
                usable = _usable_result(job)
            else:
                usable = states[str(job.job_id)] in ALIVE_STATES | {NO_ANSWER}  # no answer: not resubmitted twice
            (attach if usable else submit).append(_Tracked(s, job) if usable else s)
        return attach, submit, listed

    def changed_settings(self, attach: list[_Tracked], listed: set[str] | None) -> str | None:
        """What to tell of jobs found queued or running that were submitted with other executor
        settings (a rerun after raising ``mem_gb``): SLURM keeps the settings a job was submitted
        with, so they would end as the failed ones did; None when there are none. ``listed``:
        the listing of their folders that finding them made (:meth:`_reattach`)."""
        records = self.log.load()
        now = job_settings(self.cfg)
        ids, fields = [], {}
        for t in attach:
            then = records.get(t.spec.key, {}).get("settings")
            if then is None or exists(t.job.paths.result_pickle, listed):
                continue
            diff = {k: (then.get(k), v) for k, v in now.items() if then.get(k) != v}
            if diff:
                ids.append(t.job_id)
                fields.update(diff)
        if not ids:
            return None
        said = ", ".join(f"{k} {old!r}, now {new!r}" for k, (old, new) in fields.items())
        return (f"{len(ids)} queued or running job{'' if len(ids) == 1 else 's'} found from an earlier submission "
                f"keep{'s' if len(ids) == 1 else ''} the executor settings of that submission ({said}): `scancel {' '.join(ids)}` and rerun to submit with these")

    def changed_harness(self, attach: list[_Tracked], listed: set[str] | None) -> str | None:
        """What to tell of jobs found queued or running that were submitted with other harness code
        than this driver's (the harness was updated or edited since): their keys did not change, but
        each one that starts on a node importing other code than it was planned with fails with
        HarnessChanged (the nodes usually import what this driver does); None when there are none. Submissions
        recorded before the code was recorded are not told apart. ``listed``: as for :meth:`changed_settings`."""
        records = self.log.load()
        here, now = harness_code_id()
        ids, then = [], {}
        for t in attach:
            rec = records.get(t.spec.key, {})
            code = rec.get("harness_code")
            if not code or code == now or exists(t.job.paths.result_pickle, listed):
                continue
            ids.append(t.job_id)
            then.setdefault((rec.get("harness_dir", ""), code), None)
        if not ids:
            return None
        said = "; ".join(f"{where}, code {code}" for where, code in then)
        return (f"{len(ids)} queued or running job{'' if len(ids) == 1 else 's'} found from an earlier submission "
                f"{'were' if len(ids) != 1 else 'was'} planned with other harness code ({said}; now {here}, "
                f"code {now}): one that starts on a node importing other code than that fails with HarnessChanged; "
                f"`scancel {' '.join(ids)}` and rerun to submit with this code")

    def known(self, specs: list[JobSpec]) -> list[JobSpec]:
        """The specs that have a recorded submission (what ``collect`` can wait for)."""
        self._require_cluster("collect")
        records = self.log.load()
        if specs and not records:  # nothing to wait for: another folder, or never submitted
            raise no_submissions(self.log.path.parent)
        return [s for s in specs if s.key in records]

    def changed_code(self, specs: list[JobSpec]) -> dict[str, str]:
        """Of specs with no recorded submission, the keys of those whose job (same kind and title) was
        submitted under other code of its method or of a task of one's own, with what changed:
        their keys changed with the code, and the jobs submitted fail on the nodes (MethodChanged,
        TaskChanged). Submissions recorded before the code was recorded are not told apart."""
        by_title: dict[tuple[str, str], dict[str, Any]] = {}
        for record in self.log.load().values():
            if "method_id" in record:
                by_title[record.get("kind", ""), record.get("title", "")] = record
        out = {}
        for s in specs:
            record = by_title.get((s.kind, s.title))
            if record is None:
                continue
            tasks = sorted(t for t in set(s.task_code) | set(record.get("task_code") or {})
                           if s.task_code.get(t) != (record.get("task_code") or {}).get(t))
            what = ([f"method {s.method}"] if record["method_id"] != s.method_id else []) + [f"task {t!r}" for t in tasks]
            if what:
                out[s.key] = " and ".join(what)
        return out

    def submit(self, specs: list[JobSpec]) -> Submission:
        """Submit without waiting (``--detach``); jobs already queued or running are not resubmitted."""
        self._require_cluster("--detach")
        attach, todo, listed = self._reattach(specs)
        tracked = self._submit(todo)
        return Submission(f"{_submitted_line(tracked, attach)}; record: {self.log.path}",
                          self.queued_warnings(attach, listed))

    def queued_warnings(self, attach: list[_Tracked], listed: set[str] | None = None) -> list[str]:
        """What is wrong with the jobs found queued again: other executor settings, other harness code."""
        return [w for w in (self.changed_settings(attach, listed), self.changed_harness(attach, listed)) if w]

    def start(self, n_jobs: int) -> None:
        """Nothing to start ahead: the cluster starts each job when it is submitted."""

    def close(self, abort: bool = False) -> None:
        """Nothing to release: submitted jobs belong to the cluster and outlive the driver."""

    def _require_cluster(self, what: str) -> None:
        if self.kind != "slurm":
            raise HarnessError(f"{what} needs executor.kind slurm (this sweep uses {self.kind!r}: jobs run in-process)")

    # -- waiting -------------------------------------------------------------------------
    def run(self, specs: list[JobSpec], on_start: Callable[[JobSpec], None] | None = None
            ) -> Iterator[tuple[JobSpec, JobResult]]:
        if not specs:
            return
        attach, todo, listed = self._reattach(specs)
        if self.collect_only:
            todo = []  # collect never submits; run() only sees recorded specs then
        submitted = self._submit(todo)
        if self.kind == "slurm":
            if self.progress:  # a rerun says it found its jobs again, not resubmitted
                self.console.print(_submitted_line(submitted, attach, self.collect_only), highlight=False)
            for warning in self.queued_warnings(attach, listed):  # even with -q: jobs that will fail
                print_warning(self.console, warning)
        tracked = attach + submitted
        if self.kind == "debug":
            yield from self._run_debug(tracked, on_start)
            return
        yield from self._wait(tracked, on_start)

    def _run_debug(self, tracked: list[_Tracked], on_start) -> Iterator[tuple[JobSpec, JobResult]]:
        """submitit's debug jobs run in this process when their result is asked for."""
        root = logging.getLogger()
        root.addFilter(_quiet_debug_notice)
        try:
            with self._live(tracked) as live:
                for t in tracked:
                    t.state, t.started = "RUNNING", True
                    if on_start:
                        on_start(t.spec)
                    live.refresh_table()
                    result = JobResult.from_dict(t.job.result())
                    t.outcome = outcome(result)
                    t.state = "COMPLETED" if t.outcome == "done" else "FAILED"
                    live.refresh_table()
                    yield t.spec, result
        finally:
            root.removeFilter(_quiet_debug_notice)

    def _wait(self, tracked: list[_Tracked], on_start) -> Iterator[tuple[JobSpec, JobResult]]:
        remaining = list(tracked)
        try:
            yield from self._wait_loop(tracked, remaining, on_start)
        except KeyboardInterrupt:
            self.console.print(f"interrupted: {len(remaining)} SLURM jobs keep running; rerun the sweep or "
                               "`harness collect` to gather them (finished ones are not recomputed)")
            raise

    def _wait_loop(self, tracked: list[_Tracked], remaining: list[_Tracked], on_start
                   ) -> Iterator[tuple[JobSpec, JobResult]]:
        states: dict[str, str] = {}
        poll = self.cfg.executor.poll_s
        last_update = float("-inf")
        listed = listed_files(p for t in remaining for p in t.paths())  # the table's first frame looks there too
        with self._live(tracked, listed) as live:
            while remaining:
                changed = False
                if time.monotonic() - last_update >= poll:
                    listed = live.listed = listed_files(p for t in remaining for p in t.paths())
                    reasons: dict[str, str] = {}
                    asked = [t.job_id for t in remaining if not exists(t.job.paths.result_pickle, listed)]
                    states = slurm_states(asked, reasons)  # a job whose result came needs no state
                    last_update = time.monotonic()
                    for t in remaining:
                        changed |= t.reason != reasons.get(t.job_id, "")
                        t.reason = reasons.get(t.job_id, "")
                for t in remaining:
                    state = states.get(t.job_id, NO_ANSWER)  # none yet, or SLURM did not answer: as it was
                    if state != NO_ANSWER and state != t.state:
                        t.state, changed = state, True
                    if not t.started and t.state in RUNNING_STATES:
                        t.started = True
                        if on_start:
                            on_start(t.spec)
                self._ended = [t for t in remaining if t.state not in ALIVE_STATES | {"UNKNOWN", NO_ANSWER}]
                self._details = {}
                ended = []
                for t in remaining:
                    result = self._poll(t, listed)
                    if result is not None:
                        t.outcome = outcome(result)
                        ended.append((t, result))
                if changed or ended:  # one frame per pass: drawing it goes over every job
                    live.refresh_table()
                if ended:
                    remaining[:] = [t for t in remaining if t.outcome is None]
                for t, result in ended:
                    result.ran_on = {"slurm_job_id": t.job_id, "log": str(t.log_path()),
                                     "error_log": str(t.log_path(failed=True))}
                    if t.show_tail and result.error_detail:
                        self._print_tail(t, result.error_detail)
                    yield t.spec, result
                if remaining:
                    time.sleep(min(1.0, poll))

    def _poll(self, t: _Tracked, listed: set[str] | None = None) -> JobResult | None:
        """The job's result if it has one now, a failed result if it ended without, else None.
        ``listed``, the folder's files at the last poll (None: ask the filesystem), is looked at
        again before a job is called failed: its result may have come since."""
        if exists(t.job.paths.result_pickle, listed):
            return self._result(t)
        failed = self._ended_without_result(t)
        if failed is not None and listed is not None and t.job.paths.result_pickle.exists():
            t.show_tail = False
            return self._result(t)
        return failed

    def _result(self, t: _Tracked) -> JobResult:
        """The result the job wrote, or a failed one saying what it raised."""
        job, spec = t.job, t.spec
        written_by_this_user(job)
        try:
            return JobResult.from_dict(job.result())
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as exc:
            t.show_tail = True
            why = submitit_reason(str(exc))
            if "timed-out too many times" in why:
                why += (f" ({self.cfg.executor.requeues} requeues of {self.cfg.executor.timeout_min} min: "
                        "raise executor.requeues or executor.timeout_min)")
            return _failed(spec, f"SLURM job {t.job_id} raised: {why}",
                           f"{exc}\n--- stderr tail ({t.log_path(True)}) ---\n{_tail(t.log_path(True))}")

    def _ended_without_result(self, t: _Tracked) -> JobResult | None:
        """A failed result for a job SLURM says ended (or lost) past the grace periods, else None."""
        spec = t.spec
        now = time.monotonic()
        if t.state == "UNKNOWN":
            t.unknown_since = t.unknown_since or now
            if now - t.unknown_since < UNKNOWN_GRACE_S:
                return None
            stderr = t.log_path(True)
            t.show_tail = stderr.exists()  # one cancelled in its queue never ran: no log, no empty tail to print
            return _failed(spec, f"SLURM job {t.job_id} is unknown to sacct and squeue (cancelled while "
                           "queued in its array, which SLURM records nowhere, or accounting not configured)",
                           f"--- stderr tail ({stderr}) ---\n{_tail(stderr)}" if t.show_tail
                           else f"SLURM job {t.job_id} is unknown to SLURM and wrote no log")
        t.unknown_since = None
        if t.state in ALIVE_STATES:
            t.ended_at = None
            return None
        t.ended_at = t.ended_at or now
        grace = RESULT_GRACE_S if t.state == "COMPLETED" else min(3.0, RESULT_GRACE_S)
        if now - t.ended_at < grace:
            return None  # the result file may still be on its way (shared filesystems lag)
        details = self._ended_details(t.job_id)
        stderr = t.log_path(True)
        tail = _tail(stderr)
        state, reason = ended_reason(details.get("State", t.state), details, tail, self.cfg.executor.timeout_min)
        if not stderr.exists():  # it never ran: no log to point at
            # a job that failed without even opening its log: most often its node cannot see the folder
            where = (f" (could its node not write its log in {stderr.parent}? output_dir must be on a "
                     "filesystem the nodes share)") if state == "FAILED" else ""
            return _failed(spec, f"SLURM job {t.job_id} {state}: {reason} before it started{where}",
                           f"SLURM job {t.job_id} ended {state} before it started; it wrote no log")
        t.show_tail = True
        return _failed(spec, f"SLURM job {t.job_id} {state}: {reason}; log {stderr}",
                       f"--- stderr tail ({stderr}) ---\n{tail}")

    def _ended_details(self, job_id: str) -> dict[str, str]:
        """Accounting's details of a job that ended without a result, asked for together with
        those of every other job this pass found ended: one query, not one per job."""
        if job_id not in self._details:
            ids = sorted({job_id} | {u.job_id for u in self._ended})
            self._details.update({i: {} for i in ids} | sacct_details(ids))
        return self._details[job_id]

    def _print_tail(self, t: _Tracked, detail: str) -> None:
        if self.progress:
            self.console.print(f"[red]SLURM job {t.job_id}[/] ({escape(t.spec.title)}):", highlight=False)
            self.console.print(detail, highlight=False, markup=False)

    # -- display -------------------------------------------------------------------------
    def _live(self, tracked: list[_Tracked], listed: set[str] | None = None) -> "_LiveTable":
        return _LiveTable(self.console if self.progress else None, tracked, self.kind, listed)


class _LiveTable:
    """A live rich table of job states (pending / running / done / failed, with log paths)."""

    MAX_ROWS = 30

    def __init__(self, console: Console | None, tracked: list[_Tracked], kind: str, listed: set[str] | None = None):
        self.console, self.tracked, self.kind = console, tracked, kind
        self.live: Live | None = None
        self.listed = listed  # the jobs' files at the last poll (None: ask the filesystem)

    def __enter__(self) -> "_LiveTable":
        if self.console is not None:
            self.live = Live(self.render(), console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def refresh_table(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    def render(self) -> Table:
        return job_table(self.tracked, self.kind, listed=self.listed)

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self.render())
            self.live.__exit__(*exc)
            if not self.console.is_terminal:  # rich leaves a log's last table line unended
                self.console.line()


def _submitted_line(submitted: list[_Tracked], attach: list[_Tracked], collect: bool = False) -> str:
    """What a submission did: the jobs sent to SLURM now and those found from an earlier one
    (``collect`` sends none: it names only what it gathers)."""
    old = ", ".join(sorted({t.job_id.split("_")[0] for t in attach}))
    if collect:
        return (f"collecting {len(attach)} submitted job{'' if len(attach) == 1 else 's'}"
                + (f" (SLURM {old})" if old else ""))
    ids = ", ".join(sorted({t.job_id.split("_")[0] for t in submitted}))
    sent = f"submitted {len(submitted)} job{'' if len(submitted) == 1 else 's'} (SLURM {ids})" if ids else "submitted no jobs"
    return f"{sent}, {len(attach)} already queued, running or finished" + (f" (SLURM {old})" if old else "")


def outcome(result: JobResult) -> str:
    """How the job tables show a job whose result came back: a pruned trial is done, not failed;
    a job whose robustness study failed is failed (its log says so; a rerun runs it again)."""
    return "done" if result.status in RECORDED and not result.study_error else "failed"


def display_state(t: _Tracked, listed: set[str] | None = None) -> str:
    """The job's state as the tables show it. A requeued job is PENDING again once SLURM has put
    it back in the queue (reason BeginTime): having written its log (in ``listed``, see
    :func:`listed_files`, or asking the filesystem when None), it shows as requeued."""
    if t.outcome:
        return t.outcome
    if t.state in RUNNING_STATES or t.state == "COMPLETED":
        return "running"
    if t.state in {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"} or (t.state == "PENDING" and exists(t.log_path(), listed)):
        return "requeued"
    if t.state in ALIVE_STATES or t.state in ("UNKNOWN", NO_ANSWER):
        return "pending"
    return "failed"


_STYLE = {"pending": "dim", "running": "cyan", "requeued": "yellow", "done": "green", "failed": "red", "lost": "red"}
_ORDER = ("running", "requeued", "failed", "lost", "pending", "done")


def job_table(tracked: list[_Tracked], kind: str = "slurm", collected: set[str] | None = None,
              listed: set[str] | None = None) -> Table:
    """One row per job: title, SLURM id, state, log path (stderr for failed jobs). Cells are Text,
    not markup: a line printed with ``markup=False`` while the live table shows renders the table
    under that option too, and a title may hold brackets. ``listed``: as for :func:`display_state`."""
    states = [display_state(t, listed) for t in tracked]
    counts = {s: states.count(s) for s in _ORDER if s in states}
    title = f"{kind} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    table = Table(title=title, title_justify="left")
    for col in ("job", "id", "state", "log") + (("collected",) if collected is not None else ()):
        table.add_column(col, overflow="fold")
    order = list(range(len(tracked)))
    if len(tracked) > _LiveTable.MAX_ROWS:  # many jobs: the interesting ones first
        order.sort(key=lambda i: _ORDER.index(states[i]))
    for i in order[: _LiveTable.MAX_ROWS]:
        t, s = tracked[i], states[i]
        shown = f"{s} ({t.reason})" if t.reason and s in ("pending", "requeued", "failed") else s
        row = [Text(t.spec.title), Text(t.job_id), Text(shown, style=_STYLE[s]),
               Text(str(t.log_path(failed=s == "failed")))]
        if collected is not None:
            row.append(Text("yes" if t.spec.key in collected else ""))
        table.add_row(*row)
    if len(tracked) > _LiveTable.MAX_ROWS:
        table.add_row(Text(f"... {len(tracked) - _LiveTable.MAX_ROWS} more"), *[""] * (len(table.columns) - 1))
    return table


def _quiet_debug_notice(record: logging.LogRecord) -> bool:
    """Drops the debug executor's per-job notice about where it copies log records."""
    return not str(record.msg).startswith("Logging is written both to")


def written_by_this_user(job: Any) -> None:
    """Refuse a job's result pickle that another user wrote: submitit unpickles it, which runs
    any code it names, and this user's jobs write their results as this user (a sweep folder
    on a shared filesystem, or a copied config whose ``output_dir`` is someone else's)."""
    path = job.paths.result_pickle
    owner = path.stat().st_uid
    if owner != os.getuid():
        raise HarnessError(f"{path}: written by another user (uid {owner}), not by a job of yours: refused to "
                           "unpickle it, as that would run code from the file (is output_dir someone else's?)")


def _usable_result(job: Any) -> bool:
    """A finished job whose result is a success worth collecting (failures are retried, and so
    is a job whose robustness study failed: its adaptation resumes from its workdir)."""
    written_by_this_user(job)
    try:
        result = job.result()
    except Exception:
        return False
    return (isinstance(result, dict) and result.get("status") in RECORDED  # what the driver caches
            and not result.get("study_error"))


def _failed(spec: JobSpec, error: str, detail: str) -> JobResult:
    return JobResult.of(spec, "failed", error=error, error_detail=detail)


# ---------------------------------------------------------------------------------------
# the cluster's limits


# ---------------------------------------------------------------------------------------
# harness status


def no_submissions(folder: Path, kind: str = "slurm") -> HarnessError:
    """What ``status`` and ``collect`` say of a sweep folder nothing was submitted from; of a sweep
    whose jobs run in-process, that they never go to SLURM (``--detach`` refuses it too)."""
    if kind != "slurm":
        return HarnessError(f"no SLURM submissions recorded under {folder}: this sweep runs its jobs in-process "
                            f"(executor.kind {kind}); its results are in `harness report`, or set executor.kind "
                            "slurm to submit them")
    return HarnessError(f"no SLURM submissions recorded under {folder} "
                        "(run `harness sweep` with executor.kind slurm, or `harness sweep --detach`)")


def status_table(cfg: SweepConfig) -> tuple[Table, dict[str, int]]:
    """The recorded submissions of a sweep: SLURM state, log, and whether the driver collected it."""
    folder = cfg.resolved_output_dir() / "slurm"
    records = SubmissionLog(folder).load()
    if not records:
        raise no_submissions(folder, cfg.executor.kind)
    results = cfg.resolved_output_dir() / "results"
    cached_files = listed_files([results / "-"])  # one listing each, not a stat per job
    tracked, collected = [], set()
    for key, rec in records.items():
        spec = JobSpec("merge", rec.get("title", key), key=key)
        tracked.append(_Tracked(spec, submitit.SlurmJob(folder=folder, job_id=rec["job_id"])))
        cached = read_result(results / f"{key}.json", key) if exists(results / f"{key}.json", cached_files) else None
        if cached and outcome(cached) == "done":  # one whose robustness study failed is run again, not kept
            collected.add(key)
    listed = listed_files(p for t in tracked for p in t.paths())
    reasons: dict[str, str] = {}
    states = slurm_states([t.job_id for t in tracked], reasons)
    for t in tracked:
        t.state, t.reason = states[t.job_id], reasons.get(t.job_id, "")
        if exists(t.job.paths.result_pickle, listed):
            t.outcome = "done" if _usable_result(t.job) else "failed"
        elif t.state == "UNKNOWN":
            if _seconds_since(records[t.spec.key].get("submitted_at")) > UNKNOWN_GRACE_S:
                t.outcome = "lost"  # not just submitted, yet SLURM has no record: a rerun resubmits it
        elif t.state == NO_ANSWER:
            t.reason = "SLURM did not answer"
        elif t.state not in ALIVE_STATES:  # ended without a result: why, as the driver's failure line says
            t.outcome, t.reason = "failed", state_reason(t.state)
    states = [display_state(t, listed) for t in tracked]
    counts = {s: states.count(s) for s in _ORDER}
    counts["collected"] = len(collected)
    return job_table(tracked, collected=collected, listed=listed), counts
