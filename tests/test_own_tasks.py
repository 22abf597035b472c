"""A task of one's own: a factory, its splits, labels and templates are checked before any job,
so a mistake is one line naming the task (exit 2, nothing written), never a wrong score."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn
from torch.utils.data import Dataset

from harness.cli import main
from harness.evaluation import correct_predictions
from tasks.base import CLIP_MEAN, CLIP_STD, InMemoryTask, TaskDataError


def _run(tmp_path, sweep_dict, factory: str, command: str = "sweep"):
    d = copy.deepcopy(sweep_dict)
    name = f"tests.own_tasks:{factory}"
    d["tasks"] = [*d["tasks"], name]
    d["model"]["finetuned"] = {name: d["model"]["finetuned_pattern"].format(task="toy_colours")}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, [command, str(f)] if command == "validate" else [command, "-q", str(f)])
    return r.exit_code, " ".join(r.stderr.split()), str(f)


def test_a_factory_that_returns_no_task_names_the_field(sweep_dict, tmp_path):
    code, err, file = _run(tmp_path, sweep_dict, "returns_tuple")
    assert code == 2, err
    assert err == (f"error: {file}: tasks.2: the factory returned a builtins.tuple, not a tasks.base.Task "
                   "(got 'tests.own_tasks:returns_tuple')")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("factory, fragment", [
    ("other_size", "split 'val' gives images as a torch.float32 tensor of shape [3, 32, 32], but the image "
                   "encoder of harness-micro-vit takes float tensors of shape [3, 16, 16]"),
    ("uint8_pixels", "split 'val' gives images as a torch.uint8 tensor of shape [3, 16, 16], but the image "
                     "encoder of harness-micro-vit takes float tensors of shape [3, 16, 16]"),
    ("no_classes", "no class names"),
    ("labels_above_classes", "split 'val': label 3 is outside the 3 class names (0..2)"),
    ("negative_labels", "split 'val': label -1 is outside the 4 class names (0..3)"),
    ("empty_test", "split 'test' is empty"),
    ("template_without_class", "prompt template 'a photo.' has no {} for the class name"),
])
def test_bad_data_of_a_task_is_one_error_before_any_job(factory, fragment, sweep_dict, tmp_path):
    code, err, _ = _run(tmp_path, sweep_dict, factory)
    assert code == 2, err
    assert "task 'tests.own_tasks:" + factory + "': " + fragment in err or f"task 'mine': {fragment}" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["sweep", "validate"])
def test_a_bad_template_names_the_task_as_the_sweep_names_it(command, sweep_dict, tmp_path):
    """The sweep file names the task by its factory's import path; the factory named its task
    'mine'. The template's error names the entry to fix, as the other checks of a task do."""
    code, err, _ = _run(tmp_path, sweep_dict, "template_without_class", command=command)
    assert code == 2, err
    assert ("task 'tests.own_tasks:template_without_class': prompt template 'a photo.' has no {} for the class "
            "name") in err, err


@pytest.mark.parametrize("factory, fragment", [
    ("returns_tuple", "tasks.2: the factory returned a builtins.tuple, not a tasks.base.Task"),
    ("no_classes", "task 'tests.own_tasks:no_classes': no class names"),
    ("labels_above_classes", "task 'tests.own_tasks:labels_above_classes': split 'val': label 3 is outside the 3 class names (0..2)"),
    ("empty_test", "task 'tests.own_tasks:empty_test': split 'test' is empty"),
    ("template_without_class", "task 'tests.own_tasks:template_without_class': prompt template 'a photo.' has no {} "
                               "for the class name"),
])
def test_validate_refuses_the_data_of_a_task_the_sweep_refuses(factory, fragment, sweep_dict, tmp_path):
    """``validate`` saying ``valid`` for a task the sweep then refuses sends a researcher to the
    cluster with a sweep that cannot start."""
    code, err, file = _run(tmp_path, sweep_dict, factory, command="validate")
    assert code == 2, err
    assert fragment in err, err
    assert "valid" not in err.split(fragment)[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["sweep", "validate"])
@pytest.mark.parametrize("factory, words", [
    ("no_classes", "no class names"),
    ("labels_above_classes", "split 'val': label 3 is outside the 3 class names (0..2)"),
    ("empty_test", "split 'test' is empty"),
    ("template_without_class", "prompt template 'a photo.' has no {} for the class name"),
])
def test_bad_data_of_a_task_names_the_file_and_the_entry(command, factory, words, sweep_dict, tmp_path):
    """These lines named the task alone, neither the sweep file nor the entry to fix, unlike the
    task's other errors (its factory's, its images')."""
    code, err, file = _run(tmp_path, sweep_dict, factory, command=command)
    assert code == 2, err
    assert err == (f"error: {file}: tasks.2: task 'tests.own_tasks:{factory}': {words} "
                   f"(got 'tests.own_tasks:{factory}')"), err
    assert not (tmp_path / "out").exists()


