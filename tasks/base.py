"""The task interface and registry (lm-evaluation-harness style: tasks by name)."""

from __future__ import annotations

import functools
import hashlib
import inspect
import typing
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils.data import Dataset, TensorDataset

from harness.errors import HarnessError, did_you_mean
from harness.evaluation import label_outside
from harness.imports import defined_as, import_object

SPLITS = ("train", "val", "test")

# CLIP's normalisation; the embedded suite feeds images through the same statistics.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TaskDataError(HarnessError, ValueError):
    """A task's data is unusable (missing folder, empty split, class mismatch)."""


class Task(ABC):
    """One classification task: splits, class names and zero-shot text templates.

    ``dataset(split)`` returns a torch Dataset of ``(image, label)`` where ``image`` is a
    float tensor ``[3, H, W]`` already preprocessed for the model. Small in-memory tasks
    return a :class:`TensorDataset` so evaluation can slice batches without a DataLoader.
    """

    name: str
    classnames: Sequence[str]
    templates: Sequence[str]  # format strings with one "{}" for the class name

    @abstractmethod
    def dataset(self, split: str) -> Dataset: ...

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def identity(self) -> dict[str, Any]:
        """What determines this task's data; part of every cache key that uses it."""
        return {"name": self.name, "classes": list(self.classnames)}

    def prompts(self) -> list[list[str]]:
        return [[t.format(c) for t in self.templates] for c in self.classnames]


