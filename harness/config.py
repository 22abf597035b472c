"""Sweep configuration: a pydantic schema, YAML loading, dotted overrides, env expansion.

Every error a user can make in a sweep file surfaces as one :class:`ConfigError` line naming
the file, the dotted field path and the offending value; a file failing the schema in several
places gets a line for each, in one error.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import json
import math
import os
import re
import string
import types
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Iterator, Literal, NamedTuple, Union, get_args, get_origin

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

from harness.errors import FieldError, HarnessError, closest_name, did_you_mean
from harness.fields import no_bool_for_number
from harness.imports import source_file

if TYPE_CHECKING:
    from methods.base import MergeMethod


#: Job protocols: the main table (the sweep's seen tasks merged) and the ``generalization`` block's.
MAIN, GENERALIZATION = "main", "generalization"
#: Appended to a method's label for its generalization jobs (MLflow run names, progress, plan).
GENERALIZATION_SUFFIX = " (gen)"  # not "[gen]": rich would read that as markup and drop it


class ConfigError(HarnessError):
    """A bad field: ``file: path: message (got value)``. ``further`` holds the sweep's other bad
    fields, when validation found several (each one more line of the message), and ``more`` the
    count of those left out past the last line. ``also`` names other fields the fault lies in as
    much as in ``path`` (a task both ``seen`` and ``unseen``): an override of one of them is blamed."""

    def __init__(self, file: str, path: str, message: str, value: Any = None, show_value: bool = True,
                 further: Iterable["ConfigError"] = (), more: int = 0, also: tuple[str, ...] = ()):
        self.file, self.path, self.value, self.also = file, path, value, also
        self.message, self.show_value = message, show_value
        self.further, self.more = list(further), more
        where = f"{file}: {path}: " if path else f"{file}: "
        got = f" (got {value!r})" if show_value else ""
        self.line = f"{where}{message}{got}"
        lines = [self.line, *(e.line for e in self.further)] + ([f"... and {more} more"] if more else [])
        super().__init__("\n".join(lines))

    @classmethod
    def of_field(cls, file: str, exc: FieldError, overrides: Iterable[str] = ()) -> "ConfigError":
        """A sweep field found at fault once the sweep runs (a device this machine lacks, a SLURM
        option sbatch refuses), named with the sweep file, or the override that set it, as
        validation names a field."""
        return cls(file, exc.field, exc.message, exc.value, show_value=exc.value is not None
                   ).blamed_on_overrides(list(overrides))

    def blamed_on_overrides(self, overrides: list[str], raw: Any = None) -> "ConfigError":
        """The same error, naming the command line when the bad field came from an override (the
        last one of that field: it is the one in effect); each further error likewise. Given
        ``raw``, the file as read, a field missing from a mapping an override made (``tune`` for
        ``methods.0.tune.n_trials=3`` over a file without it) is the override's too."""
        first, further = self._blamed(overrides, raw), [e._blamed(overrides, raw) for e in self.further]
        if first is self and all(a is b for a, b in zip(further, self.further)):
            return self
        return ConfigError(first.file, first.path, first.message, first.value, first.show_value, further, self.more,
                           first.also)

    def _blamed(self, overrides: list[str], raw: Any = None) -> "ConfigError":
        """This error's own line (not the further ones) blamed on the override that set its field,
        or one of the fields it names ``also``, then named as the field at fault."""
        for item in reversed(overrides):
            key = item.partition("=")[0].strip()
            made = made_by_override(raw, key)
            for path in (self.path, *self.also):
                if path and (path == key or path.startswith(key + ".") or key.startswith(path + ".")
                             or (made and path.startswith(made + "."))):
                    return ConfigError(f"<command line> ({item}, over {self.file})", path, self.message,
                                       self.value, self.show_value)
        return self


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
                raise ValueError(f"data_root: {exc}") from None
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


#: What a method's label may hold.
LABEL = re.compile(r"[^\W_][\w .:()+=,-]*")


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
            raise ValueError("must start with a letter or digit and hold only letters, digits, spaces "
                             "and _ . : ( ) + = , -")
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
            raise ValueError(f"method labels not unique: {dup} (give each a 'label')")
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


def _format_loc(loc: tuple, raw: Any = None) -> str:
    """The dotted path of a pydantic error location, without pydantic's own entries (a
    validator's ``function-after[...]``, a union member's type); a key the file has is kept
    whatever its characters."""
    parts: list[str] = []
    absent = object()
    cur = raw
    for p in loc:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and isinstance(p, int) and 0 <= p < len(cur):
            cur = cur[p]
        elif cur is not absent and raw is not None and (not isinstance(cur, (dict, list)) or isinstance(cur, list)
                                                        and not isinstance(p, int)):
            continue  # below a value the file gives (a list's items by number): a union member's or a validator's name
        elif p in {"function-after", "function-before", "function-wrap"} or "[" in str(p):
            continue
        else:
            cur = absent
        parts.append(str(p))
    return ".".join(parts)


