"""What a job's, a trial's and a study's MLflow runs hold: names, values and steps as given."""

from __future__ import annotations

import csv
import math

import pytest

from harness.config import validate_config
from harness.job import JobResult, artifact_metrics
from harness.plots import job_artifact_files
from harness.results import TrialCounts
from harness.tracking import Tracker

ROUTING = {"experts": ["a", "b"], "layers": 2,
           "mean_weight": {"a": [[0.75, 0.25], [0.5, 0.5]], "b": [[0.125, 0.875], [0.0, 1.0]]}}


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def children(tracker: Tracker, parent: str) -> list:
    return tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")


def test_a_job_run_holds_its_metrics_timings_curves_tags_params_and_files(sweep_dict, tmp_path):
    """Every name and step below is written out by hand: a curve's dense list is indexed from 0,
    sparse [step, value] pairs keep their steps, a null step is NaN, a timing is ``time/<name>``."""
    tracker = Tracker(validate_config(sweep_dict))
    tracker.start_sweep("d1", {})
    result = JobResult("k1", "merge", "wemoe", {"lr": 0.01}, "toy_a", "ok", metrics={"acc/avg": 61.5},
                       timings={"merge": 2.5, "eval": 0.75}, protocol="generalization",
                       warnings=["w1", "w2"], ran_on={"slurm_job": "42"},
                       artifacts={"curves": {"tta/loss": [3.0, None, 1.0], "tta/val/acc/avg": [[0, 40.0], [5, 55.0]]}})
    files = job_artifact_files({"routing": ROUTING}, tmp_path / "files")
    params = {"job": {"params": {"lr": 0.01}}, "methods": [{"name": "wemoe"}, {"name": "ta"}]}
    rid = tracker.log_job(result, params, "digest1", files)
    run = tracker.client.get_run(rid)
    assert run.data.metrics == {"acc/avg": 61.5, "time/merge": 2.5, "time/eval": 0.75, "tta/loss": 1.0,
                                "tta/val/acc/avg": 55.0}
    loss = history(tracker.client, rid, "tta/loss")
    assert [s for s, _ in loss] == [0, 1, 2] and loss[0][1] == 3.0 and math.isnan(loss[1][1]) and loss[2][1] == 1.0
    assert history(tracker.client, rid, "tta/val/acc/avg") == [(0, 40.0), (5, 55.0)]
    tags = run.data.tags
    assert {k: tags.get(k) for k in ("harness.job_key", "harness.kind", "harness.label", "harness.task",
                                     "harness.protocol", "harness.config_digest", "harness.warnings",
                                     "harness.slurm_job", "mlflow.parentRunId")} == {
        "harness.job_key": "k1", "harness.kind": "merge", "harness.label": "wemoe", "harness.task": "toy_a",
        "harness.protocol": "generalization", "harness.config_digest": "digest1", "harness.warnings": "w1\nw2",
        "harness.slurm_job": "42", "mlflow.parentRunId": tracker.parent_id}
    assert run.data.params == {"job.params.lr": "0.01", "methods.0.name": "wemoe", "methods.1.name": "ta"}
    assert run.info.status == "FINISHED"
    assert {a.path for a in tracker.client.list_artifacts(rid)} == {"routing.csv", "routing.png"}
    local = tracker.client.download_artifacts(rid, "routing.csv", str(tmp_path / "back"))
    with open(local) as fh:
        rows = [(r["data_task"], int(r["layer"]), r["expert"], float(r["mean_weight"])) for r in csv.DictReader(fh)]
    assert rows == [("a", 0, "a", 0.75), ("a", 0, "b", 0.25), ("a", 1, "a", 0.5), ("a", 1, "b", 0.5),
                    ("b", 0, "a", 0.125), ("b", 0, "b", 0.875), ("b", 1, "a", 0.0), ("b", 1, "b", 1.0)]


