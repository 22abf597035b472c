"""End-to-end sweeps on the micro model: table, cache reuse, MLflow contents, worker pool."""

from __future__ import annotations

import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness.config import validate_config
from harness.config_errors import ConfigError
from harness.plan import TASK_SOURCE_KEY
from harness.runner import run_sweep
from tests.conftest import TOY_TASKS, make_sweep_dict


@pytest.fixture(scope="module")
def first_run(micro_checkpoints, tmp_path_factory):
    cfg = validate_config(make_sweep_dict(micro_checkpoints, tmp_path_factory.mktemp("first")))
    return cfg, run_sweep(cfg, quiet=True)


def test_table_rows_and_selection(first_run):
    cfg, outcome = first_run
    assert not outcome.failed
    rows = {r.method: r for r in outcome.rows}
    assert list(rows) == ["pretrained", "individual", "weight_averaging", "task_arithmetic"]
    ta = [r for r in outcome.results if r.label == "task_arithmetic"]
    assert len(ta) == 2
    best = max(ta, key=lambda r: r.metrics["val/acc/avg"])
    assert rows["task_arithmetic"].setting == f"scaling={best.params['scaling']}"
    assert rows["task_arithmetic"].avg == pytest.approx(best.metrics["acc/avg"])
    indiv = rows["individual"].acc
    for t in TOY_TASKS:  # normalized accuracy = merged / individual per task, averaged
        assert indiv[t] == next(r.metrics[f"acc/{t}"] for r in outcome.results if r.task == t)
    expected_norm = sum(rows["weight_averaging"].acc[t] / indiv[t] * 100 for t in TOY_TASKS) / len(TOY_TASKS)
    assert rows["weight_averaging"].norm == pytest.approx(expected_norm)
    md = (outcome.output_dir / "report" / "main.md").read_text()
    assert "| task_arithmetic |" in md and "norm avg" in md


def test_second_run_uses_cache(first_run, monkeypatch):
    cfg, outcome = first_run
    assert len(outcome.executed) == 1 + len(TOY_TASKS) + 3

    def boom(*a, **k):
        raise AssertionError("a cached job was run again")

    def no_model(*a, **k):
        raise AssertionError("a finished sweep built the model")

    monkeypatch.setattr("harness.executors.local.run_job", boom)
    monkeypatch.setattr("harness.workspace.build_clip", no_model)  # nothing runs: no model, no preflight
    again = run_sweep(cfg, quiet=True)
    assert again.executed == []
    assert [r.metrics for r in again.results] == [r.metrics for r in outcome.results]
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert len(runs) == 1 + len(outcome.results)  # one parent, each job logged exactly once


def test_mlflow_contents(first_run):
    cfg, outcome = first_run
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["harness.sweep_digest"] == cfg.digest()
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == len(outcome.results)
    by_key = {r.data.tags["harness.job_key"]: r for r in children}
    for res in outcome.results:
        run = by_key[res.key]
        assert run.info.status == "FINISHED"
        for k, v in res.metrics.items():
            assert run.data.metrics[k] == pytest.approx(v)
    ta = next(r for r in outcome.results if r.label == "task_arithmetic")
    run = by_key[ta.key]
    assert run.data.params["job.params.scaling"] == str(ta.params["scaling"])
    assert run.data.params["config.model.arch"] == "harness-micro-vit"
    assert "acc/avg" in run.data.metrics and "norm_acc/avg" in run.data.metrics and "val/acc/avg" in run.data.metrics
    assert run.data.tags["harness.config_digest"] == cfg.digest()
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "resolved.yaml" in arts and "report" in arts
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/main.md", "report/main.csv", "report/main.tex", "report/accuracy.png"} <= report


def test_individual_beats_pretrained_after_finetuning(tmp_path, sweep_dict):
    """A known ordering: an encoder fine-tuned on a task beats the untouched one on it."""
    from harness.finetune import finetune_encoder
    from harness.models import save_state_dict
    from harness.workspace import Workspace

    cfg = validate_config(sweep_dict)
    ws = Workspace(cfg)
    task = ws.task("toy_stripes")
    enc = finetune_encoder(ws.pretrained_encoder, ws.head("toy_stripes"), task.dataset("train"),
                           steps=60, lr=3e-3, batch_size=32, warmup=5, seed=0)
    path = tmp_path / "ft_stripes.safetensors"
    save_state_dict(enc.state_dict(), path)
    d = dict(sweep_dict, tasks=["toy_stripes"], methods=[])
    d["model"] = dict(d["model"], finetuned={"toy_stripes": str(path)}, finetuned_pattern=None)
    out = run_sweep(validate_config(d), quiet=True)
    rows = {r.method: r.avg for r in out.rows}
    assert rows["individual"] > rows["pretrained"] + 20


