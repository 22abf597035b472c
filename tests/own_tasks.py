"""Task factories of one's own with the mistakes a researcher makes (tests/test_own_tasks.py)."""

from __future__ import annotations

from torch.utils.data import Dataset, TensorDataset

from tasks.base import InMemoryTask, Task, normalize_uint8
from tasks.synthetic import make_toy_task


class PlainTask(Task):
    """A Task subclass (not InMemoryTask) serving the toy stripes data, labels shifted by ``shift``."""

    def __init__(self, name: str, classnames: list[str], image_size: int = 16, shift: int = 0,
                 empty: str | None = None, templates: tuple[str, ...] = ("a photo of {}.",), raw: bool = False):
        toy = make_toy_task("toy_stripes", image_size=image_size)
        self.name, self.classnames, self.templates = name, classnames, list(templates)
        self._data = {s: toy.raw(s) for s in ("train", "val", "test")}
        self._shift, self._empty, self._raw = shift, empty, raw

    def dataset(self, split: str) -> Dataset:
        images, labels = self._data[split]
        if split == self._empty:
            images, labels = images[:0], labels[:0]
        pixels = images.permute(0, 3, 1, 2).contiguous() if self._raw else normalize_uint8(images)
        return TensorDataset(pixels, labels.long() + self._shift)


def returns_tuple():
    return ("mine", ["a", "b"], ["{}"])


def other_size() -> Task:
    return PlainTask("mine", [f"c{i}" for i in range(4)], image_size=32)


def uint8_pixels() -> Task:
    """Images of the right size as uint8 pixels, not normalised floats."""
    return PlainTask("mine", [f"c{i}" for i in range(4)], raw=True)


def no_classes() -> Task:
    """A task whose class names came out empty (a folder listing that found nothing)."""
    return PlainTask("mine", [])


def labels_above_classes() -> Task:
    return PlainTask("mine", ["c0", "c1", "c2"])


def negative_labels() -> Task:
    return PlainTask("mine", [f"c{i}" for i in range(4)], shift=-1)


def empty_test() -> Task:
    return PlainTask("mine", [f"c{i}" for i in range(4)], empty="test")


def template_without_class() -> Task:
    return PlainTask("mine", [f"c{i}" for i in range(4)], templates=("a photo of {}.", "a photo."))


def no_val_in_memory() -> InMemoryTask:
    """The toy stripes task without a val split, made under a name of its own."""
    toy = make_toy_task("toy_stripes")
    return InMemoryTask("mine", toy.classnames, toy.templates, {s: toy.raw(s) for s in ("train", "test")})


def grayscale() -> InMemoryTask:
    """The toy stripes task's images as one channel ``[N, H, W]``."""
    toy = make_toy_task("toy_stripes")
    splits = {s: (toy.raw(s)[0][..., 0].contiguous(), toy.raw(s)[1]) for s in ("train", "val", "test")}
    return InMemoryTask("mine_gray", toy.classnames, toy.templates, splits)


def from_folder(data_root: str) -> Task:
    """A factory that reads its data from a folder (here: ignores it) and whose identity does not
    name it, as a researcher's first task class would."""
    return PlainTask("mine", [f"c{i}" for i in range(4)])


def sized_by_default(image_size: int = 16) -> Task:
    """A factory taking the encoder's input size, with a default it is made at before any model."""
    return PlainTask("mine_sized", [f"c{i}" for i in range(4)], image_size=image_size, empty="val")


def sized_without_default(image_size: int) -> Task:
    """A factory that must be given the encoder's input size: no task before a model is built."""
    return PlainTask("mine_unsized", [f"c{i}" for i in range(4)], image_size=image_size)


def shifted_labels(shift: int = 0) -> Task:
    """Labels shifted by an option the task's identity does not name (name and classes only)."""
    return PlainTask("mine", [f"c{i}" for i in range(5)], shift=shift)


def reads_a_missing_file(path: str = "/nonexistent/harness-own-task/data.npz") -> Task:
    """A factory whose data file is not there: the error is its own, raised on its line."""
    with open(path, "rb"):
        pass
    return PlainTask("mine", ["c0"])  # pragma: no cover


def slips_a_keyword() -> Task:
    """A factory whose own code calls InMemoryTask with a misspelt keyword (no option is wrong)."""
    toy = make_toy_task("toy_stripes")
    return InMemoryTask("mine", toy.classnames, toy.templates, {s: toy.raw(s) for s in ("val", "test")}, vrsion="1")


class ForgetsItsTemplates(Task):
    """A Task subclass that sets its name and class names but forgot its templates."""

    def __init__(self):
        self.name, self.classnames = "mine", [f"c{i}" for i in range(4)]

    def dataset(self, split: str) -> Dataset:
        return PlainTask("mine", self.classnames).dataset(split)


def one_template_as_a_string() -> Task:
    """A task whose templates are one string, which list() would take letter by letter."""
    task = PlainTask("mine", [f"c{i}" for i in range(4)])
    task.templates = "a photo of a {}."
    return task
