"""Batched top-1 evaluation, no gradients, with a fast path for in-memory tasks."""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from harness.precision import autocast
from harness.runtime import available_cores, job_cores, start_forked_helper


def evaluation_indices(size: int, max_samples: int | None) -> torch.Tensor | None:
    """Which images a capped evaluation scores (None: all), in the split's order.

    Splits may be stored sorted by class (MNIST-style files), so their first N images can all
    be of one or two classes. A seeded draw represents every class and gives every method the
    same images, so paired comparisons stay paired.
    """
    if max_samples is None or max_samples >= size:
        return None
    generator = torch.Generator().manual_seed(0)
    return torch.randperm(size, generator=generator)[:max_samples].sort().values


def iterate_batches(dataset: Dataset, batch_size: int, max_samples: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches; in-memory tensors are sliced directly (no worker overhead)."""
    subset = evaluation_indices(len(dataset), max_samples)
    if isinstance(dataset, TensorDataset):
        images, labels = dataset.tensors[0], dataset.tensors[1]
        if subset is not None:
            images, labels = images[subset], labels[subset]
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size], labels[i : i + batch_size]
        return
    if subset is not None:
        dataset = torch.utils.data.Subset(dataset, subset.tolist())
    workers = loader_workers(len(dataset), batch_size)
    yield from raised_here(forked_loader(dataset, workers, batch_size=batch_size, shuffle=False))


def raised_here(batches: Iterable[Any]) -> Iterator[Any]:
    """``batches``, with an error a DataLoader worker raised given its own one-line message
    again: PyTorch re-raises it with the worker's whole traceback as the message, which would
    be a job's error line (the traceback stays in the exception's cause)."""
    try:
        yield from batches
    except Exception as exc:
        message = _worker_message(exc)
        if message is None:
            raise
        try:
            again = type(exc)(message)
        except Exception:  # a constructor that takes other arguments
            again = RuntimeError(message)
        raise again from exc


def _worker_message(exc: Exception) -> str | None:
    """The worker's own message inside PyTorch's ``Caught <Type> in DataLoader worker process
    <n>.\nOriginal Traceback ...\n<module.Type>: <message>`` (None: not such an error)."""
    text = str(exc)
    lines = text.rstrip().splitlines()
    if not lines or not re.match(r"Caught \w+ in DataLoader worker process \d+\.$", lines[0]):
        return None
    frames = [k for k, line in enumerate(lines) if line.startswith(" ")]
    last = "\n".join(lines[frames[-1] + 1:] if frames else lines[-1:])
    name, sep, message = last.partition(": ")
    return message if sep and name.rsplit(".", 1)[-1] == type(exc).__name__ else last


MAX_LOADER_WORKERS = 8
# forked from this process: the default start method may be the sweep's forkserver or spawn,
# whose workers would unpickle the dataset and import again for every split they read
_FORK = "fork" if "fork" in __import__("multiprocessing").get_all_start_methods() else None


def fork_context() -> str | None:
    """The start method of the processes a job starts to read or build its data ("fork"), or
    None where this platform cannot fork."""
    return _FORK


def forked_loader(dataset: Dataset, workers: int, **batching: Any) -> DataLoader:
    """A DataLoader reading ``dataset`` in ``workers`` forked processes (none: in this one), each
    started as :func:`harness.runtime.start_forked_helper` says."""
    return DataLoader(dataset, num_workers=workers, multiprocessing_context=_FORK if workers else None,
                      worker_init_fn=start_forked_helper, **batching)


def loader_workers(size: int, batch_size: int) -> int:
    """Worker processes that read a map-style (disk-backed) split: its images are decoded and
    preprocessed when read (10-20 ms a JPEG on one core, ~110k val and test images per job on the
    paper's eight datasets), which on one core would bound evaluation while the accelerator waits.
    None for a split of one batch (not worth starting them) or in a daemonic process (which may
    not start children); else the cores this job may use, up to ``MAX_LOADER_WORKERS``. The
    batches and their order are the same either way."""
    import multiprocessing

    if size <= batch_size or _FORK is None or multiprocessing.current_process().daemon:
        return 0
    return max(0, min(usable_cores(), MAX_LOADER_WORKERS))


def usable_cores() -> int:
    """The cores this job may use: its share where it was given one, else all this process may run on."""
    return job_cores() or available_cores()


def label_outside(labels: torch.Tensor, num_classes: int) -> int | None:
    """A label outside ``[0, num_classes)`` (the lowest if any is negative, else the highest), or None."""
    if not len(labels):
        return None
    low, high = int(labels.min()), int(labels.max())
    return low if low < 0 else high if high >= num_classes else None


class EvaluationDataError(ValueError):
    """A split that cannot be scored: empty, or a label the head has no class for."""


@torch.no_grad()
def correct_predictions(classifier: nn.Module, dataset: Dataset, batch_size: int = 256,
                        device: torch.device | str = "cpu", max_samples: int | None = None,
                        precision: str = "fp32") -> torch.Tensor:
    """Per-image top-1 correctness (bool), in the split's order: what paired tests compare.

    ``precision`` (``eval.precision``): the forward runs under :func:`harness.precision.autocast`."""
    classifier.eval().to(device)
    hits = []
    for images, labels in iterate_batches(dataset, batch_size, max_samples):
        with autocast(precision, device):
            logits = classifier(images.to(device, non_blocking=True))
        if not torch.isfinite(logits).all():
            raise FloatingPointError("non-finite logits during evaluation"
                                     + (f" (eval.precision: {precision})" if precision != "fp32" else ""))
        bad = label_outside(labels, logits.shape[-1])
        if bad is not None:
            raise EvaluationDataError(f"label {bad} is outside the head's {logits.shape[-1]} classes (0..{logits.shape[-1] - 1})")
        hits.append(logits.argmax(-1).cpu() == labels)
    if not hits:
        raise EvaluationDataError("empty evaluation split")
    return torch.cat(hits)


def accuracy(classifier: nn.Module, dataset: Dataset, batch_size: int = 256,
             device: torch.device | str = "cpu", max_samples: int | None = None, precision: str = "fp32") -> float:
    """Top-1 accuracy in percent."""
    return percent(correct_predictions(classifier, dataset, batch_size, device, max_samples, precision))


def percent(correct: torch.Tensor) -> float:
    return 100.0 * correct.sum().item() / len(correct)


def shuffled_index_batches(size: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless index batches: a fresh seeded permutation every pass, its last partial batch
    dropped (a split smaller than one batch is one batch)."""
    g = torch.Generator().manual_seed(seed)
    stop = size - batch_size + 1 if size >= batch_size else 1
    while True:
        perm = torch.randperm(size, generator=g)
        for i in range(0, stop, batch_size):
            yield perm[i : i + batch_size]


class UnlabeledStream:
    """An endless shuffled stream of image batches without labels (test-time adaptation's data).

    The order is drawn here, not by a DataLoader, so a disk-backed split read by ``workers``
    forked processes streams the same batches as one read in this process, and as the same
    images held in memory. Test-time adaptation reads eight such streams side by side, a batch of
    each per step: decoded in this process, ~130 JPEGs a step (10-20 ms each on one core) would
    keep an accelerator waiting. ``skip(n)`` moves past batches without reading them, so a
    resumed adaptation does not decode the batches it already adapted on.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, workers: int = 0):
        if len(dataset) == 0:
            raise ValueError("the split has no images to adapt on")
        self.dataset = dataset
        self.workers = workers if len(dataset) > batch_size and _FORK is not None else 0
        self._order = shuffled_index_batches(len(dataset), batch_size, seed)
        self._batches: Iterator[torch.Tensor] | None = None

    def __iter__(self) -> "UnlabeledStream":
        return self

    def __next__(self) -> torch.Tensor:
        if self._batches is None:
            self._batches = self._read()
        return next(self._batches)

    def skip(self, n: int) -> None:
        if self._batches is not None:  # batches the workers already read come first
            for _ in range(n):
                next(self)
            return
        for _ in range(n):
            next(self._order)

    def _read(self) -> Iterator[torch.Tensor]:
        if isinstance(self.dataset, TensorDataset):
            images = self.dataset.tensors[0]
            return (images[idx] for idx in self._order)
        loader = forked_loader(self.dataset, self.workers, batch_sampler=_IndexLists(self._order))
        return (images for images, _ in raised_here(loader))


class _IndexLists:
    """A DataLoader ``batch_sampler`` that continues an index-batch stream (as lists of ints)."""

    def __init__(self, order: Iterator[torch.Tensor]):
        self.order = order

    def __iter__(self) -> Iterator[list[int]]:
        return (idx.tolist() for idx in self.order)


def stream_workers(streams: int) -> int:
    """Reader processes for each of ``streams`` streams read side by side: the cores this
    job may use shared among them, at least one each (so that decoding overlaps the model's
    step) and at most ``MAX_LOADER_WORKERS``; none in a daemonic process (which may not start
    children)."""
    import multiprocessing

    if _FORK is None or multiprocessing.current_process().daemon:
        return 0
    return min(MAX_LOADER_WORKERS, max(1, usable_cores() // max(1, streams)))


def unlabeled_batches(dataset: Dataset, batch_size: int, seed: int, workers: int = 0) -> UnlabeledStream:
    """An endless shuffled stream of image batches without labels (for test-time adaptation)."""
    return UnlabeledStream(dataset, batch_size, seed, workers)
