"""Isolation of failing jobs, determinism, and many workers finishing at once."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

import yaml
from harness.cli import main
from harness.config import validate_config
from harness.runner import run_sweep
from methods import MergeMethod


def failing_sweep(d: dict, tmp_path) -> tuple:
    """`harness sweep` of ``d`` that must exit 1; its result and stderr on one line."""
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", "-q", str(f)], env={"COLUMNS": "200"})
    assert r.exit_code == 1, r.output
    return r, " ".join(r.stderr.split())


def test_failures_are_isolated_and_reported(sweep_dict, tmp_path):
    d = dict(sweep_dict, methods=[
        {"name": "weight_averaging"},
        {"name": "tests.faulty_methods:NanWeights", "label": "nan-weights"},
        {"name": "tests.faulty_methods:OutOfMemory", "label": "oom"},
        {"name": "tests.faulty_methods:NanLoss", "label": "nan-loss"},
        {"name": "task_arithmetic"},
    ])
    r, err = failing_sweep(d, tmp_path)
    assert "3 of 8 jobs failed" in err
    assert ("nan-weights: FloatingPointError: merge() of tests.faulty_methods:NanWeights returned an encoder "
            "that maps one image of toy_stripes to non-finite features") in err
    assert "oom: out of memory" in err
    assert "nan-loss: FloatingPointError: adaptation loss is NaN" in err
    assert "weight_averaging" in r.stdout and "task_arithmetic" in r.stdout  # the others finished
    cfg = validate_config(d)
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    for label, reason in (("nan-weights", "non-finite"), ("oom", "out of memory"), ("nan-loss", "NaN")):
        run = client.search_runs([exp], f"tags.`harness.label` = '{label}'")[0]
        assert run.info.status == "FAILED" and reason in run.data.tags["harness.failure_reason"]
    ok = client.search_runs([exp], "tags.`harness.label` = 'task_arithmetic'")[0]
    assert ok.info.status == "FINISHED"


def test_a_failed_robustness_study_is_reported_with_its_traceback_and_exit_code(sweep_dict, tmp_path):
    """A job whose robustness study (run inside it) failed keeps its main row; the command
    summarises the study's failure as it does a failed job's (reason, traceback path, exit code
    1), not as a failed job, and its robustness row reads failed beside the others' numbers."""
    d = dict(sweep_dict, references={"pretrained": False, "individual": False},
             robustness={"tasks": ["toy_stripes"], "corruptions": ["contrast"], "severity": 3},
             methods=[{"name": "weight_averaging"},
                      {"name": "tests.faulty_methods:FailsAdaptingOn", "label": "tta",
                       "params": {"corruption": "contrast"}}])
    r, err = failing_sweep(d, tmp_path)
    cfg = validate_config(d)
    (key,) = [p.parent.name for p in (cfg.resolved_output_dir() / "artifacts").glob("*/traceback.txt")]
    path = cfg.resolved_output_dir() / "artifacts" / key / "traceback.txt"
    assert "1 robustness study run inside a job failed" in err and "jobs failed" not in err
    assert ("tta(corruption=contrast): RobustnessStudyFailed: robustness study, contrast (severity 3): FloatingPointError: "
            f"adaptation loss is NaN at step 3 traceback: {path}") in err
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in r.stdout.splitlines() if line.startswith("│")]
    main_row = next(row for row in rows if row[:2] == ["tta", "corruption=contrast"])
    assert main_row[-2].replace(".", "", 1).isdigit()  # its average: the main row stands (a failed one's is -)
    assert ["tta", "failed", "failed"] in rows and ["weight_averaging", "failed", "failed"] not in rows


