"""Corrupted splits (determinism, caching, severity) and seen/unseen generalization sweeps."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from rich.console import Console

from harness.config import validate_config
from harness.runner import run_sweep
from tasks.corruptions import (
    ALL_CORRUPTIONS,
    PAPER_CORRUPTIONS,
    SEEDED_BY_ARGUMENT,
    corrupt_image,
    corrupt_images,
    corrupted_split,
)
from tasks.synthetic import make_toy_task
from tests.conftest import pixelate_split_unreadable


@pytest.fixture(scope="module")
def image():
    rng = np.random.RandomState(0)
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = (200, 40, 90)
    return np.clip(img + rng.randint(0, 30, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", PAPER_CORRUPTIONS)
def test_each_corruption_is_deterministic_and_changes_the_image(name, image):
    a = corrupt_image(image, name, 3, seed=11)
    b = corrupt_image(image, name, 3, seed=11)
    assert a.dtype == np.uint8 and a.shape == image.shape
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - image).mean() > 0.5
    assert not np.array_equal(corrupt_image(image, name, 1, 11), corrupt_image(image, name, 5, 11))


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_each_corruption_is_the_package_under_the_image_seed(name, image):
    """Every one of the 19 is imagecorruptions' own output for the seed, repeatably: the global
    numpy seed for most, the package's ``seed`` argument for impulse noise and glass blur (glass
    blur shuffles with numba's generator, which no numpy seed reaches: it differed run to run)."""
    import warnings

    from imagecorruptions import corrupt

    np.random.seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = corrupt(image, corruption_name=name, severity=3,
                           **({"seed": 11} if name in SEEDED_BY_ARGUMENT else {}))
    state = np.random.get_state()
    out = corrupt_image(image, name, 3, seed=11)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(out, expected)
    assert np.array_equal(corrupt_image(image, name, 3, seed=11), out)
    assert np.array_equal(np.random.get_state()[1], state[1])  # the caller's global state is left alone


def test_each_image_of_a_split_is_corrupted_under_its_own_seed(image):
    """Image i of ``corrupt_images`` is ``corrupt_image`` under ``image_seed(seed, i, name,
    severity)`` (the documented contract): three copies of one image get three different noises,
    and another split seed gives other ones."""
    from tasks.corruptions import image_seed

    images = np.stack([image] * 3)
    out = corrupt_images(images, "gaussian_noise", 2, seed=5)
    for i in range(3):
        assert np.array_equal(out[i], corrupt_image(image, "gaussian_noise", 2, image_seed(5, i, "gaussian_noise", 2)))
    assert not np.array_equal(out[0], out[1]) and not np.array_equal(out[1], out[2])
    assert not np.array_equal(corrupt_images(images, "gaussian_noise", 2, seed=6)[0], out[0])


def test_unknown_corruption_and_severity(image):
    with pytest.raises(ValueError, match="unknown corruption 'fogg'"):
        corrupt_image(image, "fogg", 2, 0)
    with pytest.raises(ValueError, match="severity must be 1..5"):
        corrupt_image(image, "contrast", 6, 0)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from tasks.embedded import load_task

    return load_task("emb_mnist", size="tiny", cache_dir=str(tmp_path_factory.mktemp("emb")))


def test_every_corruption_grows_with_severity(digits):
    x = digits.raw("test")[0].numpy()[:40]
    for name in PAPER_CORRUPTIONS:
        dist = [np.abs(corrupt_images(x, name, s, 0).astype(float) - x).mean() for s in (1, 5)]
        assert dist[1] > dist[0], (name, dist)


@pytest.mark.parametrize("name", ["motion_blur", "contrast"])
def test_accuracy_does_not_increase_with_severity(name, digits):
    """A fixed model (logistic regression on clean pixels) loses accuracy as severity grows.

    Tolerance: 2 points between neighbouring severities (sampling noise on 100 test images)."""
    from sklearn.linear_model import LogisticRegression

    tx, ty = digits.raw("train")
    vx, vy = digits.raw("test")
    clf = LogisticRegression(max_iter=3000).fit(tx.reshape(len(tx), -1).numpy() / 255.0, ty.numpy())

    def acc(images: np.ndarray) -> float:
        return 100 * clf.score(images.reshape(len(images), -1) / 255.0, vy.numpy())

    accs = [acc(vx.numpy())] + [acc(corrupt_images(vx.numpy(), name, s, 0)) for s in range(1, 6)]
    assert all(b <= a + 2.0 for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] < accs[0] - 20, accs


