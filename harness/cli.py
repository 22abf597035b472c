"""Command line: thin click commands that parse, call the core, and print with rich."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any, Iterator, Literal

import click
from rich.console import Console
from rich.table import Table

from harness.errors import HarnessError, WriteRefused, storage_problem
from harness.progress import plain_warning_lines, print_warning

console = Console(emoji=False)  # a label such as "pkg:Fire:" is text, not an emoji code
if not console.is_terminal and "COLUMNS" not in os.environ:
    console = Console(width=160, emoji=False)  # piped or logged output: keep the results table's columns whole
err_console = Console(stderr=True, emoji=False)


def fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


class HarnessGroup(click.Group):
    """Turns every HarnessError (bad config, missing file) into one line and exit code 2, and
    Ctrl-C into one line saying how to resume, exit code 130 (as a shell reports SIGINT)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except WriteRefused as exc:
            fail(_refused_write(str(exc), ctx.invoked_subcommand), exc.exit_code)
        except HarnessError as exc:
            fail(str(exc))
        except Exception as exc:
            problem = storage_problem(exc)
            if problem is None:
                raise
            fail(_refused_write(problem, ctx.invoked_subcommand), WriteRefused.exit_code)
        except KeyboardInterrupt as exc:
            how = "terminated" if isinstance(exc, Terminated) else "interrupted"
            kept = _KEPT_ON_INTERRUPT.get(ctx.invoked_subcommand or "")
            err_console.print(f"{how}: {kept}; rerun the same command to resume" if kept else how, highlight=False)
            sys.exit(143 if isinstance(exc, Terminated) else 130)


#: What an interrupted command keeps, for the commands a rerun resumes.
_KEPT_ON_INTERRUPT = {"sweep": "finished jobs are saved", "tune": "finished jobs are saved",
                      "collect": "finished jobs are saved", "prepare": "models built so far are cached"}


def _refused_write(problem: str, command: str | None) -> str:
    """One line for a write the disk or folder refused: what, and how to go on."""
    kept = _KEPT_ON_INTERRUPT.get(command or "")
    return (f"{problem}; " + (f"{kept}: " if kept else "")
            + "free space (or fix the folder's permissions) and rerun the same command")


