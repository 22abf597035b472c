"""The report's tables from hand-built job results, cell by cell: selection on validation,
averages, normalized accuracy, and failed jobs shown as failed rather than left out."""

from __future__ import annotations

import csv
import io

import pytest

from harness.config import MethodSpec, validate_config
from harness.errors import HarnessError
from harness.job import JobResult
from harness.report import build_report, default_reference, generalization_records, significance_records
from harness.results import Row, TrialCounts, build_rows, table_records
from harness.significance import pack_correct

A, B = "toy_stripes", "toy_colours"


def ok(kind: str, label: str, params: dict, acc: dict, val: float, task: str | None = None,
       robust: dict | None = None) -> JobResult:
    metrics = {f"acc/{t}": v for t, v in acc.items()}
    metrics["acc/avg"] = sum(acc.values()) / len(acc)
    metrics["val/acc/avg"] = val
    metrics.update(robust or {})
    return JobResult(f"{label}{params}{task}", kind, label, params, task, "ok", metrics)


def failed(kind: str, label: str, params: dict) -> JobResult:
    return JobResult(f"{label}{params}x", kind, label, params, None, "failed", error="RuntimeError: boom")


def robust(clean: dict, noise: dict) -> dict:
    """The metrics a robustness study logs, with their averages."""
    out = {f"robust/gaussian_noise/{t}": v for t, v in noise.items()}
    out["robust/gaussian_noise/avg"] = sum(noise.values()) / len(noise)
    out["robust/clean/avg"] = sum(clean.values()) / len(clean)
    return out


@pytest.fixture
def cfg(sweep_dict):
    return validate_config(dict(sweep_dict, methods=[
        {"name": "weight_averaging"},
        {"name": "task_arithmetic", "grid": {"scaling": [0.2, 0.6, 1.0]}},
        {"name": "tests.failing_method:AlwaysFailsWithParam", "label": "broken",
         "grid": {"strength": [0.1, 0.2]}},
    ], robustness={"tasks": [A, B], "corruptions": ["gaussian_noise"], "severity": 1}))


def read(path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text())))


def test_failed_methods_and_settings_are_shown_as_failed(cfg, tmp_path):
    pre = {A: 40.0, B: 30.0}
    results = [
        ok("pretrained", "pretrained", {}, pre, 35.0, robust=robust(pre, {A: 20.0, B: 10.0})),
        ok("individual", "individual", {}, {A: 80.0}, 80.0, task=A),
        ok("individual", "individual", {}, {B: 60.0}, 60.0, task=B),
        ok("merge", "weight_averaging", {}, {A: 50.0, B: 33.0}, 41.0,
           robust=robust({A: 50.0, B: 33.0}, {A: 30.0, B: 21.0})),
        # the best test average (0.6) is not the best validation average (0.2): 0.2 is reported
        ok("merge", "task_arithmetic", {"scaling": 0.2}, {A: 60.0, B: 45.0}, 52.0),
        ok("merge", "task_arithmetic", {"scaling": 0.6}, {A: 70.0, B: 50.0}, 51.0),
        failed("merge", "task_arithmetic", {"scaling": 1.0}),
        failed("robustness", "task_arithmetic", {"scaling": 0.2}),
        failed("merge", "broken", {"strength": 0.1}),
        failed("merge", "broken", {"strength": 0.2}),
    ]
    report = build_report(cfg, results, tmp_path / "report")
    main = read(tmp_path / "report" / "main.csv")
    # averages and normalized accuracy by hand: (60 + 45) / 2 = 52.5; (60/80 + 45/60) / 2 = 75.0
    assert main == [
        ["method", "setting", A, B, "avg", "norm avg"],
        ["pretrained", "zero-shot", "40.0", "30.0", "35.0", "50.0"],
        ["individual", "per task", "80.0", "60.0", "70.0", "100.0"],
        ["weight_averaging", "", "50.0", "33.0", "41.5", "58.8"],
        ["task_arithmetic", "scaling=0.2 (1 of 3 settings failed)", "60.0", "45.0", "52.5", "75.0"],
        ["broken", "failed (2 settings)", "-", "-", "-", "-"],
    ]
    assert read(tmp_path / "report" / "robustness.csv") == [
        ["method", "clean", "gaussian_noise"],
        ["pretrained", "35.0", "15.0"],
        ["weight_averaging", "41.5", "25.5"],
        ["task_arithmetic", "failed", "failed"],  # its follow-up robustness job failed
        ["broken", "failed", "failed"],
    ]
    assert "broken" in (tmp_path / "report" / "main.tex").read_text()
    assert [r.method for r in report.rows if r.failed] == ["broken"]
    with pytest.raises(HarnessError, match="'broken' failed in this sweep"):
        build_report(cfg, results, tmp_path / "again", against=["broken"])


def test_a_killed_writers_temporary_files_are_removed_and_a_fresh_one_is_kept(cfg, tmp_path):
    """A kill while a report was written leaves ``.<table>.<x>.tmp`` in it; the next report removes
    those untouched for ten minutes, and keeps a fresh one (another report being written there)."""
    import os
    import time

    out = tmp_path / "report"
    out.mkdir()
    old, fresh = out / ".significance.csv.k1ll3d.tmp", out / ".main.md.wr1t1ng.tmp"
    for f in (old, fresh):
        f.write_text("half a table")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    results = [ok("pretrained", "pretrained", {}, {A: 40.0, B: 30.0}, 35.0),
               ok("merge", "weight_averaging", {}, {A: 50.0, B: 30.0}, 40.0)]
    build_report(cfg, results, out)
    assert not old.exists() and fresh.read_text() == "half a table"
    assert read(out / "main.csv")[2] == ["weight_averaging", "", "50.0", "30.0", "40.0", "-"]


def test_a_failed_reference_job_is_shown(cfg, tmp_path):
    results = [
        failed("pretrained", "pretrained", {}),
        ok("individual", "individual", {}, {A: 80.0}, 80.0, task=A),
        JobResult("ib", "individual", "individual", {}, B, "failed", error="boom"),
        ok("merge", "weight_averaging", {}, {A: 50.0, B: 30.0}, 40.0,
           robust=robust({A: 50.0, B: 30.0}, {A: 30.0, B: 20.0})),
    ]
    build_report(cfg, results, tmp_path / "report")
    main = read(tmp_path / "report" / "main.csv")
    assert main[1] == ["pretrained", "failed", "-", "-", "-", "-"]
    assert main[2] == ["individual", f"failed: {B}", "80.0", "-", "-", "-"]
    assert main[3] == ["weight_averaging", "", "50.0", "30.0", "40.0", "-"]  # no individual B: no normalized
    assert read(tmp_path / "report" / "robustness.csv")[1] == ["pretrained", "failed", "failed"]


