"""Test-time adaptation's unlabeled streams: a fixed seeded order, read in worker processes for a
disk-backed split, and skipped without reading on resume."""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from torch.utils.data import TensorDataset

import harness.evaluation as ev
from harness.evaluation import stream_workers, unlabeled_batches
from methods.tta import BatchStream
from tests.test_evaluation_subset import _FileBackedDataset

IMAGES = torch.arange(40, dtype=torch.float32).view(-1, 1)  # image i is the number i
LABELS = torch.zeros(40, dtype=torch.long)


def _take(stream, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(stream, n))


def _reads(log_dir) -> list[tuple[int, int]]:
    """(process id, image index) of every image the disk-backed split decoded."""
    return [tuple(int(x) for x in p.name.split("-")) for p in log_dir.iterdir()]


def test_a_stream_is_seeded_permutations_with_the_last_partial_batch_dropped():
    """The order the cached embedded results were adapted on: per pass a fresh
    ``torch.randperm`` from one generator seeded once, in batches, a partial last batch dropped."""
    g = torch.Generator().manual_seed(3)
    want = []
    for _ in range(3):
        perm = torch.randperm(10, generator=g)
        want += [perm[0:4], perm[4:8]]  # 2 of 10 left out each pass
    got = _take(unlabeled_batches(TensorDataset(IMAGES[:10], LABELS[:10]), 4, seed=3), 6)
    assert [b.view(-1).long().tolist() for b in got] == [w.tolist() for w in want]

    g = torch.Generator().manual_seed(5)
    small = _take(unlabeled_batches(TensorDataset(IMAGES[:3], LABELS[:3]), 4, seed=5), 2)  # smaller than a batch
    assert [b.view(-1).long().tolist() for b in small] == [torch.randperm(3, generator=g).tolist() for _ in range(2)]


def test_a_disk_backed_stream_is_read_in_worker_processes_with_the_same_batches(tmp_path):
    """Decoding ~130 JPEGs a step in the adapting process would keep an accelerator waiting: a
    disk-backed split is read by forked workers, and streams exactly the batches the same images
    held in memory give, across passes."""
    memory = _take(unlabeled_batches(TensorDataset(IMAGES, LABELS), 8, seed=1), 12)  # 2.4 passes
    stream = unlabeled_batches(_FileBackedDataset(IMAGES, LABELS, tmp_path), 8, seed=1, workers=2)
    disk = _take(stream, 12)
    assert all(torch.equal(a, b) for a, b in zip(memory, disk, strict=True))
    readers = {pid for pid, _ in _reads(tmp_path)}
    assert readers and os.getpid() not in readers, readers

    del stream, disk
    gc.collect()
    for pid in readers:  # the workers ended with the stream: a job leaves no processes behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_skipping_batches_does_not_read_them(tmp_path):
    """A resumed adaptation skips the batches it already adapted on: reading them would decode
    thousands of images per task before the first new step."""
    memory = _take(unlabeled_batches(TensorDataset(IMAGES, LABELS), 8, seed=2), 8)
    ds = _FileBackedDataset(IMAGES, LABELS, tmp_path)
    stream = BatchStream(lambda: unlabeled_batches(ds, 8, seed=2), "t")
    stream.skip(7)
    assert torch.equal(next(stream), memory[7])
    assert sorted(i for _, i in _reads(tmp_path)) == sorted(memory[7].view(-1).long().tolist())

    in_memory = BatchStream(lambda: unlabeled_batches(TensorDataset(IMAGES, LABELS), 8, seed=2), "t")
    in_memory.skip(7)
    assert torch.equal(next(in_memory), memory[7])


def test_skipping_after_reading_keeps_the_order(tmp_path):
    """Batches already requested from the workers come before the skipped ones are passed."""
    memory = _take(unlabeled_batches(TensorDataset(IMAGES, LABELS), 8, seed=4), 10)
    stream = unlabeled_batches(_FileBackedDataset(IMAGES, LABELS, tmp_path), 8, seed=4, workers=1)
    assert torch.equal(next(stream), memory[0])
    stream.skip(5)
    assert torch.equal(next(stream), memory[6])