class Terminated(KeyboardInterrupt):
    """SIGTERM (plain ``kill``, a scheduler or container stopping the driver) taken like Ctrl-C:
    workers stopped, MLflow runs ended KILLED, one line, exit code 143 as a shell reports it."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def run() -> None:
    """The ``harness`` executable: ``main`` with SIGTERM handled like Ctrl-C. Installed here, not
    in ``main``, so that calling ``main`` in-process (tests, notebooks) leaves the caller's signal
    handlers alone; an inherited SIG_IGN is kept (``nohup``-style launches meant to ignore it)."""
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_terminated)
    main()


@click.group(cls=HarnessGroup)
@click.version_option(package_name="harness")
def main() -> None:
    """Benchmark harness for merging multi-task CLIP models."""
    plain_warning_lines()


def _load(file: str, overrides: tuple[str, ...], start_workers: bool = False,
          does: Literal["read", "plan", "submit"] = "read", results_only: bool = False):
    """The validated config; ``start_workers``: a sweep that will run jobs in a local pool
    starts the pool's server first, from the raw executor block, because validation imports
    torch (task and method registries) and the server's imports should overlap the driver's.
    ``does`` is what the command does with the sweep, and so what is checked besides its fields
    and output folder: ``read`` (status, report, ui, prepare) reads recorded jobs or results, or
    only the model options: nothing more, so an output folder copied without the models and data
    still reports; ``plan`` (collect) plans its jobs, whose keys hash the models and data: the
    model files, checkpoint shapes and data folders too; ``submit`` (sweep, tune, validate) runs
    or submits jobs, or checks a sweep before it does: those, and a SLURM executor against the
    cluster's partitions, which commands that only read or collect must not depend on.
    ``results_only`` (status, report, ui: they read recorded jobs and results alone): an unset
    ``${VAR}`` in the paths of models and data, or in a SLURM option, is left unexpanded."""
    from harness.config import UNSET_INPUTS_KEPT, ExecutorSpec, validate_config
    from harness.config_errors import ConfigError, Gathering
    from harness.model_checks import check_model_files, check_model_reading, check_pretrained_tag
    from harness.path_checks import (
        check_cache_dir,
        check_data_roots,
        check_output_dir,
        check_storage_files,
        check_tracking_uri,
    )
    from harness.sweep_file import apply_overrides, read_yaml

    as_read = read_yaml(file)
    raw = apply_overrides(as_read, list(overrides), file)
    if start_workers:
        try:
            executor = ExecutorSpec.model_validate(raw.get("executor") or {})
        except Exception:  # noqa: BLE001  (validation below reports it with file and field)
            executor = None
        if executor is not None and executor.kind == "local" and executor.workers > 1:
            from harness.executors.server import prestart

            prestart()
    try:
        kept = UNSET_INPUTS_KEPT.set(results_only and does == "read")
        try:
            cfg = validate_config(raw, file)
        finally:
            UNSET_INPUTS_KEPT.reset(kept)
        found = Gathering(one_per_field=True)  # what the fields point at, told together where one check needs no other
        with found.check():
            check_cache_dir(cfg, file)
        if does != "read":
            cache_usable = not found.errors  # reading the models takes the encoder summaries kept in the cache folder
            with found.check():  # files are read once they all exist
                check_model_files(cfg, file)
                if cache_usable:
                    check_model_reading(cfg, file)
            with found.check():
                check_pretrained_tag(cfg, file)
            with found.check():
                check_data_roots(cfg, file)
        for check in (check_output_dir, check_tracking_uri, *([check_storage_files] if does == "submit" else [])):
            with found.check():
                check(cfg, file)
        found.raise_any()
        if does == "submit":
            if cfg.executor.kind == "slurm":
                from harness.executors.slurm_settings import check_cluster

                check_cluster(cfg, file)
                _warn_of_gpus(cfg, file, overrides, as_read)
    except ConfigError as exc:
        raise exc.blamed_on_overrides(list(overrides), as_read) from None
    return cfg


def _warn_of_gpus(cfg: Any, file: str, overrides: tuple[str, ...], as_read: Any) -> None:
    """Warn (even with ``-q``) of SLURM jobs on ``device: cuda`` that ask for no GPU, naming the
    file, or the override that set the device or the GPU count, as a config error would."""
    from harness.config_errors import ConfigError
    from harness.executors.slurm_settings import gpu_request_warning

    text = gpu_request_warning(cfg)
    if text is not None:
        line = ConfigError(file, "executor.gpus_per_node", text, show_value=False, also=("device",))
        print_warning(console, line.blamed_on_overrides(list(overrides), as_read).line)


@contextlib.contextmanager
def _fields_of(file: str, overrides: tuple[str, ...]) -> Iterator[None]:
    """A sweep field found at fault while the sweep runs (a SLURM option sbatch refuses) is named
    with the sweep file, or the override that set it, as validation names a field."""
    from harness.config_errors import ConfigError
    from harness.errors import FieldError

    try:
        yield
    except FieldError as exc:
        raise ConfigError.of_field(file, exc, overrides) from None


def _print_plan(cfg, cache: bool = False) -> None:
    """The resolved config and the job plan; with ``cache``, which jobs the output folder has
    cached already (a dry run: the result store is read, no model built or loaded)."""
    from harness.config import MAIN, dump_yaml
    from harness.plan import plan_jobs, robustness_inline, setting_key

    console.rule("resolved config")
    console.print(dump_yaml(cfg), highlight=False, markup=False)
    done: set[str] | None = None
    why = None
    if cache:
        from harness.runner import cache_status
        from harness.workspace import Workspace

        ws = Workspace(cfg, build=False)  # one for both counts: task identities are computed once
        specs, done, why = cache_status(cfg, ws)
    else:
        specs = plan_jobs(cfg)
    follow = [s for s in specs if s.kind == "robustness"]  # a dry run's follow-ups whose setting is known
    specs = [s for s in specs if s.kind != "robustness"]
    keys = [setting_key(cfg, s) for s in specs]
    first: dict[str, int] = {}  # job key -> its row: two labels' identical settings are one job, run once
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    jobs = [specs[i] for i in sorted(set(first.values()))]
    table = Table(title=f"job plan: {len(jobs)} jobs")
    for col in ("#", "kind", "method", "task", "params", *(("status",) if done is not None else ())):
        table.add_column(col)
    for i, s in enumerate(specs + follow):
        tasks = s.task or ("all" if s.protocol == MAIN else f"all, merged on {', '.join(cfg.seen_tasks(s.protocol))}")
        if s.kind == "robustness":
            tasks = ", ".join(cfg.robustness.tasks)
        status = () if done is None else ("cached" if s.key in done else "to run",)
        number = "-" if i >= len(specs) else str(i) if first[keys[i]] == i else f"= {first[keys[i]]}"
        table.add_row(number, s.kind, s.label, tasks, ", ".join(f"{k}={v}" for k, v in s.params.items()), *status)
    for m in cfg.methods:
        if m.tune:
            table.add_row("-", "tune", m.display, "all",
                          f"{m.tune.n_trials} trials ({m.tune.sampler}) over {', '.join(m.tune.space)}, then 1 test run")
        elif (cfg.robustness and not robustness_inline(cfg, m.display)
              and not any(f.label == m.display for f in follow)):
            table.add_row("-", "robustness", m.display, ", ".join(cfg.robustness.tasks),
                          "the setting chosen on val, after its grid")
    console.print(table)
    if done is not None:
        cached = sum(s.key in done for s in jobs)
        line = f"{len(jobs)} jobs: {cached} cached, {len(jobs) - cached} to run"
        if follow:
            follow_keys = {s.key for s in follow}
            known = len(follow_keys & done)
            line += (f"; then {len(follow_keys)} robustness job{'s' if len(follow_keys) != 1 else ''} (settings "
                     f"chosen on val): {known} cached, {len(follow_keys) - known} to run")
        console.print(line, highlight=False)
    elif cache:
        console.print(f"{len(jobs)} jobs: which are cached is not known before the models are built ({why})",
                      highlight=False, markup=False, soft_wrap=True)
    if cache and cfg.robustness:
        _print_corrupted_splits(cfg, ws)
    console.print(f"outputs: {cfg.resolved_output_dir()}\ntracking: {cfg.resolved_tracking_uri()}",
                  highlight=False, markup=False)  # a path may hold "[...]", which is not markup


def _print_corrupted_splits(cfg, ws) -> None:
    """The dry run's count of the robustness study's corrupted splits already built."""
    from harness.runner import corrupted_split_status

    rob = cfg.robustness
    status = corrupted_split_status(cfg, ws)
    line = f"robustness study: corrupted test splits at severity {rob.severity}: "
    if isinstance(status, str):
        line += f"which are cached is not known before the models are built ({status})"
    else:
        cached, needed = status
        tasks, corruptions = needed // len(rob.corruptions), len(rob.corruptions)
        line += (f"{needed} ({tasks} task{'s' if tasks != 1 else ''} x {corruptions} "
                 f"corruption{'s' if corruptions != 1 else ''}), {cached} cached, {needed - cached} to build")
    console.print(line, highlight=False, markup=False, soft_wrap=True)


@main.command()
@click.argument("file", type=click.Path())
@click.argument("overrides", nargs=-1)
@click.option("--dry-run", is_flag=True, help="Print the resolved config and job plan; run nothing.")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bars or per-job lines (warnings and errors still print).")
@click.option("--detach", is_flag=True, help="SLURM: submit the jobs and return; see `status`, `collect`.")
def sweep(file: str, overrides: tuple[str, ...], dry_run: bool, quiet: bool, detach: bool) -> None:
    """Run a sweep: FILE is a YAML sweep, OVERRIDES are key.path=value."""
    cfg = _load(file, overrides, start_workers=not (dry_run or detach), does="submit")
    if dry_run:
        _check_data(cfg, file, overrides)
        _print_plan(cfg, cache=True)
        return
    from harness.runner import run_sweep

    with _fields_of(file, overrides):
        outcome = run_sweep(cfg, quiet=quiet, mode="detach" if detach else "run")
    if not detach:
        _report(cfg, outcome, quiet)


@main.command()
@click.argument("file", type=click.Path())
@click.argument("overrides", nargs=-1)
def status(file: str, overrides: tuple[str, ...]) -> None:
    """SLURM: the states of a sweep's submitted jobs (pending, running, done, failed, lost) and their logs."""
    from harness.executors.slurm import status_table

    table, counts = status_table(_load(file, overrides, results_only=True))
    console.print(table)
    console.print(", ".join(f"{n} {s}" for s, n in counts.items()), highlight=False)


