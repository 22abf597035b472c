"""Sweep configuration: the pydantic schema, ``${VAR}`` expansion, loading a sweep and the checks
its methods and tasks must pass.

Every error a user can make in a sweep file surfaces as one :class:`ConfigError` line naming
the file, the dotted field path and the offending value; a file failing the schema in several
places gets a line for each, in one error (:mod:`harness.config_errors`). Reading the YAML and
the overrides is :mod:`harness.sweep_file`'s; the model files' and the folders' checks, which
read the disk, are :mod:`harness.model_checks`' and :mod:`harness.path_checks`'.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import math
import os
import re
import string
import types
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from harness.config_errors import ConfigError, Gathering, validation_error
from harness.errors import HarnessError, KeyRefused, did_you_mean
from harness.fields import no_bool_for_number
from harness.imports import source_file
from harness.path_checks import check_slurm_log_dir
from harness.sweep_file import apply_overrides, read_yaml

if TYPE_CHECKING:
    from methods.base import MergeMethod


#: Job protocols: the main table (the sweep's seen tasks merged) and the ``generalization`` block's.
MAIN, GENERALIZATION = "main", "generalization"
#: Appended to a method's label for its generalization jobs (MLflow run names, progress, plan).
GENERALIZATION_SUFFIX = " (gen)"  # not "[gen]": rich would read that as markup and drop it


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    _no_bool_for_number = field_validator("*", mode="before")(classmethod(no_bool_for_number))


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


#: True while a command that reads only a sweep's results (report, ui, status) loads its file: an
#: unset ``${VAR}`` in a field of the sweep's inputs (model files, data folders, SLURM options),
#: which such a command never opens, is left as ``$VAR`` instead of failing, so a copy taken away
#: from the checkpoints and datasets (and their variables) still reports.
UNSET_INPUTS_KEPT: contextvars.ContextVar[bool] = contextvars.ContextVar("unset_inputs_kept", default=False)


def expand_env(value: str, input_path: bool = False) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` as a shell does (the default also for a variable
    set to the empty string); an unset variable without default is an error (but in an
    ``input_path`` under :data:`UNSET_INPUTS_KEPT`, where it is left as ``$VAR``: without braces,
    which a ``finetuned_pattern`` would read as a field)."""

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if default is not None and not os.environ.get(name):
            return default
        if name in os.environ:
            return os.environ[name]
        if input_path and UNSET_INPUTS_KEPT.get():
            return f"${name}"
        raise ValueError(f"environment variable {name} is not set")

    left = re.search(r"\$\{[^}]*\}?", _ENV.sub(lambda m: m.group(2) or "", value))
    if left:  # a shell's other forms (``${VAR-d}``, a nested default) would be kept as text: a folder named so
        raise ValueError(f"{left.group()!r} does not expand: write ${{VAR}} or ${{VAR:-default}}")
    return os.path.expanduser(_ENV.sub(sub, value))


def _expand_optional(cls: type, v: str | None) -> str | None:
    """A field validator: ``${VAR}`` expanded in a value the file gives."""
    return expand_env(v) if v else v


def _expand_input(cls: type, v: str | None) -> str | None:
    """A field validator: ``${VAR}`` expanded in a path or option of the sweep's inputs."""
    return expand_env(v, input_path=True) if v else v


#: A path of the sweep's inputs in a mapping (``model.finetuned``'s, ``model.heads``'s): ``${VAR}``
#: expands in each value, and an unset variable is told at its key (``model.finetuned.cars``).
InputPath = Annotated[str, AfterValidator(lambda v: expand_env(v, input_path=True))]


