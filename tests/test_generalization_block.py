"""The ``generalization:`` block: one sweep gives the main table (every task merged) and the
generalization table (merged on the seen tasks only), with separate jobs, keys, runs and tables."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from harness.config import GENERALIZATION, MAIN, validate_config
from harness.runner import run_sweep
from tests.conftest import write_micro_checkpoints

TASKS = ["toy_stripes", "toy_colours", "toy_checks"]
SEEN, UNSEEN = ["toy_stripes", "toy_colours"], ["toy_checks"]
SCALINGS = [0.2, 0.6]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A micro CLIP and three 'fine-tuned' encoders (independent random perturbations)."""
    return write_micro_checkpoints(tmp_path_factory.mktemp("gen_ckpt"), lambda p: 0.05, TASKS)


def sweep_dict(checkpoints, root, generalization: bool = True) -> dict:
    d = {
        "name": "gen",
        "output_dir": str(root / "out"),
        "cache_dir": str(root / "cache"),
        "model": {"source": "files", "arch": "harness-micro-vit",
                  "pretrained": str(checkpoints / "pretrained.safetensors"),
                  "finetuned_pattern": str(checkpoints / "{task}.safetensors")},
        "tasks": list(TASKS),
        "methods": [{"name": "weight_averaging"}, {"name": "task_arithmetic", "grid": {"scaling": SCALINGS}}],
    }
    if generalization:
        d["generalization"] = {"unseen": list(UNSEEN)}
    return d


@pytest.fixture(scope="module")
def swept(checkpoints, tmp_path_factory):
    """The sweep, run in-process with the merged encoders' weights captured per job."""
    import harness.job

    root = tmp_path_factory.mktemp("gen_sweep")
    cfg = validate_config(sweep_dict(checkpoints, root))
    merged_states: dict[tuple, dict[str, torch.Tensor]] = {}
    real_merge = harness.job.merge

    def capture(spec, ws, device, workdir):
        merged, artifacts = real_merge(spec, ws, device, workdir)
        params = tuple(sorted(spec.params.items()))
        merged_states[(spec.protocol, spec.method, params)] = {k: v.clone() for k, v in merged.state_dict().items()}
        return merged, artifacts

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness.job, "merge", capture)
        outcome = run_sweep(cfg, quiet=True)
    return cfg, outcome, merged_states, root


def hand_task_arithmetic(checkpoints, tasks: list[str], scaling: float) -> dict[str, torch.Tensor]:
    """theta_0 + scaling * sum_t (theta_t - theta_0), straight from the checkpoint files."""
    pre = {k[len("visual."):]: v for k, v in load_file(checkpoints / "pretrained.safetensors").items()
           if k.startswith("visual.")}
    fts = [load_file(checkpoints / f"{t}.safetensors") for t in tasks]
    return {k: v + scaling * sum(ft[k] - v for ft in fts) for k, v in pre.items() if v.is_floating_point()}


def test_generalization_jobs_merge_only_the_seen_tasks(swept, checkpoints):
    cfg, outcome, states, _ = swept
    assert not outcome.failed
    assert cfg.generalization_seen == SEEN
    for s in SCALINGS:
        for protocol, tasks in ((GENERALIZATION, SEEN), ("main", TASKS)):
            got = states[(protocol, "task_arithmetic", (("scaling", s),))]
            for k, v in hand_task_arithmetic(checkpoints, tasks, s).items():
                assert torch.allclose(got[k], v, atol=1e-6), (protocol, s, k)
    gen = [r for r in outcome.results if r.protocol == GENERALIZATION]
    assert sorted(r.label for r in gen) == ["task_arithmetic (gen)"] * 2 + ["weight_averaging (gen)"]
    for r in gen:  # averages and selection metric over the seen tasks; unseen ones reported apart
        m = r.metrics
        assert m["acc/avg"] == m["seen/avg"] == pytest.approx(sum(m[f"acc/{t}"] for t in SEEN) / 2)
        assert m["val/acc/avg"] == pytest.approx(sum(m[f"val/acc/{t}"] for t in SEEN) / 2)
        assert m["unseen/toy_checks"] == m["unseen/avg"] == m["acc/toy_checks"]
    for r in outcome.results:
        if r.kind == "merge" and r.protocol != GENERALIZATION:
            assert "unseen/avg" not in r.metrics
            assert r.metrics["acc/avg"] == pytest.approx(sum(r.metrics[f"acc/{t}"] for t in TASKS) / 3)