@main.command()
@click.argument("file", type=click.Path())
@click.argument("overrides", nargs=-1)
@click.option("-q", "--quiet", is_flag=True, help="No live table.")
def collect(file: str, overrides: tuple[str, ...], quiet: bool) -> None:
    """SLURM: wait for a sweep's submitted jobs and record them (results, MLflow, table); submits nothing."""
    from harness.runner import run_sweep

    cfg = _load(file, overrides, does="plan")
    _report(cfg, run_sweep(cfg, quiet=quiet, mode="collect"), quiet)


def _report(cfg, outcome, quiet: bool) -> None:
    """After a sweep: the table when quiet, and a failure summary with exit code 1 when a job, an
    Optuna trial of this run, or a robustness study run inside a job failed (a study goes on
    without its failed trials, as a grid's row does without its failed settings, and a job's main
    metrics stand without its robustness study: the table stands, and the exit code says to look)."""
    if quiet:
        from harness.runner import print_tables

        print_tables(console, cfg, outcome.rows, outcome.generalization_rows)
    if not outcome.failed and not outcome.failed_trials and not outcome.study_failed:
        return
    from harness.plan import job_title
    from harness.runner import traceback_file

    def show(head: str, r) -> None:
        err_console.print(f"  {head}: {r.error or r.study_error}", highlight=False, markup=False, soft_wrap=True)
        trace = traceback_file(outcome.output_dir, r.key)
        if trace.is_file():
            err_console.print(f"    traceback: {trace}", highlight=False, markup=False, soft_wrap=True)

    if outcome.failed:
        err_console.print(f"[red]{len(outcome.failed)} of {len(outcome.results)} jobs failed:[/]")
        for r in outcome.failed:  # titled as its progress line was: label(k=v, ...)
            show(job_title(r.kind, r.task, r.label, r.params), r)
    if outcome.failed_trials:
        n = len(outcome.failed_trials)
        err_console.print(f"[red]{n} Optuna trial{'s' if n != 1 else ''} failed "
                          f"({_failed_trials_cost(outcome)}):[/]")
        for spec, r in outcome.failed_trials:
            show(f"trial {spec.trial['number']} {spec.title}", r)
    if outcome.study_failed:
        n = len(outcome.study_failed)
        err_console.print(f"[red]{n} robustness stud{'ies' if n != 1 else 'y'} run inside a job failed (the main "
                          "table keeps the job's row, the robustness table shows failed; a rerun runs the study "
                          "again):[/]")
        for r in outcome.study_failed:
            show(job_title(r.kind, r.task, r.label, r.params), r)
    sys.exit(1)