_MICRO_SIZE = "but the image encoder of harness-micro-vit takes float tensors of shape [3, 16, 16]"


@pytest.mark.parametrize("command", ["sweep", "validate"])
def test_images_of_another_size_name_the_file_and_the_entry(command, sweep_dict, tmp_path):
    """A task's images of another size than the model's were one line naming neither the file
    nor the entry, and validate, before the model was ever built, said ``valid`` for them."""
    code, err, file = _run(tmp_path, sweep_dict, "other_size", command=command)
    assert code == 2, err
    assert err == (f"error: {file}: tasks.2: task 'tests.own_tasks:other_size': split 'val' gives images as a "
                   f"torch.float32 tensor of shape [3, 32, 32], {_MICRO_SIZE} (resize them in the task) "
                   "(got 'tests.own_tasks:other_size')"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["sweep", "-q"], ["sweep", "--dry-run"], ["validate"]])
def test_an_image_size_option_of_another_size_is_named_as_the_option(command, sweep_dict, tmp_path):
    d = copy.deepcopy(sweep_dict)
    d["tasks"] = [d["tasks"][0], {"name": "toy_colours", "options": {"image_size": 20}}]
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, [*command, str(f)])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2, r.output
    assert err == (f"error: {f}: tasks.1.options.image_size: task 'toy_colours': split 'val' gives images as a "
                   f"torch.float32 tensor of shape [3, 20, 20], {_MICRO_SIZE} (give the encoder's size, or leave "
                   "image_size out) (got 20)"), err


def test_validate_accepts_a_sound_task_of_ones_own(sweep_dict, tmp_path):
    code, err, _ = _run(tmp_path, sweep_dict, "grayscale", command="validate")
    assert code == 0, err


def _splits(images: torch.Tensor, labels: torch.Tensor) -> dict:
    return {s: (images, labels) for s in ("train", "val", "test")}


@pytest.mark.parametrize("images, fragment", [
    (torch.rand(4, 8, 8, 3), "images are torch.float32; give uint8 pixels (0..255) [N, H, W, 3]"),
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), "images have shape [4, 3, 8, 8]; give [N, H, W, 3]"),
])
def test_in_memory_images_must_be_uint8_channels_last(images, fragment):
    with pytest.raises(TaskDataError, match="split 'train': " + fragment.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        InMemoryTask("mine", ["a", "b"], ["{}"], _splits(images, torch.tensor([0, 1, 0, 1])))


def test_in_memory_fractional_labels_are_refused_whole_float_labels_kept():
    """A label 1.5 was truncated to class 1 by the dataset's .long(): scored as class 1 silently."""
    images = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(TaskDataError, match=r"split 'train': label 1.5 is not a class index \(labels are whole "
                                            r"numbers 0..1\)"):
        InMemoryTask("mine", ["a", "b"], ["{}"], _splits(images, torch.tensor([0.0, 1.5, 0.0, 1.0])))
    task = InMemoryTask("mine", ["a", "b"], ["{}"], _splits(images, torch.tensor([0.0, 1.0, 0.0, 1.0])))
    assert task.dataset("test").tensors[1].tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("split", ["val", "test"])
def test_in_memory_task_without_a_val_or_test_split_is_refused(split):
    s = _splits(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.tensor([0, 1]))
    del s[split]
    with pytest.raises(TaskDataError, match=f"task 'mine': no '{split}' split"):
        InMemoryTask("mine", ["a", "b"], ["{}"], s)


def test_grayscale_images_are_scored_as_gray_rgb():
    gray = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    task = InMemoryTask("mine", ["a"], ["{}"], _splits(gray, torch.tensor([0])))
    x = task.dataset("test").tensors[0]
    assert x.shape == (1, 3, 2, 2)
    for c in range(3):  # by hand: (v / 255 - mean_c) / std_c for every channel
        want = (torch.tensor([[0.0, 1.0], [0.2, 0.4]]) - CLIP_MEAN[c]) / CLIP_STD[c]
        torch.testing.assert_close(x[0, c], want)
    one_channel = InMemoryTask("mine", ["a"], ["{}"], _splits(gray[..., None], torch.tensor([0])))
    assert torch.equal(one_channel.raw("test")[0], task.raw("test")[0])


class _Listed(Dataset):
    """A dataset read item by item (as files are), with the labels given."""

    def __init__(self, labels: list[int]):
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.zeros(2), self.labels[i]


def test_evaluation_refuses_a_label_the_head_has_no_class_for():
    clf = nn.Linear(2, 3)
    assert correct_predictions(clf, _Listed([0, 1, 2])).shape == (3,)
    with pytest.raises(ValueError, match=r"label 3 is outside the head's 3 classes \(0..2\)"):
        correct_predictions(clf, _Listed([0, 3, 1]))


def test_a_label_the_head_has_no_class_for_names_its_task():
    """A disk-backed split's labels are read only when it is scored: the job's error says whose."""
    from types import SimpleNamespace

    from harness.job import task_correct

    ws = SimpleNamespace(head=lambda task: torch.eye(3, 2), cfg=SimpleNamespace(eval=SimpleNamespace(
        batch_size=2, max_samples=None, precision="fp32")))
    assert task_correct(ws, nn.Identity(), "mine", _Listed([0, 1, 2]), torch.device("cpu")).shape == (3,)
    with pytest.raises(ValueError, match=r"^task 'mine': label 3 is outside the head's 3 classes \(0..2\)$"):
        task_correct(ws, nn.Identity(), "mine", _Listed([0, 3, 1]), torch.device("cpu"))


def test_grayscale_images_are_kept_as_three_equal_channels():
    """The split a task keeps (corrupted, digested, scored) is RGB: a gray [N, H, W] or
    [N, H, W, 1] split is its pixel repeated into each channel."""
    gray = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    for images in (gray, gray[..., None]):
        kept = InMemoryTask("mine", ["a"], ["{}"], _splits(images, torch.tensor([0]))).raw("test")[0]
        assert kept.shape == (1, 2, 2, 3)
        for c in range(3):
            assert torch.equal(kept[..., c], gray)


@pytest.mark.parametrize("images, labels, fragment", [
    (torch.zeros(0, 8, 8, 3, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), "split 'train' is empty"),
    (torch.zeros(4, 8, 8, 3, dtype=torch.uint8), torch.tensor([0, 1, 0]), "split 'train': 4 images but labels of "
                                                                        "shape [3]"),
])
def test_an_empty_split_or_one_label_short_is_refused(images, labels, fragment):
    with pytest.raises(TaskDataError, match=re.escape(fragment)):
        InMemoryTask("mine", ["a", "b"], ["{}"], _splits(images, labels))


def test_a_task_name_registered_twice_by_another_factory_is_refused():
    from tasks.base import _TASKS, available_tasks, register_task

    available_tasks()  # the built-in tasks registered

    def mine(**kw):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="task name 'toy_stripes' is already registered"):
        register_task("toy_stripes")(mine)
    assert _TASKS["toy_stripes"][0] is not mine


