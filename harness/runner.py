"""The sweep driver: prepare, plan, skip cached jobs, execute, record, tabulate.

Only this module writes results (the per-job cache under ``<output_dir>/results`` and MLflow),
so workers and cluster jobs stay free of shared-file writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

from rich.console import Console
from rich.markup import escape

from harness.cache import atomic_write_bytes, atomic_write_json, make_folder, remove_empty
from harness.config import MAIN, SweepConfig, dump_yaml
from harness.errors import HarnessError, NotBuilt, WriteRefused, storage_problem
from harness.executors import make_executor
from harness.failpoints import failpoint
from harness.job import RECORDED, JobResult, plain_artifacts, read_result
from harness.path_checks import folder_problem
from harness.plan import JobSpec, full_params, plan_jobs, robustness_inline, robustness_spec
from harness.plots import job_artifact_files
from harness.progress import print_warning
from harness.report import PLOT_RECORD, build_report, build_tune_table, row_routings
from harness.results import (
    Row,
    TrialCounts,
    finished_settings,
    generalization_table_records,
    normalized,
    print_table,
    rich_table,
    robustness_records,
    select_best,
    to_rich,
)
from harness.runtime import configure_threads
from harness.significance import write_correct
from harness.tracking import Tracker
from harness.workspace import Workspace


@dataclass(frozen=True)
class TuneOnly:
    """``harness tune``: one method's study run inside its sweep (the sweep's output folder, MLflow
    parent run and reference rows) without the sweep's other jobs or its report."""

    label: str
    n_trials: int | None = None  # ``--trials``: extends the study, not the sweep's config


@dataclass
class SweepOutcome:
    results: list[JobResult]
    rows: list[Row]
    output_dir: Path
    parent_run_id: str | None
    executed: list[str] = field(default_factory=list)  # keys of jobs run (not from cache)
    timings: dict[str, float] = field(default_factory=dict)
    generalization_rows: list[Row] = field(default_factory=list)  # the generalization block's table
    failed_trials: list[tuple[JobSpec, JobResult]] = field(default_factory=list)  # Optuna trials failed in this run

    @property
    def failed(self) -> list[JobResult]:
        return [r for r in self.results if r.status != "ok"]

    @property
    def study_failed(self) -> list[JobResult]:
        """Jobs whose main metrics stand but whose robustness study, run inside them, failed."""
        return study_failures(self.results)


def study_failures(results: list[JobResult]) -> list[JobResult]:
    """Jobs whose main metrics stand but whose robustness study, run inside them, failed."""
    return [r for r in results if r.status == "ok" and r.study_error]


def finished_result(results_dir: Path, spec: JobSpec) -> JobResult | None:
    """A job's cached result when it finished successfully (failed jobs are retried, and so are
    jobs whose robustness study failed: the study runs again, the adaptation resumed from the
    job's workdir)."""
    result = recorded_result(results_dir, spec)
    return None if result is None or result.study_error else result


def recorded_result(results_dir: Path, spec: JobSpec) -> JobResult | None:
    """A job's cached result when its main metrics stand, its robustness study run inside it
    failed or not: what a row shows as its last sweep left it.

    The result takes the spec's label and setting: a job keeps its key when its method is
    renamed in the sweep, or a setting that never changes a result is (``checkpoint_every``),
    and its row, run name and tags follow the sweep, not the run that computed it."""
    result = read_result(results_dir / f"{spec.key}.json", spec.key)
    if result is None or result.status != "ok":
        return None
    result.label = spec.label
    result.params = spec.params
    return result


def split_cached(specs: list[JobSpec], results_dir: Path) -> tuple[dict[str, JobResult], list[JobSpec]]:
    """(the cached results by key, the jobs to run): what a sweep runs and what its dry run shows."""
    results: dict[str, JobResult] = {}
    pending: list[JobSpec] = []
    for s in one_per_key(specs):  # keys hold no label: two labels' identical settings are one job
        cached = finished_result(results_dir, s)
        if cached:
            results[s.key] = cached
        else:
            pending.append(s)
    return results, pending


def one_per_key(specs: list[JobSpec]) -> list[JobSpec]:
    """The first spec of each job key: two labels' identical settings are one job, run once."""
    firsts: dict[str, JobSpec] = {}
    for s in specs:
        firsts.setdefault(s.key, s)
    return list(firsts.values())


def labelled_results(specs: list[JobSpec], results: Mapping[str, JobResult]) -> list[JobResult]:
    """Each planned job's result under its own label, in plan order. Two labels whose settings
    coincide (two grids of one method, a tuned best on another label's grid point) share one job,
    as keys hold no label nor a hyperparameter at its default; each row still counts and chooses
    among its own settings, and shows them (a tuned best's ``k=20.0`` the grid point left out). Jobs without
    a result (a collect's unsubmitted ones) are left out."""
    out, seen = [], set()
    for s in specs:
        if s.key in results and (s.label, s.key) not in seen:
            seen.add((s.label, s.key))
            r = results[s.key]
            out.append(r if (r.label, r.params) == (s.label, s.params) else dataclasses.replace(r, label=s.label,
                                                                                                 params=s.params))
    return out