def _value_at(raw: Any, loc: tuple) -> Any:
    cur = raw
    for p in loc:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and isinstance(p, int) and p < len(cur):
            cur = cur[p]
        else:
            return None
    return cur


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _members(t: Any) -> list[Any]:
    """The types of a union but None (``Optional[X]``: ``[X]``); ``[t]`` for any other type."""
    if get_origin(t) not in (Union, types.UnionType):
        return [t]
    return [a for a in get_args(t) if a is not type(None)] or [t]


def _followed(t: Any) -> Any:
    """The type a walk down the schema follows at ``t``: the model among a union's members, else the first."""
    members = _members(t)
    return next((a for a in members if _is_model(a)), members[0])


def _annotations_along(schema: Any, loc: tuple) -> list[Any]:
    """The annotation of each value on the way to ``loc`` under the pydantic model ``schema``:
    ``schema``, then ``loc[:1]``'s, and so on; shorter where ``loc`` leaves the schema. Past a
    union it follows the model among its members, else the first."""
    found = [schema]
    for part in loc:
        current = _followed(found[-1])
        if _is_model(current):
            if part not in current.model_fields:
                break
            found.append(current.model_fields[part].annotation)
        elif get_origin(current) in (list, dict):
            found.append(get_args(current)[-1] if get_args(current) else Any)
        else:
            break
    return found


def _keys_at(schema: Any, loc: tuple) -> list[str]:
    """The keys the mapping at ``loc`` takes under the pydantic model ``schema`` (none when
    ``loc`` leads elsewhere), for the closest name to an unknown key."""
    found = _annotations_along(schema, loc)
    if len(found) <= len(loc):
        return []
    current = _followed(found[-1])
    return list(current.model_fields) if _is_model(current) else []


def _union_at(schema: Any, loc: tuple) -> tuple | None:
    """The location of the first field on the way to ``loc`` whose type is a union (``float |
    list[float]``), or None: pydantic reports a value that fits no member once per member."""
    for depth, annotation in enumerate(_annotations_along(schema, loc)):
        if len(_members(annotation)) > 1:
            return loc[:depth]
    return None


def _meant_key(err: dict, schema: Any) -> str | None:
    """For an unknown key, the valid key closest to it under ``schema`` (what the did-you-mean names)."""
    loc = tuple(err["loc"])
    return closest_name(str(loc[-1]), _keys_at(schema, loc[:-1])) if schema is not None and loc else None


#: The most errors one validation reports, one line each; a last line counts the rest.
MAX_ERRORS = 20


def validation_error(file: str, exc: ValidationError, raw: Any, prefix: str = "", schema: Any = None) -> ConfigError:
    """Every pydantic error of ``exc`` as one error, a line each (:func:`validation_error_line`),
    at most :data:`MAX_ERRORS` lines and then a count of the rest. An unknown key comes first (the
    line a file with one mistake gets); the rest follow in pydantic's order, each mistake once: a
    field once, a value that fits no member of a union once (pydantic reports it per member), and
    a required field an unknown key misspells not as missing (``task:`` for ``tasks:`` is told
    as the unknown key naming it: the typo is the news)."""
    errors = exc.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    misspelt = {tuple(e["loc"][:-1]) + (meant,) for e in errors if e["type"] == "extra_forbidden"
                and (meant := _meant_key(e, schema)) is not None}
    lines: list[ConfigError] = []
    seen: set[Any] = set()
    unions: dict[tuple, int] = {}
    for err in [first, *(e for e in errors if e is not first)]:
        loc = tuple(err["loc"])
        if err["type"] == "missing" and loc in misspelt:
            continue
        line = validation_error_line(file, err, raw, prefix, schema)
        union = _union_at(schema, loc)
        if union in unions:  # the member reaching deepest into what the file gives says where: a list's bad item
            at = unions[union]
            if line.path.count(".") > lines[at].path.count(".") and line.path not in seen:
                seen.add(line.path)
                lines[at] = line
            continue
        if line.path in seen:
            continue
        seen.add(line.path)
        if union is not None:
            unions[union] = len(lines)
        lines.append(line)
    return gathered(lines)


def gathered(errors: list[ConfigError], one_per_field: bool = False) -> ConfigError:
    """``errors`` (each with its further lines) as one error, a line each in order, no line
    twice, at most :data:`MAX_ERRORS` lines and then a count of the rest. With ``one_per_field``,
    a field an earlier error names is not named again by a later one: two checks finding one
    field at fault (an unknown task, which the embedded suite has no model of either), the
    first says why."""
    lines: list[ConfigError] = []
    told: set[str] = set()
    fields: set[tuple[str, str]] = set()
    more = 0
    for error in errors:
        more += error.more
        group = [line for line in (error, *error.further) if not (one_per_field and (line.file, line.path) in fields)]
        for line in group:
            if line.line not in told:
                told.add(line.line)
                lines.append(line)
        fields |= {(line.file, line.path) for line in group}
    shown = lines[:MAX_ERRORS]
    head = shown[0]
    return ConfigError(head.file, head.path, head.message, head.value, head.show_value, shown[1:],
                       len(lines) - len(shown) + more, head.also)