def test_corrupted_split_is_cached(tmp_path, monkeypatch):
    task = make_toy_task("toy_stripes", n_test=40)
    first = corrupted_split(task, "spatter", 2, tmp_path, seed=3)
    files = list((tmp_path / "corrupted").glob("*.npy"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("recomputed a cached corrupted split")

    monkeypatch.setattr("tasks.corruptions.corrupt_images", boom)
    again = corrupted_split(task, "spatter", 2, tmp_path, seed=3)
    assert torch.equal(first.tensors[0], again.tensors[0])
    files[0].write_bytes(b"truncated")  # a damaged cache entry is rebuilt, never read as valid
    monkeypatch.undo()
    rebuilt = corrupted_split(task, "spatter", 2, tmp_path, seed=3)
    assert torch.equal(first.tensors[0], rebuilt.tensors[0])


def write_noise_eurosat(root: Path, per_class: int = 2, seed: int = 0) -> None:
    """A tiny EuroSAT image-folder tree of noise images (20 px, read at 32 px)."""
    from PIL import Image

    from tasks.vision8 import _EUROSAT_FOLDERS

    rng = np.random.RandomState(seed)
    for folder in _EUROSAT_FOLDERS:
        for split, n in (("train", 3), ("test", per_class)):
            (root / "EuroSAT_splits" / split / folder).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.fromarray(rng.randint(0, 256, (20, 20, 3), np.uint8)).save(
                    root / "EuroSAT_splits" / split / folder / f"{k}.png")


@pytest.fixture
def counted(monkeypatch):
    """Counts corrupt_image calls (every corrupted image passes through it)."""
    import tasks.corruptions as tc

    calls = []
    original = tc.corrupt_image

    def counting(*a, **k):
        calls.append(a[1:])
        return original(*a, **k)

    monkeypatch.setattr(tc, "corrupt_image", counting)
    return calls


def items(ds) -> list:
    return [ds[i] for i in range(len(ds))]


def assert_same_items(got, want) -> None:
    assert len(got) == len(want)
    for (x, y), (x0, y0) in zip(got, want):
        assert torch.equal(x, x0) and int(y) == int(y0)


def test_disk_backed_split_is_corrupted_once_and_read_back_exactly(tmp_path, counted):
    """A disk-backed task's corrupted split is written once to the cache folder and read back
    (memory-mapped) bit for bit as the on-the-fly CorruptedDataset corrupts it, across reads,
    calls and task objects; no cache folder keeps corrupting on every read."""
    import pickle

    import tasks.vision8 as v8
    from tasks.corruptions import CachedCorruptedDataset, CorruptedDataset

    write_noise_eurosat(tmp_path / "data")
    task = v8.eurosat(str(tmp_path / "data"), image_size=32)
    truth = items(CorruptedDataset(task.dataset("test"), "gaussian_noise", 2, seed=3))
    n = len(truth)
    counted.clear()
    cached = corrupted_split(task, "gaussian_noise", 2, tmp_path / "cache", seed=3)
    assert isinstance(cached, CachedCorruptedDataset) and len(counted) == n
    assert_same_items(items(cached), truth)
    assert_same_items(items(cached), truth)
    again = corrupted_split(v8.eurosat(str(tmp_path / "data"), image_size=32), "gaussian_noise", 2,
                            tmp_path / "cache", seed=3)
    assert_same_items(items(again), truth)
    (x, y), = torch.utils.data.DataLoader(again, batch_size=n)
    assert torch.equal(x, torch.stack([t[0] for t in truth])) and y.tolist() == [t[1] for t in truth]
    blob = pickle.dumps(again)
    assert len(blob) < 1000  # the file's path travels, not the split
    assert_same_items(items(pickle.loads(blob)), truth)
    assert len(counted) == n  # each image corrupted once
    files = sorted((tmp_path / "cache" / "corrupted").iterdir())
    assert len(files) == 2 and files[0].name.endswith(".labels.npy")  # images and labels, no temp file left
    umask = os.umask(0o022)
    os.umask(umask)
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o666 & ~umask}  # a shared cache: readable by all

    plain = corrupted_split(task, "gaussian_noise", 2, None, seed=3)
    assert isinstance(plain, CorruptedDataset)
    items(plain), items(plain)
    assert len(counted) == 3 * n


def _disk_backed_split_cached(tmp_path: Path, corruption: str) -> tuple[Any, Path, list, Path]:
    """A disk-backed task, its cache folder, the items of its ``corruption`` split (severity 2)
    cached there, and the cached images' file."""
    import tasks.vision8 as v8

    write_noise_eurosat(tmp_path / "data")
    task = v8.eurosat(str(tmp_path / "data"), image_size=32)
    cache = tmp_path / "cache"
    truth = items(corrupted_split(task, corruption, 2, cache))
    path, = (cache / "corrupted").glob("*-s2-????????????????????.npy")
    return task, cache, truth, path


def test_damaged_disk_backed_cache_is_rebuilt(tmp_path, counted, monkeypatch):
    task, cache, truth, path = _disk_backed_split_cached(tmp_path, "gaussian_noise")
    n = len(truth)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # a half file (another writer's crash, a full disk)
    assert_same_items(items(corrupted_split(task, "gaussian_noise", 2, cache)), truth)
    assert len(counted) == 2 * n and path.read_bytes() == whole
    path.with_suffix(".labels.npy").unlink()  # images without their labels
    assert_same_items(items(corrupted_split(task, "gaussian_noise", 2, cache)), truth)
    assert len(counted) == 3 * n

    def fails(*a, **k):
        raise RuntimeError("killed mid-split")

    path.unlink()
    monkeypatch.setattr("tasks.corruptions.corrupt_image", fails)
    with pytest.raises(RuntimeError, match="killed mid-split"):
        corrupted_split(task, "gaussian_noise", 2, cache)
    assert [p.name for p in (cache / "corrupted").iterdir()] == [path.with_suffix(".labels.npy").name]


def _edit_in_place(path: Path, index: int) -> None:
    """Image or label ``index`` of a cached .npy changed where it lies: its header still valid."""
    arr = np.load(path, mmap_mode="r+")
    arr[index] ^= 1
    arr.flush()
    del arr


def test_a_cached_split_edited_in_place_is_rebuilt(tmp_path, counted):
    """Images or labels changed inside a valid .npy (a script writing into the cache, a bad disk
    sector) differ from the sha256 recorded when the split was written: rebuilt, never scored."""
    task, cache, truth, path = _disk_backed_split_cached(tmp_path, "contrast")
    n = len(truth)
    for edited in (path, path.with_suffix(".labels.npy")):
        whole = edited.read_bytes()
        _edit_in_place(edited, 3)
        assert edited.read_bytes() != whole and len(edited.read_bytes()) == len(whole)
        assert_same_items(items(corrupted_split(task, "contrast", 2, cache)), truth)
        assert edited.read_bytes() == whole
    assert len(counted) == 3 * n

    memory = make_toy_task("toy_stripes", n_test=12)
    first = corrupted_split(memory, "contrast", 2, cache).tensors[0].clone()
    memory_path, = (cache / "corrupted").glob("toy_stripes-*.npy")
    _edit_in_place(memory_path, 0)
    assert torch.equal(corrupted_split(memory, "contrast", 2, cache).tensors[0], first)


def test_a_split_cached_before_digests_gets_one_recorded(tmp_path, counted):
    """A split written before digests were kept is read as it is (not rebuilt) and its digest
    recorded then, so a later edit is found."""
    task = make_toy_task("toy_stripes", n_test=12)
    first = corrupted_split(task, "contrast", 2, tmp_path).tensors[0].clone()
    path, = (tmp_path / "corrupted").glob("*.npy")
    digests = list((tmp_path / "corrupted.digests").iterdir())
    assert [d.read_text() for d in digests] == [hashlib.sha256(path.read_bytes()).hexdigest()]
    digests[0].unlink()
    calls = len(counted)
    assert torch.equal(corrupted_split(task, "contrast", 2, tmp_path).tensors[0], first) and len(counted) == calls
    assert digests[0].read_text() == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_read_only_cache_corrupts_without_it(tmp_path, monkeypatch):
    """A cache folder that refuses the split's files (read-only, no permission) costs time, not
    the job: the split is corrupted as without a cache, with a warning naming the file (every
    job needing it failed with the OSError)."""
    import tasks.vision8 as v8
    from tasks.corruptions import CorruptedDataset
    from tests.conftest import read_only_under

    memory = make_toy_task("toy_stripes", n_test=12)
    write_noise_eurosat(tmp_path / "data")
    disk = v8.eurosat(str(tmp_path / "data"), image_size=32)
    truth_memory = corrupted_split(memory, "contrast", 2, None)
    truth_disk = items(CorruptedDataset(disk.dataset("test"), "contrast", 2))
    cache = tmp_path / "cache"
    cache.mkdir()
    read_only_under(monkeypatch, cache)
    with pytest.warns(UserWarning, match=rf"could not cache {cache}/corrupted/toy_stripes-contrast-s2-\w+\.npy: "
                                         "Read-only file system"):
        got = corrupted_split(memory, "contrast", 2, cache)
    assert all(torch.equal(a, b) for a, b in zip(got.tensors, truth_memory.tensors))
    with pytest.warns(UserWarning, match=rf"could not cache {cache}/corrupted/eurosat-contrast-s2-\w+\."):
        assert_same_items(items(corrupted_split(disk, "contrast", 2, cache)), truth_disk)
    assert not any(p.is_file() for p in cache.rglob("*"))


def test_changed_task_data_gives_a_new_corrupted_file(tmp_path, counted):
    """The file key holds the task's identity: an added image (or other sweep options for the
    task) is a new file, never the old split read back."""
    import tasks.vision8 as v8
    from tasks.corruptions import CorruptedDataset

    write_noise_eurosat(tmp_path / "data")
    cache = tmp_path / "cache"
    first = corrupted_split(v8.eurosat(str(tmp_path / "data"), image_size=32), "contrast", 2, cache)
    write_noise_eurosat(tmp_path / "data", per_class=3, seed=1)  # new images, one more per class
    task = v8.eurosat(str(tmp_path / "data"), image_size=32)
    second = corrupted_split(task, "contrast", 2, cache)
    assert len(second) == len(first) + 10 and len(list((cache / "corrupted").glob("*.labels.npy"))) == 2
    assert_same_items(items(second), items(CorruptedDataset(task.dataset("test"), "contrast", 2)))
    before = len(counted)
    corrupted_split(task, "contrast", 2, cache, identity={**task.identity(), "options": {"x": 1}})
    assert len(counted) == before + len(second) and len(list((cache / "corrupted").glob("*.labels.npy"))) == 3


def test_a_cached_split_is_never_another_seeds_splits_or_corruption_revisions(tmp_path, monkeypatch):
    """The file key holds the corruption seed, the split and the corruption's revision: a split
    cached under one is corrupted anew for another, each equal to the split corrupted without a
    cache (its truth); a revised corruption (its output for a seed changed) is never read back."""
    import tasks.corruptions as tc

    task = make_toy_task("toy_stripes", n_val=12, n_test=12)

    def uncached(seed: int, split: str) -> torch.Tensor:
        return corrupted_split(task, "gaussian_noise", 2, None, seed=seed, split=split).tensors[0]

    for seed, split in ((3, "test"), (4, "test"), (3, "val")):
        got = corrupted_split(task, "gaussian_noise", 2, tmp_path, seed=seed, split=split).tensors[0]
        assert torch.equal(got, uncached(seed, split)), (seed, split)
    assert not torch.equal(uncached(3, "test"), uncached(4, "test"))
    assert len(list((tmp_path / "corrupted").glob("*.npy"))) == 3
    monkeypatch.setitem(tc._REVISION, "gaussian_noise", 99)
    revised = []
    monkeypatch.setattr(tc, "corrupt_image", lambda image, *a, **k: revised.append(1) or image)
    corrupted_split(task, "gaussian_noise", 2, tmp_path, seed=3)
    assert len(revised) == 12


def test_robustness_and_generalization_sweep(sweep_dict):
    from harness.job import evaluate_encoder
    from harness.workspace import Workspace
    from methods.base import MergeContext
    from methods.task_arithmetic import TaskArithmetic

    d = dict(sweep_dict, unseen=["toy_colours"],
             robustness={"tasks": ["toy_stripes", "toy_colours"], "corruptions": ["contrast", "gaussian_noise"]},
             methods=[{"name": "task_arithmetic", "params": {"scaling": 0.5}}])
    cfg = validate_config(d)
    out = run_sweep(cfg, quiet=True)
    assert not out.failed
    ta = next(r for r in out.results if r.kind == "merge")
    # the merge used the seen task only: recompute it independently
    ws = Workspace(cfg)
    merged = TaskArithmetic(scaling=0.5).merge(ws.pretrained_encoder, {"toy_stripes": ws.finetuned_encoder("toy_stripes")},
                                              MergeContext())
    ref = evaluate_encoder(ws, merged, cfg.task_names, torch.device("cpu"), robustness=True)
    for k, v in ref.items():
        assert ta.metrics[k] == pytest.approx(v), k
    assert ta.metrics["unseen/toy_colours"] == ta.metrics["acc/toy_colours"]
    assert ta.metrics["seen/avg"] == ta.metrics["acc/toy_stripes"] == ta.metrics["acc/avg"]
    assert ta.metrics["robust/clean/avg"] == pytest.approx((ta.metrics["acc/toy_stripes"] + ta.metrics["acc/toy_colours"]) / 2)
    client = MlflowClient(cfg.resolved_tracking_uri())
    run = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id],
                             f"tags.`harness.job_key` = '{ta.key}'")[0]
    for c in ("contrast", "gaussian_noise"):
        assert run.data.metrics[f"robust/{c}/avg"] == pytest.approx(ta.metrics[f"robust/{c}/avg"])
        assert f"robust/{c}/toy_colours" in run.data.metrics
    assert "unseen/avg" in run.data.metrics
    md = (out.output_dir / "report" / "robustness.md").read_text()
    assert "| task_arithmetic |" in md and "gaussian_noise" in md
    main = (out.output_dir / "report" / "main.md").read_text()
    assert "toy_colours (unseen)" in main