def cache_status(cfg: SweepConfig, ws: Workspace | None = None) -> tuple[list[JobSpec], set[str] | None, str | None]:
    """The sweep's planned jobs and the keys of those already cached, as a run would find them,
    building, converting and loading no model (a dry run). An output folder without results
    needs no keys (every job runs; nothing is hashed); where keys would need a model built first
    (the embedded suite not prepared, a checkpoint not converted yet), the cached keys are None
    with the reason. After the planned jobs come the robustness follow-ups (kind ``robustness``)
    of grid methods whose every job is cached: the setting the run will choose on val is known.
    ``ws``: a workspace made with ``build=False`` whose identities other dry-run counts share."""
    results_dir = cfg.resolved_output_dir() / "results"
    if not results_dir.is_dir() or not any(results_dir.glob("*.json")):
        return plan_jobs(cfg), set(), None
    ws = ws or Workspace(cfg, build=False)
    try:
        identity, task_identity = ws.identity, ws.task_identity()
    except NotBuilt as exc:
        return plan_jobs(cfg), None, str(exc)
    specs = plan_jobs(cfg, identity, task_identity)
    results, _ = split_cached(specs, results_dir)
    if not cfg.robustness:
        return specs, set(results), None
    follow = ready_followups(cfg, specs, results, identity, task_identity)
    split, _ = split_cached(follow, results_dir)
    return specs + follow, set(results) | set(split), None


def corrupted_split_status(cfg: SweepConfig, ws: Workspace | None = None) -> tuple[int, int] | str:
    """How many of the robustness study's corrupted test splits the cache holds, of how many it
    reads (the study builds the rest: minutes each at SUN397's size), or why that is not known
    before the models are built. Reads and corrupts no image and loads no model; hashes only the
    pretrained weights (a real dataset's input size is the encoder's). ``ws``: as for
    :func:`cache_status`, whose task identities it then reuses."""
    from harness.plan import adapts_on_corruptions

    ws = ws or Workspace(cfg, build=False)
    try:
        ws.sources  # an embedded suite's data too is made when it is prepared, not by a dry run
        return ws.corrupted_splits_cached(any(adapts_on_corruptions(cfg, m.name) for m in cfg.methods))
    except NotBuilt as exc:
        return str(exc)


def traceback_file(out: Path, key: str) -> Path:
    """Where a failed job's traceback is kept: the error line alone rarely names the file and line."""
    return out / "artifacts" / key / "traceback.txt"


def job_params(cfg: SweepConfig, spec: JobSpec) -> dict[str, Any]:
    """What MLflow records as a job's params: the resolved config, flattened, plus the job's own:
    ``params``, those the sweep gives (as validated: ``harness.config.hold_validated``), and
    ``hyperparameters``, every one the method ran with (defaults included, as in the job's key;
    none for a failed study's row, which ran no setting). Not the label: params cannot change,
    and a renamed method's runs take the new label (the ``harness.label`` tag and run name)."""
    conf = cfg.model_dump(mode="json")
    conf.pop("methods", None)
    job = {"kind": spec.kind, "method": spec.method, "task": spec.task,
           "protocol": spec.protocol, "params": spec.params}
    if spec.method and not spec.key.startswith(FAILED_STUDY):
        job["hyperparameters"] = full_params(spec.method, spec.params)
    return {"job": job, "config": conf}


def run_sweep(cfg: SweepConfig, console: Console | None = None, quiet: bool = False,
              mode: Literal["run", "detach", "collect"] = "run", only: TuneOnly | None = None) -> SweepOutcome:
    """Run the sweep; ``detach`` submits to SLURM and returns, ``collect`` waits for and records
    the jobs a detached (or killed) run submitted, submitting nothing; ``only``: one method's
    study and the references, logged under the sweep's parent run, its table written beside
    the sweep's report (``report/tune-<label>.md``) rather than over it."""
    if console is None:
        console = Console(stderr=True, quiet=quiet, emoji=False)  # labels are text, never emoji codes
        if not console.is_terminal:  # logged output: keep the results table's columns whole
            console = Console(stderr=True, quiet=quiet, width=200, emoji=False)
    show = not quiet
    problem = folder_problem(cfg.resolved_output_dir())
    if problem:  # before anything is read from it or built for it
        raise HarnessError(f"output_dir: {problem} (got {str(cfg.resolved_output_dir())!r})")
    ws = Workspace(cfg, progress=show)
    executor = make_executor(cfg, ws, progress=show, console=console)
    if mode != "run" and not hasattr(executor, "known"):
        raise HarnessError(f"--detach and collect need executor.kind slurm (this sweep uses {cfg.executor.kind!r})")
    with contextlib.ExitStack() as held:
        try:
            outcome = _run_sweep(cfg, ws, executor, console, show, mode, held, only)
        except BaseException as exc:
            executor.close(abort=True)
            problem = storage_problem(exc, cfg.resolved_tracking_uri()) if isinstance(exc, Exception) else None
            if problem:
                raise WriteRefused(problem) from exc
            raise
        executor.close()
    return outcome