class Gathering:
    """Runs checks that each raise at their first fault, or collects faults in ``errors``, and
    raises them together (:func:`gathered`): a typo in ``tasks:`` and another in ``methods:``
    are told in one run. ``one_per_field`` where the checks are distinct ones that may meet one
    field."""

    def __init__(self, one_per_field: bool = False) -> None:
        self.errors: list[ConfigError] = []
        self.one_per_field = one_per_field

    @contextlib.contextmanager
    def check(self) -> Iterator[None]:
        try:
            yield
        except ConfigError as exc:
            self.errors.append(exc)

    def raise_any(self) -> None:
        if self.errors:
            raise gathered(self.errors, self.one_per_field)


def validation_error_line(file: str, err: dict, raw: Any, prefix: str = "", schema: Any = None) -> ConfigError:
    """One pydantic error (an item of ``ValidationError.errors()``) as one line: file, dotted
    path, message, value. An unknown key names, given ``schema``, the closest valid key."""
    loc = tuple(err["loc"])
    path = _format_loc(loc, raw)
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        hint = did_you_mean(str(loc[-1]), _keys_at(schema, loc[:-1])) if schema is not None and loc else ""
        return ConfigError(file, path, f"unknown key{hint}", show_value=False)
    if err["type"] == "missing":
        return ConfigError(file, path, "required field is missing", show_value=False)
    value = err.get("input", _value_at(raw, loc))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["type"] == "model_type":  # not "... or instance of MethodSpec": the class is no YAML name
        entry = len(loc) == 2 and loc[0] in ("tasks", "methods") and isinstance(loc[1], int)
        msg = "Input should be a name or a mapping" if entry else "Input should be a mapping"
    if err["type"] == "list_type" and len(loc) == 4 and loc[0] == "methods" and loc[2] == "grid":
        shown = yaml.safe_dump(value, default_flow_style=True).splitlines()[0]
        msg = f"a grid takes a list of values (write [{shown}], or give it in params)"
    show = not isinstance(value, dict) or err["type"] not in {"value_error", "assertion_error"}
    short = not isinstance(value, (dict, list)) or len(repr(value)) <= 60  # a whole block would swamp the line
    return ConfigError(file, path, msg, value, show_value=show and short)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError("<command line>", item, "override must look like key.path=value", show_value=False)
    key, _, text = item.partition("=")
    key = key.strip()  # "a.b = 1", quoted whole
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("<command line>", key, "malformed key path", show_value=False)
    index = re.search(r"\[(\d*)\]", key)
    if index:
        dotted = re.sub(r"\[(\d*)\]", lambda m: f".{m.group(1) or 'N'}", key)
        raise ConfigError("<command line>", key, f"list items are dotted indices: write {dotted}={text}",
                          show_value=False)
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader) if text != "" else ""
    except DuplicateKeyError as exc:  # as in a file: plain YAML would keep the last silently
        raise ConfigError("<command line>", key, f"malformed YAML: {exc.problem}", text) from None
    except yaml.YAMLError as exc:
        if text.lstrip().startswith("["):  # a list left unclosed, not a string: told so, not taken as text
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError("<command line>", key, f"malformed YAML list: {problem}", text) from None
        value = text  # a string YAML cannot read alone, such as a pattern '{task}/x.pt'
    return key.split("."), value


def made_by_override(raw: Any, key: str) -> str | None:
    """The dotted path of the first mapping that override ``key`` creates in ``raw`` (the file as
    read), None when every mapping above its field is already there or ``raw`` is not given."""
    if raw is None:
        return None
    parts = key.split(".")
    cur = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        elif isinstance(cur, dict) and cur.get(part) is not None:
            cur = cur[part]
        else:  # absent, null, or below a method or task given by name alone (``- ties``)
            return ".".join(parts[: i + 1])
    return None


