"""A task of one's own: a factory, its splits, labels and templates are checked before any job,
so a mistake is one line naming the task (exit 2, nothing written), never a wrong score."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn
from torch.utils.data import Dataset

from harness.cli import main
from harness.evaluation import correct_predictions
from tasks.base import CLIP_MEAN, CLIP_STD, InMemoryTask, TaskDataError


def _run(tmp_path, sweep_dict, factory: str):
    d = copy.deepcopy(sweep_dict)
    name = f"tests.own_tasks:{factory}"
    d["tasks"] = [*d["tasks"], name]
    d["model"]["finetuned"] = {name: d["model"]["finetuned_pattern"].format(task="toy_colours")}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", "-q", str(f)])
    return r.exit_code, " ".join(r.stderr.split()), str(f)


def test_a_factory_that_returns_no_task_names_the_field(sweep_dict, tmp_path):
    code, err, file = _run(tmp_path, sweep_dict, "returns_tuple")
    assert code == 2, err
    assert err == (f"error: {file}: tasks.2.name: the factory returned a builtins.tuple, not a tasks.base.Task "
                   "(got 'tests.own_tasks:returns_tuple')")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("factory, fragment", [
    ("other_size", "split 'val' gives images as a torch.float32 tensor of shape [3, 32, 32], but the image "
                   "encoder of harness-micro-vit takes float tensors of shape [3, 16, 16]"),
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


def test_in_memory_task_without_a_val_split_is_refused():
    s = _splits(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.tensor([0, 1]))
    del s["val"]
    with pytest.raises(TaskDataError, match="task 'mine': no 'val' split"):
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
