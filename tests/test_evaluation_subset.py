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