def test_process_pool_matches_in_process(first_run, sweep_dict, tmp_path):
    cfg, outcome = first_run
    d = dict(sweep_dict, output_dir=str(tmp_path / "pool"), executor={"kind": "local", "workers": 2})
    pooled = run_sweep(validate_config(d), quiet=True)
    assert not pooled.failed
    a = {r.key: r.metrics for r in outcome.results}
    b = {r.key: r.metrics for r in pooled.results}
    assert a.keys() == b.keys()
    for k in a:
        for m in a[k]:
            assert a[k][m] == pytest.approx(b[k][m], abs=1e-9)


def test_failed_job_is_isolated(sweep_dict, tmp_path):
    d = dict(sweep_dict, methods=[{"name": "weight_averaging"},
                                  {"name": "tests.failing_method:AlwaysFails"}])
    cfg = validate_config(d)
    out = run_sweep(cfg, quiet=True)
    failed = out.failed
    assert [r.label for r in failed] == ["tests.failing_method:AlwaysFails"]
    assert "RuntimeError: deliberate failure" in failed[0].error
    assert any(r.method == "weight_averaging" for r in out.rows)
    client = MlflowClient(cfg.resolved_tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id],
                              "tags.`harness.label` = 'tests.failing_method:AlwaysFails'")
    assert runs[0].info.status == "FAILED"
    assert "deliberate failure" in runs[0].data.tags["harness.failure_reason"]
    assert client.get_run(out.parent_run_id).info.status == "FAILED"


def test_perfect_routing_bound_row(sweep_dict):
    """The bound's encoder has the task's own MLPs and task-arithmetic weights elsewhere."""
    from harness.job import perfect_routing_encoder
    from harness.workspace import Workspace
    from methods.task_arithmetic import task_arithmetic_state

    d = dict(sweep_dict, methods=[], references={"perfect_routing": True, "routing_bound_lambda": 0.4})
    cfg = validate_config(d)
    ws = Workspace(cfg)
    enc = perfect_routing_encoder(ws, "toy_colours", 0.4).state_dict()
    own = ws.finetuned_encoder("toy_colours").state_dict()
    ta = task_arithmetic_state(ws.pretrained_encoder, ws.finetuned_encoders(), 0.4)
    for k, v in enc.items():
        if not v.is_floating_point():
            continue
        expected = own[k] if ".mlp." in k else ta[k]
        assert torch.allclose(v, expected), k
    out = run_sweep(cfg, quiet=True)
    row = next(r for r in out.rows if r.method == "perfect routing")
    bound = {r.task: r.metrics for r in out.results if r.kind == "perfect_routing"}
    assert row.acc == {t: bound[t][f"acc/{t}"] for t in TOY_TASKS}


def test_a_bound_row_per_lambda(sweep_dict):
    """Bounds at several lambdas (one per WeMoE init_lambda) are one row each, named by their
    lambda; the one at the earlier sweep's lambda is its cached job, and each row holds its own
    lambda's accuracies. A method may not take a reference row's name."""
    from harness.report import default_reference

    one = dict(sweep_dict, methods=[], references={"perfect_routing": True, "routing_bound_lambda": 0.4})
    first = run_sweep(validate_config(one), quiet=True)
    two = dict(sweep_dict, methods=[{"name": "task_arithmetic", "grid": {"scaling": [0.4]}}],
               references={"perfect_routing": True, "routing_bound_lambda": [0.4, 0.9]})
    out = run_sweep(validate_config(two), quiet=True)
    rows = {r.method: r for r in out.rows}
    assert [r.method for r in out.rows][-3:] == ["perfect routing (0.4)", "perfect routing (0.9)", "task_arithmetic"]
    at = {s: {r.task: r.metrics[f"acc/{r.task}"] for r in out.results
              if r.kind == "perfect_routing" and r.params["scaling"] == s} for s in (0.4, 0.9)}
    assert rows["perfect routing (0.4)"].acc == at[0.4] == next(r for r in first.rows if r.method == "perfect routing").acc
    assert rows["perfect routing (0.9)"].acc == at[0.9] and at[0.9] != at[0.4]
    assert rows["perfect routing (0.9)"].setting == "scaling=0.9 (bound)"
    bound_keys = {r.key for r in first.results if r.kind == "perfect_routing"}
    assert not bound_keys & set(out.executed) and len(out.executed) == len(TOY_TASKS) + 1  # the new bound + TA
    assert default_reference(out.rows) == ["task_arithmetic"]
    for bad in ([], [0.3, 0.3], [0.3, 11.0]):
        with pytest.raises(ConfigError, match="references.routing_bound_lambda"):
            validate_config(dict(sweep_dict, references={"perfect_routing": True, "routing_bound_lambda": bad}))
    with pytest.raises(ConfigError, match="names a reference row"):
        validate_config(dict(sweep_dict, methods=[{"name": "task_arithmetic", "label": "perfect routing (0.3)"}]))