class ModelSpec(Strict):
    """Where the pretrained model and the fine-tuned image encoders come from."""

    source: Literal["embedded", "files"] = "embedded"
    arch: str = Field("harness-tiny-vit", description="open_clip architecture name")
    pretrained: str | None = Field(None, description="weights file or cached open_clip tag")
    finetuned: dict[str, InputPath] = Field(default_factory=dict, description="task -> image-encoder checkpoint")
    finetuned_pattern: str | None = Field(None, description="checkpoint path with {task}")
    heads: dict[str, InputPath] = Field(default_factory=dict, description="task -> stored head [classes, dim]")
    suite: dict[str, Any] = Field(default_factory=dict, description="options of the embedded suite")

    _env = field_validator("pretrained", "finetuned_pattern")(classmethod(_expand_input))

    @field_validator("finetuned_pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        """``{task}`` is the only field: any other brace would fail in ``str.format`` mid-sweep."""
        if v is None:
            return v
        try:
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(v) if name is not None]
        except ValueError as exc:
            raise ValueError(f"{exc}; the only field is '{{task}}' "
                             "(write a literal brace as '{{' or '}}')") from None
        for name, spec, conv in fields:
            if (name, spec, conv) != ("task", "", None):
                text = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
                raise ValueError(f"has the field {text!r}; the only field is '{{task}}' "
                                 "(write a literal brace as '{{' or '}}')")
        if not fields:
            raise ValueError("must contain '{task}'")
        return v

    @model_validator(mode="after")
    def _files_need_paths(self) -> "ModelSpec":
        if self.source == "files" and not self.pretrained:
            raise ValueError("source 'files' needs 'pretrained' (a weights file or open_clip tag)")
        if self.source == "files" and not (self.finetuned or self.finetuned_pattern):
            raise ValueError("source 'files' needs 'finetuned' or 'finetuned_pattern'")
        if self.source == "embedded":  # silently building the embedded models instead would mislead
            given = [f for f in ("pretrained", "finetuned", "finetuned_pattern", "heads") if getattr(self, f)]
            if "arch" in self.model_fields_set and self.arch != "harness-tiny-vit":
                given.insert(0, "arch")
            if given:
                raise ValueError(f"{', '.join(given)} given with source 'embedded', which builds its own models "
                                 "(its architecture is model.suite.arch): set source: files to use them")
        elif self.suite:
            raise ValueError("'suite' options configure source 'embedded' only (this model has source 'files')")
        return self


class NamedEntry(Strict):
    """A list entry that may be written as its name alone (``tasks: [a, b]``, ``methods:
    [ties]``): an error about its name then names the entry (``tasks.1``), which is what the file
    holds, not a ``name:`` key it lacks."""

    name: str
    _name_alone: bool = PrivateAttr(False)

    @model_validator(mode="wrap")
    @classmethod
    def _short_form(cls, v: Any, handler: Any) -> Any:
        if not isinstance(v, str):
            return handler(v)
        entry = handler({"name": v})
        entry._name_alone = True
        return entry

    def __eq__(self, other: object) -> bool:
        """Written as its name alone or with ``name:``, an entry is the same entry (a resolved
        config read back equals the one written)."""
        if not isinstance(other, NamedEntry):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def name_field(self, entry: str) -> str:
        """The field of this entry's name, ``entry`` being where the entry is (``tasks.1``)."""
        return entry if self._name_alone else f"{entry}.name"


class TaskSpec(NamedEntry):
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _env_data_root(cls, v: dict[str, Any]) -> dict[str, Any]:
        """A task's own data folder is a path like the top-level ``data_root``: ``${VAR}`` expands."""
        root = v.get("data_root")
        if isinstance(root, str):
            try:
                return {**v, "data_root": expand_env(root, input_path=True)}
            except ValueError as exc:
                raise KeyRefused("data_root", str(exc)) from None
        return v


class ParamSpace(Strict):
    """One tuned hyperparameter: float/int in [low, high] (optionally log or stepped), or categorical."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> "ParamSpace":
        unused = ["low", "high", "step", "log"] if self.type == "categorical" else ["choices"]
        for key in unused:  # Optuna would ignore it: a range searched where choices were meant, or the reverse
            if getattr(self, key) is not None and getattr(self, key) is not False:
                takes = "'choices'" if self.type == "categorical" else "'low', 'high', 'log' and 'step'"
                raise ValueError(f"{key!r} does not apply to type {self.type}, which takes {takes}")
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs non-empty 'choices'")
            for choice in self.choices:  # Optuna stores and compares only these (a list crashed the study's end)
                if choice is not None and not isinstance(choice, (bool, int, float, str)):
                    raise ValueError(f"categorical choices must be numbers, strings, booleans or null, not "
                                     f"{type(choice).__name__}s (got {choice!r}): give each as a string the "
                                     "method maps to its value, or use a grid")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"{self.type} needs 'low' and 'high'")
            for key in ("low", "high", "step"):  # Optuna cannot sample them (OverflowError at the first trial)
                value = getattr(self, key)
                if value is not None and not math.isfinite(value):
                    raise ValueError(f"{key!r} must be a finite number (got {value})")
            if self.low >= self.high:
                raise ValueError(f"low ({self.low}) must be below high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError("log scale needs low > 0")
            if self.log and self.step is not None:
                raise ValueError("'step' and 'log' cannot be combined")
            if self.type == "int":  # Optuna would round them silently (a step of 0.5 to 0: an error)
                for key in ("low", "high", "step"):
                    value = getattr(self, key)
                    if value is not None and value != int(value):
                        raise ValueError(f"type int needs a whole {key!r} (got {value})")
        return self

    def grid_values(self) -> list[Any]:
        """The values a grid sampler enumerates (categorical choices, or low..high by step)."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.step is None:
            raise ValueError("grid sampling needs 'step' for numeric parameters")
        # As Optuna's distributions do, the last point is the last step at or below ``high`` (a
        # rounded count could step past it, to a value the method refuses); the tolerance keeps a
        # float step that reaches ``high`` exactly (0.1 to 0.9 by 0.2) from losing its last point.
        n = math.floor((self.high - self.low) / self.step + 1e-9)
        values = [self.low + i * self.step for i in range(n + 1)]
        return [int(round(v)) for v in values] if self.type == "int" else [round(v, 12) for v in values]


def optuna_storage_problem(spec: str) -> str | None:
    """Why ``spec`` is no storage a study can live in (``journal:<path>`` or a database URL whose
    driver is installed), or None. An in-memory database is refused: it keeps no study between
    runs, and a trial's job, another process, reopens the study to report while it adapts."""
    if spec.startswith("journal:"):
        return None if spec[len("journal:"):].strip() else "'journal:' needs a file's path after it"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    usage = "an Optuna storage is 'journal:<path>' or a database URL such as 'sqlite:///studies.db'"
    try:
        url = make_url(spec)
        dialect = url.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        return f"not a storage: {usage}"
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        return f"an in-memory database keeps no study between runs or processes: {usage}"
    try:
        (getattr(dialect, "import_dbapi", None) or dialect.dbapi)()  # SQLAlchemy 2, or 1.4's name
    except ImportError as exc:
        return f"its database driver is not installed ({exc})"
    return None


class TuneSpec(Strict):
    """Optuna search over some hyperparameters; always on a validation metric."""

    n_trials: int = Field(20, ge=1, le=100000)
    n_parallel: int | None = Field(None, ge=1, le=1024, description="trials in flight (default: executor workers)")
    sampler: Literal["tpe", "cmaes", "random", "grid"] = "tpe"
    pruner: Literal["none", "median", "hyperband"] = "none"
    objective: str = Field("val/acc/avg", description="maximised; must be a validation metric")
    space: dict[str, ParamSpace] = Field(min_length=1)
    storage: str | None = Field(None, description="Optuna storage URL; default a journal file in the outputs")
    study_name: str | None = None
    seed: int | None = Field(None, ge=0, description="sampler seed (default: the sweep seed)")

    @field_validator("objective")
    @classmethod
    def _val_only(cls, v: str) -> str:
        if not v.startswith("val/"):
            raise ValueError("must be a validation metric ('val/...'): test metrics never choose hyperparameters")
        return v

    @field_validator("study_name")
    @classmethod
    def _one_kind_of_quote(cls, v: str | None) -> str | None:
        """MLflow finds the study's run by its name in a quoted search filter, which has no escape."""
        if v is not None and "'" in v and '"' in v:
            raise ValueError("may hold ' or \", not both (MLflow finds its run by it)")
        return v

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, v: str | None) -> str | None:
        """A storage the study can open, checked before any job runs (it is opened only after the
        sweep's other jobs, where a bad one was a traceback). ``${VAR}`` expands, as in the other
        paths and the tracking URI (a journal was made under a folder named ``${VAR}``); left as
        ``$VAR`` where a command that never opens the study loads the file (report, ui, status)."""
        v = _expand_input(cls, v)
        if v is not None:
            problem = optuna_storage_problem(v)
            if problem:
                raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _grid(self) -> "TuneSpec":
        if self.sampler == "grid":
            for name, p in self.space.items():
                if p.type != "categorical" and p.step is None:
                    raise ValueError(f"sampler 'grid' needs 'step' (or categorical choices) for {name!r}")
        return self


#: What a method's label may hold: no space at its end, where ``ta`` and ``ta `` would be two rows
#: that read the same in every table.
LABEL = re.compile(r"[^\W_](?:[\w .:()+=,-]*[\w.:()+=,-])?")