def test_reloading_a_module_registers_its_new_task_factory_and_another_is_still_refused(tmp_path, monkeypatch):
    """A notebook's ``importlib.reload`` of an edited module defines its factory again under the
    name it registered: the new one replaces the old (its code is the one to run) instead of
    being refused; a factory defined elsewhere under that name is refused."""
    import importlib
    import sys

    import tasks.base
    from tasks.base import register_task, resolve_task

    monkeypatch.setattr(tasks.base, "_TASKS", dict(tasks.base._TASKS))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "reloaded_task.py").write_text(
        "from tasks.base import register_task\n"
        "from tasks.synthetic import make_toy_task\n\n\n"
        "@register_task('reloaded_toy')\n"
        "def reloaded_toy():\n"
        "    return make_toy_task('toy_stripes', n_test=VERSION)\n\n\n"
        "VERSION = 20\n")
    monkeypatch.delitem(sys.modules, "reloaded_task", raising=False)
    module = importlib.import_module("reloaded_task")
    first = resolve_task("reloaded_toy")
    (tmp_path / "reloaded_task.py").write_text((tmp_path / "reloaded_task.py").read_text().replace("= 20", "= 30"))
    importlib.reload(module)
    assert resolve_task("reloaded_toy") is module.reloaded_toy is not first
    assert len(resolve_task("reloaded_toy")().dataset("test")) == 30

    def reloaded_toy():
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="task name 'reloaded_toy' is already registered by "
                                         "reloaded_task.reloaded_toy"):
        register_task("reloaded_toy")(reloaded_toy)


def test_a_tasks_identity_follows_its_declared_version_or_its_data():
    """Results are cached under a task's identity: another version, or (without one) other pixels,
    labels, or the same bytes in another shape, is another task."""
    from tasks.base import tensors_digest

    images = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1])

    def identity(images=images, labels=labels, version=""):
        return InMemoryTask("mine", ["a", "b"], ["{}"], _splits(images, labels), version=version).identity()

    assert identity(version="v1") != identity(version="v2")
    assert identity(version="v1")["version"] == "v1"
    assert identity() == identity()
    assert identity() != identity(labels=torch.tensor([1, 1, 0, 1]))
    assert identity() != identity(images=images + 1)
    assert identity() != identity(images=torch.zeros(4, 8, 4, 6, dtype=torch.uint8).reshape(4, 16, 4, 3))
    assert tensors_digest([images]) != tensors_digest([images.view(torch.int8)])


