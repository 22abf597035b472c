"""Building a corrupted split in several processes: the same file as one process builds, and a
failure in any of them fails the build without leaving a file."""

from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch

import tasks.corruptions as tc
from tasks.corruptions import corrupt_image, corrupted_split, image_seed
from tasks.synthetic import make_toy_task
from tests.test_robustness import write_noise_eurosat

pytestmark = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                                reason="build processes are forked")


def test_a_split_built_in_processes_is_every_image_under_its_own_seed(tmp_path):
    """Three processes building 50 images in blocks of 16 give the file one process builds, each
    image the package's output under that image's seed."""
    task = make_toy_task("toy_stripes", n_test=50)
    images = task.raw("test")[0].numpy()
    parallel = corrupted_split(task, "glass_blur", 2, tmp_path / "three", seed=5, processes=3)
    serial = corrupted_split(task, "glass_blur", 2, tmp_path / "one", seed=5, processes=1)
    truth = np.stack([corrupt_image(images[i], "glass_blur", 2, image_seed(5, i, "glass_blur", 2))
                      for i in range(len(images))])
    assert torch.equal(parallel.tensors[0], tc.normalize_uint8(torch.from_numpy(truth)))
    assert torch.equal(parallel.tensors[0], serial.tensors[0])
    assert torch.equal(parallel.tensors[1], task.raw("test")[1].long())


def test_a_disk_backed_split_built_in_processes_keeps_every_images_label(tmp_path):
    """The build processes read a disk-backed task's labels: each block's come back to the file
    written beside the images, in the split's order (the noise images' classes differ per folder)."""
    import tasks.vision8 as v8

    write_noise_eurosat(tmp_path / "data", per_class=4)
    task = v8.eurosat(str(tmp_path / "data"), image_size=32)
    base = task.dataset("test")
    truth = [base[i] for i in range(len(base))]
    got = corrupted_split(task, "contrast", 3, tmp_path / "cache", processes=2)
    assert len(got) == len(truth) == 40
    assert [int(got[i][1]) for i in range(len(got))] == [int(y) for _, y in truth]
    assert sorted(set(int(y) for _, y in truth)) == list(range(10))
    want = tc.CorruptedDataset(base, "contrast", 3)
    assert all(torch.equal(got[i][0], want[i][0]) for i in range(len(got)))
    again = corrupted_split(task, "contrast", 3, tmp_path / "cache", processes=1)  # read back, not built
    assert [int(again[i][1]) for i in range(len(again))] == [int(y) for _, y in truth]


def _fails_in_a_child(parent: int, how: str):
    original = tc.corrupt_image

    def corrupt(image, name, severity, seed):
        if os.getpid() != parent:
            if how == "raise":
                raise ValueError("this image cannot be corrupted")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(image, name, severity, seed)

    return corrupt


@pytest.mark.parametrize("how, error, message", [
    ("raise", ValueError, "this image cannot be corrupted"),
    ("kill", RuntimeError, "a build process ended abruptly"),
])
def test_a_build_process_failing_fails_the_build_and_leaves_no_file(how, error, message, tmp_path, monkeypatch):
    task = make_toy_task("toy_stripes", n_test=40)
    monkeypatch.setattr(tc, "corrupt_image", _fails_in_a_child(os.getpid(), how))  # the forked processes inherit it
    with pytest.raises(error, match=message) as caught:
        corrupted_split(task, "contrast", 2, tmp_path, processes=2)
    if how == "kill":
        assert ".npy" in str(caught.value)  # names the split's file
    assert not list((tmp_path / "corrupted").iterdir())  # no split, no temporary
    monkeypatch.undo()
    built = corrupted_split(task, "contrast", 2, tmp_path, processes=2)  # the next try builds it whole
    assert torch.equal(built.tensors[0], corrupted_split(task, "contrast", 2, None).tensors[0])


def test_build_processes_are_the_jobs_cores_with_enough_images_each(monkeypatch):
    import harness.evaluation as ev

    monkeypatch.setattr(ev, "usable_cores", lambda: 4)
    assert [tc.build_processes(n) for n in (0, 63, 64, 127, 128, 255, 256, 10_000)] == [1, 1, 1, 1, 2, 3, 4, 4]
    monkeypatch.setattr(ev, "_FORK", None)
    assert tc.build_processes(10_000) == 1


def test_a_daemonic_process_builds_alone():
    ctx = multiprocessing.get_context("fork")
    got = ctx.Queue()
    proc = ctx.Process(target=lambda: got.put(tc.build_processes(10_000)), daemon=True)
    proc.start()
    assert got.get(timeout=60) == 1
    proc.join(timeout=60)


def test_the_progress_bar_reaches_the_splits_size(monkeypatch, tmp_path):
    import contextlib

    advanced = []

    @contextlib.contextmanager
    def progress(enabled, description, total):
        yield advanced.append

    monkeypatch.setattr(tc, "counting_bar", progress)
    corrupted_split(make_toy_task("toy_stripes", n_test=50), "contrast", 2, tmp_path, processes=2)
    assert sorted(advanced) == [2, 16, 16, 16]


