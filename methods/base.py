"""The one base class every merge method subclasses, and the method registry.

A method is data in, model out: it receives the pretrained image encoder, the fine-tuned
encoders by task name and a :class:`MergeContext` (heads, unlabeled test batches, device,
progress) and returns an image encoder. Hyperparameters are pydantic fields on the class,
so YAML, the CLI and Optuna validate and fill them the same way.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Literal, Mapping, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from harness.errors import did_you_mean
from harness.fields import no_bool_for_number
from harness.imports import defined_as, import_module, import_object

StateDict = dict[str, torch.Tensor]


class PruneTrial(Exception):
    """Raised by a method when its ``report`` callback asks it to stop (a pruned trial)."""


@dataclass
class MergeContext:
    """Everything a method may use besides the models themselves.

    ``unlabeled[task]()`` returns a fresh, endless iterator of image batches (no labels) from
    that task's test split, reshuffled at each pass: the data test-time-adaptation methods adapt
    on (take a number of batches, ``itertools.islice``: ``list()`` of it never returns; its
    ``skip(n)`` passes batches without reading them). ``heads[task]`` is
    the frozen classification head (a ``[classes, dim]`` weight, logit scale folded in).
    ``device`` is where the job computes (the models given may still lie on the CPU); ``seed``
    is the sweep's, set by ``torch.manual_seed`` before ``merge``. ``progress`` shows a
    method's progress (falsy when nothing is shown: ``-q``, worker processes).
    ``report(step, metrics)`` lets a long method publish intermediate validation results;
    it returns True when the caller wants the method to stop early (raise PruneTrial).
    ``validate(model)`` evaluates a candidate encoder on the validation splits.
    ``workdir`` is a job-private folder for checkpoints a method wants to resume from.
    ``sources`` says where the models came from (architecture, checkpoint paths and their
    content digests), for a method that saves its result to record what it was built from.
    ``adapted_on`` says what ``unlabeled`` yields (the split and, in a robustness study that
    adapts per corruption, the corruption, its severity and seed), so that an adapted model or
    adaptation checkpoint saved in ``workdir`` records the data it was adapted on.
    ``artifacts`` is returned with the job and saved in its result file as JSON.
    ``precision`` is the sweep's ``eval.precision``: a method's own forward passes (test-time
    adaptation) run under ``with ctx.autocast():``, its parameters, merged weights and losses in
    float32 (:func:`methods.tta.run_tta` does this for the adaptation loop).
    """

    heads: Mapping[str, torch.Tensor] = field(default_factory=dict)
    unlabeled: Mapping[str, Callable[[], Iterator[torch.Tensor]]] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    progress: Callable[..., Any] | None = None
    report: Callable[[int, dict[str, float]], bool] | None = None
    validate: Callable[[nn.Module], dict[str, float]] | None = None
    workdir: str | None = None
    sources: Mapping[str, Any] = field(default_factory=dict)
    adapted_on: Mapping[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of a forward pass at ``precision`` on ``device`` (fp32: none)."""
        from harness.precision import autocast

        return autocast(self.precision, self.device)