@pytest.mark.parametrize("family, names", [
    ("toy_stripes", ["stripes at 0 degrees", "stripes at 45 degrees", "stripes at 90 degrees",
                     "stripes at 135 degrees"]),
    ("toy_colours", ["hue 0 colour", "hue 1 colour", "hue 2 colour", "hue 3 colour"]),
    ("toy_blobs", ["1 blobs", "2 blobs", "3 blobs", "4 blobs"]),
    ("toy_checks", [f"checkerboard of size {c}" for c in (1, 2, 3, 4)]),
])
def test_toy_tasks_name_their_classes_by_what_label_draws(family, names):
    """Label c draws stripes at 180 c / k degrees, c + 1 blobs, checker cells of c + 1 pixels: the
    class names (the zero-shot heads' prompts) say so."""
    from tasks.synthetic import make_toy_task

    task = make_toy_task(family, n_classes=4, n_train=8, n_val=8, n_test=8)
    assert task.classnames == names
    assert task.prompts()[2] == [f"a photo of {names[2]}.", f"an image showing {names[2]}."]


def test_toy_splits_have_their_sizes_balanced_shuffled_labels_and_a_seeded_identity():
    from tasks.synthetic import make_toy_task

    task = make_toy_task("toy_blobs", n_classes=4, n_train=40, n_val=12, n_test=20, seed=3)
    for split, n in (("train", 40), ("val", 12), ("test", 20)):
        images, labels = task.raw(split)
        assert len(images) == n
        assert torch.bincount(labels, minlength=4).tolist() == [n // 4] * 4
    assert task.raw("train")[1].tolist() != (torch.arange(40) % 4).tolist()  # shuffled, not cycling
    assert torch.equal(task.raw("test")[0], make_toy_task("toy_blobs", n_classes=4, n_train=40, n_val=12,
                                                          n_test=20, seed=3).raw("test")[0])
    other_seed = make_toy_task("toy_blobs", n_classes=4, n_train=40, n_val=12, n_test=20, seed=4)
    assert other_seed.identity() != task.identity()
    other_family = make_toy_task("toy_checks", n_classes=4, n_train=40, n_val=12, n_test=20, seed=3)
    assert other_family.raw("train")[1].tolist() != task.raw("train")[1].tolist()  # each family its own draws


@pytest.mark.parametrize("family", ["toy_blobs", "toy_checks", "toy_colours", "toy_stripes"])
def test_each_registered_toy_task_draws_its_own_family(family):
    """A sweep naming a toy task gets that family's images: the factory registered under each name
    draws its own family, not the last one the registering loop saw."""
    from tasks.base import build_task
    from tasks.synthetic import make_toy_task

    task = build_task(family, n_train=8, n_val=4, n_test=4)
    want = make_toy_task(family, n_train=8, n_val=4, n_test=4)
    assert task.name == family and task.classnames == want.classnames
    assert torch.equal(task.raw("test")[0], want.raw("test")[0])


def test_toy_stripes_lie_at_the_angle_their_class_names():
    """With 3 classes the stripes of class c run at 180 c / 3 degrees (0, 60, 120), as the class
    names say, not at the spacing of 4 classes. The gradients' dominant direction per class (the
    structure tensor summed over its images) measures it, to within 10 degrees on 32-pixel images."""
    import math

    from tasks.synthetic import make_toy_task

    task = make_toy_task("toy_stripes", n_classes=3, n_train=120, n_val=3, n_test=3, image_size=32)
    assert task.classnames == ["stripes at 0 degrees", "stripes at 60 degrees", "stripes at 120 degrees"]
    images, labels = task.raw("train")
    gray = images.float().sum(-1)
    gx = (gray[:, :, 1:] - gray[:, :, :-1])[:, :-1, :]  # along columns (x)
    gy = (gray[:, 1:, :] - gray[:, :-1, :])[:, :, :-1]  # along rows (y)
    for c, want in enumerate((0.0, 60.0, 120.0)):
        x, y = gx[labels == c], gy[labels == c]
        angle = math.degrees(0.5 * math.atan2(2 * float((x * y).sum()), float((x * x).sum() - (y * y).sum()))) % 180
        assert min(abs(angle - want), 180 - abs(angle - want)) < 10, (c, angle)


def test_a_split_is_counted_before_any_model_only_where_the_factory_has_a_default_size(sweep_dict):
    """Before the encoder is built, a split's length comes from the task made at its factory's
    default input size (the toy stripes test split's, its val split emptied by the factory); a
    factory whose ``image_size`` has no default is left to the run (NotBuilt), not called without it."""
    from harness.config import validate_config
    from harness.errors import NotBuilt
    from harness.workspace import Workspace
    from tasks.synthetic import make_toy_task

    d = copy.deepcopy(sweep_dict)
    sized, unsized = "tests.own_tasks:sized_by_default", "tests.own_tasks:sized_without_default"
    d["tasks"] = [*d["tasks"], sized, unsized]
    d["model"]["finetuned"] = {t: d["model"]["finetuned_pattern"].format(task="toy_colours") for t in (sized, unsized)}
    ws = Workspace(validate_config(d), build=False)
    assert ws.split_length(sized, "test") == len(make_toy_task("toy_stripes").dataset("test")) > 0
    assert ws.split_length(sized, "val") == 0
    with pytest.raises(NotBuilt):
        ws.split_length(unsized, "test")


def test_an_image_size_the_sweep_gives_a_task_is_kept_not_replaced_by_the_encoders(sweep_dict):
    """The encoder's input size fills in only an ``image_size`` the task's options leave out: one
    given (here 32, the micro encoder takes 16) makes the images that size, so the data check names it."""
    from harness.config import validate_config
    from harness.workspace import Workspace

    d = copy.deepcopy(sweep_dict)
    name = "tests.own_tasks:sized_by_default"
    d["tasks"] = [*d["tasks"], {"name": name, "options": {"image_size": 32}}]
    d["model"]["finetuned"] = {name: d["model"]["finetuned_pattern"].format(task="toy_colours")}
    ws = Workspace(validate_config(d))
    assert tuple(ws.task(name).dataset("test")[0][0].shape) == (3, 32, 32)
    assert tuple(ws.task("toy_stripes").dataset("test")[0][0].shape) == (3, 16, 16)


def test_rgba_images_or_labels_not_one_per_image_are_refused():
    """Four channels are not RGB (alpha would be scored as a colour); labels of shape [N, 1]
    are not one class index per image."""
    rgba = torch.zeros(4, 8, 8, 4, dtype=torch.uint8)
    with pytest.raises(TaskDataError, match=re.escape("images have shape [4, 8, 8, 4]; give [N, H, W, 3]")):
        InMemoryTask("mine", ["a", "b"], ["{}"], _splits(rgba, torch.tensor([0, 1, 0, 1])))
    images = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(TaskDataError, match=re.escape("4 images but labels of shape [4, 1]")):
        InMemoryTask("mine", ["a", "b"], ["{}"], _splits(images, torch.tensor([[0], [1], [0], [1]])))


def test_a_tasks_identity_holds_its_name_classes_and_every_split():
    """One version of two tasks (other names or class names) is two identities; without a version,
    other images in any one split, or other labels, are another identity."""
    images = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1])

    def task(name="mine", classes=("a", "b"), version="", **splits):
        return InMemoryTask(name, list(classes), ["{}"], {**_splits(images, labels), **splits}, version=version)

    assert task(version="v1").identity() != task(name="yours", version="v1").identity()
    assert task(version="v1").identity() != task(classes=("a", "c"), version="v1").identity()
    assert task().identity() != task(classes=("a", "c")).identity()
    base = task().identity()
    for split in ("train", "val", "test"):
        assert task(**{split: (images + 1, labels)}).identity() != base, split
        assert task(**{split: (images, labels.flip(0))}).identity() != base, split


