"""Processes a job forks to read or build its data leave SLURM's time-limit warning to the job.

SLURM sends the warning (SIGUSR2) to every process of a job; a forked reader has inherited the
job's handler (checkpoint, requeue, exit), which must run once, in the job, not in every reader."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal

import pytest
import torch
from torch.utils.data import Dataset

import tasks.corruptions as tc
from harness.evaluation import iterate_batches, unlabeled_batches
from tasks.synthetic import make_toy_task

pytestmark = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="readers are forked")


@pytest.fixture
def handled(tmp_path):
    """A SIGUSR2 handler in this process (as the job's): the processes that ran it, one file each."""
    log = tmp_path / "handled"
    log.mkdir()
    before = signal.signal(signal.SIGUSR2, lambda *_: (log / str(os.getpid())).touch())
    yield log
    signal.signal(signal.SIGUSR2, before)


def _warned(parent: int) -> None:
    """What SLURM does to a helper process: the time-limit warning, while it reads."""
    if os.getpid() != parent:
        os.kill(os.getpid(), signal.SIGUSR2)


class _WarnedDataset(Dataset):
    """Image i is the number i; every read in a forked process gets the warning first."""

    def __init__(self, n: int):
        self.n, self.parent = n, os.getpid()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        _warned(self.parent)
        return torch.tensor([float(i)]), torch.tensor(threads_here())


def threads_here() -> int:
    return torch.get_num_threads()


def test_evaluation_readers_ignore_the_warning(handled):
    batches = list(iterate_batches(_WarnedDataset(64), 8))
    assert torch.cat([x for x, _ in batches]).view(-1).tolist() == list(range(64))
    assert {int(t) for _, ts in batches for t in ts} == {1}  # one thread per reader
    os.kill(os.getpid(), signal.SIGUSR2)  # the job's own handler still runs, here
    assert [p.name for p in handled.iterdir()] == [str(os.getpid())]


def test_adaptation_stream_readers_ignore_the_warning(handled):
    stream = unlabeled_batches(_WarnedDataset(64), 8, seed=0, workers=2)
    seen = torch.cat(list(itertools.islice(stream, 8))).view(-1)
    assert sorted(seen.long().tolist()) == list(range(64))
    assert not list(handled.iterdir())


def test_corruption_build_processes_ignore_the_warning(handled, tmp_path, monkeypatch):
    task = make_toy_task("toy_stripes", n_test=40)
    original, parent = tc.corrupt_image, os.getpid()

    def warned(image, name, severity, seed):
        _warned(parent)
        return original(image, name, severity, seed)

    monkeypatch.setattr(tc, "corrupt_image", warned)
    built = tc.corrupted_split(task, "contrast", 2, tmp_path / "cache", processes=2)
    monkeypatch.undo()
    assert torch.equal(built.tensors[0], tc.corrupted_split(task, "contrast", 2, None).tensors[0])
    assert not list(handled.iterdir())