class MethodSpec(NamedEntry):
    """One method entry: fixed params plus an optional grid (cartesian product) or tuning."""

    label: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    tune: TuneSpec | None = None

    @field_validator("label")
    @classmethod
    def _label_chars(cls, v: str | None) -> str | None:
        """A label names MLflow metrics, runs and folders and fills table cells: characters such
        as ``|``, ``/``, ``%`` or quotes would break one of them at the end of a sweep."""
        if v is not None and not LABEL.fullmatch(v):
            raise ValueError("must start with a letter or digit, end with no space and hold only letters, "
                             "digits, spaces and _ . : ( ) + = , -")
        return v

    @field_validator("grid")
    @classmethod
    def _grid_nonempty(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for k, values in v.items():
            if len(values) == 0:
                raise ValueError(f"grid for {k!r} is empty")
        return v

    @model_validator(mode="after")
    def _no_overlap(self) -> "MethodSpec":
        both = set(self.params) & set(self.grid)
        if both:
            raise ValueError(f"{sorted(both)} given both in params and grid")
        if self.tune and self.grid:
            raise ValueError("give either 'grid' or 'tune', not both")
        if self.tune and set(self.params) & set(self.tune.space):
            raise ValueError(f"{sorted(set(self.params) & set(self.tune.space))} given both in params and tune.space")
        return self

    @property
    def display(self) -> str:
        return self.label or self.name


class EvalSpec(Strict):
    batch_size: int = Field(256, ge=1, le=65536)
    max_samples: int | None = Field(None, ge=1, description="score a fixed random subset of this many images per task and split (quick runs)")
    select_on: Literal["val"] = Field("val", description="split that picks a grid's best setting")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description=(
        "dtype of the forward passes of evaluation and test-time adaptation (torch.autocast); merging, "
        "heads, adapted parameters and losses stay float32. In job keys only when not fp32"))


class AdaptSpec(Strict):
    """Unlabeled test data handed to test-time-adaptation methods."""

    split: Literal["test"] = "test"
    shuffle_seed: int = 0


#: The perfect-routing bound's row; with several lambdas each row is named by its own.
BOUND_LABEL = "perfect routing"


def bound_label(scaling: float, several: bool) -> str:
    """The bound row at ``scaling``: ``perfect routing``, or ``perfect routing (0.6)`` beside others."""
    return f"{BOUND_LABEL} ({scaling:g})" if several else BOUND_LABEL


def reference_row(name: str) -> bool:
    """Whether a results row is a reference (pretrained, individual, a perfect-routing bound)."""
    return name in ("pretrained", "individual") or name == BOUND_LABEL or name.startswith(BOUND_LABEL + " (")