def test_the_cores_are_shared_among_the_streams(monkeypatch):
    monkeypatch.setattr(ev, "available_cores", lambda: 16)
    assert stream_workers(8) == 2
    assert stream_workers(1) == ev.MAX_LOADER_WORKERS
    monkeypatch.setattr(ev, "available_cores", lambda: 2)
    assert stream_workers(8) == 1  # decoding still overlaps the model's step
    with multiprocessing.get_context("fork").Pool(1) as pool:  # a daemonic process may not start children
        assert pool.apply(stream_workers, (8,)) == 0
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:  # the local executor's kind
        assert pool.submit(stream_workers, 8).result() == 1


def test_a_pool_workers_readers_count_its_share_of_the_cores_not_the_machines(monkeypatch):
    """A local pool worker is given ``cores / workers`` (SLURM: ``cpus_per_task``); its readers
    count those, not every core of the machine. Truth: 16 cores, 4 workers -> 4 each, by hand."""
    from harness import runtime

    monkeypatch.setattr(runtime, "_JOB_CORES", None)
    monkeypatch.setattr(runtime, "_EVAL_THREADS", runtime._EVAL_THREADS)
    monkeypatch.setattr(ev, "available_cores", lambda: 16)
    monkeypatch.setattr(runtime, "available_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        runtime.configure_threads("auto", n_params=1_000, cores=16 // 4)
        assert ev.loader_workers(1000, 100) == 4
        assert stream_workers(2) == 2 and stream_workers(8) == 1
        runtime.configure_threads("auto", n_params=1_000)  # the driver: every core
        assert ev.loader_workers(1000, 100) == ev.MAX_LOADER_WORKERS
        assert stream_workers(2) == 8
    finally:
        torch.set_num_threads(before)


def test_an_empty_split_is_an_error():
    with pytest.raises(ValueError, match="no images"):
        next(BatchStream(lambda: unlabeled_batches(TensorDataset(IMAGES[:0], LABELS[:0]), 8, seed=0), "t"))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_broken_image_is_named_in_one_line(tmp_path, workers, monkeypatch):
    """One undecodable file among a dataset's images fails the job with a line naming the file,
    not with a DataLoader worker's traceback as the message (PIL names no file for a truncated one)."""
    import tasks.vision8 as v8
    from harness.evaluation import iterate_batches
    from tasks.base import TaskDataError
    from tests.test_vision8 import folder_names, write_imagefolder

    write_imagefolder(tmp_path, "eurosat", folder_names("eurosat"))
    broken = sorted(tmp_path.rglob("t*.png"))[3]
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    ds = v8.eurosat(str(tmp_path), image_size=32).dataset("test")
    monkeypatch.setattr(ev, "available_cores", lambda: 2 * workers)
    for read in (lambda: list(itertools.islice(unlabeled_batches(ds, 4, 0, workers=workers), 20)),
                 lambda: list(iterate_batches(ds, 4))):
        with pytest.raises(TaskDataError) as info:
            read()
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"cannot read image {broken}: "), message


def test_a_split_of_whole_batches_streams_every_image_each_pass():
    """Nothing is left over when the split is a whole number of batches (one batch included):
    each pass is every image once, none dropped."""
    for size, batch in ((8, 4), (4, 4)):
        g = torch.Generator().manual_seed(7)
        got = _take(unlabeled_batches(TensorDataset(IMAGES[:size], LABELS[:size]), batch, seed=7), 2 * size // batch)
        want = [torch.randperm(size, generator=g) for _ in range(2)]
        assert [b.view(-1).long().tolist() for b in got] == [
            w[i:i + batch].tolist() for w in want for i in range(0, size, batch)]
