"""A capped evaluation scores a fixed random subset, not the first images of a sorted split."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from harness.evaluation import correct_predictions, iterate_batches


class _ListDataset(Dataset):
    """The same images as a map-style dataset (the DataLoader path)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def _sorted_split(per_class: int = 50, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(classes).repeat_interleave(per_class)  # stored sorted by class, as MNIST files are
    images = labels.float().view(-1, 1)
    return images, labels


def _labels(batches) -> torch.Tensor:
    return torch.cat([y for _, y in batches])


def test_capped_split_covers_every_class_and_is_the_same_for_both_dataset_kinds():
    images, labels = _sorted_split()
    tensor_labels = _labels(iterate_batches(TensorDataset(images, labels), 16, max_samples=100))
    list_labels = _labels(iterate_batches(_ListDataset(images, labels), 16, max_samples=100))
    assert len(tensor_labels) == 100
    assert torch.equal(tensor_labels, list_labels)
    assert set(tensor_labels.tolist()) == set(range(10))  # the first 100 would be classes 0 and 1 only
    assert torch.all(tensor_labels[1:] >= tensor_labels[:-1])  # the split's order is kept
    again = _labels(iterate_batches(TensorDataset(images, labels), 7, max_samples=100))
    assert torch.equal(again, tensor_labels)  # every method and batch size scores the same images


def test_uncapped_split_is_scored_whole_in_order():
    images, labels = _sorted_split(per_class=3)
    for cap in (None, 30, 1000):
        assert torch.equal(_labels(iterate_batches(TensorDataset(images, labels), 4, max_samples=cap)), labels)


def test_capped_accuracy_estimates_the_whole_split():
    images, labels = _sorted_split(per_class=100)

    class UpperHalf(torch.nn.Module):  # right on classes 5-9 only: 50% on the whole split
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x[:, 0].long()
            pred = torch.where(y >= 5, y, (y + 1) % 10)
            return torch.nn.functional.one_hot(pred, 10).float()

    hits = correct_predictions(UpperHalf(), TensorDataset(images, labels), 64, max_samples=200)
    assert len(hits) == 200 and 0.35 < hits.float().mean().item() < 0.65  # first 200: 0.0 (classes 0, 1)


class _FileBackedDataset(Dataset):
    """Stands for a disk-backed split (the paper's datasets): each item is decoded when read, and
    the process that read it is recorded."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, log_dir):
        self.images, self.labels, self.log_dir = images, labels, log_dir

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        import os

        (self.log_dir / f"{os.getpid()}-{i}").touch()
        return self.images[i], self.labels[i]


def test_a_disk_backed_split_is_decoded_in_loader_workers(tmp_path, monkeypatch):
    """Decoding and preprocessing JPEGs (10-20 ms an image on one core) would otherwise bound
    every job's evaluation of the paper's eight datasets (~110k val and test images) on one core
    while the accelerator waits: the DataLoader reads a large split in worker processes, with the
    same images, in the same order, and the same scores as one process."""
    import os

    import harness.evaluation as ev

    monkeypatch.setattr(ev, "available_cores", lambda: 2, raising=False)
    images, labels = _sorted_split(per_class=12, classes=5)
    ds = _FileBackedDataset(images, labels, tmp_path)
    got = _labels(iterate_batches(ds, batch_size=8))
    assert torch.equal(got, labels)
    readers = {int(p.name.split("-")[0]) for p in tmp_path.iterdir()}
    assert os.getpid() not in readers and readers, readers
    assert sorted(int(p.name.split("-")[1]) for p in tmp_path.iterdir()) == list(range(len(labels)))

    classifier = torch.nn.Linear(1, 5)
    torch.nn.init.constant_(classifier.weight, 1.0)
    want = correct_predictions(classifier, TensorDataset(images, labels), batch_size=8)
    assert torch.equal(correct_predictions(classifier, ds, batch_size=8, max_samples=40),
                       correct_predictions(classifier, TensorDataset(images, labels), batch_size=8, max_samples=40))
    assert torch.equal(correct_predictions(classifier, ds, batch_size=8), want)


def test_a_small_split_is_read_in_process(tmp_path):
    """A split of one batch is not worth starting workers for."""
    import os

    images, labels = _sorted_split(per_class=2, classes=4)
    _labels(iterate_batches(_FileBackedDataset(images, labels, tmp_path), batch_size=8))
    assert {int(p.name.split("-")[0]) for p in tmp_path.iterdir()} == {os.getpid()}


def test_the_capped_draw_is_the_one_earlier_results_were_scored_on():
    """Paired tests compare per-image correctness recorded by earlier runs (the results cache)
    with new ones: a capped split must stay the same images (torch's randperm seeded 0, its
    first ``max_samples`` in split order), listed here."""
    from harness.evaluation import evaluation_indices

    assert evaluation_indices(10, 4).tolist() == [1, 4, 5, 7]
    assert evaluation_indices(50, 6).tolist() == [6, 7, 17, 29, 39, 44]