class ReferencesSpec(Strict):
    """Reference rows: the pretrained model, the individual fine-tuned models, and WeMoE's
    perfect-routing bound (each task's own fine-tuned MLPs, everything else merged by task
    arithmetic at ``routing_bound_lambda``: what a router that always picks the right expert
    would reach)."""

    pretrained: bool = True
    individual: bool = True
    perfect_routing: bool = False
    routing_bound_lambda: float | list[float] = Field(0.3, description=(
        "task arithmetic's lambda outside the MLPs; a list gives one bound row per lambda, e.g. one "
        "per WeMoE init_lambda in the sweep"))

    @field_validator("routing_bound_lambda")
    @classmethod
    def _bound_lambdas(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values:
            raise ValueError("give at least one lambda")
        for x in values:
            if not 0.0 <= x <= 10.0:
                raise ValueError(f"lambda {x} is outside [0, 10]")
        if len(set(values)) < len(values):
            raise ValueError("a lambda is given twice")
        return v

    @property
    def bound_lambdas(self) -> list[float]:
        """The perfect-routing bounds' lambdas, in the order given."""
        v = self.routing_bound_lambda
        return list(v) if isinstance(v, list) else [v]


def given_twice(names: list[str]) -> list[str]:
    """The names ``names`` holds more than once, sorted."""
    return sorted({n for n in names if names.count(n) > 1})


def _listed_once(cls: type, names: list[str] | None) -> list[str] | None:
    """``names`` unchanged, or ValueError naming those given twice: a task listed twice would
    weigh twice in an average, and its (or a corruption's) column would be repeated."""
    dup = given_twice(names or [])
    if dup:
        raise ValueError(f"listed twice: {dup}")
    return names


class RobustnessSpec(Strict):
    """Evaluate on ImageNet-C-style corrupted copies of these tasks' test splits.

    ``adapt``: what a test-time-adaptation method adapts on before it is scored on a corruption.
    "corrupted" (the references: AdaMerging's and WeMoE's robustness studies adapt on the
    corrupted test images themselves) adapts once more per corruption, on that corruption's
    copies of every merged task's test split; "clean" scores the model adapted on the clean
    test images on every corruption (one adaptation, cheaper, and no adaptation to the shift).
    """

    tasks: list[str] = Field(min_length=1)
    corruptions: list[str] = Field(default_factory=lambda: list(_paper_corruptions()), min_length=1)
    severity: int = Field(2, ge=1, le=5)
    seed: int = Field(0, ge=0)
    adapt: Literal["corrupted", "clean"] = "corrupted"

    def identity(self) -> dict[str, Any]:
        """The block as job keys see it. ``adapt: clean`` is left out, so keys of jobs cached
        before the field existed (which adapted on clean images) stay valid."""
        return self.model_dump(exclude={"adapt"} if self.adapt == "clean" else None)

    _once = field_validator("tasks", "corruptions")(classmethod(_listed_once))

    @field_validator("corruptions")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from tasks.corruptions import ALL_CORRUPTIONS

        unknown = [f"unknown corruption {name!r}{did_you_mean(name, ALL_CORRUPTIONS)}"
                   for name in v if name not in ALL_CORRUPTIONS]  # every one, so one run lists them all
        if unknown:
            raise ValueError(f"{'; '.join(unknown)} (known: {', '.join(ALL_CORRUPTIONS)})")
        return v


class GeneralizationSpec(Strict):
    """A second protocol in the same sweep: every method row is also merged (and adapted) on the
    seen tasks alone and evaluated on all, so one sweep gives both the main table (every task
    merged) and the generalization table. Give ``unseen`` (seen: the rest), ``seen`` (unseen:
    the rest), or both covering every task."""

    unseen: list[str] | None = Field(None, min_length=1, description="tasks left out of merging and adaptation")
    seen: list[str] | None = Field(None, min_length=1, description="tasks merged (default: all but unseen)")

    _once = field_validator("unseen", "seen")(classmethod(_listed_once))

    @model_validator(mode="after")
    def _one_given(self) -> "GeneralizationSpec":
        if self.unseen is None and self.seen is None:
            raise ValueError("give 'unseen' (or 'seen')")
        return self


def slurm_time_minutes(text: str) -> int | None:
    """Whole minutes (rounded up, as SLURM rounds) of a SLURM time such as ``90``, ``90:00``,
    ``2:30:00``, ``1-12`` or ``1-12:30:00``; None for text in no such format."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        return None
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # days-hours[:minutes[:seconds]]
        seconds = ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:  # hours:minutes:seconds
        seconds = (a * 60 + b) * 60 + c
    else:  # minutes[:seconds]
        seconds = a * 60 + (b or 0)
    return -(-seconds // 60)


def _paper_corruptions() -> tuple[str, ...]:
    from tasks.corruptions import PAPER_CORRUPTIONS

    return PAPER_CORRUPTIONS


#: sbatch options the harness sets itself, with what sets them instead.
SBATCH_OWN = {
    "partition": "executor.partition", "time": "executor.timeout_min", "mem": "executor.mem_gb",
    "cpus-per-task": "executor.cpus_per_task", "gpus-per-node": "executor.gpus_per_node",
    "account": "executor.account", "qos": "executor.qos", "constraint": "executor.constraint",
    "array": "executor.array_parallelism", "signal": "executor.timeout_min (the warning comes before it)",
    "job-name": "the sweep's name", "output": "the output_dir (logs go to <output_dir>/slurm)",
    "error": "the output_dir (logs go to <output_dir>/slurm)", "open-mode": "nothing (logs are appended)",
    "wckey": "nothing", "nodes": "nothing (a job runs on one node)",
    # srun starts every task of a job: each would run the whole job, in the same workdir
    "ntasks": "nothing (a job runs one task)", "ntasks-per-node": "nothing (a job runs one task)",
    "no-requeue": "executor.requeues (0: never requeued)",
    # these change sbatch's answer ("Submitted batch job N"), from which submitit reads the job id:
    # the jobs would run untracked, or none be submitted, and the sweep end in a traceback
    "parsable": "nothing (the job id is read from sbatch's usual answer)",
    "test-only": "harness validate or --dry-run (they check the partition's limits)",
    "wait": "nothing (the driver waits for the jobs; --detach returns)",
}

#: sbatch options whose whole name starts the name of one in ``SBATCH_OWN``: sbatch reads them as
#: themselves, not as an abbreviation of the harness's own.
SBATCH_OWN_PREFIXES = frozenset({"gpus"})


class ExecutorSpec(Strict):
    """Where jobs run: in this process or a local pool, on SLURM through submitit job arrays, or in
    submitit's in-process debug executor. The SLURM fields are ignored by the other kinds."""

    kind: Literal["local", "slurm", "debug"] = "local"
    workers: int = Field(1, ge=1, le=64, description="local: processes; 1 runs jobs in-process")
    partition: str | None = Field(None, description="SLURM partition (cluster default if unset)")
    gpus_per_node: int = Field(0, ge=0, le=64)
    cpus_per_task: int = Field(1, ge=1, le=1024)
    mem_gb: float | None = Field(None, gt=0, le=65536, description="memory per job (cluster default if unset)")
    timeout_min: int = Field(60, ge=1, le=60 * 24 * 30, description="time limit per job; long jobs checkpoint and requeue")
    requeues: int = Field(3, ge=0, le=1000, description="times a job is requeued at its time limit (preemptions not counted)")
    array_parallelism: int = Field(256, ge=1, le=100_000, description="array tasks running at once, per array")
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: list[str] = Field(default_factory=list,
                             description="shell lines run before each job (module load ...); one that fails fails it")
    sbatch: dict[str, Any] = Field(
        default_factory=dict, description="further sbatch options by long name: {exclude: node3, exclusive: true}")
    poll_s: float = Field(2.0, gt=0, le=600, description="seconds between SLURM state checks while waiting")

    @field_validator("timeout_min", mode="before")
    @classmethod
    def _minutes_not_slurm_time(cls, v: Any) -> Any:
        """A SLURM time (``2:30:00``, ``1-12:00``) is refused naming the minutes it means: read as
        minutes it would be another limit (SLURM reads ``90:00`` as 90 minutes, not 90 hours)."""
        minutes = slurm_time_minutes(v) if isinstance(v, str) and re.search(r"[:-]", v.strip()) else None
        if minutes is not None:
            raise ValueError(f"a number of minutes, not a SLURM time: {v.strip()} is timeout_min: {minutes}")
        return v

    # ``${SLURM_PARTITION:-gpu}`` expands here: sbatch never expands its ``#SBATCH`` lines.
    @field_validator("partition", "account", "qos", "constraint")
    @classmethod
    def _env_one_word(cls, v: str | None) -> str | None:
        """``${VAR}`` expanded, and the value still one word: a line break from the environment
        would end the ``#SBATCH`` line, and the rest would run as a command in the job's shell.
        One expanding to nothing (``${SLURM_PARTITION:-}``) is unset, the cluster's default, as
        a shell's ``sbatch ${P:+-p $P}`` leaves it: not an option of the empty name. Checked
        here, after expansion, so the refusal names the expanded value (a ``pattern`` on the field
        would see ``${P:-a b}`` as written, and print its regular expression)."""
        if v == "":
            raise ValueError("is empty; the field takes one SLURM name (leave it out for the cluster's default)")
        expanded = _expand_input(cls, v)
        if expanded and not re.fullmatch(r"\S+", expanded):
            said = f"expands to {expanded!r}, which is" if expanded != v else "is"
            raise ValueError(f"{said} not one word (it holds whitespace); the field takes one SLURM name, "
                             "without spaces or line breaks")
        return expanded or None

    @field_validator("mem_gb")
    @classmethod
    def _whole_megabytes(cls, v: float | None) -> float | None:
        if v is not None and int(v * 1024) < 1:  # what submitit writes: --mem=<int(v * 1024)>MB
            raise ValueError("under 1 MB, which sbatch would get as --mem=0MB: all of a node's memory")
        return v

    @field_validator("sbatch")
    @classmethod
    def _sbatch_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, value in v.items():
            if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
                raise ValueError(f"{key!r} is not an sbatch option's long name (like 'exclude', 'mail-type')")
            if key in SBATCH_OWN:
                raise ValueError(f"{key!r} is set by the harness; use {SBATCH_OWN[key]}")
            # sbatch takes the start of a long option's name for the option: 'parsab' is --parsable
            owned = [o for o in SBATCH_OWN if o.startswith(key)] if key not in SBATCH_OWN_PREFIXES else []
            if owned:
                raise ValueError(f"{key!r} abbreviates {owned[0]!r} (sbatch takes the start of an option's name "
                                 f"for it), which is set by the harness; use {SBATCH_OWN[owned[0]]}")
            if not (value is True or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))):
                raise ValueError(f"the value of {key!r} must be a string, an integer, or true for a flag "
                                 f"(got {value!r})")
            if isinstance(value, str) and any(c in value for c in "\n\r\0"):
                raise ValueError(f"the value of {key!r} must be a single line")
        return v

    @field_validator("setup")
    @classmethod
    def _one_line_each(cls, v: list[str]) -> list[str]:
        for line in v:
            if "\n" in line or "\r" in line:
                raise ValueError("each setup entry must be a single shell line")
        return v


