"""Optuna tuning of a method's hyperparameters through the sweep's executor.

The driver owns the study: it asks for ``n_parallel`` trials, runs them as jobs through the
same executor as every other job (local processes or SLURM), and tells their validation
objective back. Jobs reopen their trial from the storage only to report intermediate values
and ask the pruner. The default storage is an Optuna journal file in the sweep's output
folder (safe on shared cluster filesystems); rerunning a sweep resumes its studies: finished
trials are kept, trials a killed driver left RUNNING are run again as they were (same trial,
same job key, so an adaptation resumes from its checkpoints). A trial asked from another output
folder (a storage several sweeps share) is its driver's, alive or not, and is left to it; it
counts toward ``n_trials``, the study's total.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import pickle
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from harness.cache import content_key
from harness.config import MethodSpec, SweepConfig, TuneSpec, held_value, space_probe
from harness.errors import FieldError, HarnessError, last_line
from harness.job import JobResult, read_result
from harness.plan import JobSpec, method_class_id, setting_text, with_key
from harness.results import TrialCounts

if TYPE_CHECKING:
    import optuna


def open_storage(spec: str):
    """An Optuna storage from its spec: ``journal:<path>`` or any RDB URL (``sqlite:///...``)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if spec.startswith("journal:"):
        path = Path(spec[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path), journal_lock(path)))
    return _rdb_storage(spec)


#: Tries at opening a database storage that other processes may be creating at the same moment.
RDB_OPEN_TRIES = 5


def _rdb_storage(spec: str) -> "optuna.storages.RDBStorage":
    """Optuna's database storage at ``spec``. Opening a new database creates its tables and
    stamps its schema version; sweeps sharing the storage and started together do that at once,
    and all but one fail (SQLite: ``UNIQUE constraint failed: alembic_version.version_num``, a
    table that ``already exists``, a ``locked`` database). Tried again, the database is there."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(1, RDB_OPEN_TRIES + 1):
        try:
            return optuna.storages.RDBStorage(spec)
        except (IntegrityError, OperationalError) as exc:
            raced = isinstance(exc, IntegrityError) or any(w in str(exc.orig) for w in ("already exists", "locked"))
            if not raced or attempt == RDB_OPEN_TRIES:
                raise
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


#: How long a journal's lock file may stay held before the wait for it is told (a write holds it
#: for milliseconds).
LOCK_TELL_AFTER_S = 1.0


def journal_lock(path: Path) -> "optuna.storages.journal.JournalFileSymlinkLock":
    """Optuna's lock of the journal at ``path`` (a symlink ``<path>.lock``, which works on NFS),
    which says on stderr, once per lock file met, that it waits for it. A process killed while it
    wrote (a ``harness tune`` driver, a trial reporting a step) leaves the lock behind, and Optuna
    waits its grace period for it unchanged, then removes it, silently at the harness's log level:
    a study that seemed to hang. The lock names no owner, and a trial job of the killed driver may
    still be running on another node (a SLURM job), so the wait is told, not cut short."""
    from optuna.storages.journal import JournalFileSymlinkLock

    class TellingLock(JournalFileSymlinkLock):
        told: float | None = None  # the modification time of the held lock file last told about

        def acquire(self) -> bool:
            deadline = time.monotonic() + LOCK_TELL_AFTER_S
            while os.path.lexists(self._lock_file) and time.monotonic() < deadline:
                time.sleep(0.01)
            try:
                since = os.lstat(self._lock_file).st_mtime
            except OSError:  # released meanwhile
                return super().acquire()
            if since != self.told:
                self.told = since
                print(f"waiting for the Optuna journal's lock file {self._lock_file}, held for "
                      f"{max(0.0, time.time() - since):.0f} s: a process writing to the study holds it, or "
                      f"one killed while writing left it behind (Optuna removes it after "
                      f"{self.grace_period} s unchanged)", file=sys.stderr, flush=True)
            return super().acquire()

    return TellingLock(str(path))


def make_sampler(tune: TuneSpec, seed: int) -> "optuna.samplers.BaseSampler":
    import optuna

    class DriverGridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler without its ``study.stop()`` after the last point: Optuna allows
        that call only inside ``study.optimize``, and this driver asks and tells instead (a
        RuntimeError once the grid was exhausted); :meth:`StudyRunner.run` ends the study itself."""

        def after_trial(self, study: "optuna.Study", trial: Any, state: Any, values: Any) -> None:
            return None

    if tune.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if tune.sampler == "cmaes":
        return cmaes_sampler(seed, tune.storage or "the sweep's own journal")
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return DriverGridSampler({k: p.grid_values() for k, p in tune.space.items()}, seed=seed)