def test_plots_are_titled_and_leave_failed_rows_out(cfg, tmp_path, monkeypatch):
    """Out of its folder a figure must say what it shows: the sweep, the tasks and the severity."""
    import matplotlib.figure

    drawn = {}
    real = matplotlib.figure.Figure.savefig

    def capture(fig, path, *args, **kwargs):
        ax = fig.axes[0]
        drawn[str(path).rsplit("/", 1)[-1]] = (ax.get_title(), [t.get_text() for t in ax.get_legend().get_texts()])
        return real(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    pre = {A: 40.0, B: 30.0}
    results = [ok("pretrained", "pretrained", {}, pre, 35.0, robust=robust(pre, {A: 20.0, B: 10.0})),
               failed("merge", "weight_averaging", {})]
    build_report(cfg, results, tmp_path / "report")
    title, legend = drawn["robustness.png"]
    assert title == f"toy: average accuracy on {A}, {B} under corruptions (severity 1)" and legend == ["pretrained"]
    title, legend = drawn["accuracy.png"]
    assert title.startswith("toy: test top-1 accuracy") and legend == ["pretrained"]


def test_two_labels_sharing_a_setting_share_its_job_and_each_row_chooses_among_its_own(sweep_dict, tmp_path):
    """Job keys hold no label, so two grids of one method with a setting in common run it once;
    each row still counts and chooses among its own settings, in the sweep's table and in the one
    `harness report` rebuilds from MLflow (one run per job)."""
    from harness.config import validate_config as validate
    from harness.report import load_sweep_from_mlflow
    from harness.results import build_rows
    from harness.runner import run_sweep

    d = dict(sweep_dict, references={"pretrained": False, "individual": False}, eval={"max_samples": 16})
    d["methods"] = [{"name": "task_arithmetic", "label": "low", "grid": {"scaling": [0.0, 0.5]}},
                    {"name": "task_arithmetic", "label": "high", "grid": {"scaling": [0.5, 1.0]}}]
    cfg = validate(d)
    run = run_sweep(cfg, console=None)
    assert len(run.executed) == 3  # scaling 0.5 once
    by_label = {}
    for r in run.results:
        by_label.setdefault(r.label, []).append(r.params["scaling"])
    assert by_label == {"low": [0.0, 0.5], "high": [0.5, 1.0]}

    def rows_of(results):
        rows = build_rows(results, cfg.task_names, ["low", "high"], cfg.merge_tasks)
        return {row.method: (row.setting, row.n_settings) for row in rows}

    def best(label):  # the truth: each label's own settings, the best validation average (first of equals)
        own = [r for r in run.results if r.label == label]
        return f"scaling={max(own, key=lambda r: r.metrics['val/acc/avg']).params['scaling']}"

    assert rows_of(run.results) == {"low": (best("low"), 2), "high": (best("high"), 2)}
    _, stored, _ = load_sweep_from_mlflow(cfg.resolved_tracking_uri())
    assert rows_of(stored) == rows_of(run.results)


def test_a_job_that_failed_is_read_back_from_mlflow_as_failed(sweep_dict):
    """`harness report` rebuilds each job's status from its run: a failed merge stays failed, with
    its error, and its row a failed row, beside a job that finished."""
    from harness.config import validate_config as validate
    from harness.report import load_sweep_from_mlflow
    from harness.runner import run_sweep

    d = dict(sweep_dict, references={"pretrained": False, "individual": False}, eval={"max_samples": 16})
    d["methods"] = [{"name": "task_arithmetic", "params": {"scaling": 0.3}},
                    {"name": "tests.failing_method:AlwaysFails", "label": "fails"}]
    cfg = validate(d)
    run_sweep(cfg, console=None)
    _, stored, _ = load_sweep_from_mlflow(cfg.resolved_tracking_uri())
    assert {r.label: r.status for r in stored} == {"task_arithmetic": "ok", "fails": "failed"}
    assert "deliberate failure" in next(r.error for r in stored if r.label == "fails")
    rows = build_rows(stored, cfg.task_names, ["task_arithmetic", "fails"], cfg.merge_tasks)
    assert [(row.method, row.failed) for row in rows] == [("task_arithmetic", False), ("fails", True)]


def test_a_row_whose_jobs_run_was_deleted_in_mlflow_is_refused_not_rebuilt_at_another_setting(sweep_dict):
    """A job's run deleted in MLflow leaves its row only its other settings, the best of which may
    not be the setting the sweep reported: `harness report` refuses naming the job and its row (a
    tuned row, whose trials sit under its study's run, is whole), and reports again once a rerun
    of the sweep has logged the job again."""
    from mlflow.tracking import MlflowClient

    from harness.config import validate_config as validate
    from harness.report import load_sweep_from_mlflow
    from harness.runner import run_sweep

    tune = {"n_trials": 1, "n_parallel": 1, "sampler": "grid",
            "space": {"scaling": {"type": "categorical", "choices": [0.6]}}}
    d = dict(sweep_dict, references={"pretrained": False, "individual": False}, eval={"max_samples": 16})
    d["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.2, 0.6]}},
                    {"name": "ties", "label": "tt", "tune": tune}]
    cfg = validate(d)
    run = run_sweep(cfg, console=None)
    uri = cfg.resolved_tracking_uri()

    def rows_of(results):
        return {row.method: row.setting for row in build_rows(results, cfg.task_names, ["task_arithmetic", "tt"],
                                                              cfg.merge_tasks)}

    reported = {row.method: row.setting for row in run.rows}
    assert rows_of(load_sweep_from_mlflow(uri)[1]) == reported
    chosen = next(r for r in run.results if r.label == "task_arithmetic"
                  and f"scaling={r.params['scaling']}" == reported["task_arithmetic"])
    client = MlflowClient(uri)
    (job_run,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id],
                                    f"tags.`harness.job_key` = '{chosen.key}'")
    client.delete_run(job_run.info.run_id)
    with pytest.raises(HarnessError, match=rf"no run of job {chosen.key} \(row 'task_arithmetic'\).*rerun the sweep"):
        load_sweep_from_mlflow(uri)
    run_sweep(cfg, console=None)
    assert rows_of(load_sweep_from_mlflow(uri)[1]) == reported