def test_trial_and_study_runs_hold_what_the_report_reads(sweep_dict, tmp_path):
    """A pruned trial: its intermediate values at their steps, pruned at its last one; a complete
    trial: its objective; the study's run: best setting, objective, trial counts, final job key."""
    tracker = Tracker(validate_config(sweep_dict))
    tracker.start_sweep("d1", {})
    tune = tracker.tuning_run("study1", "wemoe", {"n_trials": 4, "n_parallel": 1, "pruner": "median",
                                                    "objective": "val/acc/avg"})
    pruned = JobResult("t0", "trial", "wemoe", {}, None, "pruned")
    tracker.log_trial(tune, "study1", 0, {"lr": 0.1}, pruned, "PRUNED", "val/acc/avg", {2: 30.0, 4: 31.0, 6: 29.5})
    done = JobResult("t1", "trial", "wemoe", {}, None, "ok", metrics={"val/acc/avg": 70.0, "acc/avg": 65.0})
    tracker.log_trial(tune, "study1", 1, {"lr": 0.01}, done, "COMPLETE", "val/acc/avg", {2: 50.0})
    (tmp_path / "study.csv").write_text("number,value\n1,70.0\n")
    tracker.finish_tuning_run(tune, {"lr": 0.01}, 70.0, [tmp_path / "study.csv"],
                              TrialCounts(total=4, failed=1, pruned=2), final_key="final1")
    runs = {r.data.tags["harness.trial_number"]: r for r in children(tracker, tune)}
    client = tracker.client
    first, second = runs["0"], runs["1"]
    assert history(client, first.info.run_id, "intermediate/val/acc/avg") == [(2, 30.0), (4, 31.0), (6, 29.5)]
    assert first.data.tags["harness.pruned_at_step"] == "6" and first.data.tags["harness.trial_state"] == "PRUNED"
    assert first.data.params == {"trial.lr": "0.1"} and "objective" not in first.data.metrics
    assert second.data.metrics == {"val/acc/avg": 70.0, "acc/avg": 65.0, "objective": 70.0,
                                   "intermediate/val/acc/avg": 50.0}
    assert "harness.pruned_at_step" not in second.data.tags
    study = client.get_run(tune)
    assert study.data.metrics == {"best_objective": 70.0}
    assert history(client, tune, "best_objective") == [(0, 70.0)]
    assert history(client, second.info.run_id, "objective") == [(0, 70.0)]
    assert {k: v for k, v in study.data.tags.items() if k.startswith(("best.", "harness.trials", "harness.final"))} == {
        "best.lr": "0.01", "harness.trials": "4", "harness.trials.failed": "1", "harness.trials.pruned": "2",
        "harness.final_key": "final1"}
    assert study.data.tags["tune.n_trials"] == "4" and study.data.params == {"tune.objective": "val/acc/avg"}
    assert {a.path for a in client.list_artifacts(tune, "optuna")} == {"optuna/study.csv"}
    assert study.info.status == "FINISHED"


def test_a_trial_run_logs_its_studys_objective_not_the_average(sweep_dict):
    """With a per-task objective the trial run's ``objective`` is that task's accuracy (what the
    study was told), not the average beside it."""
    tracker = Tracker(validate_config(sweep_dict))
    tracker.start_sweep("d1", {})
    tune = tracker.tuning_run("study1", "ties", {"n_trials": 1, "n_parallel": 1, "pruner": "none",
                                                   "objective": "val/acc/toy_colours"})
    done = JobResult("t1", "trial", "ties", {}, None, "ok", metrics={"val/acc/avg": 55.0, "val/acc/toy_colours": 80.0})
    tracker.log_trial(tune, "study1", 0, {"k": 20}, done, "COMPLETE", "val/acc/toy_colours", {})
    (run,) = children(tracker, tune)
    assert run.data.metrics["objective"] == 80.0
    assert history(tracker.client, run.info.run_id, "objective") == [(0, 80.0)]


def test_router_task_identification_is_logged_per_layer_in_percent():
    """Layers 0..2 identify the task on half, a quarter and all of the images: 50, 25 and 100 %,
    averaging 175/3 %. The validation rows become sparse curves at their steps, without the
    entropy and loss, which are dense curves already."""
    artifacts = {"router_task_id": {"mean_per_layer": [0.5, 0.25, 1.0]}, "tta_loss": [2.0, 1.5],
                 "tta_validation": [{"step": 0, "val/acc/avg": 40.0, "tta_entropy": 2.0, "tta_loss": 2.0},
                                    {"step": 3, "val/acc/avg": 45.0, "tta_entropy": 1.0, "tta_loss": 1.0}]}
    assert artifact_metrics(artifacts) == pytest.approx({"router_task_id/layer0": 50.0, "router_task_id/layer1": 25.0,
                                                         "router_task_id/layer2": 100.0, "router_task_id/avg": 175 / 3})
    assert artifacts["curves"] == {"tta/loss": [2.0, 1.5], "tta/val/acc/avg": [[0, 40.0], [3, 45.0]]}


