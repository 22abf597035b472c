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
    """Child process body: the sweep with a kill point armed (fork: no re-import cost)."""
    import harness.failpoints as fp

    fp._hits.clear()
    if point:
        os.environ["HARNESS_FAILPOINT"] = point
    else:
        os.environ.pop("HARNESS_FAILPOINT", None)
    outcome = run_sweep(validate_config(d), quiet=True)
    os._exit(1 if outcome.failed else 0)


def run_forked(d: dict, point: str | None) -> int:
    import multiprocessing as mp

    proc = mp.get_context("fork").Process(target=_killable_run, args=(d, point))
    proc.start()
    proc.join(300)
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