def test_adaptation_curves_in_mlflow(sweep_dict):
    """A sweep's WeMoE run carries its loss per step and its validation accuracy at every
    ``eval_every`` steps from the start; the last validation is of the returned model."""
    d = dict(sweep_dict, methods=[{"name": "wemoe", "params": {
        "steps": 4, "eval_every": 2, "lr": 1e-2, "router_depth": 1, "routing_stats_batches": 0}}])
    d["references"] = {"pretrained": False, "individual": False}
    cfg = validate_config(d)
    outcome = run_sweep(cfg, quiet=True)
    assert not outcome.failed
    res = next(r for r in outcome.results if r.label == "wemoe")
    client = MlflowClient(cfg.resolved_tracking_uri())
    run = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id],
                             f"tags.`harness.job_key` = '{res.key}'")[0]
    loss = client.get_metric_history(run.info.run_id, "tta/loss")
    assert sorted(m.step for m in loss) == [0, 1, 2, 3]
    entropy = client.get_metric_history(run.info.run_id, "tta/entropy")  # no task-identification term: the loss
    assert sorted((m.step, m.value) for m in entropy) == sorted((m.step, m.value) for m in loss)
    assert not client.get_metric_history(run.info.run_id, "tta/task_id")
    val = sorted(client.get_metric_history(run.info.run_id, "tta/val/acc/avg"), key=lambda m: m.step)
    assert [m.step for m in val] == [0, 2, 4]
    assert val[-1].value == pytest.approx(res.metrics["val/acc/avg"])
    for t in TOY_TASKS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"tta/val/acc/{t}")] == [0, 2, 4]


def test_readme_loads_a_sweeps_adapted_wemoe_and_reproduces_its_accuracy(sweep_dict, tmp_path):
    """The README's snippet, run verbatim on a finished sweep: the model it loads from the job's
    workdir scores exactly the job's test accuracy, and the file names the sweep's checkpoints."""
    import re
    from pathlib import Path

    import yaml

    from harness.evaluation import iterate_batches
    from harness.workspace import Workspace

    d = dict(sweep_dict, methods=[{"name": "wemoe", "params": {
        "steps": 3, "lr": 1e-2, "router_depth": 1, "routing": "softmax", "routing_stats_batches": 0}}])
    d["references"] = {"pretrained": False, "individual": False}
    cfg = validate_config(d)
    outcome = run_sweep(cfg, quiet=True)
    res = next(r for r in outcome.results if r.label == "wemoe")
    path = cfg.resolved_output_dir() / "work" / res.key / "wemoe.safetensors"
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(d))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"<!-- example: load-wemoe -->\n```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace('"sweep.yaml"', repr(str(sweep_file))).replace(
        '"outputs/NAME/work/KEY/wemoe.safetensors"', repr(str(path)))
    ws = Workspace(cfg)
    for task in TOY_TASKS:
        hits = []
        for images, labels in iterate_batches(ws.task(task).dataset("test"), 64):
            scope = {"images": images}
            exec(code.replace('"TASK"', repr(task)), scope)
            hits.append(scope["predictions"] == labels)
        assert 100.0 * torch.cat(hits).float().mean().item() == pytest.approx(res.metrics[f"acc/{task}"], abs=1e-9)
    assert scope["model"].wemoe_meta["sources"] == {
        "arch": "harness-micro-vit", "pretrained": d["model"]["pretrained"],
        "finetuned": {t: d["model"]["finetuned_pattern"].format(task=t) for t in TOY_TASKS}}