def apply_overrides(raw: dict, overrides: list[str], file: str | None = None) -> dict:
    """Apply ``a.b.0.c=value`` overrides (values parsed as YAML) to a raw config dict. An override
    that does not fit is an error naming it and ``file``, the sweep it was given over."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        try:
            _apply_override(raw, item)
        except ConfigError as exc:
            if file is None or exc.file != "<command line>":
                raise
            raise ConfigError(f"<command line> ({item}, over {file})", exc.path, exc.message, exc.value,
                              exc.show_value) from None
    return raw


def _apply_override(raw: dict, item: str) -> None:
    """Apply one override to ``raw`` in place."""
    parts, value = parse_override(item)
    cur: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not part.isdigit() or int(part) >= len(cur):
                raise ConfigError("<command line>", ".".join(parts[: i + 1]),
                                  f"no list item {part} (list has {len(cur)})", show_value=False)
            if last:
                cur[int(part)] = value
            else:
                if parts[:i] in (["methods"], ["tasks"]) and isinstance(cur[int(part)], str):
                    cur[int(part)] = {"name": cur[int(part)]}  # the short form, given a field
                cur = cur[int(part)]
        elif isinstance(cur, dict):
            if last:
                cur[part] = value
            else:
                if cur.get(part) is None:
                    cur[part] = {}
                cur = cur[part]
        else:
            raise ConfigError("<command line>", ".".join(parts[:i]), "is not a mapping or list", cur)


class _SlurmTimeLoader(yaml.SafeLoader):
    """YAML that keeps ``2:30:00`` a string: YAML 1.1 reads it as the base-60 number 9000, so a
    SLURM time (``timeout_min: 2:30:00``, an unquoted ``sbatch: {begin: 16:00}``) would pass as
    another number instead of being refused or handed to sbatch as written."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        return self.construct_scalar(node) if ":" in node.value else super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> Any:
        return self.construct_scalar(node) if ":" in node.value else super().construct_yaml_float(node)


_SlurmTimeLoader.add_constructor("tag:yaml.org,2002:int", _SlurmTimeLoader.construct_yaml_int)
_SlurmTimeLoader.add_constructor("tag:yaml.org,2002:float", _SlurmTimeLoader.construct_yaml_float)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""