#: The fields :meth:`SweepConfig.digest` covers.
EXPERIMENT_FIELDS: dict[str, Any] = {
    "name": True, "experiment": True, "seed": True, "tasks": True, "seen": True, "unseen": True,
    "robustness": {"tasks", "corruptions", "severity", "seed"}, "generalization": True,
    "model": {"source", "arch", "suite"},
    "eval": {"max_samples", "select_on"}, "adapt": True,
}


class SweepConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    output_dir: str | None = None
    cache_dir: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    seed: int = Field(0, ge=0)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    threads: int | Literal["auto"] = "auto"
    data_root: str | None = None
    model: ModelSpec = Field(default_factory=ModelSpec)
    tasks: list[TaskSpec] = Field(min_length=1)
    seen: list[str] | None = Field(None, description="tasks merged (and adapted on); default: all but unseen")
    unseen: list[str] = Field(default_factory=list, description="tasks only evaluated (zero-shot heads)")
    robustness: RobustnessSpec | None = None
    generalization: GeneralizationSpec | None = None
    references: ReferencesSpec = Field(default_factory=ReferencesSpec)
    methods: list[MethodSpec] = Field(default_factory=list)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    adapt: AdaptSpec = Field(default_factory=AdaptSpec)
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)

    @field_validator("references", mode="before")
    @classmethod
    def _references_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # references: false turns every reference row off
            return {"pretrained": v, "individual": v}
        return v

    _env = field_validator("output_dir", "cache_dir", "tracking_uri")(classmethod(_expand_optional))
    _env_inputs = field_validator("data_root")(classmethod(_expand_input))

    @field_validator("device", mode="before")
    @classmethod
    def _device_word(cls, v: Any) -> Any:
        """A device other than those the jobs can run on is named with the choices (pydantic
        would print the field's regular expression)."""
        if isinstance(v, str) and not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError("must be auto, cpu, cuda, cuda:N (the GPU of index N) or mps")
        return v

    @field_validator("threads", mode="before")
    @classmethod
    def _threads_word(cls, v: Any) -> Any:
        """A word other than ``auto`` is named as one (pydantic would only say it is no integer)."""
        if isinstance(v, str) and v != "auto" and not v.strip().isdigit():
            raise ValueError("must be a number of threads between 1 and 256, or 'auto'")
        return v

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError("must be between 1 and 256 or 'auto'")
        return v

    _once = field_validator("seen", "unseen")(classmethod(_listed_once))

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, v: list[TaskSpec]) -> list[TaskSpec]:
        dup = given_twice([t.name for t in v])
        if dup:
            raise ValueError(f"tasks listed twice: {dup}")
        return v

    @field_validator("methods")
    @classmethod
    def _unique_labels(cls, v: list[MethodSpec]) -> list[MethodSpec]:
        dup = given_twice([m.display for m in v])
        if dup:
            raise ValueError(f"method labels not unique: {dup} (give each entry a label of its own)")
        return v

    # -- derived -------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        """Every task evaluated."""
        return [t.name for t in self.tasks]

    @property
    def merge_tasks(self) -> list[str]:
        """Tasks whose fine-tuned models are merged (the 'seen' tasks)."""
        if self.seen is not None:
            return list(self.seen)
        return [t for t in self.task_names if t not in self.unseen]

    @property
    def generalization_seen(self) -> list[str]:
        """The tasks the generalization protocol merges (empty without a ``generalization`` block)."""
        g = self.generalization
        if g is None:
            return []
        if g.seen is not None:
            return [t for t in self.task_names if t in g.seen]
        return [t for t in self.task_names if t not in (g.unseen or [])]

    def seen_tasks(self, protocol: str = MAIN) -> list[str]:
        """The tasks a job of ``protocol`` merges, adapts on, averages and selects its setting on."""
        return self.generalization_seen if protocol == GENERALIZATION else self.merge_tasks

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir or f"outputs/{self.name}").resolve()

    def resolved_cache_dir(self) -> Path:
        base = self.cache_dir or os.environ.get("HARNESS_CACHE") or "~/.cache/harness"
        return Path(os.path.expanduser(base)).resolve()

    def resolved_tracking_uri(self) -> str:
        return (
            self.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{self.resolved_output_dir() / 'mlflow.db'}"
        )

    def digest(self) -> str:
        """What finds the sweep's MLflow parent run again: the experiment it measures (name, tasks
        and their split, model kind, evaluation subset and precision, adaptation data, seed). Not where its files
        lie nor how it runs (paths, executor, device, threads, batch size, description), nor its
        methods and reference rows: those add jobs, found by their own keys, to the same sweep, so
        a resumed or extended sweep keeps its parent and logs each job once."""
        body = self.model_dump(mode="json", include=EXPERIMENT_FIELDS)
        if self.eval.precision != "fp32":  # fp32 sweeps keep the digest they had before the field
            body["eval"]["precision"] = self.eval.precision
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Loading


def read_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """The sweep file with the command-line overrides applied, not yet validated."""
    return apply_overrides(read_yaml(path), overrides or [], str(path))


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> SweepConfig:
    """Read, override, validate, and check method hyperparameters against their classes."""
    raw = read_yaml(path)
    overridden = apply_overrides(raw, overrides or [], str(path))  # its errors name their override already
    try:
        return validate_config(overridden, str(path))
    except ConfigError as exc:
        raise exc.blamed_on_overrides(overrides or [], raw) from None


def load_config_or_usage(parser: Any, path: str | os.PathLike, overrides: list[str] | None = None) -> SweepConfig:
    """:func:`load_config` for a script's command line (``parser``, an ``argparse`` parser): a
    sweep file or override that does not validate stops with one usage line naming the file,
    field and value, as ``harness sweep`` gives it, not with a traceback."""
    try:
        return load_config(path, overrides)
    except HarnessError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def validate_config(raw: dict, file: str = "<config>") -> SweepConfig:
    try:
        cfg = SweepConfig.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(file, exc, raw, schema=SweepConfig) from None
    found = Gathering(one_per_field=True)
    for check in (check_methods, check_tasks, check_suite, check_slurm_log_dir):
        with found.check():
            check(cfg, file)
    found.raise_any()
    return cfg