def _failed_trials_cost(outcome) -> str:
    """What the failed trials cost their studies: one that completed other trials chose among them;
    one that completed none chose no setting, and its row is among the failed jobs."""
    from harness.runner import FAILED_STUDY

    studies = {spec.label for spec, _ in outcome.failed_trials}
    chose_none = studies & {r.label for r in outcome.failed if r.key.startswith(FAILED_STUDY)}
    chose = studies - chose_none
    parts = [f"{', '.join(sorted(chose)) if chose_none else 'each study'} chose among the others"] if chose else []
    if chose_none:
        parts.append(f"no trial of {', '.join(sorted(chose_none))} completed: no setting chosen, its row failed")
    return "; ".join(parts)


@main.command()
@click.argument("file", type=click.Path())
@click.argument("overrides", nargs=-1)
@click.option("--method", "label", required=True,
              help="The method's label in the sweep, or its name when one tuned method has it.")
@click.option("--trials", type=int, default=None, help="Override tune.n_trials.")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bars or per-trial lines (warnings and errors still print).")
def tune(file: str, overrides: tuple[str, ...], label: str, trials: int | None, quiet: bool) -> None:
    """Tune one method of FILE (its `tune:` block) without the rest of the sweep.

    The study runs in the sweep's output folder and MLflow parent run; its table goes to
    report/tune-<label>.md, leaving the sweep's own report as the sweep wrote it."""
    from pydantic import ValidationError

    from harness.config import TuneSpec
    from harness.config_errors import validation_error

    cfg = _load(file, overrides, start_workers=True, does="submit")
    index = _method_index(cfg, label, file)
    m = cfg.methods[index]
    if m.tune is None:
        tuned = [t.display for t in cfg.methods if t.tune is not None and t.name == m.name]
        hint = f" (tuned {m.name} rows: {', '.join(map(repr, tuned))})" if tuned else ""
        fail(f"{file}: methods.{index}.tune: method {label!r} has no tune block{hint}")
    if trials is not None:
        raw = {**m.tune.model_dump(), "n_trials": trials}
        try:
            TuneSpec.model_validate(raw)
        except ValidationError as exc:
            raise validation_error(f"<command line> (--trials {trials}, over {file})", exc, raw,
                                   prefix=f"methods.{index}.tune", schema=TuneSpec) from None
    from harness.runner import TuneOnly, run_sweep

    with _fields_of(file, overrides):
        outcome = run_sweep(cfg, quiet=quiet, only=TuneOnly(m.display, trials))
    _report(cfg, outcome, quiet)


@main.command()
@click.argument("file", type=click.Path())
@click.argument("overrides", nargs=-1)
@click.option("--method", "label", required=True, help="The row's label in the sweep (or its method's name).")
@click.option("--out", "dst", required=True, type=click.Path(dir_okay=False), help="The safetensors file to write.")
@click.option("--full-clip", is_flag=True,
              help="Write the whole CLIP (text tower from the pretrained model), as open_clip loads it.")
def export(file: str, overrides: tuple[str, ...], label: str, dst: str, full_clip: bool) -> None:
    """Write the merged image encoder a row of FILE's results table reports (its setting chosen on
    val) as a safetensors checkpoint, loadable wherever a fine-tuned one is (`model.finetuned`);
    with --full-clip the whole CLIP, loadable wherever a pretrained one is."""
    from harness.export import export_merged, refuse_another_format
    from harness.plan import setting_text

    _check_destination(dst, "--out", must_be_file=True)
    refuse_another_format(dst, full_clip)
    cfg = _load(file, overrides)
    label = _export_label(cfg, label, file)
    with _fields_of(file, overrides):
        done = export_merged(cfg, label, dst, full_clip=full_clip)
    r = done.result
    if done.adapted_again:
        why = ("its job ran with checkpoint_every: 0, which saves none" if done.saves_none
               else f"none saved in work/{r.key}/")
        console.print(f"{label}: adapted again, from the start ({why}; same data and seed)",
                      highlight=False, markup=False)
    setting = setting_text(r.params) or "no parameters"
    console.print(f"wrote {done.path}: {label} ({setting}), val {r.metrics.get('val/acc/avg', float('nan')):.1f}, "
                  f"test {r.metrics.get('acc/avg', float('nan')):.1f} (job {r.key})", highlight=False, markup=False)


def _export_label(cfg, label: str, file: str) -> str:
    """The row ``--method`` names. A generalization row's label (``<label> (gen)``) is passed on as
    given, so that export refuses it naming its main row instead of calling it no method's label."""
    from harness.config import GENERALIZATION_SUFFIX

    if label.endswith(GENERALIZATION_SUFFIX) and any(
            m.display == label.removesuffix(GENERALIZATION_SUFFIX) for m in cfg.methods):
        return label
    return cfg.methods[_method_index(cfg, label, file)].display