def test_a_failed_jobs_traceback_is_kept_and_a_merge_returning_none_is_named(sweep_dict, tmp_path):
    """The error line alone does not say where a user's method failed: its traceback is kept as
    the job's artifact (file and MLflow run) and its path printed in the summary."""
    import inspect

    from tests.failing_method import AlwaysFails

    d = dict(sweep_dict, references=False, methods=[
        {"name": "tests.failing_method:AlwaysFails", "label": "raiser"},
        {"name": "tests.faulty_methods:ReturnsNone", "label": "none"},
    ])
    _, err = failing_sweep(d, tmp_path)
    assert "raiser: RuntimeError: deliberate failure" in err
    assert ("none: TypeError: merge() of tests.faulty_methods:ReturnsNone returned NoneType, "
            "expected an nn.Module") in err
    cfg = validate_config(d)
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    run = client.search_runs([exp], "tags.`harness.label` = 'raiser'")[0]
    key = run.data.tags["harness.job_key"]
    path = cfg.resolved_output_dir() / "artifacts" / key / "traceback.txt"
    assert f"traceback: {path}" in err
    raise_line = inspect.getsourcelines(AlwaysFails.merge)[1] + 1
    text = path.read_text()
    assert f'failing_method.py", line {raise_line}, in merge' in text and "deliberate failure" in text
    logged = client.download_artifacts(run.info.run_id, "traceback.txt", str(tmp_path / "dl"))
    assert open(logged).read() == text


def test_a_merge_raising_prune_trial_outside_a_study_fails_with_its_row(sweep_dict, tmp_path):
    """Only a study's pruner asks a trial to stop; a sweep job that raises PruneTrial anyway fails
    as any error does (its line, its row, its traceback, run again by a rerun), rather than
    vanishing from the table as 'pruned'."""
    d = dict(sweep_dict, references=False, methods=[
        {"name": "tests.faulty_methods:PrunesOutsideAStudy", "label": "pruner"},
        {"name": "weight_averaging"},
    ])
    r, err = failing_sweep(d, tmp_path)
    assert ("pruner: PruneTrial: pruned at step 1 (raised outside an Optuna trial: only a study's trial "
            "may stop early, when ctx.report returns True)") in err
    assert "traceback: " in err
    rows = [line.split() for line in r.stdout.splitlines()]
    assert any(row[:3] == ["│", "pruner", "│"] and "failed" in row for row in rows), r.stdout
    assert "1 of 2 jobs failed: pruner: PruneTrial: pruned at step 1" in failing_sweep(d, tmp_path)[1]  # not cached


def test_same_seed_same_metrics(sweep_dict, tmp_path):
    a = run_sweep(validate_config(dict(sweep_dict, output_dir=str(tmp_path / "a"))), quiet=True)
    b = run_sweep(validate_config(dict(sweep_dict, output_dir=str(tmp_path / "b"))), quiet=True)
    assert [r.key for r in a.results] == [r.key for r in b.results]
    assert [r.metrics for r in a.results] == [r.metrics for r in b.results]


def test_eight_workers_finishing_together_lose_nothing(sweep_dict, tmp_path):
    d = dict(sweep_dict, executor={"kind": "local", "workers": 8},
             methods=[{"name": "task_arithmetic", "grid": {"scaling": [0.1 * i for i in range(1, 9)]}}])
    cfg = validate_config(d)
    out = run_sweep(cfg, quiet=True)
    assert not out.failed and len(out.results) == 1 + 2 + 8
    assert len(list((out.output_dir / "results").glob("*.json"))) == 11
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    assert sorted(c.data.tags["harness.job_key"] for c in children) == sorted(r.key for r in out.results)


def test_a_retried_job_replaces_its_failed_run(sweep_dict, tmp_path):
    d = dict(sweep_dict, methods=[{"name": "tests.faulty_methods:FailsOnce", "label": "flaky",
                                   "params": {"marker": str(tmp_path / "marker")}}])
    cfg = validate_config(d)
    first = run_sweep(cfg, quiet=True)
    assert [r.label for r in first.failed] == ["flaky"]
    second = run_sweep(cfg, quiet=True)
    assert not second.failed
    client = MlflowClient(cfg.resolved_tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id], "tags.`harness.label` = 'flaky'")
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_a_sweep_that_crashes_after_its_jobs_ends_its_mlflow_run_failed(sweep_dict, monkeypatch):
    """An error outside any job (here: building the report) must not leave the sweep's run
    RUNNING in the UI forever; the rerun reopens it and ends it FINISHED."""
    import pytest

    import harness.runner as runner

    cfg = validate_config(dict(sweep_dict, methods=[{"name": "weight_averaging"}], references=False))

    def broken_report(*args, **kwargs):
        raise RuntimeError("report writer crashed")

    with monkeypatch.context() as m:
        m.setattr(runner, "build_report", broken_report)
        with pytest.raises(RuntimeError, match="report writer crashed"):
            run_sweep(cfg, quiet=True)
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id

    def status() -> dict:
        return {r.data.tags["harness.kind"]: r.info.status for r in client.search_runs([exp])}

    assert status() == {"sweep": "FAILED", "merge": "FINISHED"}
    run_sweep(cfg, quiet=True)
    assert status() == {"sweep": "FINISHED", "merge": "FINISHED"}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_umasks_permissions(tmp_path, umask):
    """Results, sidecars and shared caches must be as readable as any file the user creates."""
    from harness.cache import atomic_write_json

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "r.json", {"a": 1})
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "r.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~umask