class InMemoryTask(Task):
    """A task whose splits are uint8 image tensors ``[N, H, W, 3]`` and int labels."""

    def __init__(
        self,
        name: str,
        classnames: Sequence[str],
        templates: Sequence[str],
        splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
        version: str = "",
    ):
        for what, value in (("classnames", classnames), ("templates", templates)):
            if isinstance(value, str):  # list() would take it letter by letter
                raise TaskDataError(f"task {name!r}: {what} is the string {value!r}, not a list of them")
        self.name = name
        self.classnames = list(classnames)
        self.templates = list(templates)
        self._splits = {split: _checked_split(name, split, images, labels, len(self.classnames))
                        for split, (images, labels) in splits.items()}
        missing = [split for split in ("val", "test") if split not in splits]
        if missing:
            raise TaskDataError(f"task {name!r}: no {' and no '.join(repr(m) for m in missing)} split "
                                f"(it has {sorted(splits)}); every task is evaluated on 'val' and 'test'")
        self._normalized: dict[str, TensorDataset] = {}
        self.version = version
        self._content_digest: str | None = None

    def raw(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._splits:
            raise TaskDataError(f"task {self.name!r} has no split {split!r}")
        return self._splits[split]

    def dataset(self, split: str) -> TensorDataset:
        """Normalised once per split and kept: every job of a sweep evaluates the same splits."""
        if split not in self._normalized:
            images, labels = self.raw(split)
            self._normalized[split] = TensorDataset(normalize_uint8(images), labels.long())
        return self._normalized[split]

    def identity(self) -> dict[str, Any]:
        """``version`` when the task's maker declares one; else a digest of every split's images
        and labels, so a task built in code with other data never reuses cached results."""
        if self.version:
            return {**super().identity(), "version": self.version}
        if self._content_digest is None:
            self._content_digest = tensors_digest(t for split in sorted(self._splits) for t in self._splits[split])
        return {**super().identity(), "content": self._content_digest}


def _checked_split(name: str, split: str, images: torch.Tensor, labels: torch.Tensor,
                   num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as :class:`InMemoryTask` keeps it: uint8 ``[N, H, W, 3]`` (grayscale ``[N, H, W]``
    or ``[N, H, W, 1]`` repeated into three channels) and one label per image within the class
    names. Float images would be divided by 255 once more and score a dark copy silently."""
    where = f"task {name!r}: split {split!r}"
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TaskDataError(f"{where}: images are {got}; give uint8 pixels (0..255) [N, H, W, 3]")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise TaskDataError(f"{where}: images have shape {list(images.shape)}; give [N, H, W, 3] (channels last) "
                            "or grayscale [N, H, W]")
    if images.shape[-1] == 1:
        images = images.expand(-1, -1, -1, 3).contiguous()
    if len(images) == 0:
        raise TaskDataError(f"{where} is empty")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or len(labels) != len(images):
        raise TaskDataError(f"{where}: {len(images)} images but labels of shape {list(labels.shape)}")
    check_labels(labels, num_classes, where)
    return images, labels


def check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Integer labels within ``[0, num_classes)``: a label no class name covers is never
    predicted, so it would lower the accuracy silently instead of failing (and a fractional one
    would be truncated into another class)."""
    if labels.is_floating_point() and len(labels) and not bool((labels == labels.round()).all()):
        fraction = labels[labels != labels.round()][0].item()  # .long() would truncate it into a class
        raise TaskDataError(f"{where}: label {fraction} is not a class index (labels are whole numbers "
                            f"0..{num_classes - 1})")
    bad = label_outside(labels, num_classes)
    if bad is not None:
        raise TaskDataError(f"{where}: label {bad} is outside the {num_classes} class names (0..{num_classes - 1})")


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """A digest of tensors' dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> CLIP-normalised float ``[N, 3, H, W]``."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


TaskFactory = Callable[..., Task]
_TASKS: dict[str, tuple[TaskFactory, str]] = {}


def register_task(name: str, description: str = "") -> Callable[[TaskFactory], TaskFactory]:
    """Decorator for a factory ``f(**options) -> Task`` (options come from the YAML). Another
    factory under a taken name is refused; the same factory defined again (its module reloaded
    after an edit) replaces the old one, whose code is not the one to run any more."""

    def deco(factory: TaskFactory) -> TaskFactory:
        old = _TASKS[name][0] if name in _TASKS else None
        if old is not None and old is not factory and defined_as(old) != defined_as(factory):
            raise ValueError(f"task name {name!r} is already registered by {'.'.join(defined_as(old))}")
        _TASKS[name] = (factory, description or (factory.__doc__ or "").strip().split("\n")[0])
        return factory

    return deco


def available_tasks() -> dict[str, str]:
    import tasks  # noqa: F401  (importing the package registers the built-in tasks)

    return {k: v[1] for k, v in sorted(_TASKS.items())}


def resolve_task(name: str) -> TaskFactory:
    """A registered task name or an import path ``pkg.module:factory``."""
    if ":" in name:
        return import_object(name)
    available_tasks()
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}{did_you_mean(name, _TASKS)}; registered: {', '.join(sorted(_TASKS))}")
    return _TASKS[name][0]


def options_taker(factory: TaskFactory) -> Callable[..., Any]:
    """What takes ``factory``'s options: the factory itself, or, for one taking ``**options`` to pass
    them on (the toy tasks'), what it passes them to, named ``takes_options_of``."""
    return getattr(factory, "takes_options_of", factory)


def option_signature(factory: TaskFactory) -> inspect.Signature:
    """The options ``factory`` takes (:func:`options_taker`'s signature): so an option it does not
    take is refused before the task is made, as ``validate`` must."""
    return inspect.signature(options_taker(factory))


def option_type_problem(factory: TaskFactory, key: str, value: Any) -> str | None:
    """Why ``value`` does not fit the annotation (type and bounds) of ``factory``'s option ``key``,
    None when it does or there is none. Strict (``'40'`` is no count): the factory gets the value
    as the sweep gives it, so a value it would have to convert is its failure, not validate's."""
    from pydantic import TypeAdapter, ValidationError

    target = options_taker(factory)
    target = target.func if isinstance(target, functools.partial) else target
    try:
        hint = typing.get_type_hints(target, include_extras=True).get(key)
    except Exception:  # noqa: BLE001  (an annotation that does not resolve checks nothing)
        return None
    if hint is None:
        return None
    try:
        TypeAdapter(hint).validate_python(value, strict=True)
    except ValidationError as exc:
        return exc.errors()[0]["msg"]
    return None


def build_task(name: str, **options: Any) -> Task:
    return resolve_task(name)(**options)