#: The file in an output folder whose lock a running driver holds (:func:`_output_lock`).
LOCK_FILE = ".sweep.lock"


def _make_output_dir(out: Path) -> list[Path]:
    """Create ``out`` (and its missing parents), to hold its lock; the folders made, innermost first."""
    try:
        return make_folder(out)
    except OSError as exc:
        raise HarnessError(f"output_dir: cannot create it ({exc.strerror or exc}) (got {str(out)!r})") from None


def _unmake_output_dir(made: list[Path], locked: bool) -> None:
    """Remove the folders a sweep stopped before running (a typo, a bad checkpoint) made, still
    empty but for the lock file it holds (``locked``; else another driver's, which stays): it
    leaves nothing behind, and a second driver never finds the lock of a folder in use gone."""
    if not made:
        return
    if locked:
        with contextlib.suppress(OSError):
            (made[0] / LOCK_FILE).unlink(missing_ok=True)
    remove_empty(made)  # anything else written there: kept


@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """One driver per output folder: a second one would run (and log) every pending job again.
    The OS drops the lock with its process, however that ends, so a killed sweep never blocks
    its rerun."""
    from filelock import FileLock, Timeout

    lock = FileLock(out / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise HarnessError(f"{out}: another sweep is running into this output folder (lock file "
                           f"{lock.lock_file}); rerun when it ends (its finished jobs are cached), "
                           "or set another output_dir") from None
    except OSError as exc:  # read-only file system, no write permission
        raise HarnessError(f"output_dir: cannot write into it ({exc.strerror or exc}) (got {str(out)!r})") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _ended_if_stopped(tracker: Tracker) -> Iterator[None]:
    """A sweep stopped by Ctrl-C or an error leaves its MLflow runs KILLED or FAILED, not RUNNING."""
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(Exception):  # best effort: never hide why the sweep stopped
            tracker.abandon("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


def _run_sweep(cfg: SweepConfig, ws: Workspace, executor: Any, console: Console, show: bool,
               mode: Literal["run", "detach", "collect"], held: contextlib.ExitStack,
               only: TuneOnly | None = None) -> SweepOutcome:
    out = cfg.resolved_output_dir()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    # locked first, a new folder too: a second driver into a folder in use stops now, not after
    # preparing models for minutes (or, into a new one, after the first driver's preparation)
    made, locked = _make_output_dir(out), False
    try:
        held.enter_context(_output_lock(out))
        locked = True
        ws.check_device_before_building()  # not minutes of preparation for jobs that cannot run here
        identity = ws.identity  # builds/loads the model files (embedded suite: prepares them)
        task_identity = ws.task_identity()
        specs = plan_jobs(cfg, identity, task_identity)
        if only is not None:  # the reference rows its table shows, and normalized accuracy needs
            specs = [s for s in specs if s.kind in ("pretrained", "individual")]
        results_dir = out / "results"
        results, pending = split_cached(specs, results_dir)
        if pending or any(m.tune for m in cfg.methods):  # a finished sweep builds no model
            ws.preflight()  # bad checkpoints, data or heads: one error now, before anything is written
        if mode == "run":
            from harness.tuning import check_storages

            check_storages(cfg, [m.display for m in cfg.methods
                                 if m.tune and (only is None or m.display == only.label)])
        failpoint("prepare")
    except BaseException:
        _unmake_output_dir(made, locked)
        raise
    # writes a killed run never renamed (the driver's own: a job's workdir is cleaned by the job)
    for stale in [*results_dir.glob(".*.tmp"), *out.glob(".mlflow.db.*.tmp"), *out.glob(".resolved.yaml.*.tmp"),
                  *out.glob("artifacts/*/.traceback.txt.*.tmp")]:
        stale.unlink(missing_ok=True)
    timings["prepare"] = time.perf_counter() - t0

    digest = cfg.digest()
    tracker = Tracker(cfg)
    held.enter_context(_ended_if_stopped(tracker))  # first: a tracking server's parent run is created now
    try:
        tracker.start_sweep(digest, cfg.model_dump(mode="json"), "sweep" if only is None else f"tune:{only.label}")
    except BaseException:  # a tracking server that cannot be reached: nothing ran
        _unmake_output_dir(made, locked)
        raise
    executed: list[str] = []
    failed_trials: list[tuple[JobSpec, JobResult]] = []
    trial_counts: dict[tuple[str, str], TrialCounts] = {}  # by tuned label and its best setting's job key
    tuned = [m for m in cfg.methods if m.tune] if mode == "run" else []
    if only is not None:
        tuned = [m if only.n_trials is None else m.model_copy(update={"tune": m.tune.model_copy(
                 update={"n_trials": only.n_trials})}) for m in tuned if m.display == only.label]
    if show:
        then = ""
        if tuned:
            from harness.tuning import n_trials_possible

            trials = sum(n_trials_possible(m.tune) for m in tuned)
            then = (f", then {len(tuned)} Optuna {'study' if len(tuned) == 1 else 'studies'} "
                    f"({trials} trial{'s' if trials != 1 else ''} in all, finished ones kept)")
        n_jobs = len({sp.key for sp in specs})
        waiting = "not recorded yet" if mode == "collect" else "to run"  # collect runs none itself
        console.print(f"[bold]{cfg.name}[/]: {n_jobs} job{'s' if n_jobs != 1 else ''}, {n_jobs - len(pending)} cached, "
                      f"{len(pending)} {waiting}{then} -> {escape(str(out))}", highlight=False)
    kept = finished_studies(cfg, identity, task_identity, results_dir) if mode == "collect" else []
    studies = [m.display for m in cfg.methods if m.tune and m.display not in {f.label for f, _, _ in kept}
               ] if mode != "run" else []
    if show and studies:  # each trial is asked for after the ones before it end: a driver has to wait
        console.print(f"{'--detach' if mode == 'detach' else 'collect'} runs no Optuna study: run `harness sweep` "
                      f"(or `harness tune FILE --method LABEL`) for {', '.join(studies)}", highlight=False)

    if mode == "detach":  # with the robustness jobs of grids already cached, as the sweep would run them
        follow = [f for f in ready_followups(cfg, specs, results, identity, task_identity) if only is None
                  and not finished_result(results_dir, f)]
        submission = executor.submit(pending + one_per_key(follow))
        if show:
            console.print(submission.line, highlight=False, markup=False)
        for warning in submission.warnings:
            print_warning(console, warning)
        if show:
            console.print(submission.next_steps, highlight=False, markup=False)
        return SweepOutcome(list(results.values()), [], out, tracker.parent_id, [], timings)
    if mode == "collect":
        executor.collect_only = True
        known = executor.known(pending)
        if show and len(known) < len(pending):
            tell_unsubmitted(console, executor, [s for s in pending if s not in known])
        pending = known
    refs = [s for s in pending if s.kind != "merge"]
    merges = [s for s in pending if s.kind == "merge"]
    phases = (pending,) if getattr(executor, "single_phase", False) else (refs, merges)
    t1 = time.perf_counter()
    spec_by_key: dict[str, JobSpec] = {}
    for s in specs:  # a job two labels share is logged under the first
        spec_by_key.setdefault(s.key, s)
    log_now = False  # references first: normalized accuracy needs the individual results

    def log(r: JobResult) -> None:
        """Record a job in MLflow (once), with its normalized accuracy, under its first spec's label
        (a cached job two labels share may have been run under the other)."""
        spec = spec_by_key[r.key]
        if r.label != spec.label:
            r = dataclasses.replace(r, label=spec.label)  # its metrics stay the cached result's own dict
        if r.status == "ok" and r.kind != "individual":
            indiv = {x.task: x.metrics[f"acc/{x.task}"] for x in results.values()
                     if x.kind == "individual" and x.status == "ok"}
            r.metrics.update(normalized(r.metrics, indiv, cfg.seen_tasks(spec.protocol)))
        if tracker.is_logged(r.key):
            tracker.rename(r.key, r.label, spec.title, spec.params)
            return
        files = job_artifact_files(r.artifacts, out / "artifacts" / r.key) if r.status == "ok" else []
        if (r.status != "ok" or r.study_error) and traceback_file(out, r.key).is_file():
            files.append(traceback_file(out, r.key))
        if r.status == "ok" and r.test_correct:
            files.append(write_correct(r.test_correct, out / "artifacts" / r.key))
        tracker.log_job(r, job_params(cfg, spec), digest, files, name=spec.title)

    with _progress(console, show and not getattr(executor, "shows_progress", False), len(pending),
                   always=bool(tuned)) as bar:
        if mode == "run":  # after the checks: a bad checkpoint is reported without waiting for workers
            bar.describe("starting workers")
            executor.start(len(pending))
            bar.describe("jobs")

        @functools.cache
        def threads() -> int:
            """Set once, before the first job runs here: the count depends on the model's size."""
            return configure_threads(cfg.threads, ws.encoder_params)

        def execute(batch: list[JobSpec]) -> list[tuple[JobSpec, JobResult]]:
            if batch:
                threads()
            done = []
            for spec, res in executor.run(batch, on_start=lambda s: bar.describe(s.title)):
                res.artifacts, late = plain_artifacts(res.artifacts, spec.method)  # a job of an older harness
                res.warnings += late
                for warning in res.warnings:
                    print_warning(console, f"{spec.title}: {warning}")
                failpoint("job_done")
                if res.status in RECORDED:
                    if res.study_error and res.error_detail:  # the study's, as a failed job's is kept
                        atomic_write_bytes(traceback_file(out, spec.key), res.error_detail.encode())
                    else:
                        traceback_file(out, spec.key).unlink(missing_ok=True)  # an earlier attempt's
                    atomic_write_json(results_dir / f"{spec.key}.json", res.to_dict())
                    if show and res.status == "ok" and spec.kind != "trial":
                        console.print(result_line(res, spec), highlight=False, markup=False)
                    if res.study_error:
                        console.print(failed_line(f"robustness study of {spec.title}", res), highlight=False)
                else:
                    if res.error_detail:
                        atomic_write_bytes(traceback_file(out, spec.key), res.error_detail.encode())
                    if spec.kind != "trial":  # a trial's line comes once its study has told it (run_study)
                        console.print(failed_line(spec.title, res), highlight=False)
                results[spec.key] = res
                executed.append(spec.key)
                if log_now and spec.kind != "trial":  # trials are logged under their study's run
                    log(res)
                bar.advance()
                done.append((spec, res))
            return done

        for phase in phases:
            execute(phase)
            if not log_now:
                for s in specs:
                    if s.key in results:
                        log(results[s.key])
                log_now = True
        if mode != "detach" and cfg.robustness and only is None:  # grid methods: the study for each selected setting
            todo = []
            if mode == "run":
                follows = robustness_followups(cfg, labelled_results(specs, results), identity, task_identity)
            else:  # collect: the grids it gathered whole
                follows = ready_followups(cfg, specs, results, identity, task_identity)
            for follow in follows:
                specs.append(follow)
                spec_by_key.setdefault(follow.key, follow)  # two labels' one setting: one job, logged under the first
                cached = results.get(follow.key) or finished_result(results_dir, follow)
                if cached:
                    results[follow.key] = cached
                else:
                    todo.append(follow)
            todo = one_per_key(todo)
            if mode == "collect":
                known = executor.known(todo)
                if show and len(known) < len(todo):
                    n = len(todo) - len(known)
                    console.print(f"{n} robustness job{'s' if n != 1 else ''} (settings chosen on val) not submitted "
                                  "yet: run `harness sweep` (or `harness sweep --detach`) again", highlight=False)
                todo = known
            bar.add(len(todo))
            execute(todo)
        from harness.tuning import StudyFailed, StudyUnfinished

        for m in tuned:  # each study runs its trials, then its best setting once on test
            try:
                final, counts = run_study(cfg, m, identity, task_identity, results_dir, tracker, execute, bar, out,
                                          console if show else None, failed_trials)
            except StudyUnfinished as exc:  # its row is left out, as a study not run yet: not a failure
                if show:
                    console.print(str(exc), highlight=False, markup=False)
                continue
            except StudyFailed as exc:  # isolated as a failed job is: its row `failed`, other studies run
                final = failed_study_spec(m)
                results[final.key] = JobResult.of(final, "failed", error=str(exc))
                specs.append(final)
                spec_by_key[final.key] = final
                if show:
                    console.print(failed_line(m.display, results[final.key]), highlight=False)
                continue
            trial_counts[final.label, final.key] = counts
            specs.append(final)
            spec_by_key[final.key] = final
            if final.key not in results:
                cached = finished_result(results_dir, final)
                if cached:
                    results[final.key] = cached
                else:
                    bar.add(1)
                    execute([final])
        for final, cached, counts in kept:  # collect: a done study's row, as its last sweep left it
            specs.append(final)
            spec_by_key.setdefault(final.key, final)
            results[final.key] = cached
            trial_counts[final.label, final.key] = counts
    timings["run"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    ordered = labelled_results(specs, results)
    for key in dict.fromkeys(r.key for r in ordered):  # each job once in MLflow
        log(results[key])

    failpoint("report")
    if only is None:
        report = build_report(cfg, ordered, out / "report", row_routings(cfg, ordered), studies=trial_counts,
                              plot_record=out / "work" / PLOT_RECORD)
    else:  # the sweep's tables (and the report/jobs.json `harness report` reads) stay the sweep's
        report = build_tune_table(cfg, ordered, out / "report", only.label, trial_counts)
    rows, gen_rows = report.rows, report.generalization_rows
    atomic_write_bytes(out / "resolved.yaml", dump_yaml(cfg).encode())
    tracker.log_artifact(out / "resolved.yaml")
    for path in report.files:
        tracker.log_artifact(path, subdir="report")
    tracker.drop_report_artifacts(out / "report")
    names = summary_labels(row.method for row in [*rows, *gen_rows])
    summary = {f"{names[row.method]}/acc/avg": row.avg for row in rows if not row.failed} if only is None else {}
    summary.update(generalization_summary(cfg, rows, gen_rows, names) if only is None else {})
    if only is None:  # one study's run (harness tune) leaves the sweep's summary as it is
        tracker.log_summary_metrics(summary)
    failed = [r for r in ordered if r.status != "ok"]
    study_failed = study_failures(ordered)  # as a grid's failed robustness job
    ok = not failed and not failed_trials and not study_failed  # as the exit code: a failed trial, as a failed setting
    tracker.finish(ok=ok)
    timings["logging"] = time.perf_counter() - t2

    outcome = SweepOutcome(ordered, rows, out, tracker.parent_id, executed, timings, gen_rows, failed_trials)
    if show:
        print_tables(console, cfg, rows, gen_rows)
    return outcome


def tell_unsubmitted(console: Console, executor: Any, unknown: list[JobSpec]) -> None:
    """What ``collect`` says of jobs it finds no submission of: submitted under other code of a
    method or task of one's own (edited since ``--detach``: their keys changed), or never submitted."""
    changed = executor.changed_code(unknown)
    for what in dict.fromkeys(changed.values()):
        n = sum(w == what for w in changed.values())
        console.print(f"{n} job{'s were' if n != 1 else ' was'} submitted with other code of the {what} (its file "
                      "changed since; on the cluster they fail with MethodChanged or TaskChanged): run "
                      "`harness sweep` to run them with the current code", highlight=False)
    if len(unknown) > len(changed):
        n = len(unknown) - len(changed)
        console.print(f"{n} job{'s were' if n != 1 else ' was'} never submitted (run `harness sweep` for "
                      f"{'them' if n != 1 else 'it'})", highlight=False)


def metric_name(text: str) -> str:
    """``text`` as an MLflow metric name (letters, digits, ``_ - . / :``): a method registered
    under any name must not fail the sweep's summary."""
    return re.sub(r"[^\w./:-]", "_", text)


def summary_labels(labels: Iterable[str]) -> dict[str, str]:
    """Each row label as it names the parent run's summary metrics (:func:`metric_name`). Labels
    whose cleaned forms coincide (``ta (a)`` and ``ta _a_``) would log one metric, the last row's
    value under both: each that had characters replaced gets a digest of itself appended."""
    safe = {label: metric_name(label) for label in labels}
    taken = Counter(safe.values())
    return {label: name if name == label or taken[name] == 1
            else f"{name}-{hashlib.sha1(label.encode()).hexdigest()[:8]}" for label, name in safe.items()}


def result_line(result: JobResult, spec: JobSpec) -> str:
    """One line per finished job, printed as it lands: a long sweep shows results from its first job."""
    m = result.metrics
    if result.kind == "robustness":
        corrupted = [v for k, v in m.items() if k.startswith("robust/") and k.endswith("/avg") and "/clean/" not in k]
        text = f"clean {m['robust/clean/avg']:.1f}, corrupted {sum(corrupted) / len(corrupted):.1f}"
    elif spec.task:
        text = f"acc {m[f'acc/{spec.task}']:.1f}"
    else:
        text = f"acc/avg {m['acc/avg']:.1f}" + (f" (val {m['val/acc/avg']:.1f})" if "val/acc/avg" in m else "")
    return f"done {spec.title}: {text} [{result.timings.get('total', 0.0):.1f} s]"


def failed_line(title: str, result: JobResult) -> str:
    """A failed job's (or trial's, or in-job robustness study's) line as console markup: title
    and error shown as written (brackets in them are not markup)."""
    return f"[red]failed[/] {escape(title)}: {escape(result.error or result.study_error or '')}"


def trial_line(spec: JobSpec, result: JobResult, state: str, objective: str, study: Any) -> str:
    """One line per finished trial: its objective, and the study's best so far."""
    head = f"trial {spec.trial['number']} {spec.title}"
    if state == "PRUNED":
        return f"{head}: pruned [{result.timings.get('total', 0.0):.1f} s]"
    best = study.best_trial
    return (f"{head}: {objective} {result.metrics[objective]:.1f} (best {best.value:.1f}, trial {best.number}) "
            f"[{result.timings.get('total', 0.0):.1f} s]")


def ready_followups(cfg: SweepConfig, specs: list[JobSpec], results: dict[str, JobResult], identity: dict,
                    task_identity: dict) -> list[JobSpec]:
    """The robustness follow-ups of the grid methods every main job of which has a result in
    ``results`` (cached, or run now): the setting chosen on val is known. A dry run counts them,
    ``--detach`` submits them and ``collect`` gathers them, as a sweep runs them after its grid."""
    if not cfg.robustness:
        return []
    waiting = {s.label for s in specs if s.kind == "merge" and s.protocol == MAIN and s.key not in results}
    return [f for f in robustness_followups(cfg, labelled_results(specs, results), identity, task_identity)
            if f.label not in waiting]


def robustness_followups(cfg: SweepConfig, results: list[JobResult], identity: dict,
                         task_identity: dict) -> list[JobSpec]:
    """One robustness job per grid method whose jobs leave the study out: its val-selected setting.
    ``results`` under each planned label (:func:`labelled_results`): a setting two labels share
    is one job, cached under the first, and still one of the other row's settings."""
    specs = []
    for m in cfg.methods:
        if robustness_inline(cfg, m.display):
            continue
        cands = finished_settings(results, m.display)  # main protocol: generalization labels differ
        if cands:
            specs.append(robustness_spec(cfg, m.display, select_best(cands).params, identity, task_identity))
    return specs


def run_study(cfg: SweepConfig, m, identity: dict, task_identity: dict, results_dir: Path, tracker: Tracker,
              execute, bar: "_progress", out: Path, console: Console | None = None,
              failed: list[tuple[JobSpec, JobResult]] | None = None) -> tuple[JobSpec, TrialCounts]:
    """Tune one method; trials are logged as runs nested under the method's tuning run, and each
    trial this driver runs gets one line on ``console`` (its objective and the best so far, or its
    error) and, when it failed, an entry in ``failed``. Returns the best setting's job on test and
    the study's trial counts, which its row states."""
    from harness.plan import with_key
    from harness.tuning import StudyFailed, StudyRunner, StudyUnfinished, save_study_plots

    runner = StudyRunner(cfg, m, identity, task_identity, cfg.executor.workers, results_dir)
    tune_run = tracker.tuning_run(runner.name, m.display, m.tune.model_dump(mode="json"))

    ran: set[str] = set()  # trials run by this driver (not ones a resumed study re-records)

    def run_batch(batch: list[JobSpec]) -> list[tuple[JobSpec, JobResult]]:
        todo, done = [], []
        for spec in batch:  # a trial whose job already finished (killed driver) is not rerun
            cached = read_result(results_dir / f"{spec.key}.json", spec.key)
            if cached:
                done.append((spec, cached))
            else:
                todo.append(spec)
        bar.add(len(todo))
        ran.update(s.key for s in todo)
        return done + execute(todo)

    def record(spec: JobSpec, result: JobResult, state: str) -> None:
        tracker.log_trial(tune_run, runner.name, spec.trial["number"], spec.params, result, state,
                          m.tune.objective, runner.intermediate(spec.trial["number"]))
        if spec.key not in ran:
            return
        if state == "FAIL":  # as failed jobs are: a line now, the sweep's failure summary at the end
            if failed is not None:
                failed.append((spec, result))
            if console is not None:
                console.print(failed_line(f"trial {spec.trial['number']} {spec.title}", result), highlight=False)
        elif console is not None:
            console.print(trial_line(spec, result, state, m.tune.objective, runner.study), highlight=False,
                          markup=False)

    say = (lambda line: console.print(line, highlight=False, markup=False)) if console is not None else None
    try:
        best = runner.run(run_batch, record, say)
    except StudyFailed as exc:  # the sweep goes on: this study's run ends FAILED, with why
        tracker.fail_tuning_run(tune_run, str(exc))
        raise
    except StudyUnfinished:  # stopped before its study ended, as a stopped driver's; a rerun reopens it
        tracker.stop_tuning_run(tune_run)
        raise
    files = save_study_plots(runner.study, out / "optuna" / m.display)
    final = with_key(cfg, JobSpec("merge", m.display, method=m.name, params=best), identity, task_identity)
    if finished_result(results_dir, final) is None:  # to run (or to run again: a failed attempt)
        reuse_adaptation(out / "work", runner.best_key(), final.key)
    counts = runner.counts()
    tracker.finish_tuning_run(tune_run, best, runner.study.best_value, files, counts, final.key)
    return final, counts


def finished_studies(cfg: SweepConfig, identity: dict, task_identity: dict,
                     results_dir: Path) -> list[tuple[JobSpec, JobResult, TrialCounts]]:
    """The tuned rows ``collect`` keeps (it runs no study): each study done, with its best
    setting's job on test cached, as the attached sweep that ran it left them (a robustness study
    that failed in that job fails the row's robustness only). A study not done leaves its row
    out, as before it was run."""
    from sqlalchemy.exc import SQLAlchemyError

    from harness.plan import with_key
    from harness.tuning import stored_study

    kept = []
    for m in cfg.methods:
        try:
            runner = stored_study(cfg, m, identity, task_identity, results_dir) if m.tune else None
        except (OSError, SQLAlchemyError):  # a storage it cannot read now: its row is left out, as not done
            runner = None
        if runner is None:
            continue
        final = with_key(cfg, JobSpec("merge", m.display, method=m.name, params=runner.best_params()), identity,
                         task_identity)
        cached = recorded_result(results_dir, final)
        if cached:
            kept.append((final, cached, runner.counts()))
    return kept


def generalization_summary(cfg: SweepConfig, rows: list[Row], gen_rows: list[Row],
                           names: Mapping[str, str]) -> dict[str, float]:
    """The parent run's ``generalization/<label>/seen/avg`` and ``unseen/avg``: each row's of the
    generalization table, the ``generalization`` block's (its zero-shot row's too), or, in a sweep
    merged on its seen tasks only (top-level ``seen``/``unseen``), the main rows' it shows (not
    the individual row's, nor one missing an unseen task's accuracy). ``names``: the labels as
    metric names (:func:`summary_labels`)."""
    if cfg.generalization:
        table, unseen = gen_rows, [t for t in cfg.task_names if t not in cfg.generalization_seen]
    else:
        unseen = [t for t in cfg.task_names if t not in cfg.merge_tasks]
        table = [r for r in rows if r.method != "individual" and unseen and all(t in r.acc for t in unseen)]
    summary: dict[str, float] = {}
    for row in table:
        if row.failed:
            continue
        summary[f"generalization/{names[row.method]}/seen/avg"] = row.avg
        if unseen and all(t in row.acc for t in unseen):  # as the table has it, the zero-shot row's too
            summary[f"generalization/{names[row.method]}/unseen/avg"] = sum(row.acc[t] for t in unseen) / len(unseen)
    return summary


#: The key prefix of a failed study's row (:func:`failed_study_spec`).
FAILED_STUDY = "study-failed-"


def failed_study_spec(m) -> JobSpec:
    """The job standing for a tuned method whose study failed (too many failed trials, or none
    completed): no setting was chosen, so there is no job of a setting to run; its key, stable
    for the label, keeps the row (``failed``) in the tables, MLflow and ``report/jobs.json``."""
    digest = hashlib.sha256(f"failed study\0{m.display}".encode()).hexdigest()[:16]
    return JobSpec("merge", m.display, method=m.name, params={}, key=f"{FAILED_STUDY}{digest}")


def reuse_adaptation(work: Path, trial_key: str | None, final_key: str) -> None:
    """Copy the best trial's saved adaptation (its workdir's files) into the workdir of the best
    setting's job on test, which then resumes it at its last step instead of adapting again: the
    trial adapted with the same parameters, seed and unlabeled data (a checkpoint adapted on
    other data or, for WeMoE, with other models or hyperparameters is refused and adapting starts
    over). A workdir the final job already has (a rerun after a kill) is left as it is."""
    source, target = work / trial_key if trial_key else None, work / final_key
    if source is None or not source.is_dir() or target.exists():
        return
    part = work / f".{final_key}.copying"  # renamed whole: a driver killed while copying leaves no half
    shutil.rmtree(part, ignore_errors=True)
    shutil.copytree(source, part, ignore=shutil.ignore_patterns(".*"))
    os.replace(part, target)


def print_tables(console: Console, cfg: SweepConfig, rows: list[Row],
                 generalization: list[Row] | None = None) -> None:
    """The main table, the generalization block's table (given its rows) and the robustness table."""
    print_table(console, to_rich(rows, cfg.task_names, cfg.merge_tasks))
    if cfg.generalization and generalization is not None:
        seen = cfg.generalization_seen
        print_table(console, rich_table(*generalization_table_records(generalization, cfg.task_names, seen),
                                 title=f"generalization: merged on {', '.join(seen)} (test top-1 %, "
                                       "settings chosen on the seen tasks' val)"))
    if cfg.robustness:
        rob = cfg.robustness
        print_table(console, rich_table(*robustness_records(rows, rob.corruptions),
                                 title=f"robustness: avg test top-1 % on {', '.join(rob.tasks)}, severity {rob.severity}"))


class _progress:
    """A rich progress bar over jobs, or nothing when quiet."""

    def __init__(self, console: Console, show: bool, total: int, always: bool = False):
        self.console, self.show, self.total = console, show and (total > 0 or always), total

    def __enter__(self) -> "_progress":
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=self.console, transient=False)
            self.p.__enter__()
            self.t = self.p.add_task("jobs", total=self.total)
        return self

    def describe(self, text: str) -> None:
        if self.show:
            self.p.update(self.t, description=text)

    def advance(self) -> None:
        if self.show:
            self.p.advance(self.t)

    def add(self, n: int) -> None:
        """More jobs than planned (tuning trials are asked as the study goes)."""
        self.total += n
        if self.show:
            self.p.update(self.t, total=self.total)

    def __exit__(self, *exc: Any) -> None:
        if self.show:
            self.p.update(self.t, description="jobs")
            self.p.__exit__(*exc)