def test_a_report_rebuilt_without_a_table_leaves_none_of_the_old_one(cfg, tmp_path):
    """A sweep rerun into its folder without its robustness block (or WeMoE's routing) writes a
    report without those tables and plots: the folder must not keep the earlier run's files
    beside the new tables, as if they were this sweep's."""
    pre = {A: 40.0, B: 30.0}
    results = [
        ok("pretrained", "pretrained", {}, pre, 35.0, robust=robust(pre, {A: 20.0, B: 10.0})),
        ok("merge", "weight_averaging", {}, {A: 50.0, B: 33.0}, 41.0,
           robust=robust({A: 50.0, B: 33.0}, {A: 30.0, B: 21.0})),
    ]
    routing = {"experts": [A, B], "layers": 1, "mean_weight": {A: [[0.6, 0.4]], B: [[0.3, 0.7]]}}
    out = tmp_path / "report"
    (out / "routing.png").parent.mkdir()
    (out / "routing.png").write_bytes(b"")  # as reports wrote it before there was one per row
    first = build_report(cfg, results, out, {"wemoe": routing})
    assert {"robustness.md", "robustness.csv", "robustness.tex", "robustness.png", "routing-wemoe.png"} <= {
        p.name for p in first.files}
    assert not (out / "routing.png").exists()
    plain = cfg.model_copy(update={"robustness": None})
    second = build_report(plain, results, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in second.files)
    assert not any(p.name.startswith(("robustness", "routing")) for p in second.files)


def test_every_wemoe_row_gets_its_routing_heatmap_titled_with_its_label(cfg, tmp_path, monkeypatch):
    """Three WeMoE rows (the main sweep has raw, softmax and task-identification routing) give
    three heatmaps, each of its own row's routing statistics (the setting chosen on validation)
    and named and titled by the row and the sweep, as the other figures are (``wemoe`` is a row of
    several sweeps); a label that is no safe file name is made one."""
    import harness.plots as plots
    from harness.report import row_routings

    def stats(w: float) -> dict:
        return {"experts": [A, B], "layers": 1, "mean_weight": {A: [[w, 1 - w]], B: [[1 - w, w]]}}

    def wemoe(label: str, params: dict, val: float, w: float) -> JobResult:
        r = ok("merge", label, params, {A: 50.0, B: 40.0}, 45.0)
        r.metrics["val/acc/avg"] = val
        r.artifacts["routing"] = stats(w)
        return r

    results = [wemoe("raw", {"lr": 1}, 40.0, 0.1), wemoe("raw", {"lr": 2}, 41.0, 0.2),  # lr 2 is chosen
               wemoe("task id (soft)", {}, 50.0, 0.9)]
    two = cfg.model_copy(update={"methods": [MethodSpec(name="wemoe", label="raw"),
                                             MethodSpec(name="wemoe", label="task id (soft)")]})
    routings = row_routings(two, results)
    assert routings == {"raw": stats(0.2), "task id (soft)": stats(0.9)}
    drawn = []
    monkeypatch.setattr(plots, "routing_heatmap", lambda r, path, title: drawn.append((r, path.name, title)) or path)
    build_report(two, results, tmp_path / "report", routings)
    assert drawn == [(stats(0.2), "routing-raw.png", "toy: WeMoE routing weights, raw"),
                     (stats(0.9), "routing-task_id_soft_.png", "toy: WeMoE routing weights, task id (soft)")]


def test_row_labels_alike_as_file_names_get_files_of_their_own(cfg, tmp_path):
    """``wemoe a`` and ``wemoe_a`` are both ``wemoe_a`` as a file name: each row keeps its own
    heatmap (one overwrote the other), and the label without replaced characters keeps the plain name."""
    from harness.report import file_stems, tune_table_stem

    stems = file_stems(["wemoe a", "wemoe_a", "task id (soft)"])
    assert stems["wemoe_a"] == "wemoe_a" and stems["task id (soft)"] == "task_id_soft_"
    assert stems["wemoe a"].startswith("wemoe_a-") and len(set(stems.values())) == 3
    two = cfg.model_copy(update={"methods": [MethodSpec(name="wemoe", label="wemoe a"),
                                             MethodSpec(name="wemoe", label="wemoe_a")]})
    results = []
    for i, label in enumerate(["wemoe a", "wemoe_a"]):
        r = ok("merge", label, {}, {A: 50.0, B: 40.0}, 45.0)
        r.artifacts["routing"] = {"experts": [A, B], "layers": 1,
                                  "mean_weight": {A: [[0.1 * i, 1.0]], B: [[1.0, 0.1 * i]]}}
        results.append(r)
    from harness.report import build_report, row_routings

    report = build_report(two, results, tmp_path / "report", row_routings(two, results))
    drawn = sorted(p.name for p in report.files if p.name.startswith("routing-"))
    assert len(set(drawn)) == 2 and all((tmp_path / "report" / name).is_file() for name in drawn)
    assert "routing-wemoe_a.png" in drawn
    assert tune_table_stem(two, "wemoe a") != tune_table_stem(two, "wemoe_a") == "tune-wemoe_a"