def test_toy_identity_follows_every_option():
    """A toy task's version names each option that changes its data: another size, split size or
    seed is another identity (a cached result of one is never read for another)."""
    from tasks.synthetic import make_toy_task

    small = dict(n_classes=2, n_train=4, n_val=4, n_test=4, image_size=8, seed=0)
    base = make_toy_task("toy_checks", **small).identity()
    for option, value in (("n_train", 6), ("n_val", 6), ("n_test", 6), ("image_size", 10), ("seed", 1)):
        assert make_toy_task("toy_checks", **{**small, option: value}).identity() != base, option


def test_toy_images_draw_what_their_class_names_say():
    """Hand-checkable draws (noise lies under 0.35 of full scale, each pattern above it):
    checkerboard of size c + 1 repeats every 2 (c + 1) pixels and flips every c + 1; label 0 of
    toy_blobs is one blob; with 3 colour classes, class c's dominant channel is red, green, blue;
    stripes of class c run at 45 c degrees (the intensity gradient's dominant direction, by the
    structure tensor; the draw jitters it by 8.6 degrees, so the median error per class is held
    under 20, short of the 22.5 halfway to a neighbouring class)."""
    from scipy import ndimage

    from tasks.synthetic import make_toy_task

    x, y = make_toy_task("toy_checks", n_classes=4, n_train=4, n_val=4, n_test=16, image_size=24).raw("test")
    for img, c in zip(x, y.tolist()):
        lit = img.max(-1).values > 110
        cell = c + 1
        assert torch.equal(lit[:, :-2 * cell], lit[:, 2 * cell:]) and torch.equal(lit[:, :-cell], ~lit[:, cell:]), c

    x, y = make_toy_task("toy_blobs", n_classes=4, n_train=4, n_val=4, n_test=16, image_size=32).raw("test")
    counts = [ndimage.label((img[..., 0] > 200).numpy())[1] for img in x]
    pairs = list(zip(counts, y.tolist()))
    assert all(n == 1 for n, c in pairs if c == 0) and all(n <= c + 1 for n, c in pairs)

    x, y = make_toy_task("toy_colours", n_classes=3, n_train=3, n_val=3, n_test=12).raw("test")
    assert x.float().mean((1, 2)).argmax(-1).tolist() == y.tolist()

    x, y = make_toy_task("toy_stripes", n_classes=4, n_train=4, n_val=4, n_test=80).raw("test")
    g = x.float().mean(-1)
    gx, gy = g[:, :-1, 1:] - g[:, :-1, :-1], g[:, 1:, :-1] - g[:, :-1, :-1]
    angle = (0.5 * torch.atan2(2 * (gx * gy).sum((1, 2)), (gx * gx - gy * gy).sum((1, 2)))).rad2deg()
    for c in range(4):
        error = ((angle[y == c] - 45 * c + 90) % 180 - 90).abs()
        assert error.median() < 20, (c, error.median())