def test_cache_keys_distinct_and_main_keys_unchanged(swept, checkpoints, tmp_path):
    from harness.plan import plan_jobs
    from harness.workspace import Workspace

    cfg, outcome, _, _ = swept
    keys = [r.key for r in outcome.results]
    assert len(keys) == len(set(keys)) == 1 + 3 + 3 + 3
    plain = validate_config(sweep_dict(checkpoints, tmp_path, generalization=False))
    ws = Workspace(plain)
    plain_keys = {s.key for s in plan_jobs(plain, ws.identity, ws.task_identity())}
    main_keys = {r.key for r in outcome.results if r.protocol != GENERALIZATION}
    assert main_keys == plain_keys  # adding the block leaves every main-protocol result valid


def test_main_table_unaffected(swept, checkpoints, monkeypatch):
    from harness.results import table_records

    cfg, outcome, _, root = swept
    rows = {r.method: r for r in outcome.rows}
    assert list(rows) == ["pretrained", "individual", "weight_averaging", "task_arithmetic"]
    main_ta = [r for r in outcome.results if r.label == "task_arithmetic"]
    assert rows["task_arithmetic"].n_settings == len(main_ta) == 2
    best = max(main_ta, key=lambda r: r.metrics["val/acc/avg"])
    assert rows["task_arithmetic"].avg == best.metrics["acc/avg"]
    assert "(gen)" not in (outcome.output_dir / "report" / "main.md").read_text()

    def boom(*a, **k):
        raise AssertionError("a main-protocol job was run again")

    monkeypatch.setattr("harness.executors.local.run_job", boom)
    plain = validate_config(sweep_dict(checkpoints, root, generalization=False))
    again = run_sweep(plain, quiet=True)  # the same sweep without the block: all from cache
    assert again.executed == [] and not again.generalization_rows
    assert table_records(again.rows, TASKS) == table_records(outcome.rows, TASKS)


def _expected_generalization_rows(outcome) -> list[list[str]]:
    """The generalization table recomputed from the job results: val-selected per method."""
    indiv = {r.task: r.metrics[f"acc/{r.task}"] for r in outcome.results if r.kind == "individual"}

    def line(method: str, setting: str, m: dict[str, float]) -> list[str]:
        seen = [m[f"acc/{t}"] for t in SEEN]
        norm = sum(m[f"acc/{t}"] / indiv[t] * 100 for t in SEEN) / len(SEEN)
        return [method, setting, *[f"{a:.1f}" for a in seen], f"{sum(seen) / len(seen):.1f}", f"{norm:.1f}",
                f"{m['acc/toy_checks']:.1f}", f"{m['acc/toy_checks']:.1f}"]

    pre = next(r for r in outcome.results if r.kind == "pretrained")
    out = [line("pretrained", "zero-shot", pre.metrics)]
    for label in ("weight_averaging", "task_arithmetic"):
        cands = [r for r in outcome.results if r.protocol == GENERALIZATION and r.label == f"{label} (gen)"]
        best = max(cands, key=lambda r: sum(r.metrics[f"val/acc/{t}"] for t in SEEN))
        out.append(line(label, ", ".join(f"{k}={v}" for k, v in best.params.items()), best.metrics))
    return out