def _hold_lock(path, held, release) -> None:
    from filelock import FileLock

    with FileLock(tc._lock_path(path)):
        held.set()
        release.wait(60)


def test_a_split_another_process_is_building_is_passed_over_without_waiting(tmp_path):
    task = make_toy_task("toy_stripes", n_test=20)
    path = tc._cache_path(tmp_path, task, None, "test", "contrast", 2, 0)
    ctx = multiprocessing.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(path, held, release))
    holder.start()
    try:
        assert held.wait(60)
        assert corrupted_split(task, "contrast", 2, tmp_path, wait=False) is None
        assert not path.exists()  # nothing built
    finally:
        release.set()
        holder.join(60)
    built = corrupted_split(task, "contrast", 2, tmp_path, wait=False)
    assert path.exists() and torch.equal(built.tensors[0], corrupted_split(task, "contrast", 2, None).tensors[0])


def test_jobs_starting_together_build_different_splits_side_by_side(sweep_dict, tmp_path):
    """Two jobs of a sweep preparing the same study's two splits: the first builds one, the second,
    finding it being built, builds the other instead of waiting; each split is built once."""
    import time

    from harness.config import validate_config
    from harness.workspace import Workspace

    cfg = validate_config(dict(sweep_dict, robustness={"tasks": ["toy_stripes"],
                                                       "corruptions": ["contrast", "gaussian_noise"]}))
    log = tmp_path / "built"
    log.mkdir()
    ctx = multiprocessing.get_context("fork")
    first_started = ctx.Event()

    def job(first: bool) -> None:
        original = tc.corrupt_images

        def slow(images, name, *a, **k):
            (log / f"{name}-{os.getpid()}").touch()
            first_started.set()
            time.sleep(1.0)  # still building when the other job asks
            return original(images, name, *a, **k)

        tc.corrupt_images = slow
        if not first:
            first_started.wait(60)
        ws = Workspace(cfg)
        ws.build_free_corrupted_splits(["contrast", "gaussian_noise"], adapting=False)
        for c in ("contrast", "gaussian_noise"):  # the study's reads: the other job's split, waited for
            assert len(ws.corrupted("toy_stripes", c)) == len(ws.task("toy_stripes").dataset("test"))

    jobs = [ctx.Process(target=job, args=(first,)) for first in (True, False)]
    for p in jobs:
        p.start()
    for p in jobs:
        p.join(120)
        assert p.exitcode == 0
    built = sorted(p.name.split("-") for p in log.iterdir())
    assert [name for name, _ in built] == ["contrast", "gaussian_noise"]  # each once
    assert built[0][1] != built[1][1]  # by the two jobs, one each


def test_a_split_failing_to_build_fails_the_study_at_its_turn(sweep_dict, tmp_path, monkeypatch):
    """Building the study's splits ahead meets the error first; it is raised at that corruption's
    turn, naming it, after the corruptions before it were scored and recorded."""
    from harness.config import validate_config
    from harness.job import RobustnessStudyFailed, robustness_metrics
    from harness.workspace import Workspace

    cfg = validate_config(dict(sweep_dict, robustness={"tasks": ["toy_stripes"],
                                                       "corruptions": ["contrast", "pixelate", "gaussian_noise"]}))
    original = tc.corrupt_image

    def no_pixelate(image, name, severity, seed):
        if name == "pixelate":
            raise ValueError("cannot pixelate")
        return original(image, name, severity, seed)

    monkeypatch.setattr(tc, "corrupt_image", no_pixelate)
    ws = Workspace(cfg)
    records = tmp_path / "records"
    records.mkdir()
    with pytest.raises(RobustnessStudyFailed, match=r"pixelate \(severity 2\): ValueError: cannot pixelate"):
        robustness_metrics(ws, ws.pretrained_encoder, torch.device("cpu"), records=records)
    assert sorted(p.name for p in records.iterdir()) == ["clean.json", "contrast.json"]


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (an exited process not yet reaped by its new parent is not running)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads process states from /proc")
def test_build_processes_end_with_a_killed_job(tmp_path):
    """A job killed while it builds (out of memory, SIGKILL) leaves no build process behind: each
    would wait forever on the pool's pipes, mapping the split's temporary file."""
    import time

    task = make_toy_task("toy_stripes", n_test=200)
    pids = tmp_path / "pids"
    pids.mkdir()
    ctx = multiprocessing.get_context("fork")

    def job() -> None:
        original = tc.corrupt_image

        def slow(image, name, severity, seed):
            (pids / str(os.getpid())).touch()
            time.sleep(0.05)
            return original(image, name, severity, seed)

        tc.corrupt_image = slow
        tc.corrupted_split(task, "contrast", 2, tmp_path / "cache", processes=2)

    killed = ctx.Process(target=job)
    killed.start()
    deadline = time.monotonic() + 60
    while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    builders = [int(p.name) for p in pids.iterdir()]
    assert len(builders) == 2 and killed.pid not in builders
    os.kill(killed.pid, signal.SIGKILL)
    killed.join(10)  # its build processes hold its sentinel pipe too: quick only once they are gone
    deadline = time.monotonic() + 20  # without the job, the blocks queued for them take about 3 s
    while any(map(_running, builders)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in builders if _running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left