class _UniqueKeyLoader(_SlurmTimeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise DuplicateKeyError(None, None, f"key {key_node.value!r} given twice", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _utf8_text(path: Path) -> str:
    """The file's text; a file in another encoding (a Latin-1 comment, a checkpoint named by
    mistake) is a config error naming where its first non-UTF-8 byte lies, not a traceback."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(str(path), "", f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}, "
                          f"column {column}; save the file as UTF-8", show_value=False) from None


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():  # one line, as for any bad sweep path; naming the sweeps it holds (``sweeps/``)
        found = sorted(p.name for p in path.glob("*.y*ml"))
        held = f" (it holds {', '.join(found[:6])}{', ...' if len(found) > 6 else ''})" if found else ""
        raise ConfigError(str(path), "", f"is a folder, not a sweep file{held}", show_value=False)
    if not path.is_file():
        raise ConfigError(str(path), "", "file does not exist", show_value=False)
    try:
        raw = yaml.load(_utf8_text(path), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(str(path), "", f"malformed YAML: {where}{problem}", show_value=False) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "", "top level must be a mapping", raw)
    return raw


def read_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """The sweep file with the command-line overrides applied, not yet validated."""
    return apply_overrides(read_yaml(path), overrides or [], str(path))


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> SweepConfig:
    """Read, override, validate, and check method hyperparameters against their classes."""
    raw = None
    try:
        raw = read_yaml(path)
        return validate_config(apply_overrides(raw, overrides or [], str(path)), str(path))
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
    found = Gathering()
    for i, m in enumerate(cfg.methods):
        with found.check():
            check_method(m, i, file)
    found.raise_any()


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
    if not cfg.merge_tasks:
        raise ConfigError(file, "unseen", "every task is unseen: nothing to merge", show_value=False)


def relative_note(path: str) -> str:
    """For a relative path: that it is read from the current folder, not the sweep file's (the
    usual surprise when a command runs from elsewhere)."""
    return "" if Path(path).is_absolute() else f" (relative paths are read from the current folder, {Path.cwd()})"


def check_model_files(cfg: SweepConfig, file: str) -> None:
    """Every local model file a ``files`` sweep names exists. Checked where the sweep file is
    known (the CLI, ``validate`` and ``--dry-run`` included), so the error names file and field;
    the workspace checks the same paths again for library use."""
    m = cfg.model
    if m.source != "files":
        return
    from harness.models import resolve_arch, unknown_arch_problem

    found = Gathering()  # every missing file, a line each (a pattern's too: it names the task)
    pre = m.pretrained
    if pre and written_as_path(pre) and not Path(pre).exists():
        found.errors.append(ConfigError(file, "model.pretrained", f"weights file does not exist{relative_note(pre)}",
                                        pre))
    problem = unknown_arch_problem(m.arch)
    if problem and pre and Path(pre).is_file():  # an architecture recorded beside the weights, as the run reads it
        try:
            resolve_arch(m.arch, [pre])
            problem = None
        except HarnessError:
            problem += f"; nor recorded beside {Path(pre).name} (model_configs/{m.arch}.json, its .json sidecar)"
    if problem:
        found.errors.append(ConfigError(file, "model.arch", problem, m.arch))
    for t in cfg.task_names:  # required for merged tasks; optional for unseen ones
        required = t in cfg.merge_tasks or t in m.finetuned
        where, path = finetuned_field(cfg, t)
        if path is None:
            if required:
                found.errors.append(ConfigError(file, "model.finetuned", f"no checkpoint for task {t!r}",
                                                show_value=False))
            continue
        if required and not Path(path).exists():
            whose = f"checkpoint of task {t!r}" if where == "model.finetuned_pattern" else "checkpoint"
            found.errors.append(ConfigError(file, where, f"{whose} does not exist{relative_note(path)}", path))
    for t, path in m.heads.items():
        if t not in cfg.task_names:  # kept for another selection of tasks (tasks=... on the command line)
            continue
        if not Path(path).exists():
            found.errors.append(ConfigError(file, f"model.heads.{t}", f"head file does not exist{relative_note(path)}",
                                            path))
        elif Path(path).is_dir():
            found.errors.append(ConfigError(file, f"model.heads.{t}", "is a folder, not a head file", path))
    found.raise_any()


def written_as_path(pretrained: str) -> bool:
    """Whether ``model.pretrained`` is written as a file's path (a folder in it, a suffix), not
    as an open_clip tag: a missing one is a missing file, not an unknown tag."""
    return "/" in pretrained or bool(Path(pretrained).suffix)


def check_pretrained_tag(cfg: SweepConfig, file: str) -> None:
    """Weights named by an open_clip tag are a tag of ``model.arch`` and in the local cache: the
    run's offline lookup (no weights read, no model built), so a tag of another architecture or
    one never downloaded is named before the sweep starts. An unknown architecture is
    :func:`check_model_files`' error."""
    from harness.models import open_clip_tag_problem, unknown_arch_problem

    m = cfg.model
    pre = m.pretrained
    if m.source != "files" or not pre or written_as_path(pre) or Path(pre).exists():
        return
    if unknown_arch_problem(m.arch) is None:
        problem = open_clip_tag_problem(m.arch, pre, str(cfg.resolved_cache_dir() / "open_clip"))
        if problem:
            raise ConfigError(file, "model.pretrained", problem, pre)


def check_model_contents(cfg: SweepConfig, file: str) -> None:
    """What each model file of a ``files`` sweep holds, read as the run reads it but with nothing
    unpickled, converted or built (safetensors headers, a ``.pt``'s mapped tensors): a pickled
    module (the task_vectors layout), a file that is no checkpoint, a damaged one, a folder that
    is not a Hugging Face CLIP folder, pretrained weights without a text tower. Each is named
    with its field here, by ``validate`` and ``--dry-run`` too, instead of by the sweep once it
    starts loading models. Tensor shapes are :func:`check_checkpoint_shapes`' part."""
    m = cfg.model
    if m.source != "files":
        return
    from harness.checkpoints import whole_clip_problem
    from harness.hf_convert import hf_folder_of
    from harness.models import tensor_shapes

    named = pretrained_file(cfg) + finetuned_files(cfg)
    named += [(f"model.heads.{t}", path, path) for t, path in m.heads.items() if t in cfg.task_names]
    found = Gathering()  # every file's, a line each
    for where, path, whose in named:
        p = Path(path)
        if hf_folder_of(p) is not None or (p.is_dir() and (p / "config.json").is_file()):
            continue  # a Hugging Face folder: its converter reads it (and names what is wrong)
        if p.is_dir():
            found.errors.append(ConfigError(file, where, f"{whose}: a folder that is not a Hugging Face CLIP folder "
                                            "(no config.json); name a checkpoint file", show_value=False))
            continue
        try:
            tensor_shapes(p)
            problem = whole_clip_problem(p) if where == "model.pretrained" else None
        except HarnessError as exc:
            problem = str(exc).removeprefix(f"{p}: ")
        if problem:
            found.errors.append(ConfigError(file, where, f"{whose}: {problem}", show_value=False))
    found.raise_any()


def pretrained_file(cfg: SweepConfig) -> list[tuple[str, str, str]]:
    """The pretrained weights' file where the config names one that exists, as
    :func:`finetuned_files` gives the checkpoints'."""
    m = cfg.model
    return [("model.pretrained", m.pretrained, m.pretrained)] if m.pretrained and Path(m.pretrained).exists() else []


def finetuned_files(cfg: SweepConfig) -> list[tuple[str, str, str]]:
    """Each task's fine-tuned checkpoint the config names and that exists: its field, its path
    and how a message names it (by its task too where a pattern gave it)."""
    named = []
    for t in cfg.task_names:
        where, path = finetuned_field(cfg, t)
        if path is not None and Path(path).exists():
            named.append((where, path, f"checkpoint of task {t!r} ({path})" if where == "model.finetuned_pattern" else path))
    return named


def finetuned_field(cfg: SweepConfig, task: str) -> tuple[str, str | None]:
    """The field that names ``task``'s fine-tuned checkpoint, and the path it gives (None: none)."""
    m = cfg.model
    if task in m.finetuned:
        return f"model.finetuned.{task}", m.finetuned[task]
    return "model.finetuned_pattern", m.finetuned_pattern.format(task=task) if m.finetuned_pattern else None


def encoder_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]] | None:
    """The image encoder's tensor shapes among a file's: all of them in the harness's layout, the
    ones under its single prefix (``visual.`` of a whole CLIP, ``model.visual.``) stripped of it;
    None when there is no one encoder (the run names what is wrong)."""
    if "class_embedding" in shapes:
        return shapes
    prefixes = {k[: -len("class_embedding")] for k in shapes if k.endswith(".class_embedding")}
    if len(prefixes) != 1:
        return None
    (prefix,) = prefixes
    return {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}