def check_suite(cfg: SweepConfig, file: str) -> None:
    """The embedded suite's options and task names, checked before anything is built."""
    if cfg.model.source != "embedded":
        return
    from tasks.embedded import EMBEDDED_TASKS
    from tasks.embedded.pipeline import SuiteOptions

    try:
        SuiteOptions.model_validate(cfg.model.suite)
    except ValidationError as exc:
        raise validation_error(file, exc, cfg.model.suite, prefix="model.suite", schema=SuiteOptions) from None
    from harness.models import unknown_arch_problem

    arch = cfg.model.suite.get("arch")
    problem = (unknown_arch_problem(arch) or suite_arch_problem(arch)) if isinstance(arch, str) else None
    if problem:
        raise ConfigError(file, "model.suite.arch", problem, arch)
    found = Gathering()  # every task without a model, a line each
    for i, t in enumerate(cfg.tasks):
        if t.name in EMBEDDED_TASKS or t.name not in cfg.merge_tasks:  # an unseen task needs data and a head only
            continue
        if cfg.generalization is not None:  # top-level unseen: cannot go with the block
            instead = ("the main table merges every task, a generalization block's unseen ones too: list it in "
                       "top-level 'unseen:' instead (a generalization study of its own) or give its checkpoint "
                       "with source 'files'")
        else:
            instead = "list it in 'unseen:' to evaluate it without merging it (zero-shot head)"
        found.errors.append(ConfigError(
            file, t.name_field(f"tasks.{i}"), f"model.source 'embedded' has no fine-tuned model for task "
            f"{t.name!r}{did_you_mean(t.name, EMBEDDED_TASKS)} (embedded tasks: {', '.join(EMBEDDED_TASKS)}); "
            f"{instead}", show_value=False))
    found.raise_any()


def suite_arch_problem(arch: str) -> str | None:
    """Why the embedded suite cannot pretrain ``arch`` on its 32x32 images, or None: found only
    once pretraining fed it the first batch, minutes of pool generation in, as a traceback."""
    from harness.models import arch_config
    from tasks.embedded.render import SIZE

    config = arch_config(arch)
    if config is None:
        return ("no config to pretrain from (a generated hf-vit architecture is read from beside a converted "
                "checkpoint; the embedded suite trains its own model)")
    size = config.get("vision_cfg", {}).get("image_size")
    sides = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if sides != (SIZE, SIZE):
        return (f"takes {sides[0]}x{sides[1]} images; the embedded tasks' are {SIZE}x{SIZE} "
                "(the suite's default, harness-tiny-vit, is built for them)")
    return None


def suite_tasks(cfg: SweepConfig) -> list[str]:
    """The tasks an embedded sweep's suite fine-tunes: the embedded ones (:func:`check_suite`
    admits another task only unseen, evaluated through its zero-shot head)."""
    from tasks.embedded import EMBEDDED_TASKS

    return [t for t in cfg.task_names if t in EMBEDDED_TASKS]


def check_methods(cfg: SweepConfig, file: str) -> None:
    """Each method's entry (:func:`check_method`), the faults of every entry told together."""
    from methods.base import available_methods

    found = Gathering()
    registered_at: dict[str, int] = {}  # a name first registered as entry j was checked (its module imported) -> j
    for i, m in enumerate(cfg.methods):
        known = set(available_methods())
        with found.check():
            check_method(m, i, file)
        registered_at.update(dict.fromkeys(set(available_methods()) - known, i))
    found.errors = [registered_below(cfg, file, e, registered_at) for e in found.errors]
    found.raise_any()


def registered_below(cfg: SweepConfig, file: str, error: ConfigError, registered_at: dict[str, int]) -> ConfigError:
    """``error``, or, for an entry whose name was unknown because a later entry imports the module
    registering it, that: a registered name is found only below the entry that imports its module,
    and "unknown method" alone sends one looking for a typo."""
    from methods.base import available_methods

    for i, m in enumerate(cfg.methods):
        j = registered_at.get(m.name, -1)
        if error.path == m.name_field(f"methods.{i}") and j > i:
            module = available_methods()[m.name].__module__
            return ConfigError(file, error.path, f"unknown method {m.name!r} here: it is registered by {module}, "
                               f"imported by methods.{j} ({cfg.methods[j].name}): put this entry below it",
                               show_value=False)
    return error


def check_method(m: MethodSpec, i: int, file: str) -> None:
    """Method entry ``i``: a method that resolves and can merge, a label no reference row has,
    hyperparameters it has, every grid setting valid and distinct; its values then held as the
    method holds them (:func:`hold_validated`)."""
    from methods.base import MergeMethod, resolve_method

    try:
        cls = resolve_method(m.name)
    except KeyError as exc:
        raise ConfigError(file, m.name_field(f"methods.{i}"), str(exc.args[0]), show_value=False) from None
    who = f"{cls.__module__}:{cls.__qualname__} ({source_file(cls) or 'built in'})"
    if reference_row(m.display):  # its row would be taken for a reference row in reports and comparisons
        raise ConfigError(file, f"methods.{i}.label", f"{m.display!r} names a reference row (pretrained, "
                          "individual, perfect routing): give the method another label", m.display)
    if cls.merge is MergeMethod.merge:  # else every job of it fails with a bare NotImplementedError
        raise ConfigError(file, m.name_field(f"methods.{i}"), f"{who} does not define "
                          "merge(self, pretrained, finetuned, ctx)", show_value=False)
    fields = set(cls.model_fields)
    declared = sorted(fields & MergeMethod.__class_vars__)
    if declared:  # annotated, it is a hyperparameter, and the class-level declaration it meant is not made
        name, info = declared[0], cls.model_fields[declared[0]]
        write = f" ({name} = {info.default!r})" if not info.is_required() else ""
        raise ConfigError(file, m.name_field(f"methods.{i}"), f"{who} annotates {name!r}, which makes it a "
                          f"hyperparameter instead of setting MergeMethod.{name}: write it without an "
                          f"annotation{write}", show_value=False)
    unknown = sorted(set(cls.runtime_only) - fields)
    if unknown:  # else every job key fails with a bare KeyError
        raise ConfigError(file, m.name_field(f"methods.{i}"), f"{who} declares runtime_only {unknown}, which are "
                          f"not its hyperparameters{did_you_mean(unknown[0], fields)}", show_value=False)
    if m.tune:
        check_space(cls, m, i, file)
    for where in ("params", "grid"):
        for key in getattr(m, where):
            if key not in fields:
                raise unknown_hyperparameter(file, f"methods.{i}.{where}.{key}", m.name, key, fields)
    seen: dict[str, dict[str, Any]] = {}
    probe = space_probe(m)  # a tuned hyperparameter need not have a default: its trials give it
    for setting in expand_grid(m):
        try:
            validated = cls(**{**probe, **setting}).key_params()
        except ValidationError as exc:
            err = exc.errors()[0]
            key = str(err["loc"][0]) if err["loc"] else ""
            where = ("grid" if key in m.grid else "params") + (f".{key}" if key else "")
            if len(err["loc"]) > 1:  # an item inside a list or mapping value: its place, a grid value's first
                place = [m.grid[key].index(setting[key])] if key in m.grid else []
                where += "".join(f".{part}" for part in [*place, *err["loc"][1:]])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":  # not "Field required (got {...})": the params hold no value of it
                raise ConfigError(file, f"methods.{i}.{where}", f"hyperparameter {key!r} of {m.name!r} has no "
                                  "default: give it in params, grid or tune.space", show_value=False) from None
            raise ConfigError(file, f"methods.{i}.{where}", msg, err.get("input") if key else setting) from None
        same = seen.setdefault(json.dumps(validated, sort_keys=True), setting)
        if same is not setting:  # one job would run twice under two titles
            runtime = sorted(k for k in cls.runtime_only if k in m.grid)
            why = f" ({', '.join(runtime)} never changes a result)" if runtime else ""
            raise ConfigError(file, f"methods.{i}.grid", f"settings {same} and {setting} are the same "
                              f"setting once validated{why}", show_value=False)
    hold_validated(cls, m)