class MergeMethod(BaseModel):
    """Base class of merge methods: typed hyperparameters as fields, one ``merge`` method.

    Subclasses declare hyperparameters as annotated fields (with ``pydantic.Field`` bounds)
    and register themselves with :func:`register_method`. Instances are immutable: one
    instance is one hyperparameter setting.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    _no_bool_for_number = field_validator("*", mode="before")(classmethod(no_bool_for_number))

    #: True for methods that read unlabeled test data (reported as test-time adaptation).
    uses_test_data: ClassVar[bool] = False
    #: False for methods whose result cannot depend on the sweep's seed (they draw nothing): their
    #: job keys hold the default seed, so a reseeded sweep finds their results cached. Only a
    #: class's own declaration counts (:meth:`key_holds_seed`).
    seeded: ClassVar[bool] = True
    #: Hyperparameters that change how a merge runs, never what it returns (a checkpoint
    #: interval, a kernel with the same outputs up to rounding): job keys hold them at their
    #: defaults, so changing one finds the cached result instead of running the job again.
    runtime_only: ClassVar[frozenset[str]] = frozenset()
    #: Hyperparameters added to the method after results were cached: at their defaults job
    #: keys leave them out, so those results stay cached (at their defaults they change nothing).
    added_hyperparameters: ClassVar[frozenset[str]] = frozenset()
    #: False for methods whose merged model has tensors the architecture has not (WeMoE's routed
    #: MLPs): `harness export` refuses them before merging (or adapting) again.
    plain_encoder: ClassVar[bool] = True

    def merge(
        self,
        pretrained: nn.Module,
        finetuned: Mapping[str, nn.Module],
        ctx: MergeContext,
    ) -> nn.Module:
        raise NotImplementedError

    def batch_dependent(self) -> bool:
        """Whether the merged model scores an image differently with other images beside it in
        its batch (statistics taken over the batch): its jobs' keys then hold the evaluation
        batch size, which otherwise changes only the speed."""
        return False

    @classmethod
    def key_holds_seed(cls) -> bool:
        """Whether this class's job keys hold the sweep's seed. ``seeded = False`` counts only
        where the class itself declares it: a subclass may draw what its parent did not (random
        init, dropout), and a result cached at one seed must not stand for another unless the
        subclass says so too. Wrongly rerunning costs time; wrongly caching gives a wrong row."""
        return bool(cls.__dict__.get("seeded", True))

    def key_params(self) -> dict[str, Any]:
        """Every hyperparameter as a job key sees it (:meth:`as_key`)."""
        return self.as_key(self.model_dump(mode="json"))

    @classmethod
    def as_key(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Dumped hyperparameters as a job key sees them: ``runtime_only`` ones at their
        defaults, ``added_hyperparameters`` left out at their defaults."""
        params = dict(params)
        for name in cls.runtime_only:
            params[name] = cls.model_fields[name].default
        for name in cls.added_hyperparameters:
            if name in params and params[name] == cls.model_fields[name].default:
                del params[name]
        return params

    @classmethod
    def hyperparameters(cls) -> list[dict[str, Any]]:
        """name, type, default, range and description of every hyperparameter (``harness list``)."""
        rows = []
        for name, info in cls.model_fields.items():
            # A field without a default (a sweep must give it) has none to show, not pydantic's
            # PydanticUndefined; one with a default_factory has the value the factory makes.
            required = info.is_required()
            default = None if required else info.get_default(call_default_factory=True)
            rows.append({"name": name, "type": _type_name(info.annotation), "default": default, "required": required,
                         "range": _bounds(info.metadata), "description": info.description or ""})
        return rows


def _type_name(ann: Any) -> str:
    if get_origin(ann) is Literal:
        return "|".join(str(a) for a in get_args(ann))
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def _bounds(metadata: list[Any]) -> str:
    lo = hi = None
    for m in metadata:
        for attr, side, bracket in (("ge", "lo", "["), ("gt", "lo", "("), ("le", "hi", "]"), ("lt", "hi", ")")):
            value = getattr(m, attr, None)
            if value is not None:
                if side == "lo":
                    lo = f"{bracket}{value}"
                else:
                    hi = f"{value}{bracket}"
    if lo is None and hi is None:
        return ""
    return f"{lo or '(-inf'}, {hi or 'inf)'}"


_METHODS: dict[str, type[MergeMethod]] = {}


def register_method(name: str) -> Callable[[type[MergeMethod]], type[MergeMethod]]:
    """Class decorator: make a method available in YAML under ``name``. Another class under a
    taken name is refused; the same class defined again (its module reloaded after an edit)
    replaces the old one, whose code is not the one to run any more."""

    def deco(cls: type[MergeMethod]) -> type[MergeMethod]:
        if not (isinstance(cls, type) and issubclass(cls, MergeMethod)):
            raise TypeError(f"{cls!r} is not a MergeMethod subclass")
        old = _METHODS.get(name)
        if old is not None and old is not cls and defined_as(old) != defined_as(cls):
            raise ValueError(f"method name {name!r} is already registered by {old!r}")
        _METHODS[name] = cls
        cls.registered_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def available_methods() -> dict[str, type[MergeMethod]]:
    import methods  # noqa: F401  (importing the package registers the built-in methods)

    return dict(sorted(_METHODS.items()))