def test_renamed_method_keeps_its_cached_jobs(first_run, monkeypatch):
    """Renaming a method's label reuses its jobs (same key) under the new name: row and runs."""
    cfg, outcome = first_run
    d = cfg.model_dump(mode="json")
    d["methods"][1]["label"] = "ta_renamed"
    renamed = validate_config(d)

    def boom(*a, **k):
        raise AssertionError("a cached job was run again")

    monkeypatch.setattr("harness.executors.local.run_job", boom)
    again = run_sweep(renamed, quiet=True)
    assert again.executed == []
    rows = {r.method: r for r in again.rows}
    assert "task_arithmetic" not in rows
    assert rows["ta_renamed"].avg == next(r for r in outcome.rows if r.method == "task_arithmetic").avg
    client = MlflowClient(renamed.resolved_tracking_uri())
    children = client.search_runs([client.get_experiment_by_name(renamed.name).experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{again.parent_run_id}'")
    labels = sorted(r.data.tags["harness.label"] for r in children if r.data.tags["harness.kind"] == "merge")
    assert labels == ["ta_renamed", "ta_renamed", "weight_averaging"]
    assert all(r.info.run_name.startswith("ta_renamed") for r in children
               if r.data.tags["harness.label"] == "ta_renamed")


def test_a_renamed_label_leaves_no_summary_metric_on_the_parent_run(sweep_dict, monkeypatch):
    """The parent run's summary is the table as it stands: a rerun after renaming a row's label
    drops the old label's ``<label>/acc/avg`` instead of showing it beside the new one."""
    d = dict(sweep_dict, references=False, methods=[{"name": "weight_averaging", "label": "wa_old"}])
    first = run_sweep(validate_config(d), quiet=True)
    d["methods"][0]["label"] = "wa_new"
    cfg = validate_config(d)
    monkeypatch.setattr("harness.executors.local.run_job", lambda *a, **k: pytest.fail("a cached job ran again"))
    again = run_sweep(cfg, quiet=True)
    assert again.parent_run_id == first.parent_run_id
    client = MlflowClient(cfg.resolved_tracking_uri())
    assert client.get_run(again.parent_run_id).data.metrics == {"wa_new/acc/avg": again.rows[0].avg}
    assert client.get_metric_history(again.parent_run_id, "wa_old/acc/avg") == []


def test_the_parent_runs_report_drops_a_renamed_rows_routing_plot(sweep_dict):
    """The parent run holds the report/ folder as it stands: a rerun after renaming a WeMoE row
    removes the old row's ``routing-<row>.png`` there as it does from the folder's report/."""
    params = {"steps": 1, "router_depth": 1, "routing_stats_batches": 1}
    d = dict(sweep_dict, references=False, methods=[{"name": "wemoe", "label": "moe_old", "params": params}])
    run_sweep(validate_config(d), quiet=True)
    d["methods"][0]["label"] = "moe_new"
    cfg = validate_config(d)
    again = run_sweep(cfg, quiet=True)
    client = MlflowClient(cfg.resolved_tracking_uri())
    logged = {a.path.removeprefix("report/") for a in client.list_artifacts(again.parent_run_id, "report")}
    assert "routing-moe_new.png" in logged and "routing-moe_old.png" not in logged
    assert logged == {p.name for p in (cfg.resolved_output_dir() / "report").iterdir()}


def _renamed_merge_run(d: dict, monkeypatch) -> tuple[dict, object]:
    """``d``'s one method run as ``wa_old``, then renamed ``wa_new``: (the params, the run)."""
    d["methods"] = [{"name": "weight_averaging", "label": "wa_old"}]
    run_sweep(validate_config(d), quiet=True)
    monkeypatch.undo()
    d["methods"][0]["label"] = "wa_new"
    cfg = validate_config(d)
    monkeypatch.setattr("harness.executors.local.run_job", lambda *a, **k: pytest.fail("a cached job ran again"))
    again = run_sweep(cfg, quiet=True)
    client = MlflowClient(cfg.resolved_tracking_uri())
    run = next(r for r in client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id],
                                             f"tags.`mlflow.parentRunId` = '{again.parent_run_id}'"))
    return run.data.params, run


def test_a_renamed_methods_run_holds_no_param_with_its_old_label(sweep_dict, tmp_path, monkeypatch):
    """MLflow params cannot change: a label logged as one stayed the old label beside the tag and
    run name a rename updates. On another store (``tracking_uri``) nothing can delete it, so the
    label is no param."""
    d = dict(sweep_dict, references=False, tracking_uri=f"sqlite:///{tmp_path / 'other.db'}")
    params, run = _renamed_merge_run(d, monkeypatch)
    assert (run.data.tags["harness.label"], run.info.run_name) == ("wa_new", "wa_new")
    assert "wa_old" not in params.values(), params
    assert params["job.method"] == "weight_averaging"


def test_a_renamed_methods_run_an_earlier_harness_logged_loses_its_label_param(sweep_dict, monkeypatch):
    """A run an earlier harness logged with ``job.label`` (the label as a param) in the folder's
    own store has that param deleted when its method is renamed."""
    import harness.runner

    real = harness.runner.job_params
    monkeypatch.setattr(harness.runner, "job_params", lambda cfg, spec: {
        **real(cfg, spec), "job": {**real(cfg, spec)["job"], "label": spec.label}})
    params, run = _renamed_merge_run(dict(sweep_dict, references=False), monkeypatch)
    assert run.data.tags["harness.label"] == "wa_new"
    assert "job.label" not in params and "wa_old" not in params.values(), params


def test_the_parent_runs_summary_is_the_latest_table_when_a_row_falls(sweep_dict):
    """A row whose average falls on rerun (its grid changed): the parent's ``<label>/acc/avg`` is
    the new table's. It was the highest value ever logged: every rerun logged it at step 0 and
    time 0, where MLflow's latest value is the largest."""
    d = dict(sweep_dict, references=False, methods=[{"name": "task_arithmetic", "grid": {"scaling": [0.2]}}])
    rows = []
    for scaling in (0.2, 1.0, 0.2):
        d["methods"][0]["grid"]["scaling"] = [scaling]
        cfg = validate_config(d)
        out = run_sweep(cfg, quiet=True)
        metrics = MlflowClient(cfg.resolved_tracking_uri()).get_run(out.parent_run_id).data.metrics
        assert metrics == {"task_arithmetic/acc/avg": out.rows[0].avg}, scaling
        rows.append(out.rows[0].avg)
    assert rows[0] != rows[1] and rows[0] == rows[2]  # one of the reruns lowered the row