def test_a_report_write_cut_short_leaves_the_previous_files_whole(cfg, tmp_path, monkeypatch):
    """`harness export` reads report/jobs.json, and `harness report` the tables, while a sweep (or
    another `harness report`) may be rewriting them, or after one was killed mid-write: a write
    cut off halfway must leave the previous file whole, not half of the new one."""
    import json
    from pathlib import Path

    pre = {A: 40.0, B: 30.0}
    first = [ok("pretrained", "pretrained", {}, pre, 35.0, robust=robust(pre, {A: 20.0, B: 10.0}))]
    out = tmp_path / "report"
    build_report(cfg, first, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".json", ".md", ".csv", ".tex")}
    assert json.loads(before["jobs.json"]) == [["pretrained", first[0].key, None, {}]]  # no study counts, no params
    second = first + [ok("merge", "weight_averaging", {}, {A: 50.0, B: 33.0}, 41.0,
                         robust=robust({A: 50.0, B: 33.0}, {A: 30.0, B: 21.0}))]

    def killed_halfway(self, data, *args, **kwargs):  # the process dies after half the bytes
        with open(self, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_halfway)
    monkeypatch.setattr(Path, "write_bytes", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        build_report(cfg, second, out)
    monkeypatch.undo()
    assert {name: (out / name).read_bytes() for name in before} == before


def test_every_latex_table_has_a_label_a_paper_can_ref(cfg, tmp_path):
    """A table pasted into a paper is cited by ``\\ref``: each ``.tex`` carries one label, its
    own, with the sweep name as written (a label is a key, not typeset text: no escaping)."""
    named = cfg.model_copy(update={"name": "my_sweep.v2"})
    pre = {A: 40.0, B: 30.0}
    results = [ok("pretrained", "pretrained", {}, pre, 35.0, robust=robust(pre, {A: 20.0, B: 10.0})),
               ok("individual", "individual", {}, {A: 80.0}, 80.0, task=A),
               ok("individual", "individual", {}, {B: 60.0}, 60.0, task=B)]
    build_report(named, results, tmp_path / "report")
    for name in ("main", "robustness"):
        lines = (tmp_path / "report" / f"{name}.tex").read_text().splitlines()
        labels = [line for line in lines if line.startswith("\\label")]
        assert labels == [f"\\label{{tab:my_sweep.v2-{name}}}"], name
        caption = next(i for i, line in enumerate(lines) if line.startswith("\\caption{my\\_sweep.v2: "))
        assert lines.index(labels[0]) == caption + 1 < lines.index("\\end{table}")


def test_a_report_keeps_plots_drawn_from_the_same_inputs_and_draws_the_rest(cfg, tmp_path, monkeypatch):
    """With a plot record (a sweep's rerun), a plot whose inputs and file are unchanged is kept,
    not drawn again; one whose data changed, or whose file was altered, is drawn. Every plot then
    holds the bytes a report drawn from scratch (no record: what `harness report` does) holds."""
    import harness.plots as plots
    import harness.report as report_module

    pre = {A: 40.0, B: 30.0}
    wa = {A: 50.0, B: 33.0}
    routing = {"wemoe": {"experts": [A, B], "layers": 1, "mean_weight": {A: [[0.6, 0.4]], B: [[0.3, 0.7]]}}}

    def results(wa_acc: dict) -> list[JobResult]:
        return [ok("pretrained", "pretrained", {}, pre, 35.0, robust=robust(pre, {A: 20.0, B: 10.0})),
                ok("merge", "weight_averaging", {}, wa_acc, 41.0, robust=robust(wa_acc, {A: 30.0, B: 21.0}))]

    def oracle(res: list[JobResult], name: str) -> dict[str, bytes]:
        build_report(cfg, res, tmp_path / name, routing)
        return {p.name: p.read_bytes() for p in (tmp_path / name).glob("*.png")}

    drawn: list[str] = []
    bars, heatmap = report_module.grouped_bars, plots.routing_heatmap
    monkeypatch.setattr(report_module, "grouped_bars", lambda *a, **k: drawn.append(a[3].name) or bars(*a, **k))
    monkeypatch.setattr(plots, "routing_heatmap", lambda *a, **k: drawn.append(a[1].name) or heatmap(*a, **k))
    expected = oracle(results(wa), "fresh")
    assert sorted(expected) == ["accuracy.png", "robustness.png", "routing-wemoe.png"]
    out, record = tmp_path / "report", tmp_path / "work" / "plots.json"

    def rebuild(res: list[JobResult]) -> list[str]:
        drawn.clear()
        build_report(cfg, res, out, routing, plot_record=record)
        return sorted(drawn)

    def pngs() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in out.glob("*.png")}

    assert rebuild(results(wa)) == sorted(expected)
    assert rebuild(results(wa)) == [] and pngs() == expected
    changed = {A: 51.0, B: 33.0}  # the accuracy bars and the robustness plot's clean average change
    assert rebuild(results(changed)) == ["accuracy.png", "robustness.png"]
    assert pngs() == oracle(results(changed), "fresh-changed")
    (out / "routing-wemoe.png").write_bytes(b"not the plot")
    assert rebuild(results(changed)) == ["routing-wemoe.png"] and pngs() == oracle(results(changed), "again")
    record.write_text("{not json")
    assert rebuild(results(changed)) == sorted(expected)
    drawn.clear()
    build_report(cfg, results(changed), out, routing)  # no record: every plot drawn
    assert sorted(drawn) == sorted(expected)


def test_a_plot_drawn_from_other_than_plain_data_is_never_kept(tmp_path):
    """Inputs JSON cannot write exactly have no digest: such a plot is drawn every time."""
    from harness.report import kept_plot, plot_inputs_digest

    assert plot_inputs_digest({"series": [("m", [1.0])]}) and not plot_inputs_digest({"series": {1.0, 2.0}})
    path, drawn, record = tmp_path / "p.png", [], {}
    for _ in range(2):
        kept_plot(record, path, {"values": object()}, lambda: drawn.append(1) or path.write_bytes(b"png") and path)
    assert drawn == [1, 1] and record == {}


def test_a_fully_cached_rerun_keeps_the_report_plots(sweep_dict, monkeypatch):
    """A sweep run again into its folder with every job cached draws no plot: its report's
    plots are the first run's files, byte for byte."""
    import harness.report as report_module
    from harness.runner import run_sweep

    cfg = validate_config(sweep_dict)
    run_sweep(cfg, quiet=True)
    out = cfg.resolved_output_dir() / "report"
    first = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert "accuracy.png" in first

    def refuse(*args, **kwargs):
        raise AssertionError("a cached rerun drew a plot")

    monkeypatch.setattr(report_module, "grouped_bars", refuse)
    rerun = run_sweep(cfg, quiet=True)
    assert rerun.executed == [] and {p.name: p.read_bytes() for p in out.glob("*.png")} == first


def test_a_recorded_plot_whose_file_is_gone_is_drawn_again(tmp_path):
    """A record whose PNG digest is empty (the file could not be read after drawing) keeps nothing."""
    from harness.report import kept_plot, plot_inputs_digest

    path, drawn = tmp_path / "p.png", []
    record = {str(path): [plot_inputs_digest({"title": "t"}), ""]}
    kept_plot(record, path, {"title": "t"}, lambda: drawn.append(1) or path)
    assert drawn == [1]


