"""How the driver picks the jobs to run and collects their results, on hand-made jobs: one job per
key (the first label's), results in plan order under each label, and what counts as cached."""

from __future__ import annotations

import json
from pathlib import Path

from harness.job import JobResult
from harness.plan import JobSpec
from harness.runner import labelled_results, one_per_key, split_cached


def spec(label: str, key: str, **params) -> JobSpec:
    return JobSpec("merge", label, method="task_arithmetic", params=params, key=key)


def test_one_job_per_key_is_the_first_labels_in_plan_order():
    a, b, c, d = spec("a", "k1"), spec("b", "k2"), spec("c", "k1", scaling=0.3), spec("d", "k3")
    assert one_per_key([a, b, c, d]) == [a, b, d]


def result(key: str, label: str, acc: float, **params) -> JobResult:
    return JobResult(key, "merge", label, params, None, "ok", {"acc/avg": acc, "val/acc/avg": acc})


def test_results_come_in_plan_order_once_per_label_each_under_its_own_label():
    specs = [spec("a", "k1"), spec("b", "k2"), spec("c", "k1", scaling=0.3), spec("a", "k1"), spec("e", "k9")]
    results = {"k2": result("k2", "b", 20.0), "k1": result("k1", "a", 10.0)}
    got = labelled_results(specs, results)
    assert [(r.key, r.label, r.params, r.metrics["acc/avg"]) for r in got] == [
        ("k1", "a", {}, 10.0), ("k2", "b", {}, 20.0), ("k1", "c", {"scaling": 0.3}, 10.0)]
    assert got[0] is results["k1"] and results["k1"].label == "a"  # the shared result itself is left as it was


def test_only_finished_jobs_count_as_cached_each_under_the_sweeps_label(tmp_path):
    """A failed job, and one whose robustness study failed, run again; a finished one is cached
    under the label and setting the sweep now gives it (its method renamed since)."""
    def write(r: JobResult) -> None:
        (tmp_path / f"{r.key}.json").write_text(json.dumps(r.to_dict()))

    write(result("k1", "old name", 10.0))
    write(JobResult("k2", "merge", "b", {}, None, "failed", error="ValueError: no"))
    write(JobResult("k3", "merge", "c", {}, None, "ok", {"acc/avg": 30.0}, study_error="RobustnessStudyFailed: x"))
    specs = [spec("a", "k1", scaling=0.3), spec("b", "k2"), spec("c", "k3"), spec("d", "k4"), spec("a2", "k1"),
             spec("b2", "k2")]
    cached, pending = split_cached(specs, tmp_path)
    assert [(r.key, r.label, r.params, r.metrics) for r in cached.values()] == [
        ("k1", "a", {"scaling": 0.3}, {"acc/avg": 10.0, "val/acc/avg": 10.0})]
    assert pending == [specs[1], specs[2], specs[3]]


def test_a_failed_job_is_a_failure_and_not_also_a_failed_robustness_study():
    """A job can fail after its study failed (a non-finite metric): it counts once, as failed."""
    from harness.runner import SweepOutcome, study_failures

    ok = result("k1", "a", 10.0)
    study = JobResult("k2", "merge", "b", {}, None, "ok", {"acc/avg": 1.0}, study_error="RobustnessStudyFailed: x")
    both = JobResult("k3", "merge", "c", {}, None, "failed", error="FloatingPointError: non-finite metric acc/avg",
                     study_error="RobustnessStudyFailed: y")
    assert study_failures([ok, study, both]) == [study]
    outcome = SweepOutcome([ok, study, both], [], Path("out"), None)
    assert outcome.failed == [both] and outcome.study_failed == [study]


def test_each_failed_studys_row_has_a_key_of_its_own_stable_for_its_label():
    """Two tuned labels of one method whose studies both failed are two rows, not one."""
    from types import SimpleNamespace

    from harness.runner import FAILED_STUDY, failed_study_spec

    a, b = (SimpleNamespace(name="task_arithmetic", display=label) for label in ("ta wide", "ta narrow"))
    keys = [failed_study_spec(m).key for m in (a, b, a)]
    assert keys[0] != keys[1] and keys[0] == keys[2] and all(k.startswith(FAILED_STUDY) for k in keys)
    spec_b = failed_study_spec(b)
    assert (spec_b.kind, spec_b.label, spec_b.method, spec_b.params) == ("merge", "ta narrow", "task_arithmetic", {})