PLAIN_TASK = '''
from tasks.base import Task
from tasks.synthetic import make_toy_task


class Plain(Task):
    """A task whose identity() is the base class's: name and class names only."""

    def __init__(self, inner):
        self.inner, self.name, self.classnames, self.templates = inner, inner.name, inner.classnames, inner.templates

    def dataset(self, split):
        return self.inner.dataset(split)


def make(n_test: int = 80):
    return Plain(make_toy_task("toy_stripes", n_test=n_test))
'''


def test_a_task_option_its_identity_misses_still_reruns_the_jobs(sweep_dict, micro_checkpoints, tmp_path, monkeypatch):
    (tmp_path / "plain_tasks.py").write_text(PLAIN_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    d = dict(sweep_dict, tasks=[{"name": "plain_tasks:make", "options": {"n_test": 40}}, "toy_colours"],
             model={**sweep_dict["model"], "finetuned": {"plain_tasks:make": str(micro_checkpoints / "toy_stripes.safetensors")}})
    first = run_sweep(validate_config(d), quiet=True)
    assert first.executed
    assert run_sweep(validate_config(d), quiet=True).executed == []
    d["tasks"][0]["options"]["n_test"] = 20
    again = run_sweep(validate_config(d), quiet=True)
    stripes_jobs = {r.key for r in again.results if r.task != "toy_colours"}
    assert stripes_jobs and stripes_jobs <= set(again.executed)


def test_editing_a_task_classs_code_reruns_its_jobs(sweep_dict, micro_checkpoints, tmp_path, monkeypatch):
    """A Task subclass of one's own whose identity() is name and class names: after an edit of its
    file (its splits now in reversed order: same images, same accuracy) the jobs reading it (here
    all: each evaluates every task) run again; the project's task adds no code digest to its
    identity, so its keys are those it always had."""
    import sys

    monkeypatch.syspath_prepend(str(tmp_path))
    d = dict(sweep_dict, references={"pretrained": True, "individual": False}, methods=["weight_averaging"],
             tasks=["plain_tasks:make", "toy_colours"],
             model={**sweep_dict["model"], "finetuned": {"plain_tasks:make": str(micro_checkpoints / "toy_stripes.safetensors")}})
    (tmp_path / "plain_tasks.py").write_text(PLAIN_TASK)
    sys.modules.pop("plain_tasks", None)
    first = run_sweep(validate_config(d), quiet=True)
    sys.modules.pop("plain_tasks", None)  # as a new process would import it
    assert run_sweep(validate_config(d), quiet=True).executed == []
    (tmp_path / "plain_tasks.py").write_text(PLAIN_TASK.replace(
        "return self.inner.dataset(split)",
        "data = self.inner.dataset(split)\n        return torch.utils.data.Subset(data, range(len(data))[::-1])"
    ).replace("from tasks.base import Task", "import torch\n\nfrom tasks.base import Task"))
    sys.modules.pop("plain_tasks", None)
    again = run_sweep(validate_config(d), quiet=True)
    assert set(again.executed) == {r.key for r in again.results}  # every job reads the edited task
    assert len(again.executed) == len(first.results) and not set(again.executed) & {r.key for r in first.results}
    from harness.workspace import Workspace

    ws = Workspace(validate_config(d))
    assert TASK_SOURCE_KEY in ws.task_identity("plain_tasks:make") and TASK_SOURCE_KEY not in ws.task_identity("toy_colours")
    before = {r.label: r.metrics["acc/plain_tasks:make"] for r in first.results}
    assert {r.label: r.metrics["acc/plain_tasks:make"] for r in again.results} == pytest.approx(before)


def test_a_slurm_job_refuses_a_task_file_edited_after_submission(sweep_dict, micro_checkpoints, tmp_path,
                                                                 monkeypatch):
    """A node imports a task of one's own when its job starts: after an edit that is the new data
    code, whose result would be stored under the key of the code the sweep was planned with."""
    import sys

    from harness.executors.slurm import SweepJob
    from harness.plan import plan_jobs
    from harness.workspace import Workspace

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "plain_tasks.py").write_text(PLAIN_TASK)
    sys.modules.pop("plain_tasks", None)
    d = dict(sweep_dict, references={"pretrained": False, "individual": True}, methods=[],
             tasks=["plain_tasks:make", "toy_colours"],
             model={**sweep_dict["model"], "finetuned": {"plain_tasks:make": str(micro_checkpoints / "toy_stripes.safetensors")}})
    cfg = validate_config(d)
    ws = Workspace(cfg)
    specs = {s.task: s for s in plan_jobs(cfg, ws.identity, ws.task_identity())}
    assert set(specs["plain_tasks:make"].task_code) == {"plain_tasks:make"} and not specs["toy_colours"].task_code
    sys.modules.pop("plain_tasks")
    assert SweepJob(cfg.model_dump(mode="json"), progress=False)(specs["plain_tasks:make"].to_dict())["status"] == "ok"

    (tmp_path / "plain_tasks.py").write_text(PLAIN_TASK + "\n# edited\n")
    sys.modules.pop("plain_tasks")
    job = SweepJob(cfg.model_dump(mode="json"), progress=False)
    result = job(specs["plain_tasks:make"].to_dict())
    assert result["status"] == "failed" and result["metrics"] == {}
    assert result["error"].startswith(f"TaskChanged: task 'plain_tasks:make': {tmp_path / 'plain_tasks.py'} changed "
                                      "since the sweep was submitted"), result["error"]
    assert job(specs["toy_colours"].to_dict())["status"] == "ok"  # a job not reading it runs