def first_shape_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str | None:
    """The first tensor (in ``expected``'s order) both hold with different shapes, else None."""
    return next((k for k, shape in expected.items() if k in found and tuple(found[k]) != tuple(shape)), None)


def _read_as_is(path: Path) -> bool:
    """Whether the run reads ``path``'s tensors under their own names (a safetensors or ``.pt``
    file), so their shapes are checked before any job: not a Hugging Face folder or its weights
    file, which the converter renames."""
    from harness.hf_convert import hf_folder_of

    return path.is_file() and hf_folder_of(path) is None


def check_checkpoint_shapes(cfg: SweepConfig, file: str) -> None:
    """Every fine-tuned checkpoint's tensors have the pretrained image encoder's shapes, read from
    safetensors headers or a ``.pt``'s mapped tensors (nothing unpickled, no tensor's data read,
    whatever the checkpoints' size), so a checkpoint of another architecture or width is named
    with its field before any job runs; so is one missing a tensor, holding one more, or holding
    integer (quantized) tensors, as the run's preflight refuses them. When every fine-tuned
    checkpoint (two or more) differs in shape from the pretrained weights in the same way, the
    pretrained weights are the odd ones out. Hugging Face folders and weights named by an
    open_clip tag are checked by the run's preflight, against the built model."""
    from harness.models import check_encoder_shapes, refuse_integer_weights, tensor_dtypes, tensor_shapes

    m = cfg.model
    pre = Path(m.pretrained) if m.source == "files" and m.pretrained else None
    if pre is None or not _read_as_is(pre):
        return
    try:
        expected = encoder_shapes(tensor_shapes(pre))
    except HarnessError:
        return  # the run names the unreadable file
    if not expected:
        return
    checked, mismatches, faults = 0, [], []
    for where, path, whose in finetuned_files(cfg):
        if not _read_as_is(Path(path)):
            continue
        try:
            held = tensor_shapes(path)
        except HarnessError:
            continue  # check_model_contents names the unreadable file
        found = encoder_shapes(held)
        if found is None and not any(k.endswith("class_embedding") for k in held):
            found = held  # no encoder under a prefix: read as the run reads it, in the harness's layout
        if found is None:
            continue  # several image encoders: the run says what it holds
        checked += 1
        k = first_shape_mismatch(expected, found)
        if k is not None:
            mismatches.append((where, whose, k, tuple(found[k])))
            continue
        try:  # what the run's preflight refuses too, told here from the same header
            check_encoder_shapes(path, found, expected, m.arch, whose)
            refuse_integer_weights(encoder_shapes(tensor_dtypes(path)) or {}, whose)
        except HarnessError as exc:
            faults.append(ConfigError(file, where, str(exc), show_value=False))
    if mismatches:
        where, whose, k, shape = mismatches[0]
        if checked > 1 and len(mismatches) == checked and all((x[2], x[3]) == (k, shape) for x in mismatches):
            raise ConfigError(file, "model.pretrained", f"{pre}: tensor {k!r} of its image encoder has shape "
                              f"{tuple(expected[k])}, every fine-tuned checkpoint has {shape} (weights of another "
                              "architecture or width?)", show_value=False)
        faults = [ConfigError(file, where, f"{whose}: tensor {k!r} has shape {shape}, pretrained has "
                              f"{tuple(expected[k])} (model.pretrained {pre.name}: another architecture or width?)",
                              show_value=False) for where, whose, k, shape in mismatches] + faults
    if faults:
        raise gathered(faults)