def resolve_method(name: str) -> type[MergeMethod]:
    """A registered name (``ties``) or an import path (``my_pkg.module:MyMethod``)."""
    if ":" in name:
        cls = import_object(name)
        if not (isinstance(cls, type) and issubclass(cls, MergeMethod)):
            raise KeyError(f"{name!r} is not a MergeMethod subclass")
        from harness.plan import method_source_digest

        method_source_digest(cls)  # pinned now, as imported: later edits of the file are not this code
        return cls
    registry = available_methods()
    if name not in registry:
        raise KeyError(f"unknown method {name!r}{did_you_mean(name, registry)} (registered: {', '.join(registry)}; "
                       "a method of your own is named by import path, module:Class)")
    return registry[name]


def methods_named(name: str) -> dict[str, type[MergeMethod]]:
    """What ``harness list methods NAME`` shows: a registered name or ``module:Class`` (that
    method), or a module (every method class it defines, as a sweep names it: ``module:Class``)."""
    registry = available_methods()
    if ":" in name or name in registry:
        return {name: resolve_method(name)}
    try:
        module = import_module(name)
    except KeyError as exc:
        if not str(exc.args[0]).startswith("cannot import"):
            raise
        raise KeyError(f"{name!r} is neither a method (registered: {', '.join(registry)}) nor a module "
                       f"({exc.args[0]}){did_you_mean(name, registry)}") from None
    found = {f"{name}:{obj.__qualname__}": obj for obj in vars(module).values()
             if isinstance(obj, type) and issubclass(obj, MergeMethod) and obj.__module__ == module.__name__
             and obj.merge is not MergeMethod.merge}
    if not found:
        raise KeyError(f"module {name!r} ({getattr(module, '__file__', None) or 'built in'}) defines no "
                       "MergeMethod subclass with a merge()")
    return found


# ---------------------------------------------------------------------------------------
# State-dict helpers shared by the weight-space methods.


def float_state(module: nn.Module) -> StateDict:
    """The module's floating-point tensors (detached), the ones merges operate on."""
    return {k: v.detach() for k, v in module.state_dict().items() if v.is_floating_point()}


def checked_float_states(base: StateDict, finetuned: Mapping[str, nn.Module]) -> dict[str, StateDict]:
    """Each fine-tuned model's :func:`float_state` (views, no copies), checked against ``base``'s
    keys and shapes."""
    states = {task: float_state(model) for task, model in finetuned.items()}
    for task, sd in states.items():
        check_same_keys(base, sd, task)
    return states


def task_vectors(pretrained: nn.Module, finetuned: Mapping[str, nn.Module]) -> dict[str, StateDict]:
    """tau_t = theta_t - theta_0 (float32: a half model's difference is not rounded to half) for
    every floating-point tensor, checked for matching shapes."""
    base = float_state(pretrained)
    return {task: {k: sd[k].float() - base[k].float() for k in base}
            for task, sd in checked_float_states(base, finetuned).items()}


def check_same_keys(base: StateDict, other: StateDict, name: str) -> None:
    missing = [k for k in base if k not in other]
    extra = [k for k in other if k not in base]
    if missing or extra:
        raise ValueError(
            f"checkpoint {name!r} does not match the pretrained model: "
            f"missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for k, v in base.items():
        if other[k].shape != v.shape:
            raise ValueError(
                f"checkpoint {name!r}: tensor {k!r} has shape {tuple(other[k].shape)}, "
                f"pretrained has {tuple(v.shape)}"
            )


def with_state(template: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``template`` with the given tensors loaded (others kept)."""
    model = copy.deepcopy(template)
    current = model.state_dict()
    current.update({k: v.to(current[k].dtype) for k, v in state.items()})
    model.load_state_dict(current)
    return model