def test_generalization_table_from_mlflow_report(swept, tmp_path):
    from harness.cli import main
    from harness.results import generalization_table_records

    cfg, outcome, _, _ = swept
    expected = _expected_generalization_rows(outcome)
    header, body = generalization_table_records(outcome.generalization_rows, TASKS, SEEN)
    assert header == ["method", "setting", *SEEN, "seen avg", "seen norm avg", "toy_checks (unseen)", "unseen avg"]
    assert body == expected  # the table the sweep printed
    r = CliRunner().invoke(main, ["report", outcome.parent_run_id, "--tracking-uri", cfg.resolved_tracking_uri(),
                                  "--out", str(tmp_path / "rep")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    with open(tmp_path / "rep" / "generalization.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows == [header, *expected]  # rebuilt from MLflow alone
    with open(tmp_path / "rep" / "main.csv") as fh:
        main_rows = list(csv.reader(fh))
    assert [r[0] for r in main_rows[1:]] == ["pretrained", "individual", "weight_averaging", "task_arithmetic"]
    assert "task\\_arithmetic" in (tmp_path / "rep" / "generalization.tex").read_text()

    client = MlflowClient(cfg.resolved_tracking_uri())
    children = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    tagged = {run.data.tags["harness.job_key"]: run.data.tags.get("harness.protocol") for run in children}
    assert tagged == {res.key: res.protocol for res in outcome.results}
    names = sorted(run.info.run_name for run in children if run.data.tags["harness.protocol"] == GENERALIZATION)
    assert names == sorted([f"task_arithmetic (gen)(scaling={s})" for s in SCALINGS] + ["weight_averaging (gen)"])
    arts = {a.path for a in client.list_artifacts(outcome.parent_run_id, "report")}
    assert {"report/generalization.md", "report/generalization.csv", "report/generalization.tex"} <= arts


def test_report_takes_the_run_id_its_tables_are_titled_with(swept, tmp_path):
    """The tables' titles name the sweep run by its first 8 characters: given back to
    ``harness report``, that was "Run with id=... not found"."""
    from harness.cli import main

    cfg, outcome, _, _ = swept
    uri, short = cfg.resolved_tracking_uri(), outcome.parent_run_id[:8]
    tables = {}
    for run_id, out in ((outcome.parent_run_id, tmp_path / "full"), (short, tmp_path / "short")):
        r = CliRunner().invoke(main, ["report", run_id, "--tracking-uri", uri, "--out", str(out)],
                               env={"COLUMNS": "200"})
        assert r.exit_code == 0, r.output
        assert f"main ({cfg.name}, run {short})" in r.output
        tables[run_id] = [(out / f"{name}.csv").read_text() for name in ("main", "generalization")]
    assert tables[short] == tables[outcome.parent_run_id]


def test_a_run_ids_report_folder_is_named_by_its_first_8_characters_however_few_are_given(
        swept, tmp_path, monkeypatch):
    """``report-<first 8 characters>/``: a prefix of 4 wrote ``report-<those 4>/``, a second
    folder for the run a whole id reports into ``report-<8>/``."""
    from harness.cli import main

    cfg, outcome, _, _ = swept
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["report", outcome.parent_run_id[:4], "--tracking-uri", cfg.resolved_tracking_uri()],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert [p.name for p in tmp_path.iterdir()] == [f"report-{outcome.parent_run_id[:8]}"]
    assert (tmp_path / f"report-{outcome.parent_run_id[:8]}" / "main.csv").is_file()


def test_a_row_given_twice_to_against_is_compared_with_once(swept, tmp_path):
    """``--against ROW --against ROW`` listed every comparison twice in the significance table."""
    from harness.cli import main

    cfg, outcome, _, _ = swept
    r = CliRunner().invoke(main, ["report", str(outcome.output_dir), "--out", str(tmp_path / "rep"),
                                  "--against", "task_arithmetic", "--against", "task_arithmetic"])
    assert r.exit_code == 0, r.output
    _, *body = csv.reader((tmp_path / "rep" / "significance.csv").read_text().splitlines())
    assert sorted(row[0] for row in body) == ["individual", "pretrained", "weight_averaging"]


def test_against_a_row_without_per_image_records_is_refused_naming_it(swept, tmp_path):
    """Results cached by a version without per-image records are left out of the significance
    table: a row named by --against that has none left the table out, without a word."""
    import dataclasses

    from harness.errors import HarnessError
    from harness.report import build_report

    cfg, outcome, _, _ = swept
    results = [dataclasses.replace(r, test_correct={}) if r.kind == "pretrained" else r for r in outcome.results]
    with pytest.raises(HarnessError, match="--against 'pretrained': its results hold no per-image test records"):
        build_report(cfg, results, tmp_path / "rep", against=["pretrained"])
    rep = build_report(cfg, results, tmp_path / "rep", against=["weight_averaging"])
    assert [row[0] for row in rep.tables["significance"][1]] == ["individual", "task_arithmetic"]


def test_report_of_a_job_run_id_names_its_sweep_run(swept, tmp_path):
    """A job's run id, copied from the MLflow UI beside its sweep's, said its run had no
    ``resolved.yaml`` artifact: it names the sweep run to report instead, writing nothing."""
    from harness.cli import main

    cfg, outcome, _, _ = swept
    uri = cfg.resolved_tracking_uri()
    client = MlflowClient(uri)
    job = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id],
                             f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")[0]
    r = CliRunner().invoke(main, ["report", job.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "rep")])
    assert r.exit_code == 2, r.output
    assert " ".join(r.stderr.split()) == (
        f"error: {uri}: run {job.info.run_id} ({job.info.run_name}) is a job of sweep run "
        f"{outcome.parent_run_id[:8]} ({cfg.name}), not a sweep's run: report that one")
    assert not (tmp_path / "rep").exists()


def test_a_run_id_beginning_two_sweep_runs_is_refused_naming_them():
    from types import SimpleNamespace

    from harness.errors import HarnessError
    from harness.report import full_run_id

    ids = ["d18370c9c5714df5b73d762666a2cd4a", "d18370c9ffff4df5b73d762666a2cd4a", "0123456789abcdef0123456789abcdef"]
    client = SimpleNamespace(search_experiments=lambda: [SimpleNamespace(experiment_id="1")],
                             search_runs=lambda exps, where, max_results: [
                                 SimpleNamespace(info=SimpleNamespace(run_id=i)) for i in ids])
    assert full_run_id(client, "0123") == ids[2]
    assert full_run_id(client, "d18370c9c") == ids[0]
    assert full_run_id(client, "ffff") == "ffff"  # none: MLflow's own "not found"
    with pytest.raises(HarnessError, match=f"run id 'd18370c9' begins 2 sweep runs \\({ids[0]}, {ids[1]}\\)"):
        full_run_id(client, "d18370c9")


def test_terminal_tables_and_dry_run(swept, checkpoints, tmp_path):
    from rich.console import Console

    from harness.cli import main
    from harness.runner import print_tables

    cfg, outcome, _, root = swept
    console = Console(record=True, width=200)
    print_tables(console, cfg, outcome.rows, outcome.generalization_rows)
    text = console.export_text()
    assert "generalization: merged on toy_stripes, toy_colours" in text and "toy_checks (unseen)" in text

    f = tmp_path / "gen.yaml"
    f.write_text(yaml.safe_dump(sweep_dict(checkpoints, tmp_path)))
    r = CliRunner().invoke(main, ["sweep", str(f), "--dry-run"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "job plan: 10 jobs" in r.stdout
    plan = [line for line in r.stdout.splitlines() if "│ merge" in line]
    assert sum("task_arithmetic (gen)" in line for line in plan) == 2
    assert sum("task_arithmetic " in line and "(gen)" not in line for line in plan) == 2
    assert sum("weight_averaging (gen)" in line for line in plan) == 1
    assert all("all, merged on toy_stripes, toy_colours" in line for line in plan if "(gen)" in line)


def test_results_built_for_a_spec_keep_its_protocol():
    """Failed results made by the executors (not by run_job) must still say which table they belong to."""
    from harness.config import GENERALIZATION
    from harness.job import JobResult
    from harness.plan import JobSpec

    spec = JobSpec("merge", "task_arithmetic (gen)", method="task_arithmetic", params={"scaling": 0.3},
                   key="k", protocol=GENERALIZATION)
    failed = JobResult.of(spec, "failed", error="worker process failed")
    assert (failed.protocol, failed.label, failed.params, failed.status) == (
        GENERALIZATION, "task_arithmetic (gen)", {"scaling": 0.3}, "failed")
    assert JobResult.from_dict(failed.to_dict()) == failed


def test_parent_summary_metrics_are_the_generalization_tables(swept):
    """Every row of the generalization table, the zero-shot one too, has its seen and unseen
    averages on the sweep's parent run, equal to the table's (hand-averaged) cells."""
    cfg, outcome, _, _ = swept
    client = MlflowClient(cfg.resolved_tracking_uri())
    logged = client.get_run(outcome.parent_run_id).data.metrics
    for row in outcome.generalization_rows:
        seen = sum(row.acc[t] for t in SEEN) / len(SEEN)
        unseen = sum(row.acc[t] for t in UNSEEN) / len(UNSEEN)
        assert logged[f"generalization/{row.method}/seen/avg"] == pytest.approx(seen, abs=1e-9)
        assert logged[f"generalization/{row.method}/unseen/avg"] == pytest.approx(unseen, abs=1e-9)
    assert "pretrained" in [row.method for row in outcome.generalization_rows]


def test_a_top_level_unseen_sweeps_parent_holds_its_generalization_tables_averages(checkpoints, tmp_path):
    """A sweep merged on its seen tasks only (top-level ``unseen``) writes a generalization table
    too: its rows' seen and unseen averages are on the parent run, as the block's are, and those
    of rows the table leaves out (the individual one) are not."""
    d = dict(sweep_dict(checkpoints, tmp_path, generalization=False), unseen=list(UNSEEN), eval={"max_samples": 16})
    cfg = validate_config(d)
    outcome = run_sweep(cfg, quiet=True)
    logged = MlflowClient(cfg.resolved_tracking_uri()).get_run(outcome.parent_run_id).data.metrics
    with open(cfg.resolved_output_dir() / "report" / "generalization.csv") as fh:
        table = {line[0]: line for line in list(csv.reader(fh))[1:]}
    assert sorted(table) == ["pretrained", "task_arithmetic", "weight_averaging"]
    gen = {k for k in logged if k.startswith("generalization/")}
    assert gen == {f"generalization/{m}/{part}/avg" for m in table for part in ("seen", "unseen")}
    for m, cells in table.items():
        assert f"{logged[f'generalization/{m}/seen/avg']:.1f}" == cells[1]
        assert f"{logged[f'generalization/{m}/unseen/avg']:.1f}" == cells[-1]


def test_a_generalization_jobs_normalized_accuracy_is_over_the_seen_tasks(swept):
    """Logged with each job: norm_acc/<task> = its test accuracy / the individual model's, for the
    tasks it was merged on (a main job: every task), and their mean."""
    cfg, outcome, _, _ = swept
    indiv = {r.task: r.metrics[f"acc/{r.task}"] for r in outcome.results if r.kind == "individual"}
    assert sorted(indiv) == sorted(TASKS)
    merges = [r for r in outcome.results if r.kind == "merge"]
    assert {r.protocol for r in merges} == {GENERALIZATION, "main"}
    for r in merges:
        tasks = SEEN if r.protocol == GENERALIZATION else TASKS
        want = {f"norm_acc/{t}": r.metrics[f"acc/{t}"] / indiv[t] * 100 for t in tasks}
        want["norm_acc/avg"] = sum(want.values()) / len(tasks)
        assert {k: v for k, v in r.metrics.items() if k.startswith("norm_acc/")} == pytest.approx(want), r.label


def test_the_robustness_study_runs_in_the_main_job_only(checkpoints, tmp_path):
    """The robustness table reads the main rows: a generalization job, merged on the seen tasks,
    runs no study (a failed one would fail the sweep for a row no table shows)."""
    d = dict(sweep_dict(checkpoints, tmp_path), references={"pretrained": False, "individual": False},
             methods=[{"name": "weight_averaging"}],
             robustness={"tasks": ["toy_stripes"], "corruptions": ["contrast"]})
    out = run_sweep(validate_config(d), quiet=True)
    studied = {r.protocol: any(k.startswith("robust/") for k in r.metrics) for r in out.results}
    assert studied == {MAIN: True, GENERALIZATION: False}