def check_pretrained_arch(cfg: SweepConfig, file: str) -> None:
    """The pretrained weights fit ``model.arch``: a whole-CLIP file's tensor names and shapes (a
    safetensors header, a ``.pt``'s mapped tensors) against open_clip's model of that name built
    on the meta device (no memory, no weights), as the run loads it (every tensor, strictly). A
    ViT-B-16 named for ViT-B-32 weights is one line naming ``model.arch`` here, not a failure
    once the sweep builds the model. Hugging Face folders, an encoder without its ``visual.``
    tower and weights named by an open_clip tag are checked when loaded. Weights that were built
    with ``model.arch`` already (the encoder summary a driver reads instead of building the
    model) fit it: open_clip is not imported for them."""
    from harness.models import meta_clip_shapes, tensor_shapes

    m = cfg.model
    pre = Path(m.pretrained) if m.source == "files" and m.pretrained else None
    if pre is None or not _read_as_is(pre):
        return
    try:
        found = tensor_shapes(pre)
    except HarnessError:
        return  # check_model_contents names the unreadable file
    if not any(k.startswith("visual.") for k in found):
        return
    from harness.workspace import cached_encoder_summary, encoder_summary_file, file_identity

    if cached_encoder_summary(encoder_summary_file(cfg.resolved_cache_dir(), m.arch, file_identity(str(pre)))):
        return  # built with these weights before (the summary a driver reads): open_clip stays unimported
    try:
        built = meta_clip_shapes(m.arch, [str(pre)])
    except Exception:  # noqa: BLE001  (an unknown name is check_model_files' error; anything else, the run's)
        return
    where = f"model.pretrained {pre.name}"
    built = dict(sorted(built.items(), key=lambda kv: not kv[0].startswith("visual.")))  # the image tower named first
    k = first_shape_mismatch(built, found)
    if k is not None:
        raise ConfigError(file, "model.arch", f"architecture {m.arch!r} has tensor {k!r} of shape {built[k]}, "
                          f"{where} has {tuple(found[k])} (weights of another architecture or width?)", m.arch)
    missing, unexpected = [k for k in built if k not in found], [k for k in found if k not in built]
    if missing or unexpected:
        parts = ([f"{len(missing)} of its tensors are not in {where} (first {missing[0]!r})"] if missing else []) + (
            [f"{where} has {len(unexpected)} it lacks (first {unexpected[0]!r})"] if unexpected else [])
        raise ConfigError(file, "model.arch", f"architecture {m.arch!r} does not fit the pretrained weights: "
                          f"{'; '.join(parts)} (weights of another architecture or depth?)", m.arch)


def check_folder_arch(cfg: SweepConfig, file: str) -> None:
    """Each Hugging Face folder a ``files`` sweep names converts under ``model.arch`` as the run
    converts it (:func:`harness.hf_convert.check_given_arch`), its sizes read from its config.json
    and its tensors' shapes alone, nothing loaded: a folder of another size or activation is one
    line here, not a failure once the sweep converts it. The pretrained folder's mismatch is
    ``model.arch``'s, a fine-tuned folder's its own field's, as is what else converting a folder
    refuses (a projection of another width, tensors the config does not describe)."""
    m = cfg.model
    if m.source != "files":
        return
    from harness.hf_convert import check_given_arch, folder_open_clip_config, hf_folder_of

    pre = pretrained_file(cfg)
    found = Gathering()  # every folder's, a line each
    arch_blamed = False  # the pretrained folder does not fit model.arch: the others' misfit says no more
    generated = None  # the pretrained folder's config, where model.arch is the name import generates for it
    for where, path, whose in pre + finetuned_files(cfg):
        folder = hf_folder_of(path)
        if folder is None:
            continue
        pretrained = where == "model.pretrained"
        kind = "clip" if pretrained else "image_encoder"
        projection = None if pretrained or not pre else pre[0][1]  # a vision-only folder takes the pretrained one's
        read = False  # a refusal once the folder is read is the architecture's
        try:
            oc_cfg = folder_open_clip_config(folder, kind, projection)
            read = True
            if check_given_arch(m.arch, oc_cfg, kind, folder, projection, generated) and pretrained:
                generated = oc_cfg  # registered once the run converts it: fine-tuned folders are checked against it
        except HarnessError as exc:
            if pretrained and read:
                found.errors.append(ConfigError(file, "model.arch", str(exc), m.arch))
                arch_blamed = True
            elif not (arch_blamed and read):
                found.errors.append(ConfigError(file, where, f"{whose}: {str(exc).removeprefix(f'{folder}: ')}",
                                                show_value=False))
    found.raise_any()


