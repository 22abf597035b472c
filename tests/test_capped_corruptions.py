"""``eval.max_samples`` caps the corrupted splits too: a study corrupts only the images it scores,
each as the whole split has it, and scores what it scored when it corrupted the whole split."""

from __future__ import annotations

import torch

import tasks.corruptions as tc
from harness.config import validate_config
from harness.evaluation import correct_predictions, evaluation_indices, percent
from tasks.corruptions import CorruptedDataset, corrupted_split
from tasks.synthetic import make_toy_task
from tests.test_robustness import write_noise_eurosat


def _same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and int(a[1]) == int(b[1])


def test_a_part_of_a_split_is_the_whole_splits_images_at_those_positions(tmp_path):
    task = make_toy_task("toy_stripes", n_test=30)
    whole = corrupted_split(task, "gaussian_noise", 3, None, seed=2)
    at = [17, 2, 29, 5]
    for cache in (None, tmp_path / "memory", tmp_path / "memory"):  # uncached, built, read back
        part = corrupted_split(task, "gaussian_noise", 3, cache, seed=2, indices=at)
        assert len(part) == 4 and all(_same(part[k], whole[i]) for k, i in enumerate(at))
    full_file = tc._cache_path(tmp_path / "memory", task, None, "test", "gaussian_noise", 3, 2)
    assert not full_file.exists()  # only the part was corrupted, into a file of its own
    assert [p.name for p in (tmp_path / "memory" / "corrupted").iterdir()] == [
        tc._cache_path(tmp_path / "memory", task, None, "test", "gaussian_noise", 3, 2, at).name]


def test_a_part_of_a_disk_backed_split_keeps_each_images_label(tmp_path):
    import tasks.vision8 as v8

    write_noise_eurosat(tmp_path / "data", per_class=3)
    task = v8.eurosat(str(tmp_path / "data"), image_size=32)
    whole = CorruptedDataset(task.dataset("test"), "gaussian_noise", 2)
    at = [28, 0, 13, 7, 21]
    for cache, processes in ((None, None), (tmp_path / "c1", 1), (tmp_path / "c2", 2), (tmp_path / "c2", 2)):
        part = corrupted_split(task, "gaussian_noise", 2, cache, indices=at, processes=processes)
        assert len(part) == 5 and all(_same(part[k], whole[i]) for k, i in enumerate(at))
    assert len({int(whole[i][1]) for i in at}) > 1  # the labels say which image is where


def _study_config(sweep_dict, **extra):
    return validate_config(dict(sweep_dict, eval={"max_samples": 12},
                                robustness={"tasks": ["toy_stripes", "toy_colours"], "corruptions": ["contrast"]},
                                **extra))


def test_a_capped_study_corrupts_only_the_scored_images_and_scores_what_the_whole_split_did(sweep_dict, monkeypatch):
    from harness.job import robustness_metrics
    from harness.models import ImageClassifier
    from harness.workspace import Workspace

    ws = Workspace(_study_config(sweep_dict))
    encoder = ws.finetuned_encoder("toy_stripes")
    corrupted = []
    original = tc.corrupt_images
    monkeypatch.setattr(tc, "corrupt_images", lambda images, *a, **k: corrupted.append(len(images))
                        or original(images, *a, **k))
    got = robustness_metrics(ws, encoder, torch.device("cpu"))
    assert corrupted == [12, 12]  # the images each task scores, not its whole split
    monkeypatch.undo()
    for t in ("toy_stripes", "toy_colours"):
        task = ws.task(t)
        whole = corrupted_split(task, "contrast", 2, None)  # the whole split, the cap applied when scored
        assert len(whole) > 12
        want = percent(correct_predictions(ImageClassifier(encoder, ws.head(t)), whole, 64, "cpu", max_samples=12))
        assert got[f"robust/contrast/{t}"] == want
        scored = evaluation_indices(len(whole), 12)
        assert torch.equal(ws.corrupted(t, "contrast").tensors[0], whole.tensors[0][scored])


def test_a_capped_study_adapts_on_the_scored_images_under_a_key_of_its_own(sweep_dict, monkeypatch):
    import harness.job as job
    from harness.plan import plan_jobs
    from harness.workspace import Workspace

    cfg = _study_config(sweep_dict, methods=[{"name": "adamerging", "params": {"steps": 2, "granularity": "task"}}],
                        references={"pretrained": False, "individual": False})
    uncapped = validate_config({**cfg.model_dump(mode="json", exclude_none=True), "eval": {}})
    ws = Workspace(cfg)
    bodies = []
    monkeypatch.setattr("harness.plan.content_key", lambda body, length=20: bodies.append(body) or "k")
    for c in (cfg, uncapped, _study_config(sweep_dict, references={"pretrained": False, "individual": False},
                                           methods=[{"name": "weight_averaging"}])):
        bodies.clear()
        plan_jobs(c, ws.identity, ws.task_identity())
        # the whole key body, not the parts key_inputs digests
        merge_body, = [b for b in bodies if isinstance(b, dict) and b.get("kind") == "merge"]
        adapts_on = merge_body["robustness"].get("adapts_on")
        assert adapts_on == ("scored images" if c is cfg else None)  # results adapted on whole splits differ
    monkeypatch.undo()
    assert job.adaptation_data(cfg, "contrast")["max_samples"] == 12
    assert "max_samples" not in job.adaptation_data(uncapped, "contrast")
    assert "max_samples" not in job.adaptation_data(cfg, None)  # the clean adaptation reads the whole split
    sizes = []
    original = job.unlabeled_batches
    monkeypatch.setattr(job, "unlabeled_batches", lambda ds, *a: sizes.append(len(ds)) or original(ds, *a))
    spec = next(s for s in plan_jobs(cfg, ws.identity, ws.task_identity()) if s.kind == "merge")
    job.merge(spec, ws, torch.device("cpu"), ws.cfg.resolved_output_dir() / "work" / "x", corruption="contrast")
    assert sizes == [12] * len(cfg.seen_tasks("main"))