def test_normalisation_is_openai_clips():
    """Black and white pixels normalised with OpenAI CLIP's published statistics (its
    preprocessing's Normalize; open_clip's OPENAI_DATASET_MEAN and _STD): a model trained on them
    scores images normalised otherwise as shifted ones."""
    from tasks.base import normalize_uint8

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    pixels = torch.tensor([[[[0, 0, 0], [255, 255, 255]]]], dtype=torch.uint8)
    x = normalize_uint8(pixels)
    assert x.shape == (1, 3, 1, 2)
    for c in range(3):
        torch.testing.assert_close(x[0, c, 0], torch.tensor([-mean[c] / std[c], (1 - mean[c]) / std[c]]))


def test_labels_are_class_indices_and_a_missing_split_is_named():
    """Whole float or int32 labels are kept as int64 class indices (what cross-entropy and the
    heads' comparisons take); asking for a split the task has not is its own error, naming it."""
    images = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    for labels in (torch.tensor([1.0, 0.0]), torch.tensor([1, 0], dtype=torch.int32)):
        task = InMemoryTask("mine", ["a", "b"], ["{}"], {s: (images, labels) for s in ("val", "test")})
        got = task.dataset("val").tensors[1]
        assert got.dtype == torch.int64 and got.tolist() == [1, 0]
    with pytest.raises(TaskDataError, match="task 'mine' has no split 'train'"):
        task.raw("train")


def test_only_a_task_of_ones_own_holds_its_prompts_digest_in_its_identity(sweep_dict):
    """The project's tasks' prompts are versioned with the harness (a task in a subpackage, such as
    the synthetic toy tasks, included), so their identity, and every key, leaves them out; a
    factory of one's own writes its own prompts, which build the heads, so its identity holds them."""
    from harness.config import validate_config
    from harness.plan import TASK_PROMPTS_KEY
    from harness.workspace import Workspace

    d = copy.deepcopy(sweep_dict)
    mine = "tests.own_tasks:grayscale"
    d["tasks"] = [*d["tasks"], mine]
    d["model"]["finetuned"] = {mine: d["model"]["finetuned_pattern"].format(task="toy_colours")}
    ws = Workspace(validate_config(d), build=False)
    assert [TASK_PROMPTS_KEY in ws.task_identity(t) for t in d["tasks"]] == [False, False, True]


EMBEDDED_TINY = {"size": "tiny", "pretrain_pool": 64, "pretrain_steps": 3, "pretrain_batch_size": 16,
                 "pretrain_warmup": 1, "finetune_steps": 3, "finetune_batch_size": 8, "finetune_warmup": 1,
                 "preserve_weight": 1.0, "preserve_pool": 16, "workers": 1}
MINE = "tests.own_tasks:sized_without_default"


def _embedded_sweep(tmp_path, **extra) -> str:
    f = tmp_path / "emb.yaml"
    f.write_text(yaml.safe_dump({"name": "emb_own", "cache_dir": str(tmp_path / "cache"),
                                 "output_dir": str(tmp_path / "out"), "model": {"source": "embedded",
                                                                                "suite": EMBEDDED_TINY},
                                 "tasks": ["emb_mnist", "emb_fashion", MINE], "methods": ["task_arithmetic"],
                                 **extra}))
    return str(f)