def _check_destination(dst: str | Path, option: str, folder: bool = False, must_be_file: bool = False) -> None:
    """Refuse, before any work, a destination the first write would otherwise fail on with a
    traceback (after an export's merge) or misread: an empty one (the current folder to ``Path``,
    written into without being named), one naming a folder where a file must be written, one whose
    folder cannot be made because a file stands at it or above it."""
    text = str(dst)
    names_folder = not text or text.endswith(("/", os.sep))
    if must_be_file and names_folder:
        fail(f"{option} {text!r}: names a folder, not the safetensors file to write (e.g. --out merged.safetensors)")
    if not text:
        fail(f"{option} '': an empty path; name the safetensors file or the folder to write into "
             "('.' for the current folder)")
    path = Path(dst)
    where = path if folder or names_folder else path.parent
    for p in (where, *where.parents):
        if p.exists():
            if not p.is_dir():
                fail(f"{option} {dst}: {p} is a file, not a folder")
            return


def _check_store(where: str, uri: str) -> None:
    """A tracking URI MLflow cannot open for the file it names (``mlflow.db`` without ``sqlite:///``,
    a damaged database) in one line, ``where`` naming what gave it."""
    from harness.path_checks import tracking_file_problem

    problem = tracking_file_problem(uri)
    if problem:
        fail(f"{where}: {problem}")


def _method_index(cfg, label: str, file: str) -> int:
    """The method ``--method`` names: by label, else by name when one tuned method has that name
    (methods without a label go by their name already)."""
    index = next((i for i, m in enumerate(cfg.methods) if m.display == label), None)
    if index is not None:
        return index
    named = [i for i, m in enumerate(cfg.methods) if m.name == label]
    tuned = [i for i in named if cfg.methods[i].tune is not None]
    if len(tuned) == 1 or len(named) == 1:
        return (tuned or named)[0]
    if named:
        fail(f"{file}: {len(tuned or named)} methods are named {label!r} (labels "
             f"{', '.join(cfg.methods[i].display for i in tuned or named)}): give the label")
    from harness.errors import did_you_mean

    shown = [m.display for m in cfg.methods]
    fail(f"{file}: no method labelled {label!r}{did_you_mean(label, shown)} (methods: {', '.join(shown)})")
    raise AssertionError


@main.command()
@click.argument("file", type=click.Path())
@click.argument("overrides", nargs=-1)
def validate(file: str, overrides: tuple[str, ...]) -> None:
    """Validate FILE and print the resolved config and job plan (runs nothing)."""
    cfg = _load(file, overrides, does="submit")
    _check_data(cfg, file, overrides)
    _print_plan(cfg)
    console.print("[green]valid[/]")


def _check_data(cfg: Any, file: str, overrides: tuple[str, ...]) -> None:
    """What validate and a dry run check besides what every run's loading does (the run finds
    these itself): the datasets found in their folders (:func:`harness.path_checks.check_dataset_folders`)
    and each test-time-adaptation ``batch_size`` within the split it adapts on
    (:meth:`harness.workspace.Workspace.check_adaptation_batches`), where the split sizes are
    known without building a model; a task of one's own is built and checked as the run's
    preflight checks it, so ``valid`` is not followed by a sweep refusing its data."""
    from harness.config_errors import ConfigError, Gathering
    from harness.errors import FieldError, NotBuilt
    from harness.path_checks import check_dataset_folders
    from harness.workspace import Workspace, check_templates

    ws = Workspace(cfg, build=False)
    found = Gathering()  # every task's options, a line each, before a dataset is made of them
    for name in cfg.task_names:
        with found.check(), _fields_of(file, overrides), contextlib.suppress(NotBuilt):
            ws.check_task_options(name)
    found.raise_any()
    try:
        check_dataset_folders(cfg, file)
    except ConfigError as exc:
        raise exc.blamed_on_overrides(list(overrides)) from None
    with _fields_of(file, overrides):
        ws.check_device()
    # a task of one's own taking the encoder's input size without a default is left to the run's preflight (NotBuilt)
    with _fields_of(file, overrides), contextlib.suppress(NotBuilt):
        ws.check_adaptation_batches()
    for name in cfg.task_names:
        if _made_by_validate(cfg, name):  # its factory, splits, labels and templates, as the run checks them
            with _fields_of(file, overrides), contextlib.suppress(NotBuilt), ws.entry_errors(name):
                check_templates(ws.task(name), name)
                ws.check_task_data(name)
        if name in cfg.model.heads:  # a head file: its shape, dtype, bias and class count, as the run checks it
            with _fields_of(file, overrides), contextlib.suppress(NotBuilt):
                try:
                    ws.head(name)
                except NotBuilt:
                    raise
                except HarnessError as exc:
                    raise FieldError(f"model.heads.{name}", str(exc).removeprefix(f"model.heads.{name}: ")) from None


def _made_by_validate(cfg: Any, name: str) -> bool:
    """Whether validate makes task ``name`` to check it as the run does: a task of one's own; a
    project task made in code (a toy one) when its entry gives options (with its defaults it is
    known good, and making it costs a quarter of a second); not the embedded suite's (its data
    takes minutes to generate the first time) nor the eight datasets
    (:func:`harness.path_checks.check_dataset_folders` lists their files)."""
    from harness.plan import own_task
    from tasks.embedded import EMBEDDED_TASKS
    from tasks.vision8 import SPECS

    if not own_task(name):
        return True
    options = next(t.options for t in cfg.tasks if t.name == name)
    return bool(options) and name not in EMBEDDED_TASKS and name not in SPECS