def test_content_keys_are_the_sha256_of_the_key_sorted_json():
    """One identity written with its items in another order is the same cache entry."""
    import hashlib

    from harness.cache import content_key

    want = hashlib.sha256(b'{"a": [1, 2], "b": "x"}').hexdigest()
    assert content_key({"b": "x", "a": [1, 2]}) == content_key({"a": [1, 2], "b": "x"}) == want[:20]
    assert content_key({"z": {"d": 1, "c": 2}}, length=32) == hashlib.sha256(b'{"z": {"c": 2, "d": 1}}').hexdigest()[:32]


def test_a_nan_in_a_tuple_is_written_as_null(tmp_path):
    """Tuples are JSON arrays too: a NaN inside one is null, not a refused write."""
    import json
    import math

    from harness.cache import atomic_write_json, finite_json

    assert finite_json({"t": (1.0, math.nan), "l": [math.inf, {"x": -math.inf}]}) == {
        "t": [1.0, None], "l": [None, {"x": None}]}
    atomic_write_json(tmp_path / "r.json", {"accs": (0.5, math.nan)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"accs": [0.5, None]}


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_saved_models_get_the_umasks_permissions(tmp_path, umask):
    """Models a cache folder shares (the embedded suite's, zero-shot heads, converted
    checkpoints) and a WeMoE job's adapted routers are written through safetensors, which
    creates its files 0600: the other users of a shared cache could not read them."""
    from harness.models import save_state_dict

    old = os.umask(umask)
    try:
        save_state_dict({"w": torch.zeros(2)}, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("how", ["in_place", "through_data", "data_replaced", "head", "load_state_dict"])
def test_a_method_that_changes_its_inputs_fails_and_later_jobs_get_fresh_ones(sweep_dict, tmp_path, how):
    """The loaded models are shared by every job of a process: a merge that edits them would
    silently change every later result (and cache it)."""
    ta = {"name": "task_arithmetic", "params": {"scaling": 0.5}}
    alone = run_sweep(validate_config(dict(sweep_dict, output_dir=str(tmp_path / "alone"), methods=[ta])), quiet=True)
    d = dict(sweep_dict, methods=[{"name": "tests.faulty_methods:ChangesItsInputs", "label": "changer",
                                     "params": {"how": how}}, ta])
    out = run_sweep(validate_config(d), quiet=True)
    failed = {r.label: r.error for r in out.failed}
    assert list(failed) == ["changer"] and "changed its inputs in place" in failed["changer"], failed
    after = {r.label: r.metrics for r in out.results}
    assert after["task_arithmetic"] == {r.label: r.metrics for r in alone.results}["task_arithmetic"]
    assert after["pretrained"] == {r.label: r.metrics for r in alone.results}["pretrained"]


def test_reading_test_data_without_asking_says_how_to_ask(sweep_dict):
    d = dict(sweep_dict, references=False, methods=[{"name": "tests.faulty_methods:ReadsTestDataUnasked", "label": "unasked"}])
    out = run_sweep(validate_config(d), quiet=True)
    assert [r.label for r in out.failed] == ["unasked"]
    assert "ReadsTestDataUnasked must set the class attribute uses_test_data = True" in out.failed[0].error


def test_an_unusable_results_file_is_run_again(sweep_dict, caplog):
    """A results file that is not a whole result (hand-edited, another program's, cut short or
    damaged so that it does not parse) is not a cached result: one warning names it, the job
    runs again and the tables come out as from a clean run."""
    import json
    import logging

    cfg = validate_config(dict(sweep_dict, methods=[{"name": "weight_averaging"}]))
    first = run_sweep(cfg, quiet=True)
    merge = next(r for r in first.results if r.kind == "merge")
    path = first.output_dir / "results" / f"{merge.key}.json"
    whole = json.loads(path.read_text())
    text = json.dumps(whole)
    parsing = [json.dumps(c) for c in ("x", {"status": "ok"}, {**whole, "metrics": {}},
                                       {**whole, "metrics": {"acc/avg": "high"}}, {**whole, "key": "another-job"},
                                       {**whole, "study_error": 5}, [whole])]
    for content in [*parsing, text[: len(text) // 2], b"\xff\xfe" + text.encode()]:  # cut short; not even text
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="harness"):
            again = run_sweep(cfg, quiet=True)
        assert again.executed == [merge.key], content
        assert [(r.method, r.avg) for r in again.rows] == [(r.method, r.avg) for r in first.rows]
        assert json.loads(path.read_text()) == whole | {"timings": json.loads(path.read_text())["timings"]}
        assert [m for m in caplog.messages if str(path) in m and "runs again" in m], content
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    runs = client.search_runs([exp], f"tags.`harness.job_key` = '{merge.key}'")
    assert [(r.info.status, r.data.metrics["acc/avg"]) for r in runs] == [("FINISHED", merge.metrics["acc/avg"])]


def test_ctrl_c_while_a_job_is_logged_ends_its_run_killed_and_the_rerun_logs_it_whole(sweep_dict, monkeypatch):
    import harness.tracking as tracking

    cfg = validate_config(dict(sweep_dict, methods=[{"name": "weight_averaging"}], references=False))

    def interrupted(name: str) -> None:
        if name == "mlflow_log":
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(tracking, "failpoint", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(cfg, quiet=True)
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id

    def runs() -> list[tuple[str, str]]:
        return sorted((r.data.tags["harness.kind"], r.info.status) for r in client.search_runs([exp]))

    assert runs() == [("merge", "KILLED"), ("sweep", "KILLED")]
    outcome = run_sweep(cfg, quiet=True)
    assert runs() == [("merge", "FINISHED"), ("sweep", "FINISHED")]
    (job,) = client.search_runs([exp], "tags.`harness.kind` = 'merge'")
    assert job.data.metrics["acc/avg"] == outcome.results[0].metrics["acc/avg"]


def test_a_job_failing_again_for_another_reason_shows_the_latest_in_mlflow(sweep_dict, tmp_path):
    """One run per job, as before, but its reason and traceback are the latest attempt's, as the
    command's summary and ``artifacts/<key>/traceback.txt`` are: they were the first attempt's."""
    reason = tmp_path / "reason.txt"
    d = dict(sweep_dict, references=False, methods=[
        {"name": "tests.failing_method:FailsWithWhatItReads", "label": "broken", "params": {"reason": str(reason)}}])
    for why in ("disk busy", "no head for toy_colours"):
        reason.write_text(why)
        _, err = failing_sweep(d, tmp_path)
        assert f": RuntimeError: {why}" in err
    cfg = validate_config(d)
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    (run,) = client.search_runs([exp], "tags.`harness.label` = 'broken'")
    assert run.info.status == "FAILED"
    assert run.data.tags["harness.failure_reason"] == "RuntimeError: no head for toy_colours"
    local = client.download_artifacts(run.info.run_id, "traceback.txt", str(tmp_path))
    assert "RuntimeError: no head for toy_colours" in open(local).read()


def test_a_job_that_succeeds_on_retry_keeps_no_traceback_of_its_failed_attempt(sweep_dict, tmp_path):
    """``artifacts/<key>/traceback.txt`` is a failed job's (README): once a rerun finishes the job,
    the first attempt's traceback must go, or the folder still says the job failed (``harness
    export`` reads a row whose every setting has one as failed)."""
    from harness.runner import traceback_file

    d = dict(sweep_dict, references=False, methods=[{"name": "tests.faulty_methods:FailsOnce", "label": "flaky",
                                                     "params": {"marker": str(tmp_path / "marker")}}])
    cfg = validate_config(d)
    (failed,) = run_sweep(cfg, quiet=True).failed
    assert "transient failure" in traceback_file(cfg.resolved_output_dir(), failed.key).read_text()
    second = run_sweep(cfg, quiet=True)
    assert not second.failed and second.executed == [failed.key]
    assert not traceback_file(cfg.resolved_output_dir(), failed.key).exists()


def test_a_job_with_a_non_finite_metric_fails_and_is_not_cached(sweep_dict):
    """A job whose metrics hold NaN (here a router statistic its method reports) is failed with the
    metric named, its MLflow run FAILED, and no result cached: a rerun retries it (README:
    isolation; failed jobs are not cached)."""
    from harness.runner import cache_status

    d = dict(sweep_dict, references=False, methods=[{"name": "tests.faulty_methods:NanRouting", "label": "nan-routing"},
                                                   {"name": "weight_averaging"}])
    cfg = validate_config(d)
    out = run_sweep(cfg, quiet=True)
    (job,) = out.failed
    assert job.label == "nan-routing" and job.error == "FloatingPointError: non-finite metric router_task_id/layer0"
    assert not (out.output_dir / "results" / f"{job.key}.json").exists()
    _, cached, _ = cache_status(cfg)
    assert job.key not in cached and len(cached) == 1
    client = MlflowClient(cfg.resolved_tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id],
                                "tags.`harness.label` = 'nan-routing'")
    assert run.info.status == "FAILED" and "non-finite metric" in run.data.tags["harness.failure_reason"]


def test_forgotten_models_and_heads_load_again_as_their_files_hold_them(sweep_dict):
    """After a job changed the loaded models in place, ``forget_models`` makes the next job read
    the pretrained model, the fine-tuned encoders and the heads again: equal to their files
    (the micro models score at chance, so a later job's accuracy alone would not tell)."""
    from harness.models import load_state_dict
    from harness.workspace import Workspace

    cfg = validate_config(sweep_dict)
    ws = Workspace(cfg)
    head = ws.head("toy_stripes").clone()
    with torch.no_grad():
        for module in (ws.pretrained_encoder, ws.finetuned_encoder("toy_stripes")):
            for p in module.parameters():
                p.zero_()
        ws.head("toy_stripes").mul_(-1.0)
    ws.forget_models()
    pre = load_state_dict(cfg.model.pretrained)
    ft = load_state_dict(cfg.model.finetuned_pattern.format(task="toy_stripes"))
    assert all(torch.equal(v, pre[f"visual.{k}"]) for k, v in ws.pretrained_encoder.state_dict().items())
    assert all(torch.equal(v, ft[k]) for k, v in ws.finetuned_encoder("toy_stripes").state_dict().items())
    assert torch.equal(ws.head("toy_stripes"), head)


@pytest.mark.parametrize("name", ["model.pt", "model[1].pt", "m?*.pt"])
def test_stale_temporaries_of_a_file_are_its_own_only(tmp_path, name):
    """A builder holding a file's lock deletes that file's leftover temporaries; another file's
    (a name it begins, or one its glob characters would match) may be a live writer's, and stays."""
    from harness.cache import remove_stale_temporaries

    own = [tmp_path / f".{name}.k1ll3d.tmp", tmp_path / f"{name}.tmp4242"]  # atomic_path's, and the older form
    others = [tmp_path / f".{name}2.live.tmp", tmp_path / ".model1.pt.live.tmp", tmp_path / ".mxy.pt.live.tmp",
              tmp_path / f"{name}.digests.tmp"]
    for p in [tmp_path / name, *own, *others]:
        p.write_bytes(b"x")
    assert set(remove_stale_temporaries(tmp_path / name)) == set(own)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, *(p.name for p in others)])


def test_an_atomic_rewrite_leaves_a_reader_of_the_old_file_its_old_bytes(tmp_path):
    """A rewrite moves a new file onto the path: a reader that opened the old one (a job reading a
    cached file while another process rewrites it) reads it whole, never half old, half new."""
    from harness.cache import atomic_write_bytes

    path = tmp_path / "cached.bin"
    atomic_write_bytes(path, b"old" * 1000)
    with open(path, "rb") as reader:
        atomic_write_bytes(path, b"new" * 1000)
        assert reader.read() == b"old" * 1000
    assert path.read_bytes() == b"new" * 1000


def test_a_written_files_recorded_digest_is_of_the_bytes_written(tmp_path):
    """The digest kept with a file is of what was moved onto its path, on the first write as on
    a rewrite: a check then finds the file as written, and finds an edit made after."""
    from harness.cache import atomic_write_bytes, check_digest

    path = tmp_path / "cache" / "file.bin"
    for data in (b"first", b"second"):
        atomic_write_bytes(path, data, digest=True)
        check_digest(path)
    path.write_bytes(b"edited")
    with pytest.raises(ValueError, match="differs from the sha256"):
        check_digest(path)


def test_a_digest_check_that_may_not_record_writes_nothing(tmp_path):
    """A lookup (a dry run finding the embedded suite built) writes nothing into the cache: a file
    cached before digests were kept gets one recorded only by a check allowed to."""
    from harness.cache import check_digest, digest_path

    path = tmp_path / "cache" / "file.bin"
    path.parent.mkdir()
    path.write_bytes(b"cached before digests")
    check_digest(path, record=False)
    assert not digest_path(path).exists()
    check_digest(path)
    assert digest_path(path).is_file()


def test_a_job_with_an_infinite_metric_fails_and_is_not_cached(sweep_dict):
    """Infinite is as non-finite as NaN: the job fails naming the metric, and nothing is cached
    (JSON would store it as null, a result every later table misreads)."""
    d = dict(sweep_dict, references=False, methods=[{"name": "tests.faulty_methods:InfRouting", "label": "inf"}])
    out = run_sweep(validate_config(d), quiet=True)
    (job,) = out.failed
    assert job.error == "FloatingPointError: non-finite metric router_task_id/layer1"
    assert not (out.output_dir / "results" / f"{job.key}.json").exists()


@pytest.mark.parametrize("kind, task, metric", [("pretrained", None, "acc/avg"), ("individual", "toy_stripes",
                                                  "acc/toy_stripes"), ("perfect_routing", "toy_stripes",
                                                  "acc/toy_stripes"), ("robustness", None, "robust/clean/avg"),
                                                 ("trial", None, "val/acc/avg")])
def test_a_cached_result_without_the_metric_its_row_reads_is_not_a_result(tmp_path, kind, task, metric):
    """Every kind's finished result carries the metric its table row reads; a file without it
    (hand-edited, another program's) is run again rather than failing the tables later."""
    import json

    from harness.job import read_result

    path = tmp_path / "k.json"
    whole = {"key": "k", "kind": kind, "label": "x", "params": {}, "task": task, "status": "ok",
             "metrics": {metric: 50.0}}
    path.write_text(json.dumps(whole))
    assert read_result(path, "k") is not None
    path.write_text(json.dumps({**whole, "metrics": {"other": 50.0}}))
    assert read_result(path, "k") is None


def test_a_result_written_by_a_newer_harness_is_reused_without_the_fields_it_adds(tmp_path):
    """A results file holding a field this code does not know (a newer harness records more of a
    job) is still this job's result, read back whole but for that field, not run again."""
    import json

    from harness.job import JobResult, read_result

    path = tmp_path / "k.json"
    whole = JobResult("k", "merge", "x", {"scaling": 0.3}, None, status="ok", metrics={"acc/avg": 50.0},
                      inputs={"eval": "0123456789ab"})
    path.write_text(json.dumps({**whole.to_dict(), "energy_kwh": 0.2}))
    assert read_result(path, "k") == whole


class GlobalDraw(MergeMethod):
    """Weight averaging that draws from torch's global generator (as third-party code does)."""

    def merge(self, pretrained, finetuned, ctx):
        from methods.weight_averaging import WeightAveraging

        ctx.artifacts["draw"] = torch.rand(3).tolist()
        return WeightAveraging().merge(pretrained, finetuned, ctx)


def test_a_merge_drawing_from_the_global_generator_draws_the_same_whatever_ran_before(sweep_dict):
    """Its job's key holds the sweep's seed and nothing of what the process ran before: the
    global generator is seeded with it before each merge, so the cached result is the one a
    fresh process would compute."""
    d = dict(sweep_dict, references=False, methods=[{"name": "tests.test_reliability:GlobalDraw"}])
    draws = []
    for i in range(2):
        torch.manual_seed(100 + i)  # another job, another library, ran before
        torch.rand(7)
        (result,) = run_sweep(validate_config(dict(d, output_dir=f"{d['output_dir']}-{i}")), quiet=True).results
        draws.append(result.artifacts["draw"])
    assert draws[0] == draws[1]