def held_value(cls: type[MergeMethod], m: MethodSpec, name: str, value: Any) -> Any:
    """``value`` of hyperparameter ``name`` as the method's field holds it once validated
    (``steps: 4.0`` as 4, ``lr: '1e-3'`` as 0.001), beside ``m``'s params, first grid values and
    tuned values (:func:`space_probe`): two spellings of one setting are one job key, and must be
    one label, one study."""
    firsts = {k: values[0] for k, values in m.grid.items()}
    return cls(**{**space_probe(m), **m.params, **firsts, name: value}).model_dump(mode="json")[name]


def hold_validated(cls: type[MergeMethod], m: MethodSpec) -> None:
    """``m``'s params and grid values as the method holds them (:func:`held_value`): every label,
    row, run name and MLflow param built from them reads the same for ``4`` and ``4.0``."""
    m.params = {k: held_value(cls, m, k, v) for k, v in m.params.items()}
    m.grid = {k: [held_value(cls, m, k, v) for v in values] for k, values in m.grid.items()}


def field_kind(annotation: Any) -> str:
    """What a hyperparameter holds, for its search space: 'int', 'float' or 'other' (a bool, a
    Literal, a string: values only a categorical space lists)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        kinds = {field_kind(a) for a in get_args(annotation) if a is not type(None)}
        return "float" if "float" in kinds else "int" if kinds == {"int"} else "other"
    if annotation is float:
        return "float"
    return "int" if annotation is int else "other"


#: The space types each kind of hyperparameter takes (a float field takes an int range too).
SPACE_TYPES = {"int": ("int", "categorical"), "float": ("float", "int", "categorical"), "other": ("categorical",)}


def unknown_hyperparameter(file: str, where: str, method: str, key: str, fields: Iterable[str]) -> ConfigError:
    """A params, grid or tuning-space key the method lacks, with the closest one it has."""
    fields = sorted(fields)
    return ConfigError(file, where, f"method {method!r} has no hyperparameter {key!r}{did_you_mean(key, fields)} "
                       f"(it has {', '.join(fields) or 'none'})", show_value=False)


def check_space(cls: Any, m: MethodSpec, i: int, file: str) -> None:
    """Every tuned name is a hyperparameter of the method, its space's type fits the field's (a
    float range for an int or a bool would fail at the first trial), and the space's ends are
    valid values."""
    for name, p in m.tune.space.items():
        where = f"methods.{i}.tune.space.{name}"
        if name not in cls.model_fields:
            raise unknown_hyperparameter(file, where, m.name, name, cls.model_fields)
        if name in cls.runtime_only:  # trials differing in it alone would run one merge again and again
            raise ConfigError(file, where, f"hyperparameter {name!r} of {m.name!r} never changes a result "
                              "(runtime_only): set it in params", show_value=False)
        annotation = cls.model_fields[name].annotation
        allowed = SPACE_TYPES[field_kind(annotation)]
        if p.type not in allowed:
            shown = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
            raise ConfigError(file, f"{where}.type", f"hyperparameter {name!r} of {m.name!r} is {shown}: "
                              f"give type {' or '.join(allowed)}", p.type)
        ends = p.choices if p.type == "categorical" else [p.low, p.high]
        for value in ends:
            if p.type == "int":
                value = int(value)
            try:
                cls(**{**m.params, name: value})
            except ValidationError as exc:
                err = exc.errors()[0]
                if err["loc"] and err["loc"][0] == name:
                    raise ConfigError(file, where, err["msg"].removeprefix("Value error, "), value) from None
                if not err["loc"] and len(m.tune.space) == 1:
                    # The method's own check across its hyperparameters (a model validator) refuses
                    # this end with every other one fixed: each trial near it would fail.
                    raise ConfigError(file, where, f"{err['msg'].removeprefix('Value error, ')}, at this end of "
                                      "the range with the method's other hyperparameters as params and defaults "
                                      "set them", value) from None
        if p.type == "categorical":
            same_choices(cls, m, name, p.choices, where, file)


def same_choices(cls: Any, m: MethodSpec, name: str, choices: list[Any], where: str, file: str) -> None:
    """Refuse categorical choices that are one setting once validated (``[4, 4.0]``, a value
    listed twice): as a grid's settings, they would run one job as several trials, and weigh
    that value twice in the sampler's draws."""
    seen: dict[str, int] = {}
    for i, choice in enumerate(choices):
        try:
            held = held_value(cls, m, name, choice)
        except ValidationError:  # another tuned value's first choice refuses it: compared as written
            held = choice
        first = seen.setdefault(json.dumps(held, sort_keys=True), i)
        if first != i:
            same = choices[first]
            why = (f"choice {choice!r} is listed twice" if json.dumps(same) == json.dumps(choice) else
                   f"choices {same!r} and {choice!r} are the same setting once validated")
            raise ConfigError(file, where, why, show_value=False)


def check_tasks(cfg: SweepConfig, file: str) -> None:
    from tasks.base import available_tasks, resolve_task

    known = available_tasks()
    found = Gathering()
    for i, t in enumerate(cfg.tasks):
        with found.check():
            if ":" not in t.name and t.name not in known:
                raise ConfigError(file, t.name_field(f"tasks.{i}"), f"unknown task {t.name!r}"
                                  f"{did_you_mean(t.name, known)} (registered: {', '.join(known)})", show_value=False)
            if ":" in t.name:
                try:
                    factory = resolve_task(t.name)
                except KeyError as exc:
                    raise ConfigError(file, t.name_field(f"tasks.{i}"), str(exc.args[0]), show_value=False) from None
                if not callable(factory):
                    raise ConfigError(file, t.name_field(f"tasks.{i}"), "not a task factory (a callable returning "
                                      "a Task)", t.name)
    with found.check():
        check_task_lists(cfg, file, known)
    found.raise_any()