@main.command(name="list")
@click.argument("what", type=click.Choice(["methods", "tasks", "models"]))
@click.argument("names", nargs=-1)
@click.option("--sweep", "sweep_file", type=click.Path(),
              help="List the methods this sweep file names (with methods).")
def list_(what: str, names: tuple[str, ...], sweep_file: str | None) -> None:
    """What is registered: methods (with hyperparameters), tasks, or models.

    With methods, NAMES picks which to show instead of the registered ones: a method's name, a
    class of your own as module:Class, or a module (every method class it defines)."""
    if what != "methods" and (names or sweep_file):
        raise click.UsageError(f"NAMES and --sweep pick methods; `harness list {what}` takes neither")
    if what == "methods":
        from methods.base import available_methods

        shown = _methods_to_list(names, sweep_file) if names or sweep_file else available_methods()
        table = Table(title="merge methods")
        for col in ("method", "hyperparameter", "type", "default", "range", "description"):
            table.add_column(col, overflow="fold")
        for name, cls in shown.items():
            hps = cls.hyperparameters()
            if not hps:
                table.add_row(name, "-", "", "", "", "no hyperparameters")
            for i, hp in enumerate(hps):
                table.add_row(name if i == 0 else "", hp["name"], hp["type"],
                              "(required)" if hp["required"] else repr(hp["default"]),
                              hp["range"], hp["description"])
            table.add_section()
        console.print(table)
    elif what == "tasks":
        from tasks.base import available_tasks

        table = Table(title="tasks")
        table.add_column("name")
        table.add_column("description")
        for name, desc in available_tasks().items():
            table.add_row(name, desc)
        console.print(table)
    else:
        from harness.models import CONFIG_DIR, available_models

        own = {p.stem for p in CONFIG_DIR.glob("*.json")}
        table = Table(title="open_clip architectures (weights from local files or cached tags)")
        table.add_column("name")
        table.add_column("origin")
        for name in available_models():
            table.add_row(name, "harness" if name in own else "open_clip")
        console.print(table)


def _methods_to_list(names: tuple[str, ...], sweep_file: str | None) -> dict[str, type]:
    """The methods ``harness list methods`` was asked for: those ``sweep_file`` names (read as
    written: a hyperparameter it gets wrong does not hide the list that shows the right ones),
    then ``names``."""
    from harness.config_errors import ConfigError, gathered
    from harness.sweep_file import read_yaml
    from methods.base import methods_named

    wanted: list[tuple[str, str, str]] = []  # (file, field, name)
    if sweep_file:
        entries = read_yaml(sweep_file).get("methods") or []
        if not isinstance(entries, list):
            raise ConfigError(sweep_file, "methods", "must be a list of methods", entries)
        for i, m in enumerate(entries):
            name = m.get("name") if isinstance(m, dict) else m
            if not isinstance(name, str):
                raise ConfigError(sweep_file, f"methods.{i}", "a method is a name or a mapping with 'name'", m)
            wanted.append((sweep_file, f"methods.{i}" if m is name else f"methods.{i}.name", name))
    wanted += [("harness list methods", "NAMES", name) for name in names]
    shown: dict[str, type] = {}
    faults: list[ConfigError] = []  # every name at fault, a line each, as validate tells a sweep's
    for file, field, name in wanted:
        try:
            shown.update(methods_named(name))
        except KeyError as exc:
            faults.append(ConfigError(file, field, str(exc.args[0]), show_value=False))
    if faults:
        raise gathered(faults)
    return shown