def trial_seeded_sampler(tune: TuneSpec, seed: int) -> "optuna.samplers.BaseSampler":
    """The study's sampler, seeded afresh for each trial from ``seed`` and the number Optuna gave
    the trial when it created it (:func:`trial_seed`): a study run in several goes draws what one
    uninterrupted run draws, where one sampler kept across trials draws from where its process's
    stream stands; and two drivers of a shared study asking at once draw each their own trial's
    point, where a seed from the trial count read before asking gave both the same. A grid keeps
    its seed: the seed orders the grid, and stored trials name points by index."""
    import optuna

    if tune.sampler == "grid":
        return make_sampler(tune, seed)

    class TrialSeededSampler(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self.per_trial = make_sampler(tune, seed)

        def before_trial(self, study: "optuna.Study", trial: Any) -> None:
            self.per_trial = make_sampler(tune, trial_seed(seed, trial.number))
            self.per_trial.before_trial(study, trial)

        def infer_relative_search_space(self, study: "optuna.Study", trial: Any) -> dict[str, Any]:
            return self.per_trial.infer_relative_search_space(study, trial)

        def sample_relative(self, study: "optuna.Study", trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
            return self.per_trial.sample_relative(study, trial, search_space)

        def sample_independent(self, study: "optuna.Study", trial: Any, name: str, distribution: Any) -> Any:
            return self.per_trial.sample_independent(study, trial, name, distribution)

        def after_trial(self, study: "optuna.Study", trial: Any, state: Any, values: Any) -> None:
            self.per_trial.after_trial(study, trial, state, values)

    return TrialSeededSampler()


class StudyFailed(HarnessError):
    """More trials failed than a study tolerates: a broken method or setting, not bad luck."""


#: The globals a CMA-ES optimizer's pickle names (the ``cmaes`` package's classes aside):
#: numpy arrays and scalars, under numpy 2's module names and numpy 1's.
CMA_STATE_GLOBALS = frozenset((module, name) for module in ("numpy._core.multiarray", "numpy.core.multiarray")
                              for name in ("_reconstruct", "scalar")) | {("numpy", "ndarray"), ("numpy", "dtype")}


class UntrustedStudyState(StudyFailed):
    """A study's stored CMA-ES state names something else than CMA-ES state: unpickling it would
    run code from the storage (Optuna unpickles it as it is)."""


class CmaStateUnpickler(pickle.Unpickler):
    """Unpickles a ``cmaes`` optimizer and the numpy arrays it holds, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in CMA_STATE_GLOBALS:
            return super().find_class(module, name)
        if module == "cmaes" or module.startswith("cmaes."):
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is no part of a CMA-ES optimizer's state")


def cmaes_sampler(seed: int, storage: str) -> "optuna.samplers.CmaEsSampler":
    """Optuna's CMA-ES sampler, except that the optimizer state it resumes from (pickled in a
    trial's system attributes of the study's storage, which other sweeps may write to: a shared
    ``tune.storage``) is read by :class:`CmaStateUnpickler`, so a crafted trial cannot run code
    in the driver; such a trial fails the study, naming the storage and the trial."""
    import optuna

    hooks = ("_restore_optimizer", "_concat_optimizer_attrs", "_attr_key_optimizer")
    missing = [name for name in hooks if not hasattr(optuna.samplers.CmaEsSampler, name)]
    if missing:  # the override below would never run, and Optuna would unpickle the state itself
        raise HarnessError(f"tune.sampler: cmaes: Optuna {optuna.__version__}'s CMA-ES sampler has no "
                           f"{', '.join(missing)}, through which the harness checks the optimizer state it resumes "
                           "from before unpickling it; use another sampler, or an Optuna that has them (5.1 does)")

    class CheckedStateCmaEsSampler(optuna.samplers.CmaEsSampler):
        def _restore_optimizer(self, completed_trials: list[Any]) -> Any:
            for trial in reversed(completed_trials):
                attrs = {k: v for k, v in trial.system_attrs.items() if k.startswith(self._attr_key_optimizer)}
                if attrs:
                    return restore_cma_state(self._concat_optimizer_attrs(attrs), trial.number, storage)
            return None

    return CheckedStateCmaEsSampler(seed=seed)


def restore_cma_state(hex_state: str, number: int, storage: str) -> Any:
    """The CMA-ES optimizer trial ``number`` stored, unpickled with :class:`CmaStateUnpickler`."""
    try:
        state = CmaStateUnpickler(io.BytesIO(bytes.fromhex(hex_state))).load()
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
    else:
        if type(state).__module__.split(".")[0] == "cmaes":
            return state
        why = f"it holds a {type(state).__name__}"
    raise UntrustedStudyState(f"study storage {storage}: trial {number} holds a CMA-ES state that is not one "
                              f"({why}); refused to unpickle it, as that could run code from the storage")


def make_pruner(name: str) -> "optuna.pruners.BasePruner":
    """The study's pruner. Step 0 is the validation before the first adaptation step, which the
    tuned adaptation settings (a learning rate, a router's depth) cannot have changed yet: the
    median pruner waits for a step after it (Hyperband's rungs start at step 1 already)."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def distributions(tune: TuneSpec) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for name, p in tune.space.items():
        if p.type == "categorical":
            out[name] = CategoricalDistribution(p.choices)
        elif p.type == "int":
            out[name] = IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[name] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    return out


def storage_spec(cfg: SweepConfig, tune: TuneSpec) -> str:
    """The study's storage, a journal's path with ``~`` expanded and made absolute: the trials'
    jobs (other processes, SLURM nodes) reopen it, and ``~`` is no folder to make in the cwd."""
    if tune.storage is None:
        return f"journal:{cfg.resolved_output_dir() / 'optuna' / 'journal.log'}"
    if tune.storage.startswith("journal:"):
        return f"journal:{Path(tune.storage[len('journal:'):]).expanduser().resolve()}"
    return tune.storage


def check_storages(cfg: SweepConfig, labels: list[str]) -> None:
    """Open the storage each study of ``labels`` names (``tune.storage``) before any job runs: a
    database or journal that cannot be opened (a missing folder, no server) is one line naming the
    field, not a traceback once the sweep's other jobs are done."""
    from sqlalchemy.exc import SQLAlchemyError

    for i, m in enumerate(cfg.methods):
        if m.tune is None or m.tune.storage is None or m.display not in labels:
            continue
        try:
            open_storage(storage_spec(cfg, m.tune))
        except (OSError, SQLAlchemyError) as exc:
            raise FieldError(f"methods.{i}.tune.storage", f"cannot open it: {open_failure(exc)}",
                             m.tune.storage) from None


def open_failure(exc: Exception) -> str:
    """An OSError's reason and file, or a database error's own first line (SQLAlchemy's wrapper
    adds the statement and a link)."""
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc.strerror or exc)
    return str(getattr(exc, "orig", None) or exc).splitlines()[0]


def study_name(cfg: SweepConfig, m: MethodSpec) -> str:
    """The name a study is first stored under (see :func:`open_study` for a changed definition)."""
    return m.tune.study_name or f"{cfg.name}.{m.display}"


#: The study's user attribute holding :func:`study_definition`.
DEFINITION_ATTR = "harness.definition"
#: The study's user attribute holding :func:`study_measures`.
MEASURES_ATTR = "harness.measures"
#: The study's user attribute holding its method's class and, for a method of one's own, the
#: digest of its file (``harness.plan.method_class_id``): what says that an edit of the file,
#: not of the tuning block, made a study of its own.
METHOD_ATTR = "harness.method"
#: A trial's user attribute naming the output folder of the driver that asked it.
OWNER_ATTR = "harness.output_dir"


def study_definition(m: MethodSpec, sweep_seed: int = 0, method_id: str | None = None) -> str:
    """A digest of what makes a study's trials comparable: the method, its fixed params, the space,
    the objective, the sampler and its seed (``tune.seed``, else ``sweep_seed``: it decides which
    points the search asks, so another seed is another search, not more of this one; left out at
    0, so studies stored before it was recorded keep their digest; ``n_trials`` and
    ``n_parallel`` may change: that extends it).
    Fixed params the method declares ``runtime_only``, and ``added_hyperparameters`` given at
    their defaults, are left out, as job keys leave them out (``MergeMethod.as_key``): changing a
    runtime-only one, or writing an added one at its default, resumes the study and finds its
    trials' cached results. Fixed params and categorical choices enter as the method's fields hold
    them: two spellings of one setting (``steps: 4`` in the file, ``steps=4.0`` on the command
    line) are one study, as they are one job key. ``method_id``: the digest with another code of
    the method (:func:`harness.plan.method_class_id`), to tell an edit of its file from others."""
    from methods.base import resolve_method

    cls = resolve_method(m.name)
    runtime_only = cls.runtime_only
    given = {k: held_value(cls, m, k, v) for k, v in m.params.items() if k not in runtime_only}
    params = {k: v for k, v in cls.as_key(given).items() if k in given}
    space = {}
    for k, p in m.tune.space.items():
        space[k] = p.model_dump(mode="json")
        if p.type == "categorical":
            space[k]["choices"] = [held_value(cls, m, k, c) for c in p.choices]
    body = {"method": method_id or method_class_id(m.name), "params": params, "objective": m.tune.objective,
            "sampler": m.tune.sampler, "space": space}
    seed = m.tune.seed if m.tune.seed is not None else sweep_seed
    if seed:
        body["seed"] = seed
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:12]


def study_measures(cfg: SweepConfig, m: MethodSpec, identity: dict, task_identity: dict) -> str:
    """A digest of what the study's trials are measured on: the job key a trial of ``m`` with no
    tuned value would have (models and their checkpoints' content, tasks and their data, evaluation
    settings, ``eval.precision`` when not fp32 included, seed, adaptation data). A sweep changed
    in any of these (``tasks=[...]``, another ``eval.max_samples`` or ``eval.precision``) must not
    resume a study whose trials scored something else: no trial would run, and its best would be
    picked on the old sweep's validation data."""
    from pydantic import ValidationError

    from methods.base import resolve_method

    try:
        resolve_method(m.name)()
        params: dict[str, Any] = {}  # the method's defaults, as digests were always taken
    except ValidationError:  # a tuned hyperparameter without a default: its space's first value
        params = {**m.params, **space_probe(m)}
    probe = JobSpec("trial", m.display, method=m.name, params=params, trial={"study_name": "", "number": 0})
    measures = with_key(cfg, probe, identity, task_identity).key[:12]
    if batch_dependent_study(m):  # its trials' scores depend on the evaluation batch size too
        measures = content_key([measures, {"eval_batch_size": cfg.eval.batch_size}])[:12]
    return measures


def batch_dependent_study(m: MethodSpec) -> bool:
    """Whether a trial of ``m`` may score an image with statistics of its batch (WeMoE's
    ``batch_reduce``): with the fixed params and each categorical choice of the space in turn
    (the rest at the space's first values), as its trials build it."""
    from pydantic import ValidationError

    from methods.base import resolve_method

    cls, probe = resolve_method(m.name), {**space_probe(m), **m.params}
    choices = [{name: c} for name, p in (m.tune.space.items() if m.tune else ()) if p.type == "categorical"
               for c in p.choices]

    def dependent(params: dict[str, Any]) -> bool:
        try:
            return cls(**params).batch_dependent()
        except ValidationError:  # a choice the other first values refuse: no trial builds it
            return False

    return any(dependent({**probe, **choice}) for choice in [{}, *choices])


def open_study(storage: Any, name: str, definition: str, measures: str, sampler: Any, pruner: Any,
               measured_here: Callable[[str, "optuna.Study"], bool] | None = None,
               method: str | None = None,
               definition_for: Callable[[str], str] | None = None) -> tuple["optuna.Study", str | None]:
    """The study of this definition and measurement (:func:`choose_study`), created when new, and
    a line saying so when it is not the one named ``name``."""
    import optuna

    chosen, note = choose_study(storage, name, definition, measures, measured_here, method, definition_for)
    study = optuna.create_study(study_name=chosen, storage=storage, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    for attr, value in ((DEFINITION_ATTR, definition), (MEASURES_ATTR, measures), (METHOD_ATTR, method)):
        if value is not None and study.user_attrs.get(attr) != value:
            study.set_user_attr(attr, value)
    return study, note


def choose_study(storage: Any, name: str, definition: str, measures: str,
                 measured_here: Callable[[str, "optuna.Study"], bool] | None = None,
                 method: str | None = None,
                 definition_for: Callable[[str], str] | None = None) -> tuple[str, str | None]:
    """The name of the study of this definition and measurement, and a line saying so when it is
    not ``name``; nothing is stored.

    A study stored under ``name`` with another definition (its space, fixed params, objective or
    sampler changed since), or measured on other tasks, models or evaluation settings, is left as
    it is: resuming it would mix trials of two searches and could return a best outside the new
    space, against the new fixed params, or chosen on other data. This one gets its own study,
    ``<name>.<definition>`` (or ``<name>.<definition>.<measures>`` when that is taken), resumed by
    later runs alike. A study an older harness stored without ``measures`` is resumed when
    ``measured_here(name, study)`` says its trials were measured as this sweep measures them.
    ``definition_for(method)``: this definition with the method's code ``method`` (what tells an
    edit of the method's file alone from one of the tuning block too, for the line)."""
    import optuna

    names = set(optuna.get_all_study_names(storage))

    @functools.cache
    def stored(candidate: str) -> "optuna.Study":  # each stored study read once, however often asked about
        return optuna.load_study(study_name=candidate, storage=storage)

    @functools.cache
    def stored_attrs(candidate: str) -> tuple[dict[str, Any], bool]:
        return stored(candidate).user_attrs, bool(stored(candidate).get_trials(deepcopy=False))

    def fits(candidate: str) -> bool:
        if candidate not in names:
            return True
        attrs, has_trials = stored_attrs(candidate)
        if DEFINITION_ATTR not in attrs:
            return not has_trials
        if attrs[DEFINITION_ATTR] != definition:
            return False
        if attrs.get(MEASURES_ATTR) is None:  # stored by an older harness
            return measured_here is None or measured_here(candidate, stored(candidate))
        return attrs[MEASURES_ATTR] == measures

    own = f"{name}.{definition}.{measures}"
    chosen = next((c for c in (name, f"{name}.{definition}") if fits(c)), own)
    note = None
    if chosen != name:
        how = "resuming" if chosen in names else "starting"
        note = f"study {name!r} was run {changes(stored_attrs(name)[0], definition, method, definition_for)}: " \
               f"{how} study {chosen!r} for this one"
    twin = None if chosen in names else next((c for c in sorted(names) if _same_search(stored_attrs(c), definition,
                                                                                       measures)), None)
    if twin is not None:  # a renamed label: its study name changed, so its trials' job keys would too
        note = (f"{note}; " if note else "") + (
            f"study {chosen!r} starts afresh, its trials run again, while study {twin!r} holds trials of this same "
            f"search (a label renamed since?): set tune.study_name: {twin} to resume it")
    return chosen, note


def changes(stored: dict[str, Any], definition: str, method: str | None,
            definition_for: Callable[[str], str] | None) -> str:
    """How a stored study (its user attributes) differs from this one, each change that applies:
    its method's code, and its space, fixed params, objective or sampler (both after an edit of
    the file and then of the tuning block), or else what its trials were measured on."""
    if stored.get(DEFINITION_ATTR) == definition:
        return "on other tasks, models or evaluation settings"
    old_code = stored.get(METHOD_ATTR)
    code = method is not None and old_code not in (None, method)
    why = ["with other code of its method (its file was edited since)"] if code else []
    if not code or (definition_for is not None and definition_for(old_code) != stored.get(DEFINITION_ATTR)):
        why.append("with another space, fixed params, objective or sampler")
    return " and ".join(why)


def _same_search(stored: tuple[dict[str, Any], bool], definition: str, measures: str) -> bool:
    """Whether a stored study (its user attributes, whether it has trials) is this search measured
    as this sweep measures it."""
    attrs, has_trials = stored
    return has_trials and attrs.get(DEFINITION_ATTR) == definition and attrs.get(MEASURES_ATTR) == measures


def grid_size(tune: TuneSpec) -> int:
    """How many points a grid study has (every combination of the space's grid values)."""
    size = 1
    for p in tune.space.values():
        size *= len(p.grid_values())
    return size


def n_trials_possible(tune: TuneSpec) -> int:
    return tune.n_trials if tune.sampler != "grid" else min(tune.n_trials, grid_size(tune))


def trial_seed(seed: int, number: int) -> int:
    """The sampler's seed for trial ``number`` of a study seeded ``seed``: mixed, not added, so
    studies of seeds 0 and 1 do not ask the same points one trial apart."""
    import numpy as np

    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def quiet_optuna() -> None:
    """Optuna's own log lines below errors off: the driver prints a line per trial, and its
    warnings (a plot over a parameter with one value) would read as a problem with the study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)


class StudyUnfinished(HarnessError):
    """No trial of a shared study completed yet while other folders' drivers still run some: there
    is no best to choose yet, and no failure either; the sweep run again once they end picks it."""


class StudyRunner:
    """Drives one method's study to ``n_trials`` finished (complete or pruned) trials."""

    def __init__(self, cfg: SweepConfig, m: MethodSpec, identity: dict, task_identity: dict,
                 workers: int, results_dir: Path, create: bool = True):
        """``create=False`` opens nothing: :func:`stored_study` then loads the study if stored."""
        quiet_optuna()
        self.cfg, self.m, self.tune = cfg, m, m.tune
        self.identity, self.task_identity, self.results_dir = identity, task_identity, results_dir
        self.n_parallel = self.tune.n_parallel or workers
        self.storage = storage_spec(cfg, self.tune)
        self.seed = self.tune.seed if self.tune.seed is not None else cfg.seed
        self.dists = distributions(self.tune)
        self.owner = str(cfg.resolved_output_dir().resolve())
        self.shared = self.tune.storage is not None  # the default journal lies in this folder alone
        self.notes: list[str] = []  # one line each, for the driver to print
        if create:
            self.study, note = open_study(open_storage(self.storage), *self.choice_args(),
                                          trial_seeded_sampler(self.tune, self.seed), make_pruner(self.tune.pruner),
                                          self.measured_here, method=method_class_id(m.name),
                                          definition_for=lambda code: study_definition(m, cfg.seed, code))
            self.name = self.study.study_name
            self.notes += [note] if note else []

    def choice_args(self) -> tuple[str, str, str]:
        """What picks the study among those stored (:func:`choose_study`): name, definition, measures."""
        return (study_name(self.cfg, self.m), study_definition(self.m, self.cfg.seed),
                study_measures(self.cfg, self.m, self.identity, self.task_identity))

    def finished(self, trials: list[Any]) -> int:
        """How many of the study's ``trials`` (read once by the caller) are complete or pruned."""
        return sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)

    def counts(self) -> TrialCounts:
        """The study's finished trials, failed and pruned ones among them (a trial another
        sweep is still running is not counted)."""
        trials = [t for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()]
        return TrialCounts(len(trials), sum(t.state.name == "FAIL" for t in trials),
                           sum(t.state.name == "PRUNED" for t in trials))

    def intermediate(self, number: int) -> dict[int, float]:
        """The objective values trial ``number`` reported while adapting, by step (what a pruned
        trial was stopped at: it has no final metrics)."""
        trial = next((t for t in self.study.get_trials(deepcopy=False) if t.number == number), None)
        return dict(sorted(trial.intermediate_values.items())) if trial is not None else {}

    def measured_here(self, name: str, study: "optuna.Study") -> bool:
        """Whether a study stored without its measurement has finished trials whose results this
        folder holds under this sweep's keys (which hold the measurement), or none finished."""
        from optuna.trial import TrialState
        from pydantic import ValidationError

        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        for t in done:
            try:
                key = self.spec(t._trial_id, t.number, t.params, name).key
            except ValidationError:  # parameters the method no longer takes
                continue
            if (self.results_dir / f"{key}.json").is_file():
                return True
        return not done

    def held(self, drawn: dict[str, Any]) -> dict[str, Any]:
        """Values Optuna drew (an int range's 1 for a float field, a choice 2.0 for an int one) as the
        method holds them, as a sweep's params and grid are (``hold_validated``): the trial's and
        the tuned job's params, run name, row and ``best.*`` tags then read 1.0 and 2."""
        from methods.base import resolve_method

        cls = resolve_method(self.m.name)
        return {k: held_value(cls, self.m, k, v) for k, v in drawn.items()}

    def spec(self, trial_id: int, number: int, params: dict[str, Any], study: str | None = None) -> JobSpec:
        handle = {"storage": self.storage, "study_name": study or self.name, "trial_id": trial_id, "number": number,
                  "objective": self.tune.objective, "pruner": self.tune.pruner}
        base = JobSpec("trial", self.m.display, method=self.m.name, params={**self.m.params, **self.held(params)},
                       trial=handle)
        return with_key(self.cfg, base, self.identity, self.task_identity)

    def best_key(self) -> str | None:
        """The job key of the study's best trial (None when the method no longer takes its
        parameters): its workdir holds the adaptation the best setting's final job would redo."""
        from pydantic import ValidationError

        best = self.study.best_trial
        try:
            return self.spec(best._trial_id, best.number, best.params).key
        except ValidationError:
            return None

    def ours(self, trial: Any) -> bool:
        """Whether a RUNNING trial was asked by a driver of this output folder, which this driver
        holds the lock of: that driver is gone, so the trial is stale. A storage outside the
        folder may hold trials of other sweeps' drivers, which may still be running them."""
        return not self.shared or trial.user_attrs.get(OWNER_ATTR) == self.owner

    def recover(self) -> list[tuple[JobSpec, JobResult | None]]:
        """Trials of this folder left RUNNING by a killed driver, with their cached result if their
        job finished: the driver tells those and runs the others again as the same trials (their
        job keys and checkpoints unchanged). One whose parameters the method now refuses (its
        code changed) is failed with a note. Other folders' trials are left to their drivers."""
        from optuna.trial import TrialState
        from pydantic import ValidationError

        pending = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not self.ours(t):
                owner = t.user_attrs.get(OWNER_ATTR, "an unknown folder")
                self.notes.append(f"study {self.name!r}: trial {t.number} ({setting_text(t.params)}) is running "
                                  f"from {owner}; left to that sweep")
                continue
            try:
                spec = self.spec(t._trial_id, t.number, t.params)
            except ValidationError as exc:
                self.study.tell(t.number, state=TrialState.FAIL)
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                self.notes.append(f"study {self.name!r}: trial {t.number} ({setting_text(t.params)}), left unfinished "
                                  f"by an earlier run, is dropped: {where}: {err['msg']} (got {err.get('input')!r})")
                continue
            pending.append((spec, read_result(self.results_dir / f"{spec.key}.json", spec.key)))
        return pending

    def relog(self, record: Callable[[JobSpec, JobResult, str], None]) -> None:
        """Finished trials whose MLflow run a killed driver did not write (record skips logged ones)."""
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            spec = self.spec(t._trial_id, t.number, t.params)
            cached = read_result(self.results_dir / f"{spec.key}.json", spec.key)
            if cached:
                record(spec, cached, t.state.name)

    def elsewhere(self, trials: list[Any]) -> list[Any]:
        """The study's ``trials`` that other folders' drivers are running (a shared ``storage:``):
        they count toward ``n_trials``, so two sweeps on one study run ``n_trials`` between them,
        not one each. One naming no folder (its driver killed between asking it and naming itself)
        has no driver to finish it, and is not counted."""
        return [t for t in trials if t.state.name == "RUNNING" and not self.ours(t) and OWNER_ATTR in t.user_attrs]

    def missing(self, target: int, trials: list[Any]) -> int:
        """Trials still to ask for ``target``: finished ones and other folders' running ones count
        (``trials``: the study's, read once by the caller for all it decides)."""
        return target - self.finished(trials) - len(self.elsewhere(trials))

    def grid_left(self, trials: list[Any]) -> int | None:
        """Grid points no finished trial, nor one another folder runs, holds yet, among the
        study's ``trials``; None for the other samplers."""
        if self.tune.sampler != "grid":
            return None
        others = {t.number for t in self.elsewhere(trials)}
        taken = {t.system_attrs.get("grid_id") for t in trials if t.state.is_finished() or t.number in others} - {None}
        return grid_size(self.tune) - len(taken)

    def ask(self, k: int) -> list[JobSpec]:
        specs = []
        for _ in range(k):
            trial = self.study.ask(self.dists)
            trial.set_user_attr(OWNER_ATTR, self.owner)
            specs.append(self.spec(trial._trial_id, trial.number, trial.params))
        return specs

    def tell(self, spec: JobSpec, result: JobResult) -> str:
        from optuna.trial import TrialState

        number = spec.trial["number"]
        # skip_if_finished: a trial another process ended meanwhile (an older harness failed it
        # as stale) keeps its state; this driver still records its own result
        if result.status == "ok" and self.tune.objective in result.metrics:
            self.study.tell(number, result.metrics[self.tune.objective], skip_if_finished=True)
            return "COMPLETE"
        if result.status == "pruned":
            self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
            return "PRUNED"
        if result.status == "ok":
            result.status = "failed"
            result.error = f"objective {self.tune.objective!r} not among the job's metrics"
        self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        return "FAIL"

    def run(self, execute: Callable[[list[JobSpec]], list[tuple[JobSpec, JobResult]]],
            record: Callable[[JobSpec, JobResult, str], None],
            say: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Run trials until ``n_trials`` are finished or running from other folders (a shared
        storage); return the best parameters. ``say`` gets the study's notes (what a resumed study
        dropped or why it is a new one), one line each."""
        from optuna.trial import TrialState

        target = n_trials_possible(self.tune)
        self.relog(record)
        stale = self.recover()
        for line in self.notes if say is not None else ():
            say(line)
        redo = []  # the killed run never finished them: run again as the same trials
        for spec, cached in stale:
            if cached is not None:
                record(spec, cached, self.tell(spec, cached))
            else:
                redo.append(spec)
        failures, last_error = 0, ""
        # the study's trials read once a batch (it and other drivers told some): what it asks, and how it ends
        while redo or self.missing(target, trials := self.study.get_trials(deepcopy=False)) > 0:
            if redo:
                batch, redo = redo[:self.n_parallel], redo[self.n_parallel:]
            else:
                left = self.grid_left(trials)
                if left == 0:  # every grid point was tried (failed ones included): nothing new to ask
                    break
                batch = self.ask(min(self.n_parallel, self.missing(target, trials), left if left is not None else target))
            for spec, result in execute(batch):
                state = self.tell(spec, result)
                failures += state == "FAIL"
                if state == "FAIL":
                    last_error = last_line(result.error, "no error recorded")
                record(spec, result, state)
            if failures > max(3, target):
                raise StudyFailed(f"study {self.name!r}: {failures} trials failed, the last with: "
                                  f"{last_error}; every trial's error is in its MLflow run")
        others = self.elsewhere(trials)
        completed = [t for t in trials if t.state == TrialState.COMPLETE]
        if others and not completed:
            raise StudyUnfinished(f"study {self.name!r}: no trial completed yet; {len(others)} trial(s) still running "
                                  f"from other folders count toward n_trials {target}: its row waits for them "
                                  "(run the sweep again once they end)")
        if others and say is not None:
            say(f"study {self.name!r}: {len(others)} trial(s) still running from other folders count toward "
                f"n_trials {target}; the best is chosen among the {self.finished(trials)} finished")
        if not completed:
            raise StudyFailed(f"study {self.name!r}: no trial completed"
                              + (f"; the last failure: {last_error}" if last_error else ""))
        return self.best_params()

    def best_params(self) -> dict[str, Any]:
        """The best trial's setting with the fixed params: the tuned row's job on test."""
        return {**self.m.params, **self.held(self.study.best_params)}


def stored_study(cfg: SweepConfig, m: MethodSpec, identity: dict, task_identity: dict,
                 results_dir: Path) -> StudyRunner | None:
    """The study of ``m`` a sweep would resume, when stored and done (its ``n_trials`` finished or
    running from other folders, at least one completed, none left unfinished by a killed driver), read without storing
    anything: ``collect``, which runs no study, keeps such a study's row instead of dropping it.
    None otherwise."""
    import optuna
    from optuna.trial import TrialState

    runner = StudyRunner(cfg, m, identity, task_identity, 1, results_dir, create=False)
    if runner.storage.startswith("journal:") and not Path(runner.storage[len("journal:"):]).is_file():
        return None
    storage = open_storage(runner.storage)
    chosen, _ = choose_study(storage, *runner.choice_args(), runner.measured_here, method_class_id(m.name))
    if chosen not in optuna.get_all_study_names(storage):
        return None
    runner.study, runner.name = optuna.load_study(study_name=chosen, storage=storage), chosen
    trials = runner.study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == TrialState.RUNNING and runner.ours(t)]
    done = runner.grid_left(trials) == 0 or runner.missing(n_trials_possible(m.tune), trials) <= 0  # as run() ends
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    return runner if done and completed and not running else None


def save_study_plots(study: "optuna.Study", folder: Path) -> list[Path]:
    """Optuna's optimization history, parameter importances and contour plots as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    n_params = len(study.best_params) if study.best_trials else 0
    plots = [("optimization_history", ovm.plot_optimization_history), ("param_importances", ovm.plot_param_importances)]
    if n_params >= 2:
        plots.append(("contour", ovm.plot_contour))
    for name, fn in plots:
        try:
            with warnings.catch_warnings():  # optuna marks its matplotlib plots experimental
                warnings.simplefilter("ignore")
                ax = fn(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # too few trials for this plot
            logging.getLogger(__name__).info("skipped %s plot: %s", name, exc)
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(path)
    return files