def valid_task_names(names: list[str], known: dict[str, str]) -> list[str]:
    """The sweep's task names a field naming one of them may suggest: registered ones and import
    paths, not a misspelt entry (its own error suggests the registered name)."""
    return [n for n in names if ":" in n or n in known]


def not_sweep_tasks(file: str, field_name: str, values: list[str], names: list[str],
                    known: dict[str, str]) -> list[ConfigError]:
    """An error for each entry of the task list ``field_name`` that is none of the sweep's tasks
    ``names``, suggesting the closest valid one (``known``: the registered tasks)."""
    return [ConfigError(file, f"{field_name}.{i}", "not one of the sweep's tasks"
                        f"{did_you_mean(name, valid_task_names(names, known))}", name)
            for i, name in enumerate(values) if name not in names]


def check_task_lists(cfg: SweepConfig, file: str, known: dict[str, str]) -> None:
    """The fields naming the sweep's tasks (seen, unseen, robustness, per-task model files),
    tuning objectives and the generalization block: every entry naming no task of the sweep, a
    line each, so one run lists them all. The split itself (a task both seen and unseen, or
    neither) is judged once every name in it is one of the sweep's: a misspelt one would also be
    told as a task left out."""
    names = cfg.task_names
    found = Gathering()
    subsets = [("seen", cfg.seen or []), ("unseen", cfg.unseen)]
    if cfg.robustness:
        subsets.append(("robustness.tasks", cfg.robustness.tasks))
    for field_name, values in subsets:
        found.errors += not_sweep_tasks(file, field_name, values, names, known)
    for field_name, given in (("model.finetuned", cfg.model.finetuned), ("model.heads", cfg.model.heads)):
        for name in given:  # a typo would otherwise leave the task on the pattern, or on zero-shot heads
            if name not in names and name not in known:  # a registered task's entry waits for a sweep with it
                found.errors.append(ConfigError(
                    file, f"{field_name}.{name}", f"neither one of the sweep's tasks ({', '.join(names)}) nor a "
                    f"registered task{did_you_mean(name, [*names, *known])}", show_value=False))
    if not any(e.path.startswith(("seen.", "unseen.")) for e in found.errors):
        with found.check():
            _check_split(cfg, file)
    objectives = ["val/acc/avg", *(f"val/acc/{t}" for t in names)]
    for i, m in enumerate(cfg.methods):
        if m.tune and m.tune.objective not in objectives:  # else every trial would run, then fail
            found.errors.append(ConfigError(file, f"methods.{i}.tune.objective",
                                            f"not a metric a trial reports; one of: {', '.join(objectives)}",
                                            m.tune.objective))
    with found.check():
        check_generalization(cfg, file)
    found.raise_any()


def _check_split(cfg: SweepConfig, file: str) -> None:
    """The top-level ``seen``/``unseen`` split: no task in both, each in one when both are given,
    and a task left to merge."""
    both = set(cfg.seen or []) & set(cfg.unseen)
    if both:
        raise ConfigError(file, "unseen", f"tasks both seen and unseen: {sorted(both)}", show_value=False,
                          also=("seen",))
    rest = [t for t in cfg.task_names if t not in (cfg.seen or []) and t not in cfg.unseen]
    if cfg.seen is not None and cfg.unseen and rest:  # as the generalization block: each task one of them
        raise ConfigError(file, "seen", f"tasks neither seen nor unseen: {rest}", show_value=False, also=("unseen",))
    if not cfg.merge_tasks:  # ``seen: []`` is the field at fault where it is given, else ``unseen``
        if cfg.seen is not None:
            raise ConfigError(file, "seen", "every task is unseen: nothing to merge", cfg.seen)
        raise ConfigError(file, "unseen", "every task is unseen: nothing to merge", show_value=False)


def check_generalization(cfg: SweepConfig, file: str) -> None:
    """The ``generalization`` block: known tasks, a seen/unseen split of them, no clash with the
    whole-sweep split or with tuned methods (a study selects on every task's validation)."""
    g = cfg.generalization
    if g is None:
        return
    if cfg.seen is not None or cfg.unseen:
        which = "seen" if cfg.seen is not None else "unseen"
        raise ConfigError(file, "generalization", f"cannot be combined with top-level {which!r}, which already "
                          "makes the whole sweep a generalization study; keep one of them", show_value=False)
    names = cfg.task_names
    found = Gathering()  # every misnamed entry, a line each
    for field_name in ("unseen", "seen"):
        values = getattr(g, field_name) or []
        if any(name not in names for name in values):
            from tasks.base import available_tasks

            found.errors += not_sweep_tasks(file, f"generalization.{field_name}", values, names, available_tasks())
    found.raise_any()
    unseen = set(g.unseen or [])
    if g.seen is not None:
        both = set(g.seen) & unseen
        if both:
            raise ConfigError(file, "generalization.unseen", f"tasks both seen and unseen: {sorted(both)}",
                              show_value=False, also=("generalization.seen",))
        rest = [t for t in names if t not in g.seen and t not in unseen]
        if g.unseen is not None and rest:
            raise ConfigError(file, "generalization.seen", f"tasks neither seen nor unseen: {rest}", show_value=False,
                              also=("generalization.unseen",))
    if not cfg.generalization_seen:
        raise ConfigError(file, "generalization.unseen", "every task is unseen: nothing to merge", show_value=False)
    if len(cfg.generalization_seen) == len(names):
        raise ConfigError(file, "generalization.seen", "no task is left unseen", show_value=False)
    for i, m in enumerate(cfg.methods):
        if m.tune:
            raise ConfigError(file, f"methods.{i}.tune", "tuned methods cannot be combined with the "
                              "'generalization' block (a study selects one setting on every task's validation); "
                              "tune the generalization study as its own sweep with top-level 'unseen'",
                              show_value=False)
        if m.display.endswith(GENERALIZATION_SUFFIX):
            raise ConfigError(file, f"methods.{i}.label", f"labels ending in {GENERALIZATION_SUFFIX!r} are "
                              "reserved for the generalization block's jobs", m.display)


def space_probe(m: MethodSpec) -> dict[str, Any]:
    """A valid value of each hyperparameter ``m`` tunes (its space's low end or first choice, which
    :func:`check_space` validated; none for an untuned method): with it the method builds where
    a tuned hyperparameter has no default, as each of its trials builds it."""
    if not m.tune:
        return {}
    return {name: (p.choices[0] if p.type == "categorical" else int(p.low) if p.type == "int" else p.low)
            for name, p in m.tune.space.items()}


def expand_grid(m: MethodSpec) -> list[dict[str, Any]]:
    """The cartesian product of the grid, each merged over the fixed params, in YAML order."""
    settings = [dict(m.params)]
    for key, values in m.grid.items():
        settings = [{**s, key: v} for s in settings for v in values]
    return settings


def dump_yaml(cfg: SweepConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