def test_a_task_class_defined_in_a_notebook_runs(sweep_dict, micro_checkpoints, monkeypatch):
    """A Task subclass defined in a notebook (or `python -c`, a REPL): its `__main__` has no file,
    and Python says "source code not available" (OSError) for its classes. The task has no file
    to digest, so it adds none to its identity, as a class whose file cannot be found; the sweep
    runs."""
    import types

    import tasks.base
    from harness.workspace import Workspace
    from tasks.base import Task, register_task
    from tasks.synthetic import make_toy_task

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # as Jupyter's: no __file__
    monkeypatch.setattr(tasks.base, "_TASKS", dict(tasks.base._TASKS))  # registered for this test only

    class Cell(Task):
        def __init__(self, inner):
            self.inner, self.name, self.classnames, self.templates = inner, inner.name, inner.classnames, inner.templates

        def dataset(self, split):
            return self.inner.dataset(split)

    Cell.__module__ = "__main__"
    register_task("notebook_task")(lambda: Cell(make_toy_task("toy_stripes", n_test=40)))
    d = dict(sweep_dict, references={"pretrained": True, "individual": True}, methods=["weight_averaging"],
             tasks=["notebook_task", "toy_colours"],
             model={**sweep_dict["model"], "finetuned": {"notebook_task": str(micro_checkpoints / "toy_stripes.safetensors")}})
    assert TASK_SOURCE_KEY not in Workspace(validate_config(d)).task_identity("notebook_task")
    out = run_sweep(validate_config(d), quiet=True)
    assert out.results and all(r.status == "ok" for r in out.results), [r.error for r in out.results]


def test_a_task_built_in_code_is_identified_by_its_content():
    from tasks.base import InMemoryTask
    from tasks.synthetic import make_toy_task

    def unversioned(n_test: int, flip: bool = False) -> InMemoryTask:
        t = make_toy_task("toy_stripes", n_test=n_test)
        splits = {s: t.raw(s) for s in ("train", "val", "test")}
        if flip:
            images, labels = splits["test"]
            splits["test"] = (images, labels.roll(1))
        return InMemoryTask(t.name, t.classnames, t.templates, splits)

    a = unversioned(40).identity()
    assert unversioned(40).identity() == a
    assert unversioned(40, flip=True).identity() != a and unversioned(20).identity() != a


def test_labels_with_punctuation_end_the_sweep_and_keep_the_tables_whole(sweep_dict):
    """A label's parentheses, '=', '+' and ',' are not allowed in MLflow metric names: the
    summary metrics take a cleaned name instead of failing the sweep at its end."""
    import re

    from harness.results import markdown_table

    label = "ta (x=0.5, +1)"
    cfg = validate_config(dict(sweep_dict, methods=[{"name": "task_arithmetic", "label": label}]))
    outcome = run_sweep(cfg, quiet=True)
    row = next(r for r in outcome.rows if r.method == label)
    parent = MlflowClient(cfg.resolved_tracking_uri()).get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["ta__x_0.5___1_/acc/avg"] == row.avg
    assert f"| {label} |" in (outcome.output_dir / "report" / "main.md").read_text()

    table = markdown_table(["method", "setting"], [["ties", "mode=a|b"]])
    cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in table.splitlines()]
    assert [len(c) for c in cells] == [2, 2, 2] and cells[2][1].strip() == r"mode=a\|b"


def test_labels_alike_once_cleaned_keep_a_summary_metric_each(sweep_dict):
    """'ta (a)' and 'ta _a_' are both cleaned to 'ta__a_' for MLflow: each row keeps its own
    summary metric with its own average, instead of one metric holding the last row's."""
    labels = {"ta (a)": 0.1, "ta _a_": 1.0}
    methods = [{"name": "task_arithmetic", "label": label, "params": {"scaling": s}} for label, s in labels.items()]
    cfg = validate_config(dict(sweep_dict, references=False, methods=methods))
    outcome = run_sweep(cfg, quiet=True)
    avgs = sorted(r.avg for r in outcome.rows)
    assert avgs[0] != avgs[1]
    metrics = MlflowClient(cfg.resolved_tracking_uri()).get_run(outcome.parent_run_id).data.metrics
    assert len(metrics) == 2 and all(name.startswith("ta__a_") and name.endswith("/acc/avg") for name in metrics)
    assert sorted(metrics.values()) == avgs