@main.command()
@click.argument("target", required=False)
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--host", default="127.0.0.1", show_default=True)
def ui(target: str | None, port: int, host: str) -> None:
    """Start the MLflow UI on a sweep's tracking store (TARGET: sweep YAML or output dir)."""
    uri, artifacts = _store(target)
    exe = shutil.which("mlflow", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        fail("the mlflow command is not installed")
    if uri.startswith("http"):
        fail(f"{uri} is a tracking server: open it in a browser")
    from harness.tracking import allow_folder_stores, check_database

    check_database(uri)  # the server would retry one that is down for minutes before it says so
    args = [exe, "server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]
    if artifacts:
        args += ["--artifacts-destination", artifacts]
    allow_folder_stores()  # the server inherits it
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    console.print(f"MLflow UI for {uri} at http://{host}:{port}  (Ctrl-C stops)")
    sys.stdout.flush()
    os.execve(exe, args, env)  # the server takes this process's place: signals reach it directly


def _ran_sweep(file: str) -> tuple[Any, Path]:
    """The sweep ``file`` (read as the commands that read only its results read it) and its output
    folder, which must exist: MLflow would otherwise serve, or a report read, a new, empty store.
    The store itself (``mlflow.db``, a natural thing to point at) is named as such, with the
    folder to give instead, rather than read as a sweep file that is not UTF-8 text."""
    with contextlib.suppress(OSError), open(file, "rb") as fh:
        if fh.read(16) == b"SQLite format 3\0":
            fail(f"{file}: an SQLite database (an MLflow store), not a sweep file: give the output folder it lies "
                 f"in ({Path(file).parent}) or its sweep file")
    cfg = _load(file, (), results_only=True)
    out = cfg.resolved_output_dir()
    if not out.is_dir():
        fail(f"{file}: its output folder {out} does not exist (the sweep has not run there)")
    return cfg, out


def _store(target: str | None) -> tuple[str, str | None]:
    """Tracking URI and artifact folder from a sweep YAML (its output folder, as ``harness report
    FILE`` takes it: MLflow would serve a new, empty store there), an output folder, or the env."""
    cfg = None
    if target and Path(target).is_file():
        cfg, out = _ran_sweep(target)
        target = str(out)
    if target and Path(target).is_dir():
        folder = Path(target).resolve()
        return _folder_store(target, _folder_config(folder) or cfg), str(folder / "mlartifacts")
    if target:
        fail(f"{target}: not a sweep file or an output folder")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], None
    fail("give a sweep YAML or its output folder (or set MLFLOW_TRACKING_URI)")
    raise AssertionError


def _folder_config(folder: Path):
    """The sweep an output folder holds: its ``resolved.yaml`` (what last ran there), or None
    (no such file, or one this version cannot read)."""
    import yaml

    from harness.config import SweepConfig

    path = folder / "resolved.yaml"
    try:
        return SweepConfig.model_validate(yaml.safe_load(path.read_text()))
    except Exception:  # absent or unreadable: the folder's own store, as before
        return None


def _folder_store(target: str, cfg) -> str:
    """The tracking store of the sweep in output folder ``target``: the ``tracking_uri`` its sweep
    logged to (another store than the folder's own ``mlflow.db``), else that ``mlflow.db``, else
    MLFLOW_TRACKING_URI (a sweep that logged there names no store of its own). A copied folder's
    own store is first pointed at the copy's artifacts, as a sweep does when it opens it: MLflow
    keeps absolute artifact paths, which lead into the original folder (gone, on another machine)."""
    from harness.tracking import is_own_store, relocate_copied_store

    folder = Path(target).resolve()
    _refuse_unrun(target, folder)
    db = folder / "mlflow.db"
    if cfg is not None and cfg.tracking_uri and not is_own_store(cfg.tracking_uri, cfg.resolved_output_dir()):
        return cfg.tracking_uri
    if db.is_file():
        uri = f"sqlite:///{db}"
        try:
            relocate_copied_store(uri, folder)
        except sqlite3.Error:
            pass  # not a store (an empty file, a damaged one): MLflow says what it is when it opens it
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    fail(f"{target}: no mlflow.db in this folder")
    raise AssertionError


def _refuse_unrun(target: str, folder: Path) -> None:
    """Stop where no job has run in output folder ``folder`` yet: a sweep killed while preparing
    (or preparing now) leaves only its lock file there, which is no mlflow.db gone missing, nor,
    with MLFLOW_TRACKING_URI set, a folder to report that store's latest sweep (another one) for."""
    from harness.runner import LOCK_FILE

    try:
        ran = any(entry.name != LOCK_FILE for entry in os.scandir(folder))
    except OSError:
        return  # unreadable: opening its store says what is wrong
    if not ran:
        fail(f"{target}: no job has run in this output folder yet (a sweep stopped while preparing, or preparing "
             "now, leaves only its lock file): run `harness sweep` with its sweep file")


@main.command()
@click.argument("target")
@click.option("--tracking-uri", default=None, help="Store holding TARGET when it is a run id (default: MLFLOW_TRACKING_URI).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Where to write the report.")
@click.option("--against", multiple=True, metavar="ROW",
              help="Compare every row with this one in the significance table (repeatable; default task_arithmetic).")
def report(target: str, tracking_uri: str | None, out_dir: str | None, against: tuple[str, ...]) -> None:
    """Build the paper's tables (md, csv, tex) and plots from MLflow.

    TARGET is a sweep's output folder (the parent run of the sweep that last ran there), its
    sweep YAML, or a sweep's parent run id (or its first characters, as the tables' titles show)."""
    from harness.report import build_report, load_study_counts, load_sweep_from_mlflow, row_routings
    from harness.results import print_table, rich_table

    if out_dir:
        _check_destination(out_dir, "--out", folder=True)
    if tracking_uri and (Path(target).is_file() or Path(target).is_dir()):  # else read another store than given
        fail(f"--tracking-uri {tracking_uri}: for a run id only; {target} is a sweep "
             f"{'file' if Path(target).is_file() else 'output folder'}, reported from the store its sweep logged to")
    sweep_cfg = None  # the sweep whose parent run to report (a store may hold other sweeps' runs)
    default_out: Path | None = None  # a run id's: report-<its first 8 characters>, known once it is found
    if Path(target).is_file():  # the sweep file: its output folder, as `harness ui FILE` takes it
        sweep_cfg, out = _ran_sweep(target)
        target = str(out)
    if Path(target).is_dir():
        sweep_cfg = _folder_config(Path(target).resolve()) or sweep_cfg
        uri, run_id, default_out = _folder_store(target, sweep_cfg), None, Path(target) / "report"
        _check_store(target, uri)
    else:
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            fail(f"{target}: not a sweep file or output folder; for a run id give --tracking-uri or set "
                 "MLFLOW_TRACKING_URI")
        run_id = target
        _check_store(f"{'--tracking-uri' if tracking_uri else 'MLFLOW_TRACKING_URI'} {uri}", uri)
    if not out_dir and default_out is not None:
        _check_destination(default_out, "report folder", folder=True)
    cfg, results, parent = load_sweep_from_mlflow(uri, run_id, sweep_cfg if run_id is None else None,
                                                  Path(target) if run_id is None else None)
    if default_out is None:  # a prefix under 8 characters names the folder the whole id does
        default_out = Path(f"report-{parent.info.run_id[:8]}")
        if not out_dir:
            _check_destination(default_out, "report folder", folder=True)
    rep = build_report(cfg, results, Path(out_dir) if out_dir else default_out, row_routings(cfg, results),
                       list(against) or None, load_study_counts(uri, parent))
    for name, (header, body) in rep.tables.items():
        print_table(console, rich_table(header, body, title=f"{name} ({cfg.name}, run {parent.info.run_id[:8]})"))
    console.print(f"wrote {len(rep.files)} files to {Path(rep.files[0]).parent}")


@main.command()
@click.argument("file", required=False, type=click.Path())
@click.argument("overrides", nargs=-1)
@click.option("--from-scratch", is_flag=True, help="Retrain the pretrained model instead of using the shipped one.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (errors still print).")
def prepare(file: str | None, overrides: tuple[str, ...], from_scratch: bool, quiet: bool) -> None:
    """Build the embedded suite's models (pretrained + fine-tuned), cached for reuse."""
    import time

    from harness.config import suite_tasks, validate_config
    from harness.path_checks import check_cache_dir

    if file:
        cfg = _load(file, overrides)
    else:
        from tasks.embedded import EMBEDDED_TASKS

        cfg = validate_config({"name": "embedded", "tasks": list(EMBEDDED_TASKS)}, "<defaults>")
        check_cache_dir(cfg, "<defaults>")
    if cfg.model.source != "embedded":
        fail(f"{file}: model.source is {cfg.model.source!r}; prepare builds the embedded suite only")
    from tasks.embedded.pipeline import prepare_suite

    t0 = time.perf_counter()
    art = prepare_suite(suite_tasks(cfg), cfg.resolved_cache_dir(), options=cfg.model.suite,
                        progress=not quiet, from_scratch=from_scratch)
    folders = sorted({str(Path(p).parent) for p in art.finetuned.values()})
    console.print(f"embedded suite ready in {time.perf_counter() - t0:.1f}s: {art.arch} pretrained "
                  f"{art.pretrained}, {len(art.finetuned)} fine-tuned encoders under {', '.join(folders)}",
                  highlight=False, soft_wrap=True)


@main.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--trust-pickle", is_flag=True, help="Allow unpickling SRC (runs code from the file: trusted files only).")
@click.option("--arch", default=None, help="open_clip architecture of the checkpoint (recorded in the sidecar).")
@click.option("--overwrite", is_flag=True, help="Replace a DST file that holds another checkpoint.")
def convert(src: str, dst: str, trust_pickle: bool, arch: str | None, overwrite: bool) -> None:
    """Convert a task_vectors-style checkpoint into a safetensors image-encoder state dict."""
    from harness.convert import convert_pickled_checkpoint

    _check_destination(dst, "DST")
    kept: list[Path] = []
    path = convert_pickled_checkpoint(src, dst, trust_pickle=trust_pickle, arch=arch, overwrite=overwrite,
                                      kept=kept.append)
    _print_output(path, kept)


def _print_output(path: Path, kept: list[Path]) -> None:
    """The line of one output of convert or import: written, or already there with the same content."""
    said = f"{path}: already there with the same content, nothing written" if path in kept else f"wrote {path}"
    console.print(said, highlight=False, markup=False)


@main.command(name="import")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--trust-pickle", is_flag=True, help="Allow unpickling task_vectors files (runs code from them: trusted files only).")
@click.option("--arch", default=None, help="open_clip architecture to check the checkpoints against (default: inferred).")
@click.option("--projection", default=None, type=click.Path(),
              help="HF folder or file with the visual projection, for CLIPVisionModel folders (which have none).")
@click.option("--full", is_flag=True, help="Keep the text tower of CLIPModel folders (the pretrained model: zero-shot heads need it).")
@click.option("--verify", is_flag=True, help="Compare HF folders' image features with transformers on random images.")
@click.option("--overwrite", is_flag=True, help="Replace output files that hold other checkpoints.")
def import_(src: str, dst: str, trust_pickle: bool, arch: str | None, projection: str | None, full: bool, verify: bool,
            overwrite: bool) -> None:
    """Import checkpoints: a Hugging Face CLIP folder, a task_vectors/state-dict file, or a folder of them."""
    from harness.checkpoints import import_checkpoints

    _check_destination(dst, "DST")
    kept: list[Path] = []
    import_checkpoints(src, dst, trust_pickle=trust_pickle, arch=arch, projection=projection, full=full,
                       verify=verify, overwrite=overwrite, kept=kept.append,
                       done=lambda path: _print_output(path, kept))  # each as made: an error may stop the rest


if __name__ == "__main__":
    run()