def test_an_own_task_is_an_unseen_task_of_an_embedded_sweep(tmp_path):
    """An unseen task needs its data and a head, no fine-tuned model: the embedded suite fine-tunes
    its own tasks and the own task is scored through the zero-shot head of the suite's text tower.
    Truth: that head and the test accuracy computed here from open_clip's encoders."""
    import open_clip
    from safetensors.torch import load_file

    from harness.config import load_config
    from harness.runner import run_sweep
    from harness.workspace import Workspace
    from tests.own_tasks import sized_without_default

    f = _embedded_sweep(tmp_path, unseen=[MINE])
    r = CliRunner().invoke(main, ["validate", f])
    assert r.exit_code == 0, r.output
    assert "job plan: 4 jobs" in r.output  # pretrained, the two embedded tasks' individual, task arithmetic
    cfg = load_config(f)
    outcome = run_sweep(cfg, quiet=True)
    assert not outcome.failed
    rows = {row.method: row for row in outcome.rows}
    assert set(rows) == {"pretrained", "individual", "task_arithmetic"} and MINE not in rows["individual"].acc

    clip = open_clip.create_model("harness-tiny-vit")
    clip.load_state_dict(load_file(Workspace(cfg).sources["pretrained"]))
    clip.eval()
    task = sized_without_default(image_size=32)
    tokenizer = open_clip.get_tokenizer("harness-tiny-vit")
    with torch.no_grad():
        classes = []
        for prompts in task.prompts():
            t = nn.functional.normalize(clip.encode_text(tokenizer(list(prompts))), dim=-1).mean(0)
            classes.append(nn.functional.normalize(t, dim=-1))
        images, labels = task.dataset("test").tensors
        scores = nn.functional.normalize(clip.encode_image(images), dim=-1) @ torch.stack(classes).T
    truth = 100 * (scores.argmax(1) == labels).sum().item() / len(labels)
    assert rows["pretrained"].acc[MINE] == pytest.approx(truth, abs=1e-6)
    assert rows["pretrained"].metrics[f"unseen/{MINE}"] == pytest.approx(truth, abs=1e-6)
    assert f"unseen/{MINE}" in rows["task_arithmetic"].metrics
    r = CliRunner().invoke(main, ["sweep", "--dry-run", f])
    assert r.exit_code == 0 and "4 jobs: 4 cached, 0 to run" in r.output, r.output


def test_prepare_fine_tunes_an_embedded_sweeps_suite_tasks_beside_an_own_unseen_one(tmp_path):
    """`harness prepare` builds the models the sweep will use: the two embedded tasks' fine-tuned
    encoders, none for the own unseen task (the suite has no data to fine-tune it on)."""
    r = CliRunner().invoke(main, ["prepare", _embedded_sweep(tmp_path, unseen=[MINE]), "-q"])
    assert r.exit_code == 0, r.output
    assert "2 fine-tuned encoders under" in " ".join(r.output.split()), r.output


def test_an_own_task_unseen_in_a_generalization_block_of_an_embedded_sweep_says_why_not(tmp_path):
    """The main table merges a generalization block's unseen tasks too, so an own task there needs a
    fine-tuned model the embedded suite cannot train: one error saying so and what to do instead."""
    f = _embedded_sweep(tmp_path, generalization={"unseen": [MINE]})
    r = CliRunner().invoke(main, ["validate", f])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2, r.output
    assert (f"{f}: tasks.2: model.source 'embedded' has no fine-tuned model for task '{MINE}'" in err
            and "the main table merges every task, a generalization block's unseen ones too: list it in "
                "top-level 'unseen:' instead" in err), err
    r = CliRunner().invoke(main, ["validate", _embedded_sweep(tmp_path)])
    assert "list it in 'unseen:' to evaluate it without merging it" in " ".join(r.stderr.split())


def test_an_own_task_seen_in_a_generalization_block_of_an_embedded_sweep_is_not_told_to_be_unseen(tmp_path):
    """Top-level 'unseen:' cannot go with a generalization block, so an own task the block merges
    is told what can be done instead, not to list it there."""
    f = _embedded_sweep(tmp_path, generalization={"unseen": ["emb_fashion"]})
    r = CliRunner().invoke(main, ["validate", f])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2, r.output
    assert (f"{f}: tasks.2: model.source 'embedded' has no fine-tuned model for task '{MINE}'" in err
            and "list it in top-level 'unseen:' instead (a generalization study of its own)" in err
            and "to evaluate it without merging it" not in err), err
    r = CliRunner().invoke(main, ["validate", _embedded_sweep(tmp_path, generalization={"unseen": ["emb_fashion"]},
                                                               unseen=[MINE])])
    assert r.exit_code == 2 and "cannot be combined with top-level 'unseen'" in " ".join(r.stderr.split()), r.output


def test_a_tasks_identity_follows_the_order_of_its_class_names():
    """Label i is class name i: the same images and labels under the class names in another
    order are another task (its zero-shot head and every score differ), so never its cached results."""
    images = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1])

    def identity(classes, version=""):
        return InMemoryTask("mine", classes, ["{}"], _splits(images, labels), version=version).identity()

    assert identity(["a", "b"]) != identity(["b", "a"])
    assert identity(["a", "b"], "v1") != identity(["b", "a"], "v1")