def test_a_single_router_layers_identification_is_its_own_average():
    """Routing in one layer only (a WeMoE upscaling the last block): the average is that layer's
    40 %, whatever the count of layers a divisor might assume."""
    assert artifact_metrics({"router_task_id": {"mean_per_layer": [0.4]}}) == pytest.approx(
        {"router_task_id/layer0": 40.0, "router_task_id/avg": 40.0})


def test_every_param_and_curve_point_of_a_large_job_is_logged_at_its_step(sweep_dict):
    """MLflow takes a batch of at most 100 params and 1000 metrics: 250 params and a 1200-step
    curve go in several batches, none lost. A long param value is kept up to MLflow's own
    limit (its ``MAX_PARAM_VAL_LENGTH``), and a final metric is logged at step 0."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    tracker = Tracker(validate_config(sweep_dict))
    tracker.start_sweep("d1", {})
    curve = [float(i % 7) for i in range(1200)]
    result = JobResult("k1", "merge", "ta", {}, None, "ok", metrics={"acc/avg": 50.0},
                       artifacts={"curves": {"tta/loss": curve}})
    params = {"p": {f"x{i}": i for i in range(250)}, "long": "a" * 5000, "longer": "b" * (MAX_PARAM_VAL_LENGTH + 10)}
    rid = tracker.log_job(result, params, "digest1")
    run = tracker.client.get_run(rid)
    assert run.data.params == {**{f"p.x{i}": str(i) for i in range(250)}, "long": "a" * 5000,
                               "longer": "b" * MAX_PARAM_VAL_LENGTH}
    assert history(tracker.client, rid, "tta/loss") == list(enumerate(curve))
    assert history(tracker.client, rid, "acc/avg") == [(0, 50.0)]


def test_a_failed_trial_is_a_failed_run_with_its_reason_logged_once(sweep_dict):
    """A trial that failed ends FAILED with its error and no objective; recorded again (a rerun
    telling the same trial), it keeps its one run."""
    tracker = Tracker(validate_config(sweep_dict))
    tracker.start_sweep("d1", {})
    tune = tracker.tuning_run("study1", "wemoe", {"n_trials": 2, "n_parallel": 1, "pruner": "none"})
    failed = JobResult("t0", "trial", "wemoe", {}, None, "failed", metrics={"val/acc/avg": 12.0}, error="boom")
    for _ in range(2):
        tracker.log_trial(tune, "study1", 0, {"lr": 0.1}, failed, "FAIL", "val/acc/avg", {1: 10.0})
    from mlflow.entities import ViewType

    (run,) = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{tune}'",
                                        run_view_type=ViewType.ALL)  # none deleted and logged anew
    assert run.info.status == "FAILED" and run.data.tags["harness.failure_reason"] == "boom"
    assert run.data.metrics == {"val/acc/avg": 12.0, "intermediate/val/acc/avg": 10.0}
    assert "harness.pruned_at_step" not in run.data.tags


def test_ctrl_c_after_a_study_finished_leaves_its_run_finished(sweep_dict):
    """Stopping the sweep ends what is still running (its run, a study in progress) KILLED; a
    study that ended before keeps the status it ended with."""
    tracker = Tracker(validate_config(sweep_dict))
    tracker.start_sweep("d1", {})
    done = tracker.tuning_run("study1", "wemoe", {"n_trials": 1, "n_parallel": 1, "pruner": "none"})
    tracker.finish_tuning_run(done, {"lr": 0.1}, 50.0, [])
    failed = tracker.tuning_run("study2", "ta", {"n_trials": 1, "n_parallel": 1, "pruner": "none"})
    tracker.fail_tuning_run(failed, "no trial completed")
    going = tracker.tuning_run("study3", "ada", {"n_trials": 1, "n_parallel": 1, "pruner": "none"})
    tracker.abandon("KILLED")
    status = {rid: tracker.client.get_run(rid).info.status for rid in (done, failed, going, tracker.parent_id)}
    assert status == {done: "FINISHED", failed: "FAILED", going: "KILLED", tracker.parent_id: "KILLED"}


def test_of_two_studies_that_chose_one_job_the_counts_of_the_last_to_end_are_the_rows(sweep_dict):
    """A sweep of an older harness (no jobs.json): studies 1 (3 trials, 1 failed) and 2 (5 trials,
    2 pruned), of one label, both chose job ``final1``; study 2 ended last, so its counts are the row's."""
    import time

    from harness.report import load_study_counts

    cfg = validate_config(sweep_dict)
    tracker = Tracker(cfg)
    tracker.start_sweep("d1", {})
    for study, counts in (("study2", TrialCounts(5, 0, 2)), ("study1", TrialCounts(3, 1, 0))):
        tracker.tuning_run(study, "wemoe", {"n_trials": counts.total, "n_parallel": 1, "pruner": "none"})
    for study, counts in (("study1", TrialCounts(3, 1, 0)), ("study2", TrialCounts(5, 0, 2))):
        rid = tracker.tuning_run(study, "wemoe", {"n_trials": counts.total, "n_parallel": 1, "pruner": "none"})
        tracker.finish_tuning_run(rid, {"lr": 0.1}, 50.0, [], counts, final_key="final1")
        time.sleep(0.01)  # distinct end times
    parent = tracker.client.get_run(tracker.parent_id)
    assert load_study_counts(cfg.resolved_tracking_uri(), parent) == {("wemoe", "final1"): TrialCounts(5, 0, 2)}