def test_grid_method_runs_the_study_once_for_its_selected_setting(sweep_dict, tmp_path):
    d = dict(sweep_dict, robustness={"tasks": ["toy_stripes", "toy_colours"], "corruptions": ["contrast"]},
             methods=[{"name": "task_arithmetic", "grid": {"scaling": [0.2, 0.6, 1.0]}}])
    cfg = validate_config(d)
    printed = io.StringIO()
    out = run_sweep(cfg, console=Console(file=printed, width=200))
    assert not out.failed
    merges = [r for r in out.results if r.kind == "merge"]
    assert len(merges) == 3 and not any("robust/contrast/avg" in r.metrics for r in merges)
    (rob,) = [r for r in out.results if r.kind == "robustness"]
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("done ")]
    assert len(lines) == len(out.results)  # every job's line, printed as it finished
    for r in merges:
        assert f"done {r.title}({', '.join(f'{k}={v}' for k, v in r.params.items())}): acc/avg " \
               f"{r.metrics['acc/avg']:.1f} (val {r.metrics['val/acc/avg']:.1f})" in printed.getvalue()
    assert f"done robustness/task_arithmetic(scaling={rob.params['scaling']}): clean " \
           f"{rob.metrics['robust/clean/avg']:.1f}, corrupted {rob.metrics['robust/contrast/avg']:.1f}" in printed.getvalue()
    best = max(merges, key=lambda r: r.metrics["val/acc/avg"])
    assert rob.params == best.params
    row = next(r for r in out.rows if r.method == "task_arithmetic")
    assert row.metrics["robust/contrast/avg"] == rob.metrics["robust/contrast/avg"]
    pre = next(r for r in out.results if r.kind == "pretrained")
    assert "robust/contrast/avg" in pre.metrics  # one setting: the study runs inside the job
    assert "| task_arithmetic |" in (out.output_dir / "report" / "robustness.md").read_text()

    # the same setting as a one-setting method runs the study inline: the numbers agree
    single = dict(d, output_dir=str(tmp_path / "single"), methods=[{"name": "task_arithmetic", "params": best.params}])
    inline = next(r for r in run_sweep(validate_config(single), quiet=True).results if r.kind == "merge")
    assert {k: v for k, v in inline.metrics.items() if k.startswith("robust/")} == pytest.approx(rob.metrics)
    assert set(rob.metrics) == {"robust/clean/avg", "robust/contrast/toy_stripes", "robust/contrast/toy_colours",
                                "robust/contrast/avg"}
    assert run_sweep(cfg, quiet=True).executed == []  # a rerun finds the follow-up in the result cache


def test_two_grids_sharing_their_chosen_setting_both_get_its_robustness(trained_checkpoints, tmp_path):
    """Keys hold no label: ``tb``'s chosen setting is a job cached under ``ta``. Its robustness
    study is that setting's (one job for both rows), not ``tb``'s other grid point's. Truth: the
    setting merged by hand and scored on the corrupted splits."""
    from harness.job import robustness_metrics
    from harness.workspace import Workspace
    from methods.base import MergeContext
    from methods.task_arithmetic import TaskArithmetic
    from tests.conftest import TRAINED_TASKS, make_sweep_dict

    d = dict(make_sweep_dict(trained_checkpoints, tmp_path), tasks=TRAINED_TASKS,
             robustness={"tasks": ["toy_stripes", "toy_checks"], "corruptions": ["contrast"]},
             methods=[{"name": "task_arithmetic", "label": "ta", "grid": {"scaling": [0.3, 0.6]}},
                      {"name": "task_arithmetic", "label": "tb", "grid": {"scaling": [0.6, 1.0]}}])
    cfg = validate_config(d)
    out = run_sweep(cfg, quiet=True)
    assert not out.failed
    rows = {r.method: r for r in out.rows}
    assert rows["ta"].setting == rows["tb"].setting == "scaling=0.6"  # the shared setting is tb's choice
    robust = [r for r in out.results if r.kind == "robustness"]
    assert sorted((r.label, r.params["scaling"]) for r in robust) == [("ta", 0.6), ("tb", 0.6)]
    assert len({r.key for r in robust}) == 1 and sum(k in out.executed for k in {r.key for r in robust}) == 1
    ws = Workspace(cfg)
    merged = TaskArithmetic(scaling=0.6).merge(ws.pretrained_encoder, ws.finetuned_encoders(TRAINED_TASKS),
                                              MergeContext())
    want = robustness_metrics(ws, merged, torch.device("cpu"))
    for label in ("ta", "tb"):
        assert {k: v for k, v in rows[label].metrics.items() if k.startswith("robust/")} == pytest.approx(want)
    md = (out.output_dir / "report" / "robustness.md").read_text()
    assert f"| tb | {want['robust/clean/avg']:.1f} | {want['robust/contrast/avg']:.1f} |" in md


@pytest.mark.parametrize("edit,fragment", [
    ({"unseen": ["nope"]}, "unseen.0: not one of the sweep's tasks (got 'nope')"),
    ({"seen": ["toy_stripes"], "unseen": ["toy_stripes"]}, "unseen: tasks both seen and unseen"),
    ({"unseen": ["toy_stripes", "toy_colours"]}, "unseen: every task is unseen"),
    ({"robustness": {"tasks": ["toy_stripes"], "corruptions": ["fogg"]}}, "robustness.corruptions: unknown corruption 'fogg'"),
    ({"robustness": {"tasks": ["toy_stripes"], "severity": 9}}, "robustness.severity:"),
    ({"robustness": {"tasks": ["toy_stripes"], "corruptions": []}}, "robustness.corruptions: List should have at least 1 item"),
    ({"robustness": {"tasks": ["toy_x"]}}, "robustness.tasks.0: not one of the sweep's tasks"),
    ({"seen": ["toy_stripes", "toy_stripes"]}, "s.yaml: seen: listed twice: ['toy_stripes']"),
    ({"tasks": ["toy_stripes", "toy_colours", "toy_checks"], "seen": ["toy_stripes"], "unseen": ["toy_colours"]},
     "s.yaml: seen: tasks neither seen nor unseen: ['toy_checks']"),
    ({"unseen": ["toy_colours", "toy_colours"]}, "s.yaml: unseen: listed twice: ['toy_colours']"),
    ({"generalization": {"unseen": ["toy_colours", "toy_colours"]}},
     "generalization.unseen: listed twice: ['toy_colours']"),
    ({"generalization": {"seen": ["toy_stripes", "toy_stripes"]}}, "generalization.seen: listed twice: ['toy_stripes']"),
    ({"robustness": {"tasks": ["toy_stripes", "toy_colours", "toy_stripes"]}},
     "robustness.tasks: listed twice: ['toy_stripes']"),
    ({"robustness": {"tasks": ["toy_stripes"], "corruptions": ["contrast", "pixelate", "contrast"]}},
     "robustness.corruptions: listed twice: ['contrast']"),
])
def test_generalization_and_robustness_config_errors(edit, fragment, sweep_dict):
    from harness.config_errors import ConfigError

    with pytest.raises(ConfigError) as e:
        validate_config(dict(sweep_dict, **edit), "s.yaml")
    assert fragment in str(e.value)