def test_job_runs_carry_every_hyperparameter_and_grid_points_their_setting(sweep_dict):
    """Defaults are part of what a job ran with (and of its key): they are logged too. Grid
    points' runs are named with their setting, so the UI tells them apart."""
    import yaml

    from methods.base import resolve_method

    d = dict(sweep_dict, references=False, methods=[
        {"name": "task_arithmetic", "grid": {"scaling": [0.2, 0.6]}},
        {"name": "ties", "params": {"k": 50}},
        {"name": "weight_averaging"},
    ])
    cfg = validate_config(d)
    outcome = run_sweep(cfg, quiet=True)
    client = MlflowClient(cfg.resolved_tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id],
                              f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    assert sorted(r.info.run_name for r in runs) == [
        "task_arithmetic(scaling=0.2)", "task_arithmetic(scaling=0.6)", "ties(k=50.0)", "weight_averaging"]
    for run in runs:
        method = run.data.params["job.method"]
        given = {k.removeprefix("job.params."): yaml.safe_load(v) for k, v in run.data.params.items()
                 if k.startswith("job.params.")}
        logged = {k.removeprefix("job.hyperparameters."): yaml.safe_load(v) for k, v in run.data.params.items()
                  if k.startswith("job.hyperparameters.")}
        fields = resolve_method(method).model_fields
        assert logged == {k: given.get(k, f.default) for k, f in fields.items()}, method
        # the resolved config, flattened under config.*, less its methods (the job's own params stand for them)
        assert run.data.params["config.name"] == cfg.name and run.data.params["config.eval.batch_size"] == "256"
        assert not [k for k in run.data.params if k.startswith(("config.methods", "methods."))]
        assert {run.data.params[f"job.{k}"] for k in ("kind", "protocol", "task")} == {"merge", "main", "None"}
    ties = next(r for r in runs if r.data.params["job.method"] == "ties").data.params
    assert ties["job.hyperparameters.merge_function"] == "mean" and ties["job.hyperparameters.k"] == "50.0"


def test_only_jobs_that_save_something_have_a_work_folder(sweep_dict):
    """``work/<key>/`` holds what a job keeps to resume from (WeMoE's adapted routers): a
    method that saves nothing there leaves no empty folder per job, nor does one whose merge
    fails (its traceback is in ``artifacts/<key>/``)."""
    d = dict(sweep_dict, references={"pretrained": False, "individual": False},
             methods=[{"name": "weight_averaging"},
                      {"name": "wemoe",
                       "params": {"steps": 2, "lr": 1e-2, "router_depth": 0, "routing_stats_batches": 0}},
                      {"name": "tests.failing_method:AlwaysFails", "label": "broken"}])
    cfg = validate_config(d)
    outcome = run_sweep(cfg, quiet=True)
    keys = {r.label: r.key for r in outcome.results}
    work = cfg.resolved_output_dir() / "work"
    assert not (work / keys["weight_averaging"]).exists()
    assert (work / keys["wemoe"] / "wemoe.safetensors").is_file()
    assert (cfg.resolved_output_dir() / "artifacts" / keys["broken"] / "traceback.txt").is_file()
    assert not (work / keys["broken"]).exists()


PROMPTED_TASK = '''
from tasks.base import InMemoryTask
from tasks.synthetic import make_toy_task

TEMPLATES = ["a photo of {}."]


def make():
    toy = make_toy_task("toy_stripes")
    return InMemoryTask("mine", toy.classnames, TEMPLATES, {s: toy.raw(s) for s in ("train", "val", "test")},
                        version="1")
'''


def test_editing_the_prompts_of_a_task_of_ones_own_reruns_its_jobs(sweep_dict, micro_checkpoints, tmp_path, monkeypatch):
    """A factory of one's own returning an InMemoryTask: its templates build the zero-shot heads
    every job scores with, so prompts edited in its file (images, labels and version unchanged)
    run the jobs again, as a fresh folder would, instead of reusing scores of the old heads."""
    import sys

    monkeypatch.syspath_prepend(str(tmp_path))
    d = dict(sweep_dict, references={"pretrained": True, "individual": False}, methods=["weight_averaging"],
             tasks=["prompted:make", "toy_colours"],
             model={**sweep_dict["model"], "finetuned": {"prompted:make": str(micro_checkpoints / "toy_stripes.safetensors")}})

    def run(templates: str, out: str):
        (tmp_path / "prompted.py").write_text(PROMPTED_TASK.replace('["a photo of {}."]', templates))
        sys.modules.pop("prompted", None)  # as a new process would import it
        return run_sweep(validate_config({**d, "output_dir": str(tmp_path / out)}), quiet=True)

    first = run('["a photo of {}."]', "out")
    assert run('["a photo of {}."]', "out").executed == []
    edited = run('["{} stripes", "a blurry {}"]', "out")
    assert set(edited.executed) == {r.key for r in edited.results}
    fresh = run('["{} stripes", "a blurry {}"]', "fresh")
    assert {r.key: r.metrics for r in edited.results} == {r.key: r.metrics for r in fresh.results}
    assert {r.label: r.metrics["acc/prompted:make"] for r in edited.results} != {
        r.label: r.metrics["acc/prompted:make"] for r in first.results}