def check_recorded_arch(cfg: SweepConfig, file: str) -> None:
    """Each converted checkpoint was converted for an architecture that computes as ``model.arch``
    does. GELU and QuickGELU towers (or towers with another head count) hold the same tensors, so
    the shape checks pass and every score would silently come from another activation. The
    architecture is the one ``harness import`` / ``harness convert`` recorded (sidecar, header)."""
    m = cfg.model
    if m.source != "files":
        return
    from harness.convert import recorded_arch

    want: _Tower | None = None
    found = Gathering()  # every file's, a line each
    for where, path in [("model.pretrained", m.pretrained)] + [finetuned_field(cfg, t) for t in cfg.task_names]:
        if not path or not Path(path).is_file():
            continue
        try:
            got = recorded_arch(Path(path))
        except HarnessError:
            continue  # check_model_contents names the unreadable file
        if got is None or got == m.arch:
            continue
        want = want or _image_tower(m.arch, [m.pretrained] if m.pretrained else [])
        have = _image_tower(got, [path])
        if want is None or have is None or have == want:
            continue
        if have.size != want.size:  # other tensors, not the same ones computing differently
            found.errors.append(ConfigError(
                file, where, f"{path} was converted for architecture {got!r} (image tower {have.size_text()}), but "
                f"model.arch {m.arch!r} is {want.size_text()}: a checkpoint of another architecture; set model.arch: "
                f"{got}, or give checkpoints of {m.arch}", show_value=False))
        else:
            found.errors.append(ConfigError(
                file, where, f"{path} was converted for architecture {got!r} ({have.computation_text()}), but "
                f"model.arch {m.arch!r} is {want.computation_text()}: the same tensors compute differently; set "
                f"model.arch: {got}, or convert the source again with --arch {m.arch}", show_value=False))
    found.raise_any()


def check_model_reading(cfg: SweepConfig, file: str) -> None:
    """What the model files hold (contents, tensor shapes, architecture), every file's fault a
    line, told together. Pretrained weights already found at fault (unreadable, without a text
    tower, the odd ones out of every checkpoint) are not then compared with ``model.arch``: that
    line would blame the architecture for the weights' own fault."""
    found = Gathering()
    for check in (check_model_contents, check_checkpoint_shapes, check_pretrained_arch, check_folder_arch,
                  check_recorded_arch):
        if check is check_pretrained_arch and any(line.path == "model.pretrained" for error in found.errors
                                                  for line in (error, *error.further)):
            continue
        with found.check():
            check(cfg, file)
    found.raise_any()


class _Tower(NamedTuple):
    """An architecture's image tower as :func:`check_recorded_arch` compares two: its size, which
    its tensors' shapes show, and its activation and head count, which they do not."""

    quick_gelu: bool
    heads: int | None
    size: tuple[int | None, int | None, int | None]  # width, layers, patch size

    def size_text(self) -> str:
        width, layers, patch = self.size
        return f"width {width}, {layers} layers, patch {patch}"

    def computation_text(self) -> str:
        return f"{'QuickGELU' if self.quick_gelu else 'GELU'}, {self.heads} attention heads"


def _image_tower(arch: str, near: list[str]) -> _Tower | None:
    """``arch``'s image tower; None when the architecture is not known here."""
    from harness.models import open_clip_module, resolve_arch

    try:
        resolve_arch(arch, near)
    except HarnessError:
        return None
    config = open_clip_module().get_model_config(arch) or {}
    vision = config.get("vision_cfg") or {}
    width, head_width = vision.get("width"), vision.get("head_width", 64)
    return _Tower(bool(config.get("quick_gelu", False)), (width // head_width if width and head_width else None),
                  (width, vision.get("layers"), vision.get("patch_size")))


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
            raise ConfigError(file, f"methods.{i}.tune.storage", problem, m.tune.storage)


#: Seconds a database server storage has to answer a connection (:func:`database_problem`).
CONNECT_TIMEOUT_S = 10
#: Each driver's keyword for its connection timeout (an unknown driver waits as it does).
_TIMEOUT_KEYWORDS = {"psycopg2": "connect_timeout", "psycopg": "connect_timeout", "pymysql": "connect_timeout",
                     "mysqldb": "connect_timeout", "mariadbconnector": "connect_timeout", "pg8000": "timeout",
                     "mysqlconnector": "connection_timeout"}


def database_problem(spec: str) -> str | None:
    """Why the database server of storage ``spec`` (a URL whose driver is installed) takes no
    connection, in the driver's words, or None; SQLite is a file (:func:`storage_file_problem`).
    Without it a server that is down or refuses the login passed ``validate`` and failed the sweep."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    url = make_url(spec)
    if url.get_backend_name() == "sqlite":
        return None
    keyword = _TIMEOUT_KEYWORDS.get(url.get_driver_name())
    engine = create_engine(url, poolclass=NullPool, connect_args={keyword: CONNECT_TIMEOUT_S} if keyword else {})
    try:
        with engine.connect():
            return None
    except Exception as exc:  # noqa: BLE001  (each driver raises its own errors; SQLAlchemy wraps most)
        words = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return f"cannot connect: {words[0] if words else type(exc).__name__}"
    finally:
        engine.dispose()


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
