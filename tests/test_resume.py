"""A sweep SIGKILLed at many points and rerun ends exactly like an uninterrupted one."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlflow.tracking import MlflowClient

from harness.config import validate_config
from harness.runner import run_sweep
from tests.conftest import make_sweep_dict

ROOT = Path(__file__).resolve().parents[1]

# (failpoint, hit): preparation, merging, adaptation, evaluation, result caching and MLflow logging
KILL_POINTS = [
    "prepare", "merged:1", "evaluate:2", "job_done:1", "cache_write:1", "mlflow_log:1", "merged:1",
    "evaluate:5", "tta_step:3", "tta_step:2", "job_done:2", "cache_write:1", "mlflow_log:2", "report",
]


def _killable_run(d: dict, point: str | None) -> None:
    """Child process body: the sweep with a kill point armed (forked: no re-import cost)."""
    import harness.failpoints as fp

    fp._hits.clear()
    if point:
        os.environ["HARNESS_FAILPOINT"] = point
    else:
        os.environ.pop("HARNESS_FAILPOINT", None)
    outcome = run_sweep(validate_config(d), quiet=True)
    os._exit(1 if outcome.failed else 0)


def run_forked(d: dict, point: str | None) -> int:
    """Exit code of the sweep run in a child forked from the harness's preloaded server: a
    child forked from this process, whose OpenMP threads have run, can hang in its first
    parallel region."""
    from harness.executors.server import worker_context

    proc = worker_context().Process(target=_killable_run, args=(d, point))
    proc.start()
    proc.join(300)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise AssertionError(f"the sweep killed at {point!r} did not end within 300 s")
    return proc.exitcode


def sweep(ckpt: Path, root: Path) -> dict:
    d = make_sweep_dict(ckpt, root)
    d["methods"] = [{"name": "weight_averaging"},
                    {"name": "task_arithmetic", "grid": {"scaling": [0.1, 0.2, 0.3, 0.5, 0.6, 0.8]}},
                    {"name": "ties", "params": {"k": 50}, "grid": {"scaling": [0.5, 1.0]}},
                    {"name": "adamerging", "params": {"granularity": "layer", "steps": 6, "checkpoint_every": 2,
                                                      "batch_size": 8}}]
    return d


def test_killed_at_many_points_then_resumed(micro_checkpoints, tmp_path):
    reference = run_sweep(validate_config(sweep(micro_checkpoints, tmp_path / "ref")), quiet=True)

    d = sweep(micro_checkpoints, tmp_path / "killed")
    codes = [run_forked(d, point) for point in KILL_POINTS]
    assert set(codes) <= {-9, 0}, codes
    assert codes.count(-9) >= 10, str(list(zip(KILL_POINTS, codes)))  # at least ten kills, across every stage
    assert run_forked(d, None) == 0

    cfg = validate_config(d)
    out = cfg.resolved_output_dir()
    for f in (out / "results").iterdir():  # no half-written cache entry is left as a result
        assert f.suffix == ".json" and not f.name.startswith("."), f
        json.loads(f.read_text())
    for r in reference.results:  # bit for bit: per-image correctness, metrics, artifacts (the adaptation's losses)
        ref, resumed = (json.loads((folder / "results" / f"{r.key}.json").read_text())
                        for folder in (reference.output_dir, out))
        assert [resumed[k] for k in ("test_correct", "metrics", "artifacts")] == [
            ref[k] for k in ("test_correct", "metrics", "artifacts")], r.title
    assert (out / "report" / "main.md").read_text() == (reference.output_dir / "report" / "main.md").read_text()
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    parents = client.search_runs([exp], "tags.`harness.kind` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'", max_results=1000)
    keys = [c.data.tags["harness.job_key"] for c in children]
    assert sorted(keys) == sorted(r.key for r in reference.results)  # each job exactly once
    assert {c.info.status for c in children} == {"FINISHED"}
    ref_metrics = {r.key: r.metrics for r in reference.results}
    for c in children:
        for k, v in ref_metrics[c.data.tags["harness.job_key"]].items():
            assert abs(c.data.metrics[k] - v) < 1e-9, (k, c.data.metrics.get(k), v)


def _sweep_runs(cfg) -> tuple[MlflowClient, str]:
    client = MlflowClient(cfg.resolved_tracking_uri())
    return client, client.get_experiment_by_name(cfg.name).experiment_id


def test_a_resumed_or_extended_sweep_keeps_its_parent_and_logs_each_job_once(sweep_dict, tmp_path):
    """Settings of how a sweep runs, and more methods or grid values, leave it the same sweep:
    one parent run, each job logged once. What it measures (here the evaluation subset) makes
    another."""
    d = dict(sweep_dict, methods=[{"name": "weight_averaging"}, {"name": "task_arithmetic", "grid": {"scaling": [0.2]}}])
    first = run_sweep(validate_config(d), quiet=True)
    out = d["output_dir"]
    for change in ({"executor": {"kind": "local", "workers": 2}}, {"output_dir": out + "/"},
                   {"description": "rerun"}, {"eval": {"batch_size": 64}}, {"threads": 1}, {"device": "cpu"},
                   {"cache_dir": str(tmp_path / "other-cache")},
                   {"tracking_uri": f"sqlite:///{out}/mlflow.db"},
                   {"methods": [{"name": "weight_averaging", "label": "wa"},
                                {"name": "task_arithmetic", "grid": {"scaling": [0.2, 0.6]}}]}):
        again = run_sweep(validate_config({**d, **change}), quiet=True)
        assert again.parent_run_id == first.parent_run_id, change
    assert again.executed and len(again.executed) == 1  # the new grid value's job alone
    cfg = validate_config(d)
    client, exp = _sweep_runs(cfg)
    runs = client.search_runs([exp], max_results=1000)
    jobs = [r for r in runs if r.data.tags["harness.kind"] != "sweep"]
    assert len(runs) - len(jobs) == 1 and client.get_run(first.parent_run_id).info.status == "FINISHED"
    assert sorted(r.data.tags["harness.job_key"] for r in jobs) == sorted(r.key for r in again.results)
    assert len(jobs) == 1 + len(d["tasks"]) + 3
    assert sorted(r.data.tags["harness.label"] for r in jobs if r.data.tags["harness.kind"] == "merge") == [
        "task_arithmetic", "task_arithmetic", "wa"]  # the renamed method's run follows the sweep
    subset = run_sweep(validate_config({**d, "eval": {"max_samples": 8}}), quiet=True)
    assert subset.parent_run_id != first.parent_run_id


def test_a_killed_sweeps_runs_are_ended_by_the_next_sweep_on_its_own_store(micro_checkpoints, tmp_path):
    """A SIGKILLed driver leaves its runs RUNNING. The next sweep into the folder, holding its lock,
    ends them KILLED, even when it starts another parent run (here: another seed)."""
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["methods"] = [{"name": "weight_averaging"}, {"name": "task_arithmetic"}]
    assert run_forked(d, "mlflow_log:2") == -9
    cfg = validate_config(d)
    client, exp = _sweep_runs(cfg)
    killed = {r.info.run_id: r.info.status for r in client.search_runs([exp])}
    assert "RUNNING" in killed.values()
    reseeded = run_sweep(validate_config({**d, "seed": 1}), quiet=True)
    assert reseeded.parent_run_id not in killed
    statuses = {r.info.run_id: r.info.status for r in client.search_runs([exp])}
    assert {statuses[rid] for rid, status in killed.items() if status == "RUNNING"} == {"KILLED"}
    assert {s for rid, s in statuses.items() if rid not in killed} == {"FINISHED"}


def test_runs_in_a_shared_store_are_left_to_their_drivers(micro_checkpoints, tmp_path):
    """Another driver may be writing to a store outside the output folder: its RUNNING runs stay."""
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["methods"] = [{"name": "weight_averaging"}]
    d["tracking_uri"] = f"sqlite:///{tmp_path / 'shared.db'}"
    run_sweep(validate_config(d), quiet=True)
    client, exp = _sweep_runs(validate_config(d))
    other = client.create_run(exp, tags={"harness.kind": "sweep", "harness.sweep_digest": "another"}).info.run_id
    run_sweep(validate_config({**d, "output_dir": str(tmp_path / "out2")}), quiet=True)
    assert client.get_run(other).info.status == "RUNNING"


def test_a_sweep_on_its_own_store_leaves_another_folders_live_sweep_logging_there_alone(micro_checkpoints, tmp_path):
    """Sweep B (folder b) logs to folder a's mlflow.db through ``tracking_uri``; a's lock does not
    keep B's driver out. While B runs (its parent and a job run RUNNING), a sweep into a ends
    only runs of its own folder's experiments: B's stay RUNNING, to be ended by B's driver."""
    a = make_sweep_dict(micro_checkpoints, tmp_path)
    a["methods"] = [{"name": "weight_averaging"}]
    run_sweep(validate_config(a), quiet=True)
    b = {**a, "name": "other", "output_dir": str(tmp_path / "b"), "tracking_uri": f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"}
    run_sweep(validate_config(b), quiet=True)
    client, exp = _sweep_runs(validate_config(b))
    live = client.create_run(exp, tags={"harness.kind": "sweep", "harness.sweep_digest": "live"}).info.run_id
    job = client.create_run(exp, tags={"harness.kind": "merge", "mlflow.parentRunId": live}).info.run_id
    own_client, own_exp = _sweep_runs(validate_config(a))
    stale = own_client.create_run(own_exp, tags={"harness.kind": "sweep", "harness.sweep_digest": "stale"}).info.run_id
    run_sweep(validate_config(a), quiet=True)
    assert client.get_run(live).info.status == client.get_run(job).info.status == "RUNNING"
    assert own_client.get_run(stale).info.status == "KILLED"  # the folder's own leftovers still end


def test_temporary_files_a_killed_driver_left_are_removed_by_the_rerun(micro_checkpoints, tmp_path):
    """A driver killed while writing ``resolved.yaml`` or a failed job's traceback leaves the
    hidden temporary file of that write; the next sweep on the folder deletes them, as it does
    a killed result write's."""
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["methods"] = [{"name": "weight_averaging"}]
    cfg = validate_config(d)
    first = run_sweep(cfg, quiet=True)
    out = cfg.resolved_output_dir()
    key = first.results[0].key
    stale = [out / ".resolved.yaml.k1ll3d.tmp", out / "artifacts" / key / ".traceback.txt.k1ll3d.tmp",
             out / "results" / f".{key}.json.k1ll3d.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    run_sweep(validate_config(d), quiet=True)
    assert [p for p in stale if p.exists()] == []
    assert (out / "resolved.yaml").is_file()