@pytest.mark.parametrize("ended", [None, "KILLED"], ids=["left-running", "ended-killed"])
def test_a_trial_run_a_killed_or_stopped_driver_left_is_logged_anew(sweep_dict, ended):
    """A driver killed while it wrote trial 0's run left it RUNNING with no metrics; Ctrl-C ends
    such a run KILLED (see ``abandon``). Either way the rerun telling that trial replaces it with
    one run that holds its objective and ends FINISHED, or the trial would stay a run without it."""
    tracker = Tracker(validate_config(sweep_dict))
    tracker.start_sweep("d1", {})
    tune = tracker.tuning_run("study1", "wemoe", {"n_trials": 1, "n_parallel": 1, "pruner": "none"})
    left = tracker.client.create_run(tracker.experiment_id, tags={
        "harness.run_key": "trial:study1#0", "mlflow.parentRunId": tune, "harness.kind": "trial"}).info.run_id
    if ended:
        tracker.client.set_terminated(left, status=ended)
    done = JobResult("t0", "trial", "wemoe", {}, None, "ok", metrics={"val/acc/avg": 70.0})
    tracker.log_trial(tune, "study1", 0, {"lr": 0.1}, done, "COMPLETE", "val/acc/avg")
    (run,) = children(tracker, tune)
    assert run.info.run_id != left and run.info.status == "FINISHED"
    assert run.data.metrics == {"val/acc/avg": 70.0, "objective": 70.0}


def test_a_study_run_reopened_by_a_rerun_is_running_until_it_ends(sweep_dict):
    """A study that failed is run again: its run reads RUNNING while it runs, without the old
    failure, and a stop then ends it KILLED, not FAILED with no reason."""
    tracker = Tracker(validate_config(sweep_dict))
    tracker.start_sweep("d1", {})
    tune = {"n_trials": 1, "n_parallel": 1, "pruner": "none"}
    rid = tracker.tuning_run("study1", "wemoe", tune)
    tracker.fail_tuning_run(rid, "no trial completed")
    assert tracker.tuning_run("study1", "wemoe", tune) == rid
    run = tracker.client.get_run(rid)
    assert run.info.status == "RUNNING" and "harness.failure_reason" not in run.data.tags
    tracker.abandon("KILLED")
    assert tracker.client.get_run(rid).info.status == "KILLED"


def test_a_study_run_a_rerun_reopened_ends_killed_when_that_rerun_is_stopped(sweep_dict):
    """The rerun's driver did not create the study's run, it reopened it: stopping that driver
    still ends the run KILLED, not RUNNING for ever."""
    cfg = validate_config(sweep_dict)
    tune = {"n_trials": 1, "n_parallel": 1, "pruner": "none"}
    first = Tracker(cfg)
    first.start_sweep("d1", {})
    rid = first.tuning_run("study1", "wemoe", tune)
    first.stop_tuning_run(rid)
    first.finish(False)
    rerun = Tracker(cfg)
    rerun.start_sweep("d1", {})
    assert rerun.tuning_run("study1", "wemoe", tune) == rid
    rerun.abandon("KILLED")
    assert rerun.client.get_run(rid).info.status == "KILLED"