def test_a_tasks_identity_follows_its_last_pixel():
    """Every byte of every split is in the identity, not a prefix: a split differing only in its
    last image's last pixel is other data."""
    images = torch.zeros(4, 32, 32, 3, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1])
    edited = images.clone()
    edited[-1, -1, -1, -1] = 1

    def identity(test_images):
        return InMemoryTask("mine", ["a", "b"], ["{}"], {**_splits(images, labels), "test": (test_images, labels)}
                            ).identity()

    assert identity(edited) != identity(images)


@pytest.mark.parametrize("command", ["sweep", "validate"])
@pytest.mark.parametrize("factory, fragment", [
    ("reads_a_missing_file", "its factory tests.own_tasks.reads_a_missing_file failed at {own}:{line}: FileNotFoundError: "
                             "[Errno 2] No such file or directory: '/nonexistent/harness-own-task/data.npz'"),
    ("slips_a_keyword", "its factory tests.own_tasks.slips_a_keyword failed at {own}:{line}: TypeError: "
                        "InMemoryTask.__init__() got an unexpected keyword argument 'vrsion'"),
    ("ForgetsItsTemplates", "the tests.own_tasks.ForgetsItsTemplates its factory returned has no templates (a Task "
                            "sets name, classnames and templates)"),
    ("one_template_as_a_string", "templates of the tests.own_tasks.PlainTask is the string 'a photo of a {{}}.', not a "
                                 "list of them"),
], ids=["missing-file", "slip-in-its-code", "no-templates", "templates-as-a-string"])
def test_a_factory_that_fails_or_forgets_an_attribute_is_one_line_naming_the_task(command, factory, fragment,
                                                                                  sweep_dict, tmp_path):
    """A factory's own error (a missing data file, a slip in its code) was a traceback, or, for a
    TypeError, blamed on the entry's options though it has none; a Task without templates was an
    AttributeError, and templates given as one string were read letter by letter. Each is now one
    line naming the entry and the task (and where the factory failed), nothing written."""
    import inspect

    import tests.own_tasks as own

    fn = getattr(own, factory)
    lines, start = inspect.getsourcelines(fn)
    line = start + next((i for i, text in enumerate(lines) if "open(" in text or "vrsion" in text), 0)
    code, err, file = _run(tmp_path, sweep_dict, factory, command=command)
    assert code == 2, err
    expected = f"task 'tests.own_tasks:{factory}': " + fragment.format(own=inspect.getsourcefile(own), line=line)
    assert expected in err, err
    assert "bad options" not in err and "Traceback" not in err
    if factory in ("reads_a_missing_file", "slips_a_keyword"):
        assert err.startswith(f"error: {file}: tasks.2: "), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["validate", "sweep"])
def test_an_in_memory_task_refused_inside_a_factory_names_the_file_the_entry_and_its_name(command, sweep_dict,
                                                                                        tmp_path):
    """``InMemoryTask`` names the task its factory made (``task 'mine'``), no name of the sweep: its
    refusal was that line alone, without the file or the entry; it now leads with both."""
    code, err, file = _run(tmp_path, sweep_dict, "no_val_in_memory", command=command)
    assert code == 2, err
    assert err == (f"error: {file}: tasks.2: task 'tests.own_tasks:no_val_in_memory': task 'mine': no 'val' split "
                   "(it has ['test', 'train']); every task is evaluated on 'val' and 'test'"), err
    assert not (tmp_path / "out").exists()


def test_a_wrong_option_of_a_factory_taking_options_through_kwargs_is_still_blamed_on_the_options(sweep_dict, tmp_path):
    """The toy tasks' factories take ``**options`` and pass them on: a misspelt one fails inside,
    and is an error of the entry's options, as before."""
    d = copy.deepcopy(sweep_dict)
    d["tasks"] = ["toy_colours", {"name": "toy_stripes", "options": {"n_vall": 3}}]
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", "-q", str(f)])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2 and err.startswith(f"error: {f}: tasks.1.options: bad options for task 'toy_stripes': "), err
    assert "'n_vall'" in err


@pytest.mark.parametrize("what", ["classnames", "templates"])
def test_in_memory_classnames_or_templates_given_as_one_string_are_refused(what):
    toy_images, toy_labels = torch.zeros(4, 8, 8, 3, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    args = {"classnames": ["a", "b"], "templates": ["a photo of {}."], what: "ab" if what == "classnames" else "{}"}
    with pytest.raises(TaskDataError, match=f"task 'x': {what} is the string"):
        InMemoryTask("x", args["classnames"], args["templates"], _splits(toy_images, toy_labels))