def test_a_table_of_twenty_tasks_keeps_every_task_name_readable(sweep_dict):
    """A logged sweep (not a terminal) printed its table at 200 characters: twenty task columns
    were cut to ``many…`` each, which task was which unreadable. Logged, the table is as wide as
    its columns; in a narrow terminal a header folds onto more lines instead of being cut."""
    from rich.console import Console

    from harness.results import Row
    from harness.runner import print_tables

    tasks = [f"many_tasks:t{i:02d}" for i in range(20)]
    cfg = validate_config(dict(sweep_dict, methods=[{"name": "ties", "grid": {"k": [20], "scaling": [0.5]}}]))
    cfg = cfg.model_copy(update={"tasks": [cfg.tasks[0].model_copy(update={"name": t}) for t in tasks]})
    acc = {t: 10.0 + i for i, t in enumerate(tasks)}
    rows = [Row("ties", "k=20, scaling=0.5", acc, 19.5, None)]
    logged = Console(file=io.StringIO(), width=200, emoji=False)
    print_tables(logged, cfg, rows)
    text = logged.file.getvalue()
    assert "…" not in text
    header = next(line for line in text.splitlines() if "method" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["method", "setting", *tasks, "avg", "norm avg"]
    body = next(line for line in text.splitlines() if "ties" in line)
    assert [c.strip() for c in body.strip("│ ").split("│")] == ["ties", "k=20, scaling=0.5",
                                                                *[f"{v:.1f}" for v in acc.values()], "19.5", "-"]
    assert logged.width == 200  # the console keeps its width for what it prints next

    terminal = Console(file=io.StringIO(), width=120, force_terminal=True, color_system=None, emoji=False)
    print_tables(terminal, cfg, rows)
    text = terminal.file.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 120
    header = [line for line in text.splitlines() if line.startswith("┃")]
    columns = ["".join(parts).replace(" ", "") for parts in zip(*(line.strip("┃").split("┃") for line in header))]
    assert columns[2:22] == tasks


def test_a_kept_plot_is_drawn_again_under_other_code_libraries_or_matplotlibrc(tmp_path, monkeypatch):
    """Besides its inputs, a plot is drawn by the harness code, matplotlib and Pillow, and styled
    by matplotlibrc files: a change to any of them draws it again (the file kept would be the old
    code's or style's drawing); with none changed it is kept."""
    import harness.report as report_module
    from harness.report import kept_plot

    monkeypatch.chdir(tmp_path)
    path, record, drawn = tmp_path / "p.png", {}, []

    def draw() -> Path:
        drawn.append(1)
        path.write_bytes(f"png {len(drawn)}".encode())
        return path

    def draws() -> int:
        before = len(drawn)
        kept_plot(record, path, {"title": "t"}, draw)
        return len(drawn) - before

    assert draws() == 1 and draws() == 0
    code = report_module.harness_code_id()
    monkeypatch.setattr(report_module, "harness_code_id", lambda: (code[0], code[1] + "0"))
    assert draws() == 1 and draws() == 0
    versions = report_module.plot_library_versions()
    monkeypatch.setattr(report_module, "plot_library_versions", lambda: [versions[0] + ".1", versions[1]])
    assert draws() == 1 and draws() == 0
    monkeypatch.setattr(report_module, "plot_library_versions", lambda: [versions[0] + ".1", versions[1] + ".1"])
    assert draws() == 1 and draws() == 0
    (tmp_path / "matplotlibrc").write_text("lines.linewidth: 3\n")
    assert draws() == 1 and draws() == 0
    (tmp_path / "matplotlibrc").write_text("lines.linewidth: 4\n")
    assert draws() == 1 and draws() == 0


@pytest.mark.parametrize("message, expected", [
    ("", "fallback"), (None, "fallback"), ("  \n\t\n ", "fallback"),
    ("one reason", "one reason"), ("Traceback:\n  at x\nValueError: bad\n\n  ", "ValueError: bad"),
    ("Traceback:\n    raise ValueError('bad')", "raise ValueError('bad')"),  # an indented last line
])
def test_last_line_of_a_message_falls_back_on_an_empty_or_blank_one(message, expected):
    """The reason a one-line error quotes: a blank message gives the fallback, not an IndexError."""
    from harness.errors import last_line

    assert last_line(message, "fallback") == expected


@pytest.mark.parametrize("message", ["", "   \n  "])
def test_an_artifact_error_with_no_message_names_the_exception_class(monkeypatch, message):
    """MLflow's error without a message: the report's one line names the exception's class."""
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException

    import harness.report as report

    class Refusing:
        def download_artifacts(self, path, dst):
            raise MlflowException(message)

    monkeypatch.setattr(report, "run_artifacts", lambda uri, run: Refusing())
    run = SimpleNamespace(info=SimpleNamespace(run_id="r1", run_name="sweep", artifact_uri="/gone/artifacts"))
    with pytest.raises(HarnessError) as err:
        report._download("sqlite:///x.db", run, "resolved.yaml", "/tmp")
    assert str(err.value) == ("sqlite:///x.db: run r1 (sweep): cannot read its artifact 'resolved.yaml' "
                              "at /gone/artifacts (MlflowException)")


def test_a_kept_plot_is_recorded_by_the_one_file_digest_of_its_bytes(tmp_path):
    """The plot record holds the sha256 of the PNG's bytes as the harness's one file digest
    (:func:`harness.models.file_digest`) computes it; a PNG not there yet is drawn, not an error."""
    import hashlib

    from harness import models, report

    assert not hasattr(report, "file_digest") or report.file_digest is models.file_digest
    path, drawn, record = tmp_path / "p.png", [], {}
    for _ in range(2):
        report.kept_plot(record, path, {"title": "t"}, lambda: drawn.append(1) or path.write_bytes(b"png") and path)
    assert drawn == [1]
    assert record == {str(path): [report.plot_inputs_digest({"title": "t"}), hashlib.sha256(b"png").hexdigest()]}


def bound_job(task: str, scaling: float, acc: float) -> JobResult:
    return JobResult(f"pr{scaling}{task}", "perfect_routing", "perfect routing", {"scaling": scaling}, task, "ok",
                     {f"acc/{task}": acc})


def test_bound_rows_follow_their_lambdas_whatever_order_the_jobs_were_read_in():
    """MLflow returns runs newest first: the bound rows still come in ascending lambda order."""
    jobs = [bound_job(A, 0.6, 70.0), bound_job(B, 0.6, 50.0), bound_job(A, 0.3, 60.0), bound_job(B, 0.3, 40.0)]
    for read_in in (jobs, jobs[::-1]):
        rows = build_rows(read_in, [A, B], [])
        assert [(r.method, r.avg) for r in rows] == [("perfect routing (0.3)", 50.0), ("perfect routing (0.6)", 60.0)]


def test_a_row_names_its_failed_tasks_in_the_sweeps_task_order():
    """Task order A, B is not alphabetical order."""
    lost = [JobResult(f"i{t}", "individual", "individual", {}, t, "failed", error="boom") for t in (B, A)]
    assert [r.setting for r in build_rows(lost, [A, B], [])] == [f"failed: {A}, {B}"]


def test_a_tuned_rows_note_counts_failed_and_pruned_trials():
    assert TrialCounts(20, failed=2, pruned=3).note() == "2 of 20 trials failed, 3 pruned"
    assert TrialCounts(20, failed=2).note() == "2 of 20 trials failed"
    assert TrialCounts(20, pruned=3).note() == "3 of 20 trials pruned"
    assert TrialCounts(20).note() == ""


def test_an_unseen_sweeps_generalization_table_averages_each_rows_unseen_tasks():
    C, D = "toy_checks", "toy_bars"
    rows = [Row("pretrained", "zero-shot", {A: 40.0, B: 30.0, C: 20.0, D: 11.0}, 35.0, None),
            Row("individual", "per task", {A: 90.0, B: 80.0, C: 70.0, D: 60.0}, 85.0, 100.0),
            Row("task_arithmetic", "scaling=0.3", {A: 60.0, B: 50.0, C: 25.0, D: 14.0}, 55.0, 70.0),
            Row("ties", "failed", {}, None, None),
            Row("partial", "", {A: 60.0, B: 50.0, C: 25.0}, 55.0, 70.0)]  # an unseen task not scored: left out
    header, body = generalization_records(rows, [A, B], [C, D])
    assert header == ["method", "seen avg", C, D, "unseen avg"]
    assert body == [["pretrained", "35.0", "20.0", "11.0", "15.5"],  # (20 + 11) / 2
                    ["task_arithmetic", "55.0", "25.0", "14.0", "19.5"],  # (25 + 14) / 2
                    ["ties", "failed", "failed", "failed", "failed"]]


def test_an_unseen_avg_is_over_the_unseen_tasks_however_many_tasks_were_seen():
    """Merged on one task, three unseen: the unseen avg divides by three, not by the seen count."""
    C, D = "toy_checks", "toy_bars"
    rows = [Row("task_arithmetic", "", {A: 70.0, B: 30.0, C: 20.0, D: 10.0}, 70.0, None)]
    _, body = generalization_records(rows, [A], [B, C, D])
    assert body == [["task_arithmetic", "70.0", "30.0", "20.0", "10.0", "20.0"]]  # (30 + 20 + 10) / 3


def test_the_default_reference_is_task_arithmetic_else_the_first_method_that_did_not_fail():
    """A failed method has no test predictions: as the reference it would leave no significance table."""
    def row(method: str, failed: bool = False) -> Row:
        return Row(method, "", {}, None if failed else 50.0, None)

    assert default_reference([row("pretrained"), row("ties"), row("task_arithmetic")]) == ["task_arithmetic"]
    assert default_reference([row("pretrained"), row("individual"), row("ties", failed=True), row("tsv")]) == ["tsv"]
    assert default_reference([row("pretrained"), row("ties", failed=True)]) == []


def test_each_row_is_compared_with_the_reference_signed_and_in_table_order():
    """Per task, 100 test images: the reference gets the first 50 right, ``best`` all, ``worst``
    none: +50.0 and -50.0 points, every resample on one side of 0 (p below 0.001)."""
    half = pack_correct([True] * 50 + [False] * 50)

    def row(method: str, correct: bool) -> Row:
        packed = pack_correct([correct] * 100)
        return Row(method, "", {}, 50.0, None, test_correct={A: packed, B: packed})

    ref = Row("task_arithmetic", "", {}, 50.0, None, test_correct={A: half, B: half})
    older = Row("cached_before_records", "", {}, 50.0, None)  # no per-image records: left out
    header, body = significance_records([row("best", True), ref, older, row("worst", False)], [A, B],
                                        ["task_arithmetic"])
    assert header == ["method", "against", "difference", "95% interval", "p", "test images"]
    assert [line[:3] + line[4:] for line in body] == [["best", "task_arithmetic", "+50.0", "<0.001", "200"],
                                                     ["worst", "task_arithmetic", "-50.0", "<0.001", "200"]]
    low, high = (float(x) for x in body[0][3].strip("[]").split(","))
    assert 0 < low <= 50.0 <= high
    assert body[1][3].startswith("[-")


def test_a_row_with_per_image_records_of_only_some_seen_tasks_is_left_out_of_the_comparison():
    """A row (or a reference) holding records of task A alone has no average over A and B to
    compare: it is left out, the complete rows compared as usual."""
    right, half = pack_correct([True] * 10), pack_correct([True] * 5 + [False] * 5)
    ref = Row("task_arithmetic", "", {}, 50.0, None, test_correct={A: half, B: half})
    partial = Row("partial", "", {}, 50.0, None, test_correct={A: right})
    best = Row("best", "", {}, 100.0, None, test_correct={A: right, B: right})
    _, body = significance_records([ref, partial, best], [A, B], ["task_arithmetic", "partial"])
    assert [line[:3] for line in body] == [["best", "task_arithmetic", "+50.0"]]


def test_a_jobs_entry_holds_the_trial_counts_of_its_label_and_key():
    """jobs.json records a tuned row's counts under its (label, key); another row's job holds null."""
    from harness.report import job_entry

    counts = {("wemoe", "k1"): TrialCounts(5, 1, 2)}
    tuned = JobResult("k1", "merge", "wemoe", {"lr": 0.1}, None, "ok", {})
    other = JobResult("k2", "merge", "ties", {}, None, "ok", {})
    assert job_entry(tuned, counts) == ["wemoe", "k1", {"total": 5, "failed": 1, "pruned": 2}, {"lr": 0.1}]
    assert job_entry(other, counts) == ["ties", "k2", None, {}]


@pytest.mark.parametrize("data, entries", [
    (b'[["wemoe", "k1", null, {"lr": 0.1}], ["ties", "k2"]]', [["wemoe", "k1", None, {"lr": 0.1}], ["ties", "k2"]]),
    (b'[["wemoe"]]', None),  # no job key: not an entry a sweep writes
    (b'[["wemoe", 3]]', None),
    (b'{"wemoe": "k1"}', None),
    (b'[["wemoe", "k1"', None),  # cut short
])
def test_a_jobs_file_is_read_only_when_every_entry_names_a_label_and_a_key(data, entries):
    from harness.report import job_entries

    assert job_entries(data) == entries


def test_a_sweep_with_unseen_tasks_averages_and_normalizes_over_the_seen_ones():
    """Merged on A and B, evaluated on C and D too: every row's avg and norm avg are over A and
    B, its unseen avg over C and D; the pretrained job's own acc/avg (over all four) is not used."""
    C, D = "toy_checks", "toy_bars"
    tasks, seen = [A, B, C, D], [A, B]

    def job(kind, label, params, acc, avg, val=0.0, task=None):
        metrics = {f"acc/{t}": v for t, v in acc.items()} | {"acc/avg": avg, "val/acc/avg": val}
        return JobResult(f"{kind}{label}{params}{task}", kind, label, params, task, "ok", metrics)

    results = [job("pretrained", "pretrained", {}, {A: 40.0, B: 30.0, C: 20.0, D: 10.0}, 25.0),
               *[job("individual", "individual", {}, {t: v}, v, task=t)
                 for t, v in ((A, 80.0), (B, 60.0), (C, 50.0), (D, 40.0))],
               *[job("perfect_routing", "perfect routing", {"scaling": 0.3}, {t: v}, v, task=t)
                 for t, v in ((A, 64.0), (B, 54.0))],
               job("merge", "task_arithmetic", {"scaling": 0.2}, {A: 60.0, B: 45.0, C: 25.0, D: 16.0}, 52.5, 50.0)]
    header, body = table_records(build_rows(results, tasks, ["task_arithmetic"], seen), tasks, seen)
    assert header == ["method", "setting", A, B, "avg", "norm avg", f"{C} (unseen)", f"{D} (unseen)", "unseen avg"]
    assert body == [
        # (40 + 30) / 2; (40/80 + 30/60) / 2 = 50%; (20 + 10) / 2
        ["pretrained", "zero-shot", "40.0", "30.0", "35.0", "50.0", "20.0", "10.0", "15.0"],
        ["individual", "per task", "80.0", "60.0", "70.0", "100.0", "50.0", "40.0", "45.0"],
        # (64 + 54) / 2; (64/80 + 54/60) / 2 = (80 + 90) / 2
        ["perfect routing", "scaling=0.3 (bound)", "64.0", "54.0", "59.0", "85.0", "-", "-", "-"],
        # (60/80 + 45/60) / 2 = 75%, C and D not in it; (25 + 16) / 2
        ["task_arithmetic", "scaling=0.2", "60.0", "45.0", "52.5", "75.0", "25.0", "16.0", "20.5"],
    ]


def test_a_bound_row_with_a_failed_task_names_it_and_keeps_the_others():
    routed = [JobResult(f"pr{t}", "perfect_routing", "perfect routing", {"scaling": 0.3}, t, "ok", {f"acc/{t}": 70.0})
              for t in (A,)]
    routed.append(JobResult("prB", "perfect_routing", "perfect routing", {"scaling": 0.3}, B, "failed", error="boom"))
    rows = build_rows(routed, [A, B], [])
    assert [(r.method, r.setting, r.acc, r.avg, r.norm) for r in rows] == [
        ("perfect routing", f"failed: {B}", {A: 70.0}, None, None)]


def test_a_setting_without_a_validation_average_is_never_chosen_over_one_with_it():
    """A result without val/acc/avg (cached by an older version, a metric MLflow lost) has no
    claim to be the best setting, however high its test accuracy."""
    from harness.results import select_best

    unvalidated = JobResult("k1", "merge", "ta", {"scaling": 1.0}, None, "ok", {f"acc/{A}": 90.0, "acc/avg": 90.0})
    validated = ok("merge", "ta", {"scaling": 0.3}, {A: 50.0}, 10.0)
    for order in ([unvalidated, validated], [validated, unvalidated]):
        assert select_best(order) is validated


def test_a_grid_rows_robustness_is_its_chosen_settings_study():
    """Robustness jobs of two settings (one of an earlier sweep's best): the row shows the
    study of the setting chosen on validation, whichever was read last."""
    from harness.results import robustness_records

    def study(scaling: float, clean: float, noise: float) -> JobResult:
        return JobResult(f"r{scaling}", "robustness", "task_arithmetic", {"scaling": scaling}, None, "ok",
                         {"robust/clean/avg": clean, "robust/gaussian_noise/avg": noise})

    results = [ok("merge", "task_arithmetic", {"scaling": 0.2}, {A: 60.0, B: 40.0}, 52.0),
               ok("merge", "task_arithmetic", {"scaling": 0.6}, {A: 70.0, B: 50.0}, 51.0)]
    for studies in ([study(0.2, 48.0, 31.0), study(0.6, 55.0, 22.0)], [study(0.6, 55.0, 22.0), study(0.2, 48.0, 31.0)]):
        rows = build_rows(results + studies, [A, B], ["task_arithmetic"])
        assert robustness_records(rows, ["gaussian_noise"]) == (
            ["method", "clean", "gaussian_noise"], [["task_arithmetic", "48.0", "31.0"]])


@pytest.mark.parametrize("p, shown", [(0.0042, "0.004"), (0.001, "0.001"), (0.000999, "<0.001"), (0.5, "0.500")])
def test_a_p_value_is_shown_to_three_places_and_below_that_as_under_a_thousandth(monkeypatch, p, shown):
    import harness.report
    from harness.significance import Difference

    monkeypatch.setattr(harness.report, "paired_bootstrap", lambda *a, **k: Difference(2.04, -0.96, 5.04, p, 300))
    packed = pack_correct([True, False, True])
    rows = [Row(m, "", {}, 50.0, None, test_correct={A: packed}) for m in ("task_arithmetic", "ties")]
    assert significance_records(rows, [A], ["task_arithmetic"])[1] == [
        ["ties", "task_arithmetic", "+2.0", "[-1.0, +5.0]", shown, "300"]]


def test_each_corruption_column_holds_its_own_average():
    from harness.results import robustness_records

    metrics = {"robust/clean/avg": 50.0, "robust/gaussian_noise/avg": 30.0, "robust/fog/avg": 40.0}
    rows = [Row("ties", "", {}, 50.0, None, metrics=metrics), Row("individual", "per task", {}, 70.0, 100.0)]
    assert robustness_records(rows, ["gaussian_noise", "fog"]) == (
        ["method", "clean", "gaussian_noise", "fog"], [["ties", "50.0", "30.0", "40.0"]])


def test_a_rows_routing_heatmap_is_of_the_setting_chosen_on_validation():
    from dataclasses import replace
    from types import SimpleNamespace

    from harness.report import row_routings

    worse = replace(ok("merge", "task_arithmetic", {"scaling": 0.2}, {A: 70.0, B: 50.0}, 40.0),
                    artifacts={"routing": {"of": 0.2}})
    chosen = replace(ok("merge", "task_arithmetic", {"scaling": 0.6}, {A: 60.0, B: 45.0}, 52.0),
                     artifacts={"routing": {"of": 0.6}})
    cfg = SimpleNamespace(methods=[SimpleNamespace(display="task_arithmetic")])  # all row_routings reads
    assert row_routings(cfg, [worse, chosen]) == {"task_arithmetic": {"of": 0.6}}


def test_an_unseen_sweeps_report_files_average_the_merged_task_only(sweep_dict, tmp_path):
    """Merged on A, B unseen: main.csv's avg and norm avg are A's alone, B has its own columns,
    and generalization.csv gives the seen average beside B's."""
    cfg = validate_config(dict(sweep_dict, unseen=[B], methods=[{"name": "weight_averaging"}]))
    results = [ok("pretrained", "pretrained", {}, {A: 40.0, B: 30.0}, 35.0),
               ok("individual", "individual", {}, {A: 80.0}, 80.0, task=A),
               ok("individual", "individual", {}, {B: 50.0}, 50.0, task=B),
               ok("merge", "weight_averaging", {}, {A: 50.0, B: 33.0}, 41.0)]
    results[-1].metrics["acc/avg"] = 50.0  # a merge job averages its merged tasks' accuracy
    build_report(cfg, results, tmp_path)
    assert read(tmp_path / "main.csv") == [
        ["method", "setting", A, "avg", "norm avg", f"{B} (unseen)", "unseen avg"],
        ["pretrained", "zero-shot", "40.0", "40.0", "50.0", "30.0", "30.0"],  # 40 / 80
        ["individual", "per task", "80.0", "80.0", "100.0", "50.0", "50.0"],
        ["weight_averaging", "", "50.0", "50.0", "62.5", "33.0", "33.0"],  # 50 / 80
    ]
    assert read(tmp_path / "generalization.csv") == [
        ["method", "seen avg", B, "unseen avg"],
        ["pretrained", "40.0", "30.0", "30.0"],
        ["weight_averaging", "50.0", "33.0", "33.0"],
    ]


def test_a_tune_table_states_its_studys_trial_counts(cfg, tmp_path):
    from harness.report import build_tune_table

    best = ok("merge", "task_arithmetic", {"scaling": 0.6}, {A: 70.0, B: 50.0}, 51.0)
    build_tune_table(cfg, [best], tmp_path, "task_arithmetic", {("task_arithmetic", best.key): TrialCounts(8, 1, 2)})
    assert read(tmp_path / "tune-task_arithmetic.csv")[1] == [
        "task_arithmetic", "scaling=0.6 (1 of 8 trials failed, 2 pruned)", "70.0", "50.0", "60.0", "-"]


def test_a_tune_table_holds_the_reference_rows_and_the_tuned_methods_row_only(cfg, tmp_path):
    """`harness tune task_arithmetic` writes its own method's row beside the references, not the
    rows of the sweep's other methods, whose results the folder also holds."""
    from harness.report import build_tune_table

    pre = {A: 40.0, B: 30.0}
    results = [ok("pretrained", "pretrained", {}, pre, 35.0),
               ok("merge", "weight_averaging", {}, {A: 55.0, B: 45.0}, 50.0),
               ok("merge", "task_arithmetic", {"scaling": 0.6}, {A: 70.0, B: 50.0}, 51.0)]
    build_tune_table(cfg, results, tmp_path, "task_arithmetic")
    assert [row[0] for row in read(tmp_path / "tune-task_arithmetic.csv")[1:]] == ["pretrained", "task_arithmetic"]


def test_a_failed_jobs_routing_is_not_the_rows_heatmap(cfg):
    """A job read back failed (its run killed after logging) may hold routing and a higher
    validation average: the row reports the best finished setting, and so does its heatmap."""
    from harness.report import row_routings

    def wemoe(status: str, lr: int, val: float, w: float) -> JobResult:
        r = ok("merge", "wemoe", {"lr": lr}, {A: 50.0, B: 40.0}, val)
        r.status, r.artifacts["routing"] = status, {"experts": [A, B], "layers": 1, "mean_weight": {A: [[w, 1 - w]]}}
        return r

    one = cfg.model_copy(update={"methods": [MethodSpec(name="wemoe", label="wemoe")]})
    routings = row_routings(one, [wemoe("failed", 1, 90.0, 0.1), wemoe("ok", 2, 40.0, 0.7)])
    assert routings["wemoe"]["mean_weight"] == {A: [[0.7, 1 - 0.7]]}


def test_settings_whose_validation_averages_tie_but_for_float_rounding_choose_the_first():
    """Averages of per-task percentages that are equal as numbers can differ in their last bit
    (summed from other task accuracies): the first setting of the tie is still the one reported."""
    def val_avg(hits: list[int]) -> float:  # as a job averages its per-task validation accuracy
        return sum(100.0 * k / 700 for k in hits) / len(hits)

    first = val_avg([168, 391, 533, 510, 491, 132, 230, 160])
    second = val_avg([168, 391, 533, 510, 491, 132, 201, 189])
    assert first < second  # the same average but for rounding: 46.69642857142856 against ...57
    jobs = [ok("merge", "task_arithmetic", {"scaling": s}, {A: 50.0, B: acc}, val)
            for s, acc, val in ((0.2, 40.0, 30.0), (0.6, 60.0, first), (1.0, 70.0, second))]
    (row,) = build_rows(jobs, [A, B], ["task_arithmetic"])
    assert (row.setting, row.avg) == ("scaling=0.6", 55.0)