def test_a_job_run_stopped_while_it_was_logged_ends_killed(sweep_dict, monkeypatch):
    """Ctrl-C while a job's metrics are logged, after its run was created: the run ends KILLED."""
    tracker = Tracker(validate_config(sweep_dict))
    tracker.start_sweep("d1", {})
    tracker.is_logged("k1")  # MLflow opened, as the sweep does before it logs a job

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tracker.client, "log_batch", stopped)
    with pytest.raises(KeyboardInterrupt):
        tracker.log_job(JobResult("k1", "merge", "ta", {}, None, "ok", metrics={"acc/avg": 50.0}), {"a": 1}, "digest1")
    monkeypatch.undo()
    tracker.abandon("KILLED")
    (run,) = children(tracker, tracker.parent_id)
    assert run.data.tags["harness.job_key"] == "k1" and run.info.status == "KILLED"


def _reopened_after_logging(sweep_dict, result: JobResult) -> tuple[Tracker, str]:
    """A first driver logs ``result`` (job key ``k1``); a second one reopens the sweep's run, as a
    rerun does: that second tracker, and the run's id the first logged."""
    cfg = validate_config(sweep_dict)
    first = Tracker(cfg)
    first.start_sweep("d1", {})
    rid = first.log_job(result, {}, "digest1")
    rerun = Tracker(cfg)
    rerun.start_sweep("d1", {})
    return rerun, rid


def test_a_job_failing_again_in_a_rerun_keeps_its_one_run_with_the_latest_reason(sweep_dict):
    """A rerun (a new driver reopening the sweep's run) finds the failed job's run; the job failing
    again updates that run's reason: no run is deleted and logged anew."""
    from mlflow.entities import ViewType

    rerun, rid = _reopened_after_logging(sweep_dict, JobResult("k1", "merge", "ta", {}, None, "failed", error="boom1"))
    assert not rerun.is_logged("k1")  # as the sweep asks before it logs a job: a failed job is run again
    assert rerun.log_job(JobResult("k1", "merge", "ta", {}, None, "failed", error="boom2"), {}, "digest1") is None
    (run,) = rerun.client.search_runs([rerun.experiment_id], f"tags.`mlflow.parentRunId` = '{rerun.parent_id}'",
                                      run_view_type=ViewType.ALL)
    assert run.info.run_id == rid and run.info.status == "FAILED"
    assert run.data.tags["harness.failure_reason"] == "boom2"


def test_the_sweeps_run_reads_running_while_its_driver_runs_and_when_a_rerun_reopens_it(sweep_dict):
    """Ending the runs a killed driver left RUNNING must spare the sweep's own run, just created
    or reopened: the UI would show a running sweep as killed, and a crash could not end it FAILED."""
    cfg = validate_config(sweep_dict)
    first = Tracker(cfg)
    first.start_sweep("d1", {})
    assert first.client.get_run(first.parent_id).info.status == "RUNNING"
    first.finish(True)
    rerun = Tracker(cfg)
    rerun.start_sweep("d1", {})
    assert rerun.parent_id == first.parent_id
    assert rerun.client.get_run(rerun.parent_id).info.status == "RUNNING"
    rerun.abandon("FAILED")
    assert rerun.client.get_run(rerun.parent_id).info.status == "FAILED"


def test_a_job_logged_by_an_earlier_driver_is_not_logged_twice_by_a_first_log_job(sweep_dict):
    """``log_job`` skips a job already logged even as a new driver's first MLflow call: what is
    logged is known only once the sweep's run is found, which must come before the check."""
    done = JobResult("k1", "merge", "ta", {}, None, "ok", metrics={"acc/avg": 50.0})
    rerun, rid = _reopened_after_logging(sweep_dict, done)
    assert rerun.log_job(done, {}, "digest1") is None
    assert [r.info.run_id for r in children(rerun, rerun.parent_id)] == [rid]


def test_a_robustness_study_failing_again_in_a_rerun_updates_its_runs_reason(sweep_dict):
    """A finished job whose robustness study failed keeps its run through a rerun whose study fails
    again; the run's study failure reason becomes the latest one, as the command's summary says."""
    rerun, rid = _reopened_after_logging(sweep_dict, JobResult("k1", "merge", "ta", {}, None, "ok",
                                                               study_error="corrupt1"))
    assert not rerun.is_logged("k1")
    assert rerun.log_job(JobResult("k1", "merge", "ta", {}, None, "ok", study_error="corrupt2"), {}, "digest1") is None
    (run,) = children(rerun, rerun.parent_id)
    assert run.info.run_id == rid and run.data.tags["harness.study_failure_reason"] == "corrupt2"