def test_report_from_mlflow_matches_the_sweep(sweep_dict, tmp_path):
    """`harness report` rebuilds, from MLflow alone, the tables the sweep printed."""
    from click.testing import CliRunner

    from harness.cli import main
    from harness.report import load_sweep_from_mlflow
    from harness.results import build_rows, table_records

    d = dict(sweep_dict, unseen=["toy_colours"],
             robustness={"tasks": ["toy_stripes"], "corruptions": ["contrast"]},
             methods=[{"name": "task_arithmetic", "grid": {"scaling": [0.3, 0.7]}}, {"name": "weight_averaging"}])
    cfg = validate_config(d)
    out = run_sweep(cfg, quiet=True)
    cfg2, results, parent = load_sweep_from_mlflow(cfg.resolved_tracking_uri())
    assert parent.info.run_id == out.parent_run_id and cfg2 == cfg
    rows = build_rows(results, cfg.task_names, [m.display for m in cfg.methods], cfg.merge_tasks)
    assert table_records(rows, cfg.task_names, cfg.merge_tasks) == table_records(out.rows, cfg.task_names, cfg.merge_tasks)
    r = CliRunner().invoke(main, ["report", str(out.output_dir), "--out", str(tmp_path / "rep")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    files = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"main.md", "main.csv", "main.tex", "generalization.md", "robustness.tex", "accuracy.png",
            "robustness.png"} <= files
    tex = (tmp_path / "rep" / "main.tex").read_text()
    assert "\\begin{tabular}" in tex and "task\\_arithmetic" in tex
    gen = (tmp_path / "rep" / "generalization.csv").read_text().splitlines()
    assert gen[0] == "method,seen avg,toy_colours,unseen avg"
    # the merged rows and the zero-shot one, as the main table has them; not the fine-tuned models
    want = [f"{r.method},{r.avg:.1f},{r.acc['toy_colours']:.1f},{r.acc['toy_colours']:.1f}"
            for r in out.rows if r.method != "individual"]
    assert gen[1:] == want and [r.method for r in out.rows][:2] == ["pretrained", "individual"]
    assert (out.output_dir / "report" / "generalization.csv").read_text().splitlines() == gen


def test_report_from_mlflow_ignores_jobs_of_replaced_checkpoints(sweep_dict, micro_checkpoints, tmp_path):
    """Replacing a checkpoint's bytes keeps the sweep's config, hence its MLflow parent run, but
    changes every job key: the rebuilt report shows the new jobs only, as the sweep did."""
    import shutil

    from mlflow.tracking import MlflowClient

    from harness.report import load_sweep_from_mlflow
    from harness.results import build_rows, table_records

    ckpt = tmp_path / "ckpt"
    shutil.copytree(micro_checkpoints, ckpt)
    d = dict(sweep_dict, model={**sweep_dict["model"], "pretrained": str(ckpt / "pretrained.safetensors"),
                                "finetuned_pattern": str(ckpt / "{task}.safetensors")})
    cfg = validate_config(d)
    first = run_sweep(cfg, quiet=True)
    a, b = (ckpt / f"{t}.safetensors" for t in cfg.task_names[:2])
    tmp = tmp_path / "swap"
    a.rename(tmp), b.rename(a), tmp.rename(b)
    second = run_sweep(validate_config(d), quiet=True)
    assert second.parent_run_id == first.parent_run_id and second.executed
    runs = MlflowClient(cfg.resolved_tracking_uri()).search_runs(
        [MlflowClient(cfg.resolved_tracking_uri()).get_run(first.parent_run_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{first.parent_run_id}'")
    assert {r.data.tags["harness.job_key"] for r in runs} > {r.key for r in second.results}  # both states logged
    _, results, _ = load_sweep_from_mlflow(cfg.resolved_tracking_uri())
    assert sorted(r.key for r in results) == sorted(r.key for r in second.results)
    new = table_records(second.rows, cfg.task_names, cfg.merge_tasks)
    rows = build_rows(results, cfg.task_names, [m.display for m in cfg.methods], cfg.merge_tasks)
    assert table_records(rows, cfg.task_names, cfg.merge_tasks) == new


def test_test_time_adaptation_adapts_on_each_corruption(trained_checkpoints, tmp_path):
    """``robustness.adapt: corrupted`` (the references' protocol) scores each corruption with the
    method adapted on that corruption's test images; ``clean`` with the one adapted on clean
    images. Truth: AdaMerging run directly on the same unlabeled streams."""
    from harness.evaluation import unlabeled_batches
    from harness.job import task_accuracy
    from harness.workspace import Workspace
    from methods.adamerging import AdaMerging
    from methods.base import MergeContext
    from tests.conftest import make_sweep_dict

    params = {"granularity": "layer", "steps": 3, "lr": 0.3, "batch_size": 8, "clamp": False,
              "checkpoint_every": 0}
    study = {"tasks": ["toy_stripes", "toy_colours"], "corruptions": ["contrast", "gaussian_noise"]}
    jobs = {}
    for adapt in ("corrupted", "clean"):
        d = dict(make_sweep_dict(trained_checkpoints, tmp_path), output_dir=str(tmp_path / adapt), robustness={**study, "adapt": adapt},
                 references={"pretrained": False, "individual": False},
                 methods=[{"name": "adamerging", "params": params}])
        cfg = validate_config(d)
        out = run_sweep(cfg, quiet=True)
        assert not out.failed
        jobs[adapt] = next(r for r in out.results if r.kind == "merge")
    assert jobs["corrupted"].key != jobs["clean"].key

    ws = Workspace(cfg)
    tasks = cfg.task_names
    cpu = torch.device("cpu")

    def adapted(split) -> torch.nn.Module:
        unlabeled = {t: (lambda ds=split(t), s=i: unlabeled_batches(ds, 8, s)) for i, t in enumerate(tasks)}
        torch.manual_seed(cfg.seed)
        ctx = MergeContext(heads={t: ws.head(t) for t in tasks}, unlabeled=unlabeled, seed=cfg.seed)
        return AdaMerging(**params).merge(ws.pretrained_encoder, ws.finetuned_encoders(tasks), ctx)

    on_clean = adapted(lambda t: ws.task(t).dataset("test"))
    differs = False
    for c in study["corruptions"]:
        on_corrupted = adapted(lambda t: ws.corrupted(t, c))
        for t in study["tasks"]:
            want = task_accuracy(ws, on_corrupted, t, ws.corrupted(t, c), cpu)
            want_clean = task_accuracy(ws, on_clean, t, ws.corrupted(t, c), cpu)
            assert jobs["corrupted"].metrics[f"robust/{c}/{t}"] == pytest.approx(want), (c, t)
            assert jobs["clean"].metrics[f"robust/{c}/{t}"] == pytest.approx(want_clean), (c, t)
            differs |= want != want_clean
    assert differs  # the two protocols are told apart by this test
    for adapt in ("corrupted", "clean"):
        assert jobs[adapt].metrics["robust/clean/avg"] == pytest.approx(
            sum(task_accuracy(ws, on_clean, t, ws.task(t).dataset("test"), cpu) for t in study["tasks"]) / 2)


def ta_accuracy(cfg, split) -> dict[str, float]:
    """Per task, the accuracy of task arithmetic at 0.3 (what the faulty TTA methods merge) on
    ``split(ws, task)``, evaluated here: the truth a sweep's metrics are checked against."""
    from harness.job import task_accuracy
    from harness.workspace import Workspace
    from methods.base import with_state
    from methods.task_arithmetic import task_arithmetic_state

    ws = Workspace(cfg)
    pretrained = ws.pretrained_encoder
    merged = with_state(pretrained, task_arithmetic_state(pretrained, ws.finetuned_encoders(), 0.3))
    return {t: task_accuracy(ws, merged, t, split(ws, t), torch.device("cpu")) for t in cfg.task_names}


def job_runs(cfg, key: str) -> list:
    client = MlflowClient(cfg.resolved_tracking_uri())
    experiment = client.get_experiment_by_name(cfg.name).experiment_id
    return client.search_runs([experiment], f"tags.`harness.job_key` = '{key}'")


def test_a_failed_adaptation_on_one_corruption_is_named(sweep_dict):
    """A test-time-adaptation job whose adaptation fails on one corruption's images (after its
    clean adaptation and the other corruptions went through) says which, and loses only its
    robustness row: its main metrics are recorded (main row ok), its robustness row reads
    failed, its MLflow run carries the reason and traceback, and a rerun runs it again. Truth:
    the corruption the method was written to fail on; its merge evaluated here."""
    from harness.report import load_sweep_from_mlflow
    from harness.results import build_rows, robustness_records
    from harness.runner import cache_status, traceback_file

    d = dict(sweep_dict, references={"pretrained": False, "individual": False},
             robustness={"tasks": ["toy_stripes"], "corruptions": ["contrast", "gaussian_noise"], "severity": 3},
             methods=[{"name": "tests.faulty_methods:FailsAdaptingOn", "params": {"corruption": "gaussian_noise"}}])
    cfg = validate_config(d)
    printed = io.StringIO()
    out = run_sweep(cfg, console=Console(file=printed, width=400))
    assert not out.failed
    (job,) = out.study_failed
    assert job.study_error == ("RobustnessStudyFailed: robustness study, gaussian_noise (severity 3): "
                               "FloatingPointError: adaptation loss is NaN at step 3")
    title = "tests.faulty_methods:FailsAdaptingOn(corruption=gaussian_noise)"
    assert f"failed robustness study of {title}: {job.study_error}" in printed.getvalue()
    assert "adaptation loss is NaN at step 3" in job.error_detail
    assert "adaptation loss is NaN at step 3" in traceback_file(out.output_dir, job.key).read_text()
    assert not any(k.startswith("robust/") for k in job.metrics)

    truth = ta_accuracy(cfg, lambda ws, t: ws.task(t).dataset("test"))
    (row,) = out.rows
    assert not row.failed and row.avg == pytest.approx(sum(truth.values()) / len(truth))
    assert row.acc == pytest.approx(truth)
    csv = (out.output_dir / "report" / "robustness.csv").read_text().splitlines()
    assert csv == ["method,clean,contrast,gaussian_noise", f"{row.method},failed,failed,failed"]

    (run,) = job_runs(cfg, job.key)
    assert run.info.status == "FINISHED" and run.data.tags["harness.study_failure_reason"] == job.study_error
    assert run.data.metrics["acc/avg"] == pytest.approx(row.avg)
    assert MlflowClient(cfg.resolved_tracking_uri()).get_run(out.parent_run_id).info.status == "FAILED"  # as exit 1
    files = {a.path for a in MlflowClient(cfg.resolved_tracking_uri()).list_artifacts(run.info.run_id)}
    assert "traceback.txt" in files
    _, results, _ = load_sweep_from_mlflow(cfg.resolved_tracking_uri())
    rebuilt = build_rows(results, cfg.task_names, [m.display for m in cfg.methods], cfg.merge_tasks)
    assert robustness_records(rebuilt, ["contrast", "gaussian_noise"]) == robustness_records(
        out.rows, ["contrast", "gaussian_noise"])
    _, cached, _ = cache_status(cfg)
    assert job.key not in cached  # the study is run again


def test_the_harness_exception_classes_have_distinct_names():
    """An error line names its exception's class alone: two classes of one name (a robustness
    study's failure inside a job, a tuning study's in the driver) read as one failure."""
    import importlib
    import inspect
    import pkgutil
    from collections import defaultdict

    import harness

    where = defaultdict(list)
    for info in pkgutil.walk_packages(harness.__path__, "harness."):
        if info.name.endswith("__main__"):  # runs the command line when imported
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == info.name:
                where[name].append(info.name)
    assert "StudyFailed" in where
    assert {name: mods for name, mods in where.items() if len(mods) > 1} == {}


def test_a_study_failing_to_score_one_corruption_keeps_the_main_rows(sweep_dict, monkeypatch):
    """The zero-shot model's and a one-setting merge's studies (scoring only, no adaptation)
    failing on one corruption's split keep their main rows as the jobs evaluated them; only
    their robustness rows read failed. Truth: a sweep of the same jobs without the corruption."""

    d = dict(sweep_dict, references={"pretrained": True, "individual": False},
             robustness={"tasks": ["toy_stripes"], "corruptions": ["contrast", "pixelate"], "severity": 2},
             methods=[{"name": "weight_averaging"}])
    pixelate_split_unreadable(monkeypatch)
    out = run_sweep(validate_config(d), quiet=True)
    assert not out.failed and [r.study_error for r in out.study_failed] == [
        "RobustnessStudyFailed: robustness study, pixelate (severity 2): OSError: corrupted split unreadable"] * 2
    monkeypatch.undo()
    truth = run_sweep(validate_config(dict(d, output_dir=d["output_dir"] + "-truth",
                                           robustness={**d["robustness"], "corruptions": ["contrast"]})), quiet=True)
    assert [(r.method, r.avg, r.acc) for r in out.rows] == [(r.method, r.avg, r.acc) for r in truth.rows]
    csv = (out.output_dir / "report" / "robustness.csv").read_text().splitlines()
    assert csv == ["method,clean,contrast,pixelate", "pretrained,failed,failed,failed",
                   "weight_averaging,failed,failed,failed"]


def test_a_rerun_runs_a_failed_study_again_resuming_the_adaptations(sweep_dict, tmp_path):
    """A study that failed fails again on a rerun while its cause lasts (one MLflow run, its
    reason updated), and succeeds once it is mended: the row gains its robustness numbers and
    its run is replaced by one without the reason. No rerun adapts again what its job saved
    (the clean adaptation, the corruption that went through). Truth: the method's own log of
    the adaptations it ran; its merge scored here on the corrupted split."""
    from harness.runner import traceback_file

    flag, log = tmp_path / "flag", tmp_path / "adaptations.log"
    flag.touch()
    d = dict(sweep_dict, references={"pretrained": False, "individual": False},
             robustness={"tasks": ["toy_stripes"], "corruptions": ["contrast", "gaussian_noise"], "severity": 3},
             methods=[{"name": "tests.faulty_methods:FailsAdaptingWhile",
                       "params": {"corruption": "gaussian_noise", "flag": str(flag), "log": str(log)}}])
    cfg = validate_config(d)
    first = run_sweep(cfg, quiet=True)
    (job,) = first.study_failed
    assert log.read_text().split() == ["None", "contrast", "gaussian_noise"]

    again = run_sweep(validate_config(d), quiet=True)
    assert again.executed == [job.key] and [r.study_error for r in again.study_failed] == [job.study_error]
    assert log.read_text().split() == ["None", "contrast", "gaussian_noise", "gaussian_noise"]
    (run,) = job_runs(cfg, job.key)
    assert run.data.tags["harness.study_failure_reason"] == job.study_error

    flag.unlink()
    mended = run_sweep(validate_config(d), quiet=True)
    assert mended.executed == [job.key] and not mended.failed and not mended.study_failed
    assert log.read_text().split() == ["None", "contrast", "gaussian_noise", "gaussian_noise", "gaussian_noise"]
    (result,) = mended.results
    truth = ta_accuracy(cfg, lambda ws, t: ws.corrupted(t, "gaussian_noise"))
    assert result.metrics["robust/gaussian_noise/toy_stripes"] == pytest.approx(truth["toy_stripes"])
    assert result.metrics["acc/avg"] == pytest.approx(job.metrics["acc/avg"])
    (row,) = mended.rows
    assert row.metrics["robust/gaussian_noise/avg"] == pytest.approx(truth["toy_stripes"])
    assert not traceback_file(mended.output_dir, job.key).exists()
    (run,) = job_runs(cfg, job.key)
    assert run.info.status == "FINISHED" and "harness.study_failure_reason" not in run.data.tags
    assert run.data.metrics["robust/gaussian_noise/toy_stripes"] == pytest.approx(truth["toy_stripes"])
    assert MlflowClient(cfg.resolved_tracking_uri()).get_run(mended.parent_run_id).info.status == "FINISHED"
    assert run_sweep(validate_config(d), quiet=True).executed == []


def test_jobs_asking_for_one_split_at_once_build_it_once(tmp_path):
    """Two processes (two SLURM jobs) asking for a missing split together: one corrupts every
    image, the other waits and reads its file; a killed build's temporary file is deleted."""
    import multiprocessing as mp

    import tasks.corruptions as tc

    task = make_toy_task("toy_stripes", n_test=12)
    cache, log = tmp_path / "cache", tmp_path / "calls.log"
    truth = corrupt_images(task.raw("test")[0].numpy(), "contrast", 2, 0)
    path = tc._cache_path(cache, task, None, "test", "contrast", 2, 0)
    path.parent.mkdir(parents=True)
    stale = path.parent / f".{path.name}.dead1234.tmp"
    stale.write_bytes(b"x" * 1000)  # left by a job killed mid-build
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()

    def job() -> None:
        original = tc.corrupt_images

        def counting(images, *a, **k):
            with open(log, "a") as fh:
                fh.write(f"{len(images)} images\n")
            time.sleep(0.3)  # the other job asks while this one is still building
            return original(images, *a, **k)

        tc.corrupt_images = counting
        barrier.wait()
        results.put(tc.corrupted_split(task, "contrast", 2, cache).tensors[0].numpy())

    procs = [ctx.Process(target=job) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert log.read_text() == "12 images\n"  # each image corrupted once, by one of the two jobs
    want = tc.normalize_uint8(torch.from_numpy(truth)).numpy()
    assert np.array_equal(got[0], want) and np.array_equal(got[1], want)
    assert not stale.exists() and [p.name for p in path.parent.iterdir()] == [path.name]


def test_lock_files_are_a_fixed_set_however_many_splits_are_cached(tmp_path):
    """Every split's builders share one lock file, always the same, and a cache of thousands of
    splits has at most ``LOCK_STRIPES`` of them (a lock file is never deleted, as a job may wait on it)."""
    import tasks.corruptions as tc

    folder = tmp_path / "cache" / "corrupted"
    splits = [folder / f"emb_{i % 8}-contrast-s{i % 5 + 1}-{i:020x}.npy" for i in range(3000)]
    locks = {tc._lock_path(p) for p in splits}
    assert len(locks) == tc.LOCK_STRIPES
    assert all(lock.parent == tmp_path / "cache" / "corrupted.locks" for lock in locks)
    assert all(tc._lock_path(Path(str(p))) == tc._lock_path(p) for p in splits[:50])


def test_an_accelerator_out_of_memory_in_the_study_fails_the_job(sweep_dict, monkeypatch):
    """Out-of-memory fails the job, in its robustness study too (README): on a GPU that is
    torch's OutOfMemoryError, not MemoryError, and the study recorded it as a study failure,
    the job's row ok. Truth: the job's own failure, as the same error in its main evaluation gives."""
    import torch

    from harness.workspace import Workspace

    d = dict(sweep_dict, references={"pretrained": False, "individual": False},
             robustness={"tasks": ["toy_stripes"], "corruptions": ["contrast", "pixelate"], "severity": 2},
             methods=[{"name": "weight_averaging"}])
    corrupted = Workspace.corrupted

    def out_of_memory(self, task, corruption):
        if corruption == "pixelate":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return corrupted(self, task, corruption)

    monkeypatch.setattr(Workspace, "corrupted", out_of_memory)
    out = run_sweep(validate_config(d), quiet=True)
    assert not out.study_failed
    (job,) = out.failed
    assert job.error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" and job.study_error is None


def counted_corrupted_reads(monkeypatch, fail_on: str | None = None) -> list[str]:
    """The corruptions whose split a study reads, in order (``fail_on``'s read fails, as an
    unreadable split: the study fails on that corruption after the ones before it were scored)."""
    from harness.workspace import Workspace

    corrupted, reads = Workspace.corrupted, []

    def counted(self, task, corruption):
        reads.append(corruption)
        if corruption == fail_on:
            raise OSError("corrupted split unreadable")
        return corrupted(self, task, corruption)

    monkeypatch.setattr(Workspace, "corrupted", counted)
    return reads


@pytest.mark.parametrize("method", ["weight_averaging", "task_arithmetic"])
def test_a_retried_study_scores_only_the_corruptions_it_had_not_scored(method, sweep_dict, monkeypatch):
    """A study failing on its 3rd corruption scored the first two: the rerun scores the 3rd alone
    and records what an uninterrupted study gives. weight_averaging's study runs inside its job;
    a grid's runs as its selected setting's robustness follow-up job (which fails whole)."""
    corruptions = ["contrast", "gaussian_noise", "pixelate"]
    d = dict(sweep_dict, references={"pretrained": False, "individual": False},
             robustness={"tasks": ["toy_stripes"], "corruptions": corruptions, "severity": 2},
             methods=[{"name": method, **({"grid": {"scaling": [0.3, 0.5]}} if method == "task_arithmetic" else {})}])
    failing = counted_corrupted_reads(monkeypatch, fail_on="pixelate")
    first = run_sweep(validate_config(d), quiet=True)
    assert failing == corruptions and (first.study_failed or first.failed)
    monkeypatch.undo()
    reads = counted_corrupted_reads(monkeypatch)
    retried = run_sweep(validate_config(d), quiet=True)
    assert reads == ["pixelate"] and not retried.failed and not retried.study_failed
    monkeypatch.undo()
    whole = run_sweep(validate_config(dict(d, output_dir=d["output_dir"] + "-whole")), quiet=True)
    robust = [{k: v for k, v in r.metrics.items() if k.startswith("robust/")} for r in (retried.rows[0], whole.rows[0])]
    assert robust[0] == robust[1] and len(robust[0]) == 2 * len(corruptions) + 1


@pytest.mark.parametrize("damage", ["nan", "a task missing", "not a number"])
def test_a_study_record_that_is_not_whole_is_scored_again(damage, sweep_dict, monkeypatch):
    """A study's recorded evaluation in ``work/<key>.robustness/`` is read back only when whole
    (every task, a finite number each, README): one a hand edit or an older writer left damaged is
    scored again, and the job's metrics are the uninterrupted study's, not a NaN or a KeyError."""
    import json

    from harness.job import study_records

    d = dict(sweep_dict, references={"pretrained": False, "individual": False},
             robustness={"tasks": ["toy_stripes", "toy_colours"], "corruptions": ["contrast", "pixelate"],
                         "severity": 2},
             methods=[{"name": "weight_averaging"}])
    cfg = validate_config(d)
    (first,) = run_sweep(cfg, quiet=True).results
    records = study_records(cfg.resolved_output_dir() / "work" / first.key)
    record = json.loads((records / "pixelate.json").read_text())
    if damage == "nan":
        record["accuracy"]["toy_colours"] = float("nan")
    elif damage == "a task missing":
        del record["accuracy"]["toy_colours"]
    else:
        record["accuracy"]["toy_colours"] = "87.5"
    (records / "pixelate.json").write_text(json.dumps(record))
    (cfg.resolved_output_dir() / "results" / f"{first.key}.json").unlink()  # the job runs again, its study too
    reads = counted_corrupted_reads(monkeypatch)
    again = run_sweep(cfg, quiet=True)
    assert not again.failed and not again.study_failed and again.executed == [first.key]
    assert reads == ["pixelate", "pixelate"]  # scored again on both tasks; contrast read back
    robust = [{k: v for k, v in r.metrics.items() if k.startswith("robust/")} for r in (first, again.results[0])]
    assert robust[0] == robust[1] and len(robust[0]) == 3 * 2 + 1


@pytest.mark.parametrize("severity", [0, -1, 6])
def test_a_severity_outside_1_to_5_is_refused(severity, image):
    """ImageNet-C defines five severities; the package reads severity ``s`` as the ``s-1``-th level,
    so 0 would silently pick its last (severity 5) level."""
    with pytest.raises(ValueError, match="severity must be 1..5"):
        corrupt_image(image, "contrast", severity, 0)


@pytest.mark.parametrize("severity,factor", [(1, 0.4), (3, 0.2), (5, 0.05)])
def test_contrast_of_a_checkerboard_is_the_imagenet_c_formula(severity, factor):
    """Hand-computed: ImageNet-C's contrast maps x (in [0, 1]) to (x - mean) * c + mean with
    c = .4, .3, .2, .1, .05 by severity, then truncates x * 255 to uint8; a black-and-white
    checkerboard's mean is 0.5. A 16-px board goes through the upscaled copy and back."""
    for size in (32, 16):
        board = np.zeros((size, size, 3), np.uint8)
        board[(np.add.outer(np.arange(size), np.arange(size)) % 2).astype(bool)] = 255
        out = corrupt_image(board, "contrast", severity, seed=0)
        dark, light = int((0.5 - 0.5 * factor) * 255), int((0.5 + 0.5 * factor) * 255)
        assert np.array_equal(out, np.where(board == 255, light, dark).astype(np.uint8)), (size, np.unique(out))


def test_corrupting_leaves_the_callers_random_state_alone(image):
    """The caller's numpy stream continues as if nothing drew from it (a seed that is not the
    corruption's own: under the same seed, the state after drawing is the same either way)."""
    np.random.seed(123)
    state = np.random.get_state()
    corrupt_image(image, "gaussian_noise", 3, seed=11)
    after = np.random.get_state()
    assert np.array_equal(after[1], state[1]) and after[2] == state[2]


def test_a_draw_giving_invalid_values_is_replaced_by_the_next_seeds(image, monkeypatch):
    """Spatter can divide by zero for some draws (NaN pixels): such a draw is redone under the
    image's seed + 1, deterministically (the same seed again would give the same NaNs)."""
    import warnings

    import imagecorruptions

    calls = []

    def corrupt(img, corruption_name, severity, **kw):
        drawn = np.random.randint(2**31)
        calls.append(drawn)
        if len(calls) == 1:
            warnings.warn("invalid value encountered in divide", RuntimeWarning)
        return np.full_like(img, drawn % 256)

    monkeypatch.setattr(imagecorruptions, "corrupt", corrupt)
    out = corrupt_image(image, "spatter", 2, seed=40)
    expected = [np.random.RandomState(s).randint(2**31) for s in (40, 41)]
    assert calls == expected
    assert np.array_equal(out, np.full_like(image, expected[1] % 256))


def test_the_image_seed_formula_is_pinned():
    """Cached corrupted splits are keyed by the split seed, not by how each image's seed derives
    from it: a changed formula would read stale files as the new ones. Hand-computed: the first
    4 bytes, little-endian, of sha256("seed/index/name/severity")."""
    import hashlib

    from tasks.corruptions import image_seed

    for args in [(0, 0, "gaussian_noise", 3), (7, 12, "contrast", 1), (7, 12, "contrast", 5)]:
        digest = hashlib.sha256("/".join(map(str, args)).encode()).digest()
        assert image_seed(*args) == int.from_bytes(digest[:4], "little")
    assert image_seed(7, 12, "contrast", 1) != image_seed(7, 12, "contrast", 5)


def test_denormalizing_a_normalized_image_gives_its_pixels_back():
    """A disk-backed split is corrupted from its preprocessed tensors: the uint8 pixels recovered
    from CLIP normalisation must be the original ones, rounded (truncating float error would
    darken 255 to 254)."""
    from tasks.base import normalize_uint8
    from tasks.corruptions import _denormalize

    pixels = torch.arange(256, dtype=torch.uint8).repeat(3 * 16).reshape(1, 64, 64, 3)
    back = _denormalize(normalize_uint8(pixels)[0])
    assert np.array_equal(back, pixels[0].numpy())


def test_a_small_image_is_corrupted_at_32_px_and_averaged_back(image):
    """An image under 32 px is corrupted as an upscaled copy whose blocks are then averaged (a
    box filter): each output pixel is the mean of its 2x2 block, up to rounding, not one noisy
    pixel of it picked."""
    small = image[::2, ::2].copy()  # 16 px: upscaled by 2
    big = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)
    corrupted_big = corrupt_image(big, "gaussian_noise", 3, seed=9).astype(float)
    block_means = corrupted_big.reshape(16, 2, 16, 2, 3).mean(axis=(1, 3))
    out = corrupt_image(small, "gaussian_noise", 3, seed=9)
    assert np.abs(out - block_means).max() <= 1.0


def test_a_small_non_square_image_is_upscaled_by_the_least_factor_reaching_32_px(image):
    """A 12 x 20 image is corrupted as its 3x nearest-neighbour copy (36 x 60: 2x would give 24 px,
    still under 32) and each output pixel is the mean of its 3x3 block, up to rounding. Truth:
    the upscaled copy built by hand (rows and columns repeated) and corrupted at full size."""
    small = image[:12, :20].copy()
    big = np.repeat(np.repeat(small, 3, axis=0), 3, axis=1)
    corrupted_big = corrupt_image(big, "gaussian_noise", 3, seed=9).astype(float)
    block_means = corrupted_big.reshape(12, 3, 20, 3, 3).mean(axis=(1, 3))
    out = corrupt_image(small, "gaussian_noise", 3, seed=9)
    assert out.shape == small.shape and out.dtype == np.uint8
    assert np.abs(out - block_means).max() <= 1.0


def test_a_float_or_resized_package_output_is_rounded_clipped_and_resized_back(monkeypatch):
    """Where the package returns floats, or an array of another size, the image comes back as
    uint8 of its own shape: values rounded to the nearest integer and clipped to 0..255, and a
    resized array scaled back to the image's width and height (a non-square image tells them apart)."""
    import imagecorruptions

    image = np.zeros((32, 48, 3), np.uint8)
    floats = np.tile(np.array([-5.0, 10.6, 10.4, 300.0]), 32 * 48 * 3 // 4).reshape(32, 48, 3)
    monkeypatch.setattr(imagecorruptions, "corrupt", lambda img, corruption_name, severity, **kw: floats)
    out = corrupt_image(image, "contrast", 2, seed=0)
    assert out.dtype == np.uint8 and np.array_equal(out, np.tile(np.array([0, 11, 10, 255], np.uint8),
                                                                   32 * 48 * 3 // 4).reshape(32, 48, 3))
    monkeypatch.setattr(imagecorruptions, "corrupt",
                        lambda img, corruption_name, severity, **kw: np.full((40, 60, 3), 77, np.uint8))
    out = corrupt_image(image, "contrast", 2, seed=0)
    assert out.shape == image.shape and out.dtype == np.uint8 and (out == 77).all()


def test_a_retried_draw_of_a_corruption_seeded_by_argument_gets_the_next_seed_too(image, monkeypatch):
    """Impulse noise and glass blur draw from the package's ``seed`` argument: a draw redone for
    invalid values is redone under seed + 1 there as well (the same argument again gives the same draw)."""
    import warnings

    import imagecorruptions

    seeds = []

    def corrupt(img, corruption_name, severity, **kw):
        seeds.append(kw["seed"])
        if len(seeds) == 1:
            warnings.warn("invalid value encountered in divide", RuntimeWarning)
        return img

    monkeypatch.setattr(imagecorruptions, "corrupt", corrupt)
    for name in SEEDED_BY_ARGUMENT:
        seeds.clear()
        corrupt_image(image, name, 2, seed=40)
        assert seeds == [40, 41], name


def test_denormalizing_clips_values_outside_the_pixel_range():
    """A preprocessed value beyond what uint8 pixels give (a resampling filter's overshoot) becomes
    0 or 255, never a wrapped-around byte."""
    from tasks.base import CLIP_MEAN, CLIP_STD
    from tasks.corruptions import _denormalize

    x = torch.zeros(3, 1, 3)
    for c in range(3):
        x[c, 0] = torch.tensor([(1.5 - CLIP_MEAN[c]) / CLIP_STD[c], (-0.5 - CLIP_MEAN[c]) / CLIP_STD[c],
                                (1.0 - CLIP_MEAN[c]) / CLIP_STD[c]])
    assert _denormalize(x).tolist() == [[[255] * 3, [0] * 3, [255] * 3]]


@pytest.mark.parametrize("foreign", [np.zeros((11, 16, 16, 3), np.uint8), np.zeros((12, 16, 16, 3), np.int16),
                                     np.zeros((12, 8, 8, 3), np.uint8)])
def test_a_cache_file_of_another_shape_or_dtype_is_rebuilt(foreign, tmp_path):
    """A file at a split's cache path holding another number of images, image size or dtype (one
    with no digest recorded, as a split cached before digests is read) is rebuilt, never scored.
    Truth: the split corrupted without a cache."""
    import tasks.corruptions as tc

    task = make_toy_task("toy_stripes", n_test=12)
    truth = corrupted_split(task, "contrast", 2, None).tensors
    path = tc._cache_path(tmp_path, task, None, "test", "contrast", 2, 0)
    path.parent.mkdir(parents=True)
    np.save(path, foreign)
    got = corrupted_split(task, "contrast", 2, tmp_path).tensors
    assert all(torch.equal(a, b) for a, b in zip(got, truth))
    assert np.load(path).shape == (12, 16, 16, 3) and np.load(path).dtype == np.uint8


@pytest.mark.parametrize("code", ["EACCES", "EPERM"])
def test_a_cache_without_permission_corrupts_without_it(code, tmp_path, monkeypatch):
    """No permission on the cache folder (a shared cache) is refused as a read-only one is: a
    warning naming the file, the split corrupted without the cache (truth: no cache folder)."""
    import errno

    task = make_toy_task("toy_stripes", n_test=12)
    truth = corrupted_split(task, "contrast", 2, None).tensors
    cache = tmp_path / "cache"
    cache.mkdir()
    real_open, err = os.open, getattr(errno, code)

    def denied(path, *args, **kwargs):
        if str(path).startswith(str(cache)):
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.warns(UserWarning, match=rf"could not cache {cache}/corrupted/toy_stripes-contrast-s2-\w+\.npy: "
                                         + os.strerror(err)):
        got = corrupted_split(task, "contrast", 2, cache).tensors
    assert all(torch.equal(a, b) for a, b in zip(got, truth))


def test_the_split_seed_reaches_every_uncached_path(tmp_path, monkeypatch):
    """Seed 3 gives the same images with a cache, without one, and with a cache that refuses its
    files, for an in-memory and a disk-backed task; seed 0 gives others (truth: the split cached
    under seed 3, built image by image under ``image_seed(3, i, ...)``)."""
    import tasks.vision8 as v8
    from tests.conftest import read_only_under

    memory = make_toy_task("toy_stripes", n_test=12)
    write_noise_eurosat(tmp_path / "data")
    disk = v8.eurosat(str(tmp_path / "data"), image_size=32)
    want_memory = corrupted_split(memory, "gaussian_noise", 2, tmp_path / "cache", seed=3).tensors[0].clone()
    want_disk = items(corrupted_split(disk, "gaussian_noise", 2, tmp_path / "cache", seed=3))
    assert not torch.equal(corrupted_split(memory, "gaussian_noise", 2, None, seed=0).tensors[0], want_memory)
    assert torch.equal(corrupted_split(memory, "gaussian_noise", 2, None, seed=3).tensors[0], want_memory)
    assert_same_items(items(corrupted_split(disk, "gaussian_noise", 2, None, seed=3)), want_disk)
    refusing = tmp_path / "refusing"
    refusing.mkdir()
    read_only_under(monkeypatch, refusing)
    with pytest.warns(UserWarning, match="could not cache"):
        assert torch.equal(corrupted_split(memory, "gaussian_noise", 2, refusing, seed=3).tensors[0], want_memory)
    with pytest.warns(UserWarning, match="could not cache"):
        assert_same_items(items(corrupted_split(disk, "gaussian_noise", 2, refusing, seed=3)), want_disk)


def test_another_split_is_that_splits_images_corrupted_and_its_labels_untouched(tmp_path):
    """``split="val"`` corrupts the val images and keeps their labels as they are, with a cache
    and without. Truth: the raw val images corrupted image by image, CLIP-normalised by hand."""
    from tasks.base import CLIP_MEAN, CLIP_STD
    from tasks.corruptions import image_seed

    task = make_toy_task("toy_stripes", n_val=8, n_test=12)
    images, labels = task.raw("val")
    want = np.stack([corrupt_image(images[i].numpy(), "contrast", 2, image_seed(0, i, "contrast", 2))
                     for i in range(8)])
    want = ((torch.from_numpy(want).permute(0, 3, 1, 2).float() / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
            / torch.tensor(CLIP_STD).view(1, 3, 1, 1))
    for cache in (None, tmp_path):
        x, y = corrupted_split(task, "contrast", 2, cache, split="val").tensors
        torch.testing.assert_close(x, want)
        assert y.tolist() == labels.tolist()


def test_a_draw_still_invalid_after_eight_seeds_is_the_eighth(image, monkeypatch):
    """Eight draws in a row giving invalid values: the eighth (seed + 7) is kept, as deterministic
    as any other, rather than a ninth draw under no seed of the image's."""
    import warnings

    import imagecorruptions

    def corrupt(img, corruption_name, severity, **kw):
        warnings.warn("invalid value encountered in divide", RuntimeWarning)
        return np.full_like(img, np.random.randint(256))

    monkeypatch.setattr(imagecorruptions, "corrupt", corrupt)
    out = corrupt_image(image, "spatter", 2, seed=40)
    assert np.array_equal(out, np.full_like(image, np.random.RandomState(47).randint(256)))


def test_a_sweeps_corrupted_split_is_drawn_under_its_robustness_seed(sweep_dict):
    """The workspace corrupts a task's test split under the sweep's ``robustness.seed`` and
    severity: the split equals the one corrupted without a cache under that seed, not the
    default seed's noise."""
    from harness.workspace import Workspace

    d = dict(sweep_dict, robustness={"tasks": ["toy_stripes"], "corruptions": ["gaussian_noise"], "severity": 3,
                                     "seed": 5})
    ws = Workspace(validate_config(d))
    got = ws.corrupted("toy_stripes", "gaussian_noise").tensors[0]
    task = ws.task("toy_stripes")
    assert torch.equal(got, corrupted_split(task, "gaussian_noise", 3, None, seed=5).tensors[0])
    assert not torch.equal(got, corrupted_split(task, "gaussian_noise", 3, None, seed=0).tensors[0])


def test_a_split_corrupted_for_other_options_of_a_factory_of_ones_own_is_not_read_back(sweep_dict):
    """The corrupted-split cache is keyed by the task's identity in the sweep, options included:
    a factory of one's own whose ``identity()`` ignores an option (here a label shift) gets its
    own split, its labels those of its own test split, not the split cached for the other value."""
    import copy

    from harness.workspace import Workspace

    name = "tests.own_tasks:shifted_labels"
    for shift in (0, 1):
        d = copy.deepcopy(sweep_dict)
        d["tasks"] = [*d["tasks"], {"name": name, "options": {"shift": shift}}]
        d["robustness"] = {"tasks": [name], "corruptions": ["contrast"]}
        ws = Workspace(validate_config(d))
        got = [int(y) for _, y in items(ws.corrupted(name, "contrast"))]
        assert got == [int(y) for y in ws.task(name).dataset("test").tensors[1]] and min(got) == shift
    assert len(list((Path(sweep_dict["cache_dir"]) / "corrupted").glob("mine-*.labels.npy"))) == 2


def test_an_unseen_task_without_a_checkpoint_file_is_checked_without_one(sweep_dict):
    """An unseen task needs no fine-tuned checkpoint: its pattern path that does not exist is left
    out of the inputs, so the sweep's checks pass and no key names the missing file."""
    from harness.workspace import Workspace

    d = dict(sweep_dict, tasks=["toy_stripes", "toy_colours", "toy_checks"], unseen=["toy_checks"])
    ws = Workspace(validate_config(d))
    ws.preflight()
    assert sorted(ws.sources["finetuned"]) == sorted(ws.identity["finetuned"]) == ["toy_colours", "toy_stripes"]


def test_a_perfect_routing_bound_merges_the_seen_tasks_only(sweep_dict):
    """The perfect-routing bound of a sweep with an unseen task is task arithmetic over the seen
    tasks' encoders with the task's own MLPs: the unseen task's checkpoint, present on disk, is
    no part of it (hand-computed: pretrained + scaling * (fine-tuned - pretrained) outside MLPs)."""
    from harness.job import perfect_routing_encoder
    from harness.workspace import Workspace

    d = dict(sweep_dict, unseen=["toy_colours"], references={"perfect_routing": True})
    ws = Workspace(validate_config(d))
    got = perfect_routing_encoder(ws, "toy_stripes", 0.5).state_dict()
    pre, ft = ws.pretrained_encoder.state_dict(), ws.finetuned_encoder("toy_stripes").state_dict()
    assert any(".mlp." in k for k in pre)
    for k, v in pre.items():
        want = ft[k] if ".mlp." in k else v + 0.5 * (ft[k] - v)
        assert torch.allclose(got[k], want, atol=1e-6), k


def test_a_study_records_beside_the_jobs_work_folder_never_in_it(sweep_dict):
    """``work/<key>/`` holds only what a method saved (``harness export`` reads a non-empty one
    as a saved adaptation): a merge that saves nothing gets none, its study's records lying in
    ``work/<key>.robustness/`` (README)."""
    d = dict(sweep_dict, references={"pretrained": False, "individual": False},
             robustness={"tasks": ["toy_stripes"], "corruptions": ["contrast"], "severity": 2},
             methods=[{"name": "weight_averaging"}])
    cfg = validate_config(d)
    (result,) = run_sweep(cfg, quiet=True).results
    work = cfg.resolved_output_dir() / "work"
    assert not (work / result.key).exists()
    assert (work / f"{result.key}.robustness" / "contrast.json").is_file()


@pytest.mark.parametrize("name", ["gaussian_noise", "impulse_noise"])
def test_an_image_seed_of_2_to_the_31_or_more_is_used_with_all_its_bits(name):
    """Half of the image seeds are 2**31 or more (four sha256 bytes): each seeds numpy's global
    state, and the package's ``seed`` argument where that is what draws, as it is, not folded onto
    a smaller range (which would give such an image another seed's noise). Truth: the package
    under that very seed."""
    import warnings

    from imagecorruptions import corrupt

    image = np.full((32, 32, 3), 128, np.uint8)
    seed = 2**31 + 5
    np.random.seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = corrupt(image, corruption_name=name, severity=3,
                           **({"seed": seed} if name in SEEDED_BY_ARGUMENT else {}))
    assert np.array_equal(corrupt_image(image, name, 3, seed=seed), expected)
    assert not np.array_equal(corrupt_image(image, name, 3, seed=5), expected)


def test_an_image_under_32_px_on_one_side_only_is_corrupted_upscaled(image):
    """The package needs 32 px on both sides: a 16 x 40 image is corrupted as its 2x
    nearest-neighbour copy (32 x 80) and each output pixel is the mean of its 2x2 block, up to
    rounding. Truth: the copy built by hand and corrupted at full size."""
    small = np.concatenate([image[::2], image[::2, :8]], axis=1)  # 16 x 40
    big = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)
    corrupted_big = corrupt_image(big, "gaussian_noise", 3, seed=9).astype(float)
    block_means = corrupted_big.reshape(16, 2, 40, 2, 3).mean(axis=(1, 3))
    out = corrupt_image(small, "gaussian_noise", 3, seed=9)
    assert out.shape == small.shape and np.abs(out - block_means).max() <= 1.0


@pytest.mark.parametrize("value,pixel", [(300.0, 255), (-5.0, 0)])
def test_a_resized_float_package_output_is_clipped_before_it_is_scaled_back(value, pixel, monkeypatch):
    """A float array of another size is clipped to 0..255 before it becomes uint8 and is resized
    back: 300 is white and -5 black, not a byte wrapped around (300 would read as 44)."""
    import imagecorruptions

    image = np.zeros((32, 48, 3), np.uint8)
    monkeypatch.setattr(imagecorruptions, "corrupt",
                        lambda img, corruption_name, severity, **kw: np.full((40, 60, 3), value))
    out = corrupt_image(image, "contrast", 2, seed=0)
    assert out.shape == image.shape and (out == pixel).all()


def test_the_default_corruptions_are_the_papers_seven():
    """A robustness block without ``corruptions`` scores the seven of AdaMerging's and WeMoE's
    robustness tables (their Table 5 / 6 columns), each a name the package knows."""
    from harness.config import RobustnessSpec

    paper = ["motion_blur", "impulse_noise", "gaussian_noise", "pixelate", "spatter", "contrast", "jpeg_compression"]
    assert RobustnessSpec(tasks=["toy_stripes"]).corruptions == paper
    assert set(paper) <= set(ALL_CORRUPTIONS)


def test_every_corruption_the_package_knows_is_accepted():
    """The accepted names are exactly imagecorruptions' own list (its 15 ImageNet-C ones and 4 extra):
    a name dropped from ours would refuse a corruption the package implements."""
    from imagecorruptions import get_corruption_names

    assert list(ALL_CORRUPTIONS) == get_corruption_names("all")


def test_a_corrupted_dataset_s_default_seed_is_the_splits_default_seed():
    """Without a seed, :class:`CorruptedDataset` draws each image under ``image_seed(0, i, ...)``,
    as :func:`corrupted_split` does by default (truth: the images corrupted one by one by hand)."""
    from tasks.corruptions import CorruptedDataset, _denormalize, image_seed

    task = make_toy_task("toy_stripes", n_test=3)
    base = task.dataset("test")
    dataset = CorruptedDataset(base, "gaussian_noise", 3)
    for i in range(3):
        want = corrupt_image(_denormalize(base[i][0]), "gaussian_noise", 3, image_seed(0, i, "gaussian_noise", 3))
        assert np.array_equal(_denormalize(dataset[i][0]), want)


@pytest.mark.parametrize("size", [16, 40])
def test_a_corrupted_image_is_a_writable_array_of_its_own_at_any_size(size):
    """An image under 32 px goes through PIL, whose arrays are read-only views: handed to
    ``torch.from_numpy`` as it was, it warned of undefined behaviour and shared PIL's buffer. Small
    or not, the result is a writable uint8 array of the input's shape."""
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = corrupt_image(image, "contrast", 2, 0)
    assert out.flags.writeable and out.flags.owndata and out.dtype == np.uint8 and out.shape == image.shape


def test_a_test_time_adaptation_saving_nothing_leaves_no_work_folder_adapting_on_corruptions(sweep_dict):
    """A method of one's own that adapts on test data and saves nothing, its study adapting on each
    corruption (``adapt: corrupted``, in ``work/<key>/corrupted-<name>/``): its job left an empty
    ``work/<key>/``, which ``harness export`` would not read as a saved adaptation but a reader of
    the folder counts as one. Truth: the folder listing."""
    d = dict(sweep_dict, references={"pretrained": False, "individual": False},
             robustness={"tasks": ["toy_stripes"], "corruptions": ["contrast", "gaussian_noise"], "severity": 2,
                         "adapt": "corrupted"},
             methods=[{"name": "tests.faulty_methods:FailsAdaptingOn", "params": {"corruption": "fog"}}])
    cfg = validate_config(d)
    out = run_sweep(cfg, quiet=True)
    (result,) = out.results
    assert not out.failed and not out.study_failed
    assert any(k.startswith("robust/") for k in result.metrics)
    work = cfg.resolved_output_dir() / "work"
    assert not (work / result.key).exists(), sorted((work / result.key).rglob("*"))
    assert sorted(p.name for p in (work / f"{result.key}.robustness").iterdir()) == ["contrast.json",
                                                                                   "gaussian_noise.json"]