def test_a_setting_two_labels_share_is_one_job_run_once(sweep_dict):
    """README (--dry-run): a setting two labels share is one job. Two grids of task arithmetic
    sharing scaling 0.3 run three merge jobs, not four, and each row shows its own settings."""
    d = dict(sweep_dict, references=False, methods=[
        {"name": "task_arithmetic", "label": "a", "grid": {"scaling": [0.3]}},
        {"name": "task_arithmetic", "label": "b", "grid": {"scaling": [0.3, 0.5, 0.7]}}])
    out = run_sweep(validate_config(d), quiet=True)
    assert not out.failed
    assert len(out.executed) == len(set(out.executed)) == 3
    assert len(list((out.output_dir / "results").glob("*.json"))) == 3
    assert sorted((r.label, r.params["scaling"]) for r in out.results) == [
        ("a", 0.3), ("b", 0.3), ("b", 0.5), ("b", 0.7)]


def test_normalized_accuracy_divides_by_the_individual_models_test_accuracy(trained_checkpoints, tmp_path):
    """norm_acc/<task> logged with a merge job: its test accuracy over the individual model's
    test accuracy (not its validation accuracy), and their mean."""
    from tests.conftest import TRAINED_TASKS

    d = dict(make_sweep_dict(trained_checkpoints, tmp_path), tasks=list(TRAINED_TASKS),
             methods=[{"name": "weight_averaging"}])
    cfg = validate_config(d)
    outcome = run_sweep(cfg, quiet=True)
    assert not outcome.failed
    indiv = {r.task: r.metrics for r in outcome.results if r.kind == "individual"}
    assert any(m[f"val/acc/{t}"] != m[f"acc/{t}"] for t, m in indiv.items())  # else val and test cannot be told apart
    wa = next(r for r in outcome.results if r.kind == "merge")
    norm = {f"norm_acc/{t}": wa.metrics[f"acc/{t}"] / indiv[t][f"acc/{t}"] * 100 for t in TRAINED_TASKS}
    norm["norm_acc/avg"] = sum(norm.values()) / len(TRAINED_TASKS)
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    run = client.search_runs([exp], f"tags.`harness.job_key` = '{wa.key}'")[0]
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("norm_acc/")} == pytest.approx(norm)


def test_an_unseen_tasks_individual_row_scores_its_own_task(sweep_dict):
    """A top-level unseen task keeps its individual row (it has a checkpoint): that job scores
    only its own task, which its average is, though the sweep merges none of its tasks with it."""
    unseen = sweep_dict["tasks"][1]
    d = dict(sweep_dict, references={"pretrained": False, "individual": True}, methods=[{"name": "weight_averaging"}],
             unseen=[unseen])
    outcome = run_sweep(validate_config(d), quiet=True)
    assert not outcome.failed
    row = next(r for r in outcome.results if r.kind == "individual" and r.task == unseen)
    assert row.metrics["acc/avg"] == row.metrics[f"acc/{unseen}"]
    assert row.metrics["val/acc/avg"] == row.metrics[f"val/acc/{unseen}"]


def test_the_pretrained_rows_run_carries_its_normalized_accuracy(sweep_dict):
    """The zero-shot row is a row like a merge's: its run holds its test accuracy over each
    individual model's, which the tables read from MLflow."""
    d = dict(sweep_dict, methods=[])
    cfg = validate_config(d)
    outcome = run_sweep(cfg, quiet=True)
    indiv = {r.task: r.metrics[f"acc/{r.task}"] for r in outcome.results if r.kind == "individual"}
    assert all(v > 0 for v in indiv.values())
    pre = next(r for r in outcome.results if r.kind == "pretrained")
    norm = {f"norm_acc/{t}": pre.metrics[f"acc/{t}"] / indiv[t] * 100 for t in TOY_TASKS}
    norm["norm_acc/avg"] = sum(norm.values()) / len(TOY_TASKS)
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    (run,) = client.search_runs([exp], f"tags.`harness.job_key` = '{pre.key}'")
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("norm_acc/")} == pytest.approx(norm)
