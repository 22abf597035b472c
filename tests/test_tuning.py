"""Optuna tuning: recovers the grid's best lambda (toy tasks and a reduced embedded suite),
resumes after a kill, prunes, stays on val; grid studies end with their grid, spaces fit their
fields' types, a changed study is a new one, `harness tune` works inside its sweep."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness.config import validate_config
from harness.config_errors import ConfigError
from harness.errors import HarnessError
from harness.runner import run_sweep
from tests.conftest import TRAINED_TASKS, make_sweep_dict, pixelate_split_unreadable, tuned_ties_then_k_joins

GRID = [round(0.05 * i, 2) for i in range(21)]


def trained_sweep(ckpt: Path, root: Path, methods: list[dict]) -> dict:
    d = make_sweep_dict(ckpt, root)
    d["tasks"] = list(TRAINED_TASKS)
    d["methods"] = methods
    return d


def tune_block(**kw) -> dict:
    block = {"n_trials": 12, "sampler": "tpe", "space": {"scaling": {"type": "float", "low": 0.0, "high": 1.0}}}
    block.update(kw)
    return block


def completed_trials(cfg, n: int):
    """(client, the tuning run, its trial runs) read back from MLflow; all n trials complete."""
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    tune_run = client.search_runs([exp], "tags.`harness.kind` = 'tune'")[0]
    trials = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{tune_run.info.run_id}'")
    assert len(trials) == n
    assert {t.data.tags["harness.trial_state"] for t in trials} == {"COMPLETE"}
    return client, tune_run, trials


def test_tuning_recovers_grid_best(trained_checkpoints, tmp_path):
    d = trained_sweep(trained_checkpoints, tmp_path, [
        {"name": "task_arithmetic", "label": "grid", "grid": {"scaling": GRID}},
        {"name": "task_arithmetic", "label": "tuned", "tune": tune_block()},
    ])
    cfg = validate_config(d)
    out = run_sweep(cfg, quiet=True)
    assert not out.failed
    grid = {r.params["scaling"]: r.metrics["val/acc/avg"] for r in out.results if r.label == "grid"}
    top = max(grid.values())
    argmax = [lam for lam, v in grid.items() if v == top]
    tuned = next(r for r in out.results if r.label == "tuned" and r.kind == "merge")
    lam = tuned.params["scaling"]
    assert min(abs(lam - a) for a in argmax) <= 0.1 + 1e-9, (lam, argmax, grid)
    row = next(r for r in out.rows if r.method == "tuned")
    assert row.setting == f"scaling={lam:.4g}"  # the table shows the chosen hyperparameters
    # MLflow: a tuning run with one nested run per trial and the best params; plots as artifacts
    client, tune_run, trials = completed_trials(cfg, 12)
    assert float(tune_run.data.tags["best.scaling"]) == pytest.approx(lam)
    assert tune_run.data.metrics["best_objective"] == pytest.approx(max(t.data.metrics["objective"] for t in trials))
    arts = {a.path for a in client.list_artifacts(tune_run.info.run_id, "optuna")}
    assert "optuna/optimization_history.png" in arts
    assert arts == {"optuna/optimization_history.png", "optuna/param_importances.png"}  # one tuned name: no contour
    plots = cfg.resolved_output_dir() / "optuna" / "tuned"  # the method's own folder (README)
    assert sorted(p.name for p in plots.iterdir()) == ["optimization_history.png", "param_importances.png"]
    # test/val separation: trials never saw test labels
    for t in trials:
        assert "val/acc/avg" in t.data.metrics
        assert not any(k.startswith("acc/") for k in t.data.metrics), t.data.metrics


# A reduced embedded suite: the shipped pretrained CLIP (pretraining fields at their defaults,
# so nothing is pretrained) and short plain-protocol fine-tuning. With feature preservation
# and the default lr, 40-80 steps leave task vectors too small for a hump (val accuracy keeps
# rising up to lambda ~1); lr 1e-3 without preservation gives a hump with its top at 0.25
# (val 56.5, pretrained 46.2, lambda=1 42.8). emb_mnist comes from a Python dependency and
# the other two are procedural, so the landscape is the same on every machine.
EMBEDDED_TASKS = ["emb_mnist", "emb_signs", "emb_landcover"]
EMBEDDED_SUITE = {"finetune_steps": 40, "finetune_lr": 1e-3, "finetune_warmup": 5, "finetune_batch_size": 32,
                  "preserve_weight": 0.0, "preserve_pool": 256, "workers": 1}


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory):
    """A cache folder holding the reduced suite's data and fine-tuned encoders (built once)."""
    from tasks.embedded.pipeline import prepare_suite

    cache = tmp_path_factory.mktemp("embedded-cache")
    with pytest.MonkeyPatch.context() as mp:  # fine-tuning reads task data from the default cache
        mp.setenv("HARNESS_CACHE", str(cache))
        art = prepare_suite(EMBEDDED_TASKS, cache, EMBEDDED_SUITE, progress=False)
    assert art.timings["pretrain"] == 0.0 and art.pretrained.parent.name == "assets"  # shipped weights
    return cache


def test_tuning_recovers_grid_best_on_embedded_suite(embedded_cache, tmp_path):
    d = {
        "name": "embedded-tune",
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(embedded_cache),
        "model": {"source": "embedded", "suite": dict(EMBEDDED_SUITE)},
        "tasks": list(EMBEDDED_TASKS),
        "references": False,
        "eval": {"max_samples": 200},
        "methods": [
            {"name": "task_arithmetic", "label": "grid", "grid": {"scaling": GRID}},
            {"name": "task_arithmetic", "label": "tuned", "tune": tune_block()},
        ],
    }
    cfg = validate_config(d)
    out = run_sweep(cfg, quiet=True)
    assert not out.failed, [r.error for r in out.failed]
    grid = {r.params["scaling"]: r.metrics["val/acc/avg"] for r in out.results if r.label == "grid"}
    assert sorted(grid) == GRID
    top = max(grid.values())
    argmax = [lam for lam, v in grid.items() if v == top]
    assert top > grid[0.0] and top > grid[1.0], grid  # a hump inside the range, not a flat curve
    tuned = next(r for r in out.results if r.label == "tuned" and r.kind == "merge")
    lam = tuned.params["scaling"]
    assert min(abs(lam - a) for a in argmax) <= 0.1 + 1e-9, (lam, argmax, grid)
    _, _, trials = completed_trials(cfg, 12)
    # the chosen lambda is the best trial's, and re-merging it on the final run gives the same val
    best = max(trials, key=lambda t: t.data.metrics["objective"])
    assert float(best.data.params["trial.scaling"]) == pytest.approx(lam)
    assert tuned.metrics["val/acc/avg"] == pytest.approx(best.data.metrics["objective"])
    # test/val separation: trials only ever saw validation labels; the final run reports test
    for t in trials:
        assert "val/acc/avg" in t.data.metrics
        assert not any(k.startswith("acc/") for k in t.data.metrics), t.data.metrics
    assert all(f"acc/{t}" in tuned.metrics for t in EMBEDDED_TASKS)


def test_pruning(trained_checkpoints, tmp_path):
    space = {"quality": {"type": "float", "low": 0.0, "high": 100.0}}
    d = trained_sweep(trained_checkpoints, tmp_path, [{
        "name": "tests.tuning_methods:ReportingTaskArithmetic", "label": "rep",
        "tune": {"n_trials": 10, "sampler": "random", "pruner": "median", "space": space}}])
    d["references"] = False
    cfg = validate_config(d)
    import io
    import re

    from rich.console import Console

    shown = io.StringIO()
    out = run_sweep(cfg, console=Console(file=shown, width=200))
    assert not out.failed
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    trials = client.search_runs([exp], "tags.`harness.kind` = 'trial'")
    states = [t.data.tags["harness.trial_state"] for t in trials]
    assert len(states) == 10 and "PRUNED" in states and "COMPLETE" in states
    lines = {int(m.group(1)): m.group(2) for m in re.finditer(r"^trial (\d+) rep\(quality=[\d.]+\): (.*)$",
                                                               shown.getvalue(), re.M)}
    assert sorted(lines) == list(range(10)), shown.getvalue()  # one line per trial, as it finishes
    from harness.tuning import open_storage, storage_spec
    import optuna

    study = optuna.load_study(study_name=f"{cfg.name}.rep", storage=open_storage(storage_spec(cfg, cfg.methods[0].tune)))
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert pruned and max(t.params["quality"] for t in pruned) < max(t.params["quality"] for t in complete)
    best = None
    for t in sorted(study.trials, key=lambda t: t.number):  # the line's best is the running best
        if t.state.name == "PRUNED":
            assert lines[t.number].startswith("pruned"), lines[t.number]
            continue
        best = t if best is None or t.value > best.value else best
        assert lines[t.number].startswith(
            f"val/acc/avg {t.value:.1f} (best {best.value:.1f}, trial {best.number})"), lines[t.number]
    # a pruned trial's job is cached as a finished one's: a driver killed before telling its study
    # tells it on the rerun instead of running the trial again
    import json
    from collections import Counter

    cached = [json.loads(p.read_text()) for p in (cfg.resolved_output_dir() / "results").glob("*.json")]
    assert Counter(r["status"] for r in cached if r["kind"] == "trial") == {"pruned": len(pruned), "ok": len(complete)}


def test_median_pruner_never_prunes_before_the_first_adaptation_step():
    """Step 0 is the validation before adapting (WeMoE: task arithmetic at init_lambda): a trial
    worse there than the median is not pruned before its learning rate took one step; a step
    after it below the median is."""
    import optuna

    from harness.tuning import make_pruner

    study = optuna.create_study(direction="maximize", pruner=make_pruner("median"))
    for start, adapted in [(30.0, 40.0), (32.0, 42.0), (34.0, 44.0)]:  # the pruner's 3 startup trials
        done = study.ask()
        done.report(start, 0)
        done.report(adapted, 1)
        study.tell(done, adapted)
    trial = study.ask()
    trial.report(10.0, 0)  # far below every step-0 value
    assert not trial.should_prune()
    trial.report(20.0, 1)  # below the median of step 1 (42.0)
    assert trial.should_prune()


def test_median_pruner_waits_for_three_completed_trials():
    """As the README says: the median pruner judges no trial before 3 trials completed, and
    failed or pruned ones do not count toward them."""
    import optuna

    from harness.tuning import make_pruner

    study = optuna.create_study(direction="maximize", pruner=make_pruner("median"))

    def below_median_at_step_1() -> bool:
        trial = study.ask()
        trial.report(1.0, 1)
        pruned = trial.should_prune()
        study.tell(trial, state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.FAIL)
        return pruned

    for adapted in (40.0, 42.0):
        done = study.ask()
        done.report(adapted, 1)
        study.tell(done, adapted)
    assert not below_median_at_step_1()  # 2 completed, 1 failed: still warming up
    done = study.ask()
    done.report(44.0, 1)
    study.tell(done, 44.0)
    assert below_median_at_step_1()


def test_resume_after_kill(trained_checkpoints, tmp_path):
    d = trained_sweep(trained_checkpoints, tmp_path, [
        {"name": "task_arithmetic", "tune": tune_block(n_trials=8, n_parallel=1)}])
    d["references"] = False
    cfg_file = tmp_path / "tune.yaml"
    cfg_file.write_text(yaml.safe_dump(d))
    results = tmp_path / "out" / "results"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "sweep", "-q", str(cfg_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in results.glob("*.json")] if results.exists() else []
        if sum('"kind": "trial"' in p.read_text() for p in done) >= 3:  # three trial jobs finished
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the study finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = subprocess.run([sys.executable, "-m", "harness.cli", "sweep", "-q", str(cfg_file)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = validate_config(d)
    import optuna

    from harness.tuning import open_storage, storage_spec

    study = optuna.load_study(study_name=f"{cfg.name}.task_arithmetic",
                              storage=open_storage(storage_spec(cfg, cfg.methods[0].tune)))
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 8
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    trials = client.search_runs([exp], "tags.`harness.kind` = 'trial'")
    numbers = [t.data.tags["harness.trial_number"] for t in trials]
    assert len(numbers) == len(set(numbers)) == 8
    assert {int(n) for n in numbers} == {t.number for t in finished}
    assert len(client.search_runs([exp], "tags.`harness.kind` = 'tune'")) == 1


@pytest.mark.parametrize("tune,fragment", [
    ({"space": {"lamda": {"type": "float", "low": 0, "high": 1}}},
     "methods.0.tune.space.lamda: method 'task_arithmetic' has no hyperparameter 'lamda'"),
    ({"space": {"scaling": {"type": "float", "low": -1, "high": 1}}}, "methods.0.tune.space.scaling:"),
    ({"space": {"scaling": {"type": "float", "low": 1, "high": 0.5}}}, "low (1.0) must be below high (0.5)"),
    ({"objective": "acc/avg", "space": {"scaling": {"type": "float", "low": 0, "high": 1}}},
     "methods.0.tune.objective: must be a validation metric"),
    ({"sampler": "grid", "space": {"scaling": {"type": "float", "low": 0, "high": 1}}}, "needs 'step'"),
    ({"space": {"scaling": {"type": "categorical"}}}, "categorical needs non-empty 'choices'"),
    ({"space": {"scaling": {"type": "float", "low": 0, "high": 1, "log": True}}}, "log scale needs low > 0"),
    ({"space": {}}, "methods.0.tune.space:"),
    ({"sampler": "bayes", "space": {"scaling": {"type": "float", "low": 0, "high": 1}}}, "methods.0.tune.sampler:"),
    ({"objective": "val/acc/avgg", "space": {"scaling": {"type": "float", "low": 0, "high": 1}}},
     "methods.0.tune.objective: not a metric a trial reports; one of: val/acc/avg, val/acc/"),
    ({"objective": "val/acc/no_such_task", "space": {"scaling": {"type": "float", "low": 0, "high": 1}}},
     "(got 'val/acc/no_such_task')"),
])
def test_search_space_errors(tune, fragment, sweep_dict):
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic", "tune": tune}])
    with pytest.raises(ConfigError) as e:
        validate_config(d, "s.yaml")
    assert fragment in str(e.value), str(e.value)


def strength_study(checkpoints, tmp_path, method: str, label: str, high: float, n_trials: int) -> dict:
    """A sweep of one study, one trial at a time, over ``strength`` of a tests.failing_method class."""
    space = {"strength": {"type": "float", "low": 0.0, "high": high}}
    d = trained_sweep(checkpoints, tmp_path, [
        {"name": f"tests.failing_method:{method}", "label": label,
         "tune": {"n_trials": n_trials, "n_parallel": 1, "sampler": "random", "space": space}}])
    d["references"] = False
    return d


def test_a_study_whose_trials_all_fail_is_a_failed_row_and_the_sweep_goes_on(trained_checkpoints, tmp_path):
    """As a failed job is isolated: the other methods and studies run, the tables are written with
    the study's row ``failed``, its run ends FAILED with why, and the command exits 1 naming it."""
    from click.testing import CliRunner

    from harness.cli import main

    d = strength_study(trained_checkpoints, tmp_path, "AlwaysFailsWithParam", "broken", high=1.0, n_trials=2)
    d["methods"] = [*d["methods"], "weight_averaging",
                    {"name": "task_arithmetic", "tune": {"n_trials": 2, "n_parallel": 1, "sampler": "random",
                                                         "space": {"scaling": {"type": "float", "low": 0.1,
                                                                               "high": 0.5}}}}]
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", str(f), "-q"], env={"COLUMNS": "200"})
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)  # no traceback
    err = " ".join(r.stderr.split())
    assert "broken: study " in err and "trials failed, the last with: RuntimeError: deliberate failure at strength" in err
    # the study chose nothing: its failed trials are not said to have been chosen among
    assert "Optuna trials failed (no trial of broken completed: no setting chosen, its row failed):" in err, err
    assert "chose among the others" not in err, err
    cfg = validate_config(d)
    table = (cfg.resolved_output_dir() / "report" / "main.csv").read_text().splitlines()
    rows = {line.split(",")[0]: line for line in table[1:]}
    assert rows["broken"].split(",")[1] == "failed"
    for label in ("weight_averaging", "task_arithmetic"):  # the study after the failed one ran too
        assert float(rows[label].split(",")[-2]) > 0, rows[label]
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    tune_runs = {run.data.tags["harness.label"]: run for run in client.search_runs([exp], "tags.`harness.kind` = 'tune'")}
    assert tune_runs["broken"].info.status == "FAILED" and tune_runs["task_arithmetic"].info.status == "FINISHED"
    assert "trials failed" in tune_runs["broken"].data.tags["harness.failure_reason"]
    assert "RUNNING" not in {run.info.status for run in client.search_runs([exp])}
    rebuilt = CliRunner().invoke(main, ["report", str(cfg.resolved_output_dir()), "--out", str(tmp_path / "rebuilt")])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert (tmp_path / "rebuilt" / "main.csv").read_text() == "\n".join(table) + "\n"  # harness report agrees


def test_a_failed_trial_is_named_and_its_error_printed_as_written(sweep_dict):
    """A failed trial's line names its trial (as its MLflow run is named) and shows the error as
    raised: text in brackets is not taken for console markup (dropped, or a closing tag crashing
    the sweep)."""
    import io

    from rich.console import Console

    space = {"strength": {"type": "float", "low": 0.0, "high": 0.8}}
    d = dict(sweep_dict, references=False, methods=[{"name": "tests.failing_method:FailsWithBrackets",
                                                     "label": "brackets", "tune": {"n_trials": 3, "n_parallel": 1,
                                                                                    "sampler": "random", "space": space}}])
    cfg = validate_config(d)
    shown = io.StringIO()
    out = run_sweep(cfg, console=Console(file=shown, width=400))
    assert not out.failed, [r.error for r in out.failed]
    failed = [t for t in stored_study(cfg).trials if t.state.name == "FAIL"]
    assert failed, "no trial drew a strength above 0.5"
    for t in failed:
        line = f"failed trial {t.number} brackets(strength={t.params['strength']:.4g}): RuntimeError: no head [emb_mnist] under ckpt[/b]"
        assert line in shown.getvalue(), shown.getvalue()


def test_objective_of_one_task_is_accepted(sweep_dict):
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic", "tune": tune_block()}])
    task = d["tasks"][0] if isinstance(d["tasks"][0], str) else d["tasks"][0]["name"]
    d["methods"][0]["tune"]["objective"] = f"val/acc/{task}"
    assert validate_config(d, "s.yaml").methods[0].tune.objective == f"val/acc/{task}"


def test_tune_and_grid_together_refused(sweep_dict):
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic", "grid": {"scaling": [0.1]},
                                   "tune": tune_block()}])
    with pytest.raises(ConfigError, match="either 'grid' or 'tune'"):
        validate_config(d, "s.yaml")


@pytest.mark.parametrize("space,fragment", [
    ({"type": "float", "low": 0.1, "high": 1.0, "choices": [0.3, 0.6]},
     "methods.0.tune.space.scaling: 'choices' does not apply to type float, which takes 'low', 'high', 'log' and 'step'"),
    ({"type": "categorical", "choices": [0.3, 0.6], "low": 0.0},
     "methods.0.tune.space.scaling: 'low' does not apply to type categorical, which takes 'choices'"),
    ({"type": "categorical", "choices": [0.3, 0.6], "step": 0.1}, "'step' does not apply to type categorical"),
])
def test_a_space_key_its_type_does_not_use_is_a_config_error(space, fragment, sweep_dict):
    """Optuna ignored it: choices given to a float range searched the whole range, a range given
    to categorical choices was dropped, silently."""
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic", "tune": tune_block(space={"scaling": space})}])
    with pytest.raises(ConfigError) as e:
        validate_config(d, "s.yaml")
    assert fragment in str(e.value), str(e.value)


def test_a_space_key_its_type_does_not_use_may_be_written_at_its_default(sweep_dict):
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic", "tune": tune_block(space={
        "scaling": {"type": "categorical", "choices": [0.3, 0.6], "log": False, "low": None}})}])
    assert validate_config(d).methods[0].tune.space["scaling"].choices == [0.3, 0.6]


@pytest.mark.parametrize("choices,fragment", [
    ([0.3, 0.6, 0.3], "methods.0.tune.space.scaling: choice 0.3 is listed twice"),
    ([1, 1.0], "methods.0.tune.space.scaling: choices 1 and 1.0 are the same setting once validated"),
])
def test_categorical_choices_that_are_one_setting_are_a_config_error(choices, fragment, sweep_dict):
    """As a grid's settings that are one setting once validated are: a grid study ran the one job
    as two trials (counted in the row's trial count), and other samplers drew it twice as often."""
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic", "tune": tune_block(
        sampler="grid", space={"scaling": {"type": "categorical", "choices": choices}})}])
    with pytest.raises(ConfigError) as e:
        validate_config(d, "s.yaml")
    assert fragment in str(e.value), str(e.value)


@pytest.mark.parametrize("storage,fragment", [
    ("garbage", "methods.0.tune.storage: not a storage: an Optuna storage is 'journal:<path>' or a database URL"),
    ("sqlite://", "methods.0.tune.storage: an in-memory database keeps no study between runs or processes"),
    ("mysql://user@host/studies", "methods.0.tune.storage: its database driver is not installed (No module named"),
])
def test_a_storage_no_study_can_live_in_is_a_config_error(storage, fragment, sweep_dict):
    """Checked with the sweep file: it was opened only after the sweep's other jobs, a traceback
    (an in-memory database failed every trial that reports while adapting, its job another process)."""
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic", "tune": tune_block(storage=storage)}])
    with pytest.raises(ConfigError) as e:
        validate_config(d, "s.yaml")
    assert fragment in str(e.value) and f"(got {storage!r})" in str(e.value), str(e.value)


def test_a_storage_driver_missing_under_sqlalchemy_1_4_is_named(monkeypatch):
    """SQLAlchemy 1.4 (which Optuna and MLflow accept) loads a dialect's driver with ``dbapi()``,
    not 2.0's ``import_dbapi()``: the check named no driver there, it crashed on the name."""
    from sqlalchemy.engine.url import URL

    from harness.config import optuna_storage_problem

    class Dialect14:
        @classmethod
        def dbapi(cls):
            raise ImportError("No module named 'psycopg2'")

    monkeypatch.setattr(URL, "get_dialect", lambda self, *a, **k: Dialect14)
    assert optuna_storage_problem("postgresql://user@host/studies") == (
        "its database driver is not installed (No module named 'psycopg2')")


REFUSED = ('connection to server at "127.0.0.1", port 1 failed: Connection refused\n'
           '\tIs the server running on that host and accepting TCP/IP connections?')


def _refusing_driver(monkeypatch) -> list[dict]:
    """psycopg2 stood in for by a driver whose server refuses every connection with libpq's words;
    returns the keyword arguments each connection was asked with."""
    import types

    from sqlalchemy.dialects import registry
    from sqlalchemy.engine.default import DefaultDialect

    asked: list[dict] = []

    class Error(Exception):
        pass

    class OperationalError(Error):
        pass

    def connect(*args, **kwargs):
        asked.append(kwargs)
        raise OperationalError(REFUSED)

    driver = types.SimpleNamespace(paramstyle="pyformat", Error=Error, OperationalError=OperationalError,
                                   InterfaceError=Error, DatabaseError=Error, connect=connect)

    class RefusingDialect(DefaultDialect):
        name, driver = "postgresql", "psycopg2"
        supports_statement_cache = True

        @classmethod
        def import_dbapi(cls):
            return driver

    monkeypatch.setitem(registry.impls, "postgresql.psycopg2", lambda: RefusingDialect)
    return asked


@pytest.mark.parametrize("command", [["validate"], ["sweep", "--dry-run"]])
def test_a_database_server_that_refuses_the_connection_is_refused_by_validate(command, sweep_dict, tmp_path,
                                                                              monkeypatch):
    """Only SQLite's folder was checked before the sweep: a server that is down passed validate.
    One line naming the field, with the driver's first line of words, asked with a connection
    timeout (an unreachable host would otherwise hold the check for minutes), making nothing."""
    from click.testing import CliRunner

    from harness.cli import main

    asked = _refusing_driver(monkeypatch)
    storage = "postgresql+psycopg2://user@127.0.0.1:1/studies"
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic", "tune": tune_block(n_trials=1, storage=storage)}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    before = sorted(tmp_path.rglob("*"))
    r = CliRunner().invoke(main, [*command, str(f)])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == (f"error: {f}: methods.0.tune.storage: cannot connect: connection to server at "
                                f"\"127.0.0.1\", port 1 failed: Connection refused (got {storage!r})"), r.stderr
    assert [a.get("connect_timeout") for a in asked] == [10] and asked[0]["host"] == "127.0.0.1"
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("scheme", ["postgresql+psycopg2", "postgresql+pg8000", "mysql+pymysql"])
def test_a_database_server_that_never_answers_is_refused_within_the_timeout(scheme, monkeypatch):
    """A server that takes the TCP connection and never answers (a hung host, a firewall's proxy)
    held the check forever with PyMySQL, whose connect timeout ends at the TCP connection: each
    real driver now gives up after the timeout with its words."""
    import socket
    import time

    from harness import path_checks

    monkeypatch.setattr(path_checks, "CONNECT_TIMEOUT_S", 1)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the connection; nothing ever reads or writes
        start = time.monotonic()
        problem = path_checks.database_problem(f"{scheme}://user:pw@127.0.0.1:{silent.getsockname()[1]}/studies")
        waited = time.monotonic() - start
    assert problem is not None and ("timed out" in problem or "timeout expired" in problem), problem
    assert waited < 30, waited


@pytest.mark.parametrize("message, words", [
    (REFUSED, 'connection to server at "127.0.0.1", port 1 failed: Connection refused'),
    ("3024: \n    The Read Operation timed out. As a consequence the current connection has been closed to avoid"
     "\n    any unstable behaviour, consider using the reconnect() option and continue with the current\n    ",
     "3024: The Read Operation timed out."),
    ("\n  2003: no words after the code\n", "2003: no words after the code"),
    ("  \n ", ""),
])
def test_a_drivers_error_is_told_in_its_first_line_of_words(message, words):
    """mysql-connector puts its error code alone on the first line (its words as printed by
    ``str``): the refusal read ``cannot connect: 3024:`` and nothing else."""
    from harness.path_checks import driver_words

    assert driver_words(message) == words


def test_a_storage_that_cannot_be_opened_stops_the_sweep_before_any_job(sweep_dict, tmp_path):
    """A database in a folder that does not exist: one line naming the field and the storage, exit
    code 2, before any job ran or the output folder was written (it was a traceback after them)."""
    from click.testing import CliRunner

    from harness.cli import main

    storage = f"sqlite:///{tmp_path / 'no' / 'such' / 'studies.db'}"
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic", "tune": tune_block(n_trials=1, storage=storage)}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", str(f), "-q"])
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)  # no traceback
    assert r.stderr.strip() == (f"error: {f}: methods.0.tune.storage: cannot open it: folder {tmp_path / 'no' / 'such'} "
                                f"does not exist (SQLite makes the database file, not its folder) (got {storage!r})"), r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where, storage, problem", [
    ("missing", "sqlite:///{tmp}/no/such/studies.db", "folder {tmp}/no/such does not exist (SQLite makes the database "
                                                      "file, not its folder)"),
    ("file", "journal:{tmp}/a_file/studies/journal.log", "its folder {tmp}/a_file/studies: {tmp}/a_file is a file, not a "
                                                         "folder"),
    ("file", "sqlite:///{tmp}/a_file/studies.db", "its folder {tmp}/a_file: is a file, not a folder"),
    ("folder", "journal:{tmp}/a_folder", "{tmp}/a_folder is a folder, not a file"),
    ("folder", "sqlite:///{tmp}/a_folder", "{tmp}/a_folder is a folder, not a file"),
])
def test_validate_refuses_a_storage_file_the_study_cannot_be_made_in_and_makes_nothing(where, storage, problem,
                                                                                      sweep_dict, tmp_path):
    """As the sweep refuses it (before it builds any model), without making the journal's folders
    or the database: validate writes nothing."""
    from click.testing import CliRunner

    from harness.cli import main

    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    storage = storage.format(tmp=tmp_path)
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic", "tune": tune_block(n_trials=1, storage=storage)}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    before = sorted(tmp_path.rglob("*"))
    r = CliRunner().invoke(main, ["validate", str(f)])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == (f"error: {f}: methods.0.tune.storage: cannot open it: {problem.format(tmp=tmp_path)} "
                                f"(got {storage!r})"), r.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_a_sqlite_storage_under_home_written_with_a_tilde_is_told_that_urls_do_not_expand_it(sweep_dict, tmp_path,
                                                                                               monkeypatch):
    """``journal:~/...`` is expanded, so ``sqlite:///~/studies.db`` was written too; SQLAlchemy reads
    it as a folder named ``~`` in the current folder, and the error only said that it does not exist."""
    from click.testing import CliRunner

    from harness.cli import main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    storage = "sqlite:///~/studies.db"
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic", "tune": tune_block(n_trials=1, storage=storage)}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["validate", str(f)])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == (f"error: {f}: methods.0.tune.storage: cannot open it: folder ~ does not exist (SQLite "
                                "makes the database file, not its folder; a database URL does not expand ~: write the "
                                f"full path) (got {storage!r})"), r.stderr
    assert not (tmp_path / "~").exists() and not any((tmp_path / "home").iterdir())


def test_validate_finds_a_journal_under_the_home_folder_that_cannot_be_made(sweep_dict, tmp_path, monkeypatch):
    """``~`` in a journal's path is the home folder, as the study opens it: a file standing where
    its folder goes there is found, not looked for under a folder named ``~``."""
    from click.testing import CliRunner

    from harness.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "a_file").write_text("x")
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic",
                                   "tune": tune_block(n_trials=1, storage="journal:~/a_file/journal.log")}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["validate", str(f)])
    assert r.exit_code == 2, r.output
    assert f"methods.0.tune.storage: cannot open it: its folder {tmp_path / 'a_file'}: is a file, not a folder" \
        in r.stderr, r.stderr
    d["methods"].insert(0, {"name": "ties", "tune": tune_block(n_trials=1, storage=f"journal:{tmp_path}/ok.log")})
    f.write_text(yaml.safe_dump(d))  # a method's storage is found after another's that can be made
    r = CliRunner().invoke(main, ["validate", str(f)])
    assert r.exit_code == 2 and "methods.1.tune.storage: cannot open it: its folder" in r.stderr, r.stderr


@pytest.mark.parametrize("storage", ["journal:{tmp}/new/folders/journal.log", "sqlite:///{tmp}/studies.db",
                                     "journal:~/studies/journal.log"])
def test_validate_accepts_a_storage_whose_file_the_sweep_can_make(storage, sweep_dict, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from harness.cli import main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    storage = storage.format(tmp=tmp_path)
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic", "tune": tune_block(n_trials=1, storage=storage)}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["validate", str(f)])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "new").exists() and not (tmp_path / "studies.db").exists() and not (tmp_path / "home").exists()


def test_tune_command_runs_one_method(trained_checkpoints, tmp_path):
    from click.testing import CliRunner

    from harness.cli import main

    d = trained_sweep(trained_checkpoints, tmp_path, [
        {"name": "weight_averaging"},
        {"name": "task_arithmetic", "label": "ta", "tune": tune_block(n_trials=50)}])
    d["references"] = False
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["tune", str(f), "--method", "ta", "--trials", "3", "-q"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "ta" in r.stdout and "weight_averaging" not in r.stdout
    r = CliRunner().invoke(main, ["tune", str(f), "--method", "ta", "--trials", "5", "-q"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    import optuna

    from harness.config import load_config
    from harness.tuning import open_storage, storage_spec, study_name

    cfg = load_config(f)
    m = next(m for m in cfg.methods if m.display == "ta")
    study = optuna.load_study(study_name=study_name(cfg, m), storage=open_storage(storage_spec(cfg, m.tune)))
    values = [t.params["scaling"] for t in study.trials]
    assert len(values) == 5 and len(set(values)) == 5, values  # extending asks new points, not the first run's
    r = CliRunner().invoke(main, ["tune", str(f), "--method", "nope"])
    assert r.exit_code == 2 and "no method labelled 'nope'" in r.stderr
    r = CliRunner().invoke(main, ["tune", str(f), "--method", "taa"])
    assert r.exit_code == 2 and "no method labelled 'taa'; did you mean 'ta'?" in " ".join(r.stderr.split())


def test_an_interrupted_study_leaves_its_runs_killed_not_running(trained_checkpoints, tmp_path):
    """Ctrl-C during a trial: the study's tuning run and the sweep's run show KILLED in the UI."""
    d = strength_study(trained_checkpoints, tmp_path, "InterruptedAtStrength", "stopped", high=3.0, n_trials=30)
    cfg = validate_config(d)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, quiet=True)
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    status = {}
    for r in client.search_runs([exp]):
        status.setdefault(r.data.tags["harness.kind"], set()).add(r.info.status)
    assert status.pop("sweep") == {"KILLED"} and status.pop("tune") == {"KILLED"}
    assert status in ({}, {"trial": {"FINISHED"}}), status  # trials finished before Ctrl-C stay finished


TYPED = "tests.tuning_methods:TypedTaskArithmetic"
GRID_SPACE = {"scaling": {"type": "float", "low": 0.2, "high": 0.6, "step": 0.2},
              "mode": {"type": "categorical", "choices": ["sum", "mean"]}}


def typed_study(sweep_dict: dict, **tune) -> dict:
    """A sweep of one study, one trial at a time, over tests.tuning_methods:TypedTaskArithmetic."""
    tune.setdefault("n_parallel", 1)
    return dict(sweep_dict, references=False, methods=[{"name": TYPED, "label": "typed", "tune": tune}])


def stored_study(cfg, m=None):
    import optuna

    from harness.tuning import open_storage, storage_spec, study_name

    m = m or cfg.methods[0]
    return optuna.load_study(study_name=study_name(cfg, m), storage=open_storage(storage_spec(cfg, m.tune)))


def study_runner(cfg, output_dir: Path | None = None):
    """The StudyRunner a sweep of ``cfg`` opens (its models' and tasks' identities), asking nothing."""
    from harness.tuning import StudyRunner
    from harness.workspace import Workspace

    ws = Workspace(cfg)
    results = (output_dir or cfg.resolved_output_dir()) / "results"
    return StudyRunner(cfg, cfg.methods[0], ws.identity, ws.task_identity(), 1, results)


def test_grid_study_ends_when_the_grid_is_exhausted(sweep_dict):
    """Extended past its grid, a grid study tries every point once, then evaluates the best."""
    run_sweep(validate_config(typed_study(sweep_dict, n_trials=2, sampler="grid", space=GRID_SPACE)), quiet=True)
    cfg = validate_config(typed_study(sweep_dict, n_trials=10, sampler="grid", space=GRID_SPACE))
    out = run_sweep(cfg, quiet=True)
    assert not out.failed, [r.error for r in out.failed]
    trials = stored_study(cfg).trials
    assert {t.state.name for t in trials} == {"COMPLETE"}
    points = sorted((t.params["scaling"], t.params["mode"]) for t in trials)
    assert points == sorted((s, mode) for s in (0.2, 0.4, 0.6) for mode in ("sum", "mean"))  # each once
    best = max(trials, key=lambda t: t.value)
    final = next(r for r in out.results if r.kind == "merge")
    assert final.params == {**best.params}
    assert final.metrics["val/acc/avg"] == pytest.approx(best.value)


@pytest.mark.parametrize("space,points", [
    ({"type": "int", "low": 1, "high": 8, "step": 2}, [1, 3, 5, 7]),  # 9 would step past high
    ({"type": "float", "low": 0.1, "high": 0.95, "step": 0.3}, [0.1, 0.4, 0.7]),  # 1.0 would too
    ({"type": "float", "low": 0.1, "high": 0.9, "step": 0.2}, [0.1, 0.3, 0.5, 0.7, 0.9]),  # high on the step
])
def test_grid_points_stay_within_the_range(space, points):
    """A grid steps from low up to the last point at or below high, as Optuna's distribution does."""
    from harness.config import ParamSpace

    assert ParamSpace(**space).grid_values() == pytest.approx(points)


def test_grid_study_whose_step_does_not_divide_the_range_runs_every_point_in_it(sweep_dict):
    """repeats (an int in [1, 4]) by 2 from 1 to 4: the points are 1 and 3, not 5, which the
    method refuses (the study stopped with a traceback at its third trial)."""
    space = {"repeats": {"type": "int", "low": 1, "high": 4, "step": 2}}
    cfg = validate_config(typed_study(sweep_dict, n_trials=10, sampler="grid", space=space))
    out = run_sweep(cfg, quiet=True)
    assert not out.failed, [r.error for r in out.failed]
    trials = stored_study(cfg).trials
    assert sorted(t.params["repeats"] for t in trials) == [1, 3]
    assert {t.state.name for t in trials} == {"COMPLETE"}


@pytest.mark.parametrize("space,fragment", [
    ({"repeats": {"type": "float", "low": 1, "high": 3}},
     "s.yaml: methods.0.tune.space.repeats.type: hyperparameter 'repeats' of "
     f"'{TYPED}' is int: give type int or categorical (got 'float')"),
    ({"flip": {"type": "float", "low": 0, "high": 1}},
     "methods.0.tune.space.flip.type: hyperparameter 'flip' of " f"'{TYPED}' is bool: give type categorical"),
    ({"mode": {"type": "int", "low": 0, "high": 1}}, "methods.0.tune.space.mode.type:"),
    ({"repeats": {"type": "int", "low": 1, "high": 3, "step": 0.5}},
     "methods.0.tune.space.repeats: type int needs a whole 'step' (got 0.5)"),
    ({"repeats": {"type": "int", "low": 1.5, "high": 3}}, "methods.0.tune.space.repeats: type int needs a whole 'low'"),
    ({"repeats": {"type": "categorical", "choices": [1, 2.5]}}, "methods.0.tune.space.repeats: Input should be a valid "
     "integer, got a number with a fractional part (got 2.5)"),
    ({"mode": {"type": "categorical", "choices": ["sum", "max"]}}, "methods.0.tune.space.mode: Input should be"),
    ({"repeats": {"type": "categorical", "choices": [1, True]}},  # worded as in params, without pydantic's prefix
     "s.yaml: methods.0.tune.space.repeats: expects a number, not the boolean true (got True)"),
])
def test_space_type_must_fit_the_hyperparameter(space, fragment, sweep_dict):
    """A range a field cannot hold is refused at config time, not by the first trial's merge."""
    d = dict(sweep_dict, methods=[{"name": TYPED, "tune": {"space": space}}])
    with pytest.raises(ConfigError) as e:
        validate_config(d, "s.yaml")
    assert fragment in str(e.value), str(e.value)


def test_space_types_that_fit_are_accepted(sweep_dict):
    space = {"scaling": {"type": "int", "low": 0, "high": 2}, "repeats": {"type": "int", "low": 1, "high": 4, "step": 1},
             "mode": {"type": "categorical", "choices": ["sum", "mean"]},
             "flip": {"type": "categorical", "choices": [False, True]}}
    cfg = validate_config(dict(sweep_dict, methods=[{"name": TYPED, "tune": {"space": space}}]), "s.yaml")
    assert set(cfg.methods[0].tune.space) == set(space)


def test_resumed_study_drops_an_unfinished_trial_the_method_refuses(sweep_dict, tmp_path):
    """A trial left RUNNING with a value the method no longer takes is failed with one line;
    the study goes on and its best is one of the trials that ran."""
    import io

    from optuna.distributions import FloatDistribution
    from rich.console import Console

    space = {"scaling": {"type": "float", "low": 0.0, "high": 1.0}}
    cfg = validate_config(typed_study(sweep_dict, n_trials=2, sampler="random", space=space))
    left = study_runner(cfg).study
    left.enqueue_trial({"scaling": 3.0})  # above the method's le=2.0: a killed run of older code
    left.ask({"scaling": FloatDistribution(0.0, 5.0)})
    shown = io.StringIO()
    out = run_sweep(cfg, console=Console(file=shown, width=300))
    assert not out.failed, [r.error for r in out.failed]
    assert ("trial 0 (scaling=3.0), left unfinished by an earlier run, is dropped: scaling: Input should be "
            "less than or equal to 2 (got 3.0)") in shown.getvalue(), shown.getvalue()
    trials = stored_study(cfg).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    final = next(r for r in out.results if r.kind == "merge")
    assert final.params["scaling"] == max(trials[1:], key=lambda t: t.value).params["scaling"]


def test_a_trial_left_running_is_run_again_as_itself(sweep_dict, tmp_path):
    """A trial a killed driver left RUNNING runs again as the same trial: its number and parameters,
    so its job key (and the adaptation checkpoints under work/<key>/), not as a failed trial and a
    new one whose adaptation starts from zero."""
    from optuna.distributions import FloatDistribution

    space = {"scaling": {"type": "float", "low": 0.0, "high": 1.0}}
    cfg = validate_config(typed_study(sweep_dict, n_trials=2, sampler="random", space=space))
    left = study_runner(cfg).study
    left.enqueue_trial({"scaling": 0.25})
    trial = left.ask({"scaling": FloatDistribution(0.0, 1.0)})
    out = run_sweep(cfg, quiet=True)
    assert not out.failed, [r.error for r in out.failed]
    trials = stored_study(cfg).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert trials[0].params == {"scaling": 0.25}
    key = study_runner(cfg).spec(trial._trial_id, 0, {"scaling": 0.25}).key  # the killed driver's job key
    assert (out.output_dir / "results" / f"{key}.json").is_file()
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    runs = client.search_runs([exp], "tags.`harness.kind` = 'trial'")
    assert sorted(r.data.tags["harness.trial_number"] for r in runs) == ["0", "1"]


def test_a_trial_run_again_reports_only_steps_not_reported_yet(sweep_dict, tmp_path):
    """Optuna keeps a step's first value and warns at a second one: the rerun skips them."""
    import warnings

    from optuna.distributions import FloatDistribution

    from harness.job import trial_reporter
    from harness.tuning import storage_spec

    cfg = validate_config(typed_study(sweep_dict, n_trials=2, sampler="random",
                                      space={"scaling": {"type": "float", "low": 0.0, "high": 1.0}}))
    study = study_runner(cfg).study
    trial = study.ask({"scaling": FloatDistribution(0.0, 1.0)})
    trial.report(40.0, 0)
    handle = {"storage": storage_spec(cfg, cfg.methods[0].tune), "study_name": study.study_name,
              "trial_id": trial._trial_id, "objective": "val/acc/avg", "pruner": "none"}
    report = trial_reporter(handle)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert report(0, {"val/acc/avg": 40.0}) is False
        assert report(1, {"val/acc/avg": 45.0}) is False
    assert stored_study(cfg).trials[0].intermediate_values == {0: 40.0, 1: 45.0}


def test_a_storage_shared_by_two_sweeps_leaves_the_other_ones_running_trial(sweep_dict, tmp_path):
    """Two output folders on one study (``storage:`` outside them): a sweep leaves a trial the other
    folder's driver is running alone, with one line, instead of failing it, running it again and
    crashing that driver when it reports the trial's value."""
    import io

    from rich.console import Console

    from harness.job import JobResult

    space = {"scaling": {"type": "float", "low": 0.0, "high": 1.0}}
    d = typed_study(sweep_dict, n_trials=2, sampler="random", space=space,
                    storage=f"journal:{tmp_path / 'shared' / 'journal.log'}")
    cfg_a = validate_config(dict(d, output_dir=str(tmp_path / "a")))
    cfg_b = validate_config(dict(d, output_dir=str(tmp_path / "b")))
    driver_a = study_runner(cfg_a)
    running = driver_a.ask(1)[0]
    shown = io.StringIO()
    out = run_sweep(cfg_b, console=Console(file=shown, width=300))
    assert not out.failed, [r.error for r in out.failed]
    setting = f"scaling={running.params['scaling']:.4g}"
    assert (f"trial 0 ({setting}) is running from {(tmp_path / 'a').resolve()}; left to that sweep"
            in shown.getvalue()), shown.getvalue()
    assert [t.state.name for t in stored_study(cfg_b).trials] == ["RUNNING", "COMPLETE"]  # a's counts toward 2
    assert driver_a.tell(running, JobResult.of(running, "ok", metrics={"val/acc/avg": 50.0})) == "COMPLETE"
    done = stored_study(cfg_a).trials[0]
    assert (done.state.name, done.value) == ("COMPLETE", 50.0)


def scored(batch):
    """A stand-in executor: each trial completes, scoring its scaling (no job runs)."""
    from harness.job import JobResult

    return [(s, JobResult.of(s, "ok", metrics={"val/acc/avg": 100 * s.params["scaling"]})) for s in batch]


def shared_runners(sweep_dict: dict, tmp_path: Path, n_trials: int, **tune):
    """Drivers of two output folders, ``a`` and ``b``, on one study in a storage outside both."""
    tune = {"sampler": "random", "space": {"scaling": {"type": "float", "low": 0.0, "high": 1.0}}, **tune}
    d = typed_study(sweep_dict, n_trials=n_trials, storage=f"journal:{tmp_path / 'shared' / 'journal.log'}", **tune)
    return tuple(study_runner(validate_config(dict(d, output_dir=str(tmp_path / f)))) for f in "ab")


def test_a_resumed_study_runs_only_the_trials_missing_for_n_trials(sweep_dict, tmp_path):
    """3 trials finished, n_trials 4, two in flight at a time: exactly 1 more runs."""
    a, _ = shared_runners(sweep_dict, tmp_path, 3, n_parallel=2)
    a.run(scored, lambda *_: None)
    a.tune.n_trials = 4
    asked = []
    a.run(lambda batch: asked.extend(batch) or scored(batch), lambda *_: None)
    assert len(asked) == 1
    assert [t.state.name for t in a.study.trials] == ["COMPLETE"] * 4


def test_a_random_study_whose_every_trial_fails_stops_after_four_failures(sweep_dict, tmp_path):
    """Failed trials do not count toward n_trials 2, so a broken method would be asked for new
    points for ever: the study fails once more than max(3, n_trials) = 3 trials failed, naming
    the last error."""
    from harness.job import JobResult
    from harness.tuning import StudyFailed

    a, _ = shared_runners(sweep_dict, tmp_path, 2)
    asked = []

    def fails(batch):
        asked.extend(batch)
        return [(s, JobResult.of(s, "failed", error="RuntimeError: boom")) for s in batch]

    with pytest.raises(StudyFailed, match="4 trials failed, the last with: RuntimeError: boom"):
        a.run(fails, lambda *_: None)
    assert len(asked) == 4


def test_two_sweeps_sharing_a_study_run_n_trials_between_them(sweep_dict, tmp_path):
    """Sweep b starts while a runs its first trial: b counts it toward n_trials 4 and runs the 3
    missing; a then tells its trial, and the study holds 4 finished trials, not 5."""
    a, b = shared_runners(sweep_dict, tmp_path, 4)
    notes, ran_b = [], []

    def a_executes(batch):
        if not ran_b:
            b.run(lambda bb: ran_b.extend(bb) or scored(bb), lambda *_: None, notes.append)
        return scored(batch)

    a.run(a_executes, lambda *_: None)
    assert len(ran_b) == 3
    assert [t.state.name for t in a.study.trials] == ["COMPLETE"] * 4
    assert (f"study {b.name!r}: 1 trial(s) still running from other folders count toward n_trials 4; the best is "
            "chosen among the 3 finished") in notes, notes


def test_a_study_reads_its_trials_once_a_batch(sweep_dict, tmp_path, monkeypatch):
    """6 trials, 2 at a time: 3 batches. The driver reads the study's trials once before each
    batch and once more to end (what it asks and how it ends come from one read), beside its
    resume checks (a relog, the trials left running); collect's check of a done study reads
    them once beside choosing the study (each read replays a journal, or queries a database)."""
    import optuna

    from harness.tuning import stored_study as done_study

    a, _ = shared_runners(sweep_dict, tmp_path, 6, n_parallel=2)
    reads, read = [], optuna.Study.get_trials
    monkeypatch.setattr(optuna.Study, "get_trials", lambda study, *x, **kw: reads.append(1) or read(study, *x, **kw))
    asked = []
    a.run(lambda batch: asked.append(batch) or scored(batch), lambda *_: None)
    assert [len(b) for b in asked] == [2, 2, 2]
    assert len(reads) == 2 + len(asked) + 1
    reads.clear()
    assert done_study(a.cfg, a.m, a.identity, a.task_identity, a.results_dir) is not None
    assert len(reads) == 1 + 1


def test_collect_keeps_no_row_of_a_study_whose_every_trial_was_pruned(sweep_dict, tmp_path):
    """n_trials 2, both pruned (pruned trials count toward n_trials): the study is over but chose
    no setting, so collect finds no done study to keep a row from; once a third trial (n_trials
    3) completes, it does, with that trial's value as the best."""
    from harness.job import JobResult
    from harness.tuning import stored_study as done_study

    a, _ = shared_runners(sweep_dict, tmp_path, 2)
    for spec in a.ask(2):
        assert a.tell(spec, JobResult.of(spec, "pruned")) == "PRUNED"
    assert done_study(a.cfg, a.m, a.identity, a.task_identity, a.results_dir) is None
    a.tune.n_trials = 3
    (spec,) = a.ask(1)
    a.tell(spec, JobResult.of(spec, "ok", metrics={"val/acc/avg": 61.0}))
    done = done_study(a.cfg, a.m, a.identity, a.task_identity, a.results_dir)
    assert done is not None and done.study.best_value == 61.0


def test_collect_keeps_no_row_of_a_study_with_a_trial_its_own_killed_driver_left_running(sweep_dict, tmp_path):
    """n_trials 1: one trial completed, another this folder's driver asked was left running (the
    driver killed). The sweep would run that trial again and may pick it as the best, so collect
    finds no done study to keep a row from until it has finished."""
    from harness.job import JobResult
    from harness.tuning import stored_study as done_study

    a, _ = shared_runners(sweep_dict, tmp_path, 1)
    done, left = a.ask(2)
    a.tell(done, JobResult.of(done, "ok", metrics={"val/acc/avg": 61.0}))
    assert done_study(a.cfg, a.m, a.identity, a.task_identity, a.results_dir) is None
    a.tell(left, JobResult.of(left, "ok", metrics={"val/acc/avg": 70.0}))
    kept = done_study(a.cfg, a.m, a.identity, a.task_identity, a.results_dir)
    assert kept is not None and kept.study.best_value == 70.0


def test_a_grid_point_another_folder_runs_is_not_asked_again(sweep_dict, tmp_path):
    """A 2-point grid: point 0 failed, a runs point 1. Nothing is left for b to ask (asking would
    run point 1 twice); b's study has no completed trial yet, and says what still runs."""
    from harness.job import JobResult
    from harness.tuning import StudyUnfinished

    grid = {"scaling": {"type": "float", "low": 0.2, "high": 0.4, "step": 0.2}}
    a, b = shared_runners(sweep_dict, tmp_path, 2, space=grid, sampler="grid")
    (failed,) = a.ask(1)
    a.tell(failed, JobResult.of(failed, "failed", error="boom"))
    a.ask(1)
    asked = []
    with pytest.raises(StudyUnfinished, match="no trial completed yet; 1 trial.s. still running from other folders"):
        b.run(lambda batch: asked.extend(batch) or scored(batch), lambda *_: None)
    assert asked == [] and [t.state.name for t in b.study.trials] == ["FAIL", "RUNNING"]


def test_collect_keeps_a_grid_study_whose_every_point_was_tried_though_one_failed(sweep_dict, tmp_path):
    """A 2-point grid, n_trials 2: one point failed, the other completed. No point is left to
    ask, so the study is over as the sweep ends it (one trial short of n_trials), and collect
    keeps its row with the completed point as the best."""
    from harness.job import JobResult
    from harness.tuning import stored_study as done_study

    grid = {"scaling": {"type": "float", "low": 0.2, "high": 0.4, "step": 0.2}}
    a, _ = shared_runners(sweep_dict, tmp_path, 2, space=grid, sampler="grid")
    failed, ok = a.ask(2)
    a.tell(failed, JobResult.of(failed, "failed", error="boom"))
    a.tell(ok, JobResult.of(ok, "ok", metrics={"val/acc/avg": 61.0}))
    done = done_study(a.cfg, a.m, a.identity, a.task_identity, a.results_dir)
    assert done is not None and done.study.best_params == ok.params


def test_a_shared_study_with_no_trial_completed_yet_waits_for_the_other_folders_trials(sweep_dict, tmp_path):
    """A 2-point grid: a runs one point, b's trial of the other fails, and no point is left to ask.
    b's study has no completed trial, but a's may still complete: b's sweep does not fail; its row
    is left out with a line saying why, its tuning run ends KILLED. Once a's trial completes, b
    run again picks a's setting."""
    import io

    from rich.console import Console

    from harness.job import JobResult

    marker = tmp_path / "fixed"
    d = flaky_study(sweep_dict, marker)
    d["methods"][0]["tune"].update(n_trials=2, sampler="grid", storage=f"journal:{tmp_path / 'shared' / 'journal.log'}",
                                   space={"strength": {"type": "float", "low": 0.1, "high": 0.5, "step": 0.4}})
    cfg_a, cfg_b = (validate_config(dict(d, output_dir=str(tmp_path / f))) for f in "ab")
    a = study_runner(cfg_a)
    (running,) = a.ask(1)
    shown = io.StringIO()
    out = run_sweep(cfg_b, console=Console(file=shown, width=300))
    assert not out.failed and not [r for r in out.rows if r.method == "flaky"], [r.error for r in out.failed]
    assert ("study 'toy.flaky': no trial completed yet; 1 trial(s) still running from other folders count toward "
            "n_trials 2: its row waits for them (run the sweep again once they end)") in shown.getvalue(), (
        shown.getvalue())
    client = MlflowClient(cfg_b.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg_b.name).experiment_id
    (tune_run,) = client.search_runs([exp], "tags.`harness.kind` = 'tune'")
    assert tune_run.info.status == "KILLED"
    a.tell(running, JobResult.of(running, "ok", metrics={"val/acc/avg": 50.0}))
    marker.touch()
    out = run_sweep(cfg_b, quiet=True)
    (row,) = [r for r in out.results if r.label == "flaky"]
    assert row.status == "ok" and row.params["strength"] == running.params["strength"]


def test_a_shared_studys_trial_naming_no_folder_does_not_count_toward_n_trials(sweep_dict, tmp_path):
    """A trial asked but never named by its driver (killed in between) has no driver to finish
    it: sweep b runs all 2 of n_trials beside it, rather than 1 and a study one trial short."""
    from optuna.distributions import FloatDistribution

    _, b = shared_runners(sweep_dict, tmp_path, 2)
    b.study.ask({"scaling": FloatDistribution(0.0, 1.0)})
    b.run(scored, lambda *_: None)
    assert [t.state.name for t in b.study.trials] == ["RUNNING", "COMPLETE", "COMPLETE"]


def test_a_trial_a_killed_driver_left_unnamed_in_its_folders_own_journal_runs_again(sweep_dict):
    """A folder's own journal holds its drivers' trials only, and this driver holds the folder's
    lock: a RUNNING trial there is stale, named or not (its driver killed between asking it and
    naming its folder). It runs again, and the study ends with n_trials completed, none running."""
    from optuna.distributions import FloatDistribution

    d = typed_study(sweep_dict, n_trials=2, sampler="random", space={"scaling": {"type": "float", "low": 0.0,
                                                                                  "high": 1.0}})
    runner = study_runner(validate_config(d))
    runner.study.ask({"scaling": FloatDistribution(0.0, 1.0)})
    runner.run(scored, lambda *_: None)
    assert [t.state.name for t in runner.study.trials] == ["COMPLETE", "COMPLETE"]


def test_two_drivers_asking_at_once_draw_each_their_trials_own_point(sweep_dict, tmp_path):
    """Drivers a and b ask together: b's trial is created after a read the study's trial count and
    before a's trial is. Each trial draws the point a single driver draws for its number (seeded
    from the study's seed and that number), so a's trial 1 does not repeat b's trial 0."""
    import optuna

    from harness.tuning import trial_seed

    a, b = shared_runners(sweep_dict, tmp_path, 2)
    storage, create = a.study._storage, a.study._storage.create_new_trial
    b_asked = []

    def b_asks_first(*args, **kw):
        if not b_asked:
            b_asked.extend(b.ask(1))
        return create(*args, **kw)

    storage.create_new_trial = b_asks_first
    (a_asked,) = a.ask(1)
    drawn = {s.trial["number"]: s.params["scaling"] for s in (a_asked, *b_asked)}

    def single_driver_draw(number: int) -> float:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=trial_seed(a.seed, number)))
        return study.ask().suggest_float("scaling", 0.0, 1.0)

    assert drawn == {n: single_driver_draw(n) for n in (0, 1)}
    assert drawn[0] != drawn[1]


def test_a_journal_storage_under_home_is_the_one_file_wherever_the_sweep_runs(sweep_dict, tmp_path, monkeypatch):
    """``storage: journal:~/studies.log`` is the file in the home folder, not a folder named ``~``
    in the cwd: sweeps started from two folders share one study, as written."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    d = typed_study(sweep_dict, n_trials=1, sampler="random", storage="journal:~/studies.log",
                    space={"scaling": {"type": "float", "low": 0.0, "high": 1.0}})
    for cwd in ("one", "two"):
        (tmp_path / cwd).mkdir()
        monkeypatch.chdir(tmp_path / cwd)
        run_sweep(validate_config(dict(d, output_dir=str(tmp_path / f"out-{cwd}"))), quiet=True)
        assert not (tmp_path / cwd / "~").exists()
    assert [t.state.name for t in stored_study(validate_config(d)).trials] == ["COMPLETE"]
    assert (home / "studies.log").is_file()


def test_a_study_storage_is_absolute_with_home_expanded(sweep_dict, tmp_path, monkeypatch):
    """The storage a trial's job reopens from another process or node names the same file: a
    journal's ``~`` is the home folder and a relative path is taken from where the sweep started;
    the default journal lies in the output folder; a database URL is passed on as written."""
    from harness.tuning import storage_spec

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)

    def spec(storage: str | None) -> str:
        cfg = validate_config(typed_study(sweep_dict, space={"scaling": {"type": "float", "low": 0.0, "high": 1.0}},
                                          **({"storage": storage} if storage else {})))
        return storage_spec(cfg, cfg.methods[0].tune)

    assert spec("journal:~/studies.log") == f"journal:{tmp_path}/home/studies.log"
    assert spec("journal:shared/studies.log") == f"journal:{tmp_path}/shared/studies.log"
    assert spec(None) == f"journal:{tmp_path}/out/optuna/journal.log"
    assert spec("sqlite:///studies.db") == "sqlite:///studies.db"


def test_collect_finds_a_shared_study_done_as_the_sweep_that_ran_it_did(sweep_dict, tmp_path):
    """Sweep b ran the 1 trial n_trials 2 missing beside a's running one and showed its row:
    collect, which runs no study, finds that study done too and keeps the row."""
    from harness.tuning import stored_study as done_study

    a, b = shared_runners(sweep_dict, tmp_path, 2)
    a.ask(1)
    b.run(scored, lambda *_: None)
    found = done_study(b.cfg, b.m, b.identity, b.task_identity, b.results_dir)
    assert found is not None and found.counts().total == 1


def test_changed_study_definition_starts_a_new_study(sweep_dict):
    """A rerun with another space and fixed params does not resume the old study: its best would
    lie outside the new space and override the new fixed params."""
    import io

    from rich.console import Console

    wide = {"scaling": {"type": "float", "low": 0.5, "high": 1.0}, "repeats": {"type": "int", "low": 2, "high": 3},
            "mode": {"type": "categorical", "choices": ["sum", "mean"]},
            "flip": {"type": "categorical", "choices": [False, True]}}
    first = typed_study(sweep_dict, n_trials=3, sampler="random", space=wide)
    run_sweep(validate_config(first), quiet=True)
    second = typed_study(sweep_dict, n_trials=2, sampler="random",
                         space={"scaling": {"type": "float", "low": 0.1, "high": 0.2}})
    second["methods"][0]["params"] = {"repeats": 1, "mode": "sum", "flip": False}
    cfg = validate_config(second)
    shown = io.StringIO()
    out = run_sweep(cfg, console=Console(file=shown, width=300))
    assert not out.failed, [r.error for r in out.failed]
    final = next(r for r in out.results if r.kind == "merge")
    assert final.params["repeats"] == 1 and final.params["mode"] == "sum" and final.params["flip"] is False
    assert 0.1 <= final.params["scaling"] <= 0.2, final.params
    import optuna

    from harness.tuning import open_storage, storage_spec, study_definition, study_name

    name = f"{study_name(cfg, cfg.methods[0])}.{study_definition(cfg.methods[0])}"
    assert (f"study 'toy.typed' was run with another space, fixed params, objective or sampler: starting study "
            f"{name!r} for this one") in shown.getvalue(), shown.getvalue()

    storage = open_storage(storage_spec(cfg, cfg.methods[0].tune))
    new = optuna.load_study(study_name=name, storage=storage)
    assert len(new.trials) == 2 and all(0.1 <= t.params["scaling"] <= 0.2 for t in new.trials)
    old = optuna.load_study(study_name="toy.typed", storage=storage)
    assert len(old.trials) == 3  # left as it was, and resumed by a rerun of its own definition
    again = run_sweep(validate_config(first), quiet=True)
    assert next(r for r in again.results if r.kind == "merge").params["scaling"] == old.best_params["scaling"]
    assert len(optuna.load_study(study_name="toy.typed", storage=storage).trials) == 3


def test_a_changed_study_is_read_once_when_choosing(monkeypatch):
    """Choosing for a study whose stored definition differs reads that study (and its attributes)
    once: the choice, the line saying what changed and the search for a renamed twin share it."""
    from collections import Counter

    import optuna

    from harness.tuning import DEFINITION_ATTR, MEASURES_ATTR, choose_study

    storage = optuna.storages.InMemoryStorage()
    old = optuna.create_study(study_name="s", storage=storage)
    old.set_user_attr(DEFINITION_ATTR, "olddef")
    old.set_user_attr(MEASURES_ATTR, "m")
    old.enqueue_trial({})
    loads, reads = Counter(), Counter()
    load, read = optuna.load_study, storage.get_study_user_attrs
    monkeypatch.setattr(optuna, "load_study", lambda **kw: loads.update([kw["study_name"]]) or load(**kw))
    monkeypatch.setattr(storage, "get_study_user_attrs", lambda sid: reads.update([sid]) or read(sid))
    chosen, note = choose_study(storage, "s", "newdef", "m")
    assert chosen == "s.newdef"
    assert note == ("study 's' was run with another space, fixed params, objective or sampler: starting study "
                    "'s.newdef' for this one")
    assert loads == Counter({"s": 1}) and reads == Counter({old._study_id: 1})


def test_a_sweep_measuring_other_data_starts_its_own_study(sweep_dict):
    """A rerun on fewer tasks (or another eval.max_samples) does not resume the study of the old
    sweep: that study has its trials, so none would run, and the 'tuned' setting would be the one
    chosen on the old tasks' validation data, backed by no trial of this sweep."""
    import io

    from rich.console import Console

    space = {"scaling": {"type": "float", "low": 0.0, "high": 1.0}}
    first = typed_study(sweep_dict, n_trials=2, sampler="random", space=space)
    run_sweep(validate_config(first), quiet=True)
    fewer = validate_config(dict(first, tasks=first["tasks"][:1]))
    shown = io.StringIO()
    out = run_sweep(fewer, console=Console(file=shown, width=300))
    assert not out.failed, [r.error for r in out.failed]
    from harness.tuning import study_definition

    name = f"toy.typed.{study_definition(fewer.methods[0])}"
    assert (f"study 'toy.typed' was run on other tasks, models or evaluation settings: starting study {name!r} "
            "for this one") in shown.getvalue(), shown.getvalue()
    runner = study_runner(fewer)
    assert runner.name == name and len(runner.study.trials) == 2  # its own trials, run on the one task
    final = next(r for r in out.results if r.kind == "merge")
    assert final.params["scaling"] == runner.study.best_params["scaling"]
    assert len(study_runner(validate_config(first)).study.trials) == 2  # the first sweep's, resumed as it was
    assert study_runner(validate_config(first)).name == "toy.typed"


def test_another_sampler_seed_is_another_study(sweep_dict, tmp_path):
    """``tune.seed`` decides which points a study asks: a rerun with another seed over a finished
    study runs that seed's search (the points a fresh folder's study of that seed asks) instead of
    finding nothing to run and reporting the other seed's best; the same seed written out resumes
    the study it was the default of."""
    space = {"scaling": {"type": "float", "low": 0.0, "high": 1.0}}
    first = typed_study(sweep_dict, n_trials=3, sampler="random", space=space)
    run_sweep(validate_config(first), quiet=True)
    reseeded = typed_study(sweep_dict, n_trials=3, sampler="random", space=space, seed=5)
    out = run_sweep(validate_config(reseeded), quiet=True)
    assert not out.failed, [r.error for r in out.failed]
    fresh = typed_study(dict(sweep_dict, output_dir=str(tmp_path / "fresh")), n_trials=3, sampler="random",
                        space=space, seed=5)
    run_sweep(validate_config(fresh), quiet=True)

    def asked(d: dict) -> list[float]:
        return [t.params["scaling"] for t in study_runner(validate_config(d)).study.trials]

    assert asked(reseeded) == asked(fresh) != asked(first)
    final = next(r for r in out.results if r.kind == "merge")
    assert final.params["scaling"] == study_runner(validate_config(reseeded)).study.best_params["scaling"]
    written_out = typed_study(sweep_dict, n_trials=3, sampler="random", space=space, seed=0)
    assert study_runner(validate_config(written_out)).name == "toy.typed" and asked(written_out) == asked(first)


def test_a_study_stored_without_its_measurement_is_resumed_only_by_its_sweep(sweep_dict):
    """A study an older harness stored (no measurement recorded) is resumed by the sweep whose
    trial results lie in the folder under its keys, and not by a sweep on other tasks."""
    from harness.tuning import MEASURES_ATTR

    space = {"scaling": {"type": "float", "low": 0.0, "high": 1.0}}
    first = typed_study(sweep_dict, n_trials=2, sampler="random", space=space)
    run_sweep(validate_config(first), quiet=True)
    stored_study(validate_config(first)).set_user_attr(MEASURES_ATTR, None)  # as an older harness left it
    fewer = validate_config(dict(first, tasks=first["tasks"][:1]))
    run_sweep(fewer, quiet=True)
    assert study_runner(fewer).name != "toy.typed"
    assert stored_study(validate_config(first)).user_attrs[MEASURES_ATTR] is None  # left as it was
    again = study_runner(validate_config(first))
    assert again.name == "toy.typed" and len(again.study.trials) == 2


def test_a_stored_study_of_this_search_is_named_as_a_twin_only_when_it_holds_trials():
    """Study ``old`` has this definition and measurement: empty, there is nothing of it to resume
    and ``new`` starts without a line; once it holds a trial, the line points at it."""
    import optuna

    from harness.tuning import DEFINITION_ATTR, MEASURES_ATTR, choose_study

    storage = optuna.storages.InMemoryStorage()
    old = optuna.create_study(study_name="old", storage=storage)
    old.set_user_attr(DEFINITION_ATTR, "d")
    old.set_user_attr(MEASURES_ATTR, "m")
    assert choose_study(storage, "new", "d", "m") == ("new", None)
    old.add_trial(optuna.trial.create_trial(value=1.0))
    chosen, note = choose_study(storage, "new", "d", "m")
    assert chosen == "new" and "set tune.study_name: old to resume it" in note


def test_a_study_stored_without_a_definition_is_resumed_only_while_it_holds_no_trial():
    """A study named as this one but stored without a definition: empty, it is this study; with a
    trial of an unknown search in it, this one gets its own, ``<name>.<definition>``."""
    import optuna

    from harness.tuning import choose_study

    storage = optuna.storages.InMemoryStorage()
    bare = optuna.create_study(study_name="s", storage=storage)
    assert choose_study(storage, "s", "d", "m")[0] == "s"
    bare.add_trial(optuna.trial.create_trial(value=1.0))
    assert choose_study(storage, "s", "d", "m")[0] == "s.d"


def test_a_study_of_seed_0_keeps_the_digest_of_a_definition_without_a_seed(sweep_dict):
    """Studies stored before the seed was recorded have a digest of no ``seed`` entry: seed 0
    (the default) keeps that digest, and any other seed enters it."""
    import hashlib
    import json

    from harness.plan import method_class_id
    from harness.tuning import study_definition

    space = {"scaling": {"type": "float", "low": 0.0, "high": 1.0}}
    m = validate_config(dict(sweep_dict, methods=[{"name": "task_arithmetic", "tune": {
        "n_trials": 2, "sampler": "random", "space": space}}])).methods[0]
    body = {"method": method_class_id("task_arithmetic"), "params": {}, "objective": "val/acc/avg",
            "sampler": "random", "space": {"scaling": m.tune.space["scaling"].model_dump(mode="json")}}

    def digest(b: dict) -> str:
        return hashlib.sha256(json.dumps(b, sort_keys=True).encode()).hexdigest()[:12]

    assert study_definition(m, 0) == digest(body)
    assert study_definition(m, 7) == digest({**body, "seed": 7})


def test_tune_command_works_inside_its_sweep(sweep_dict, tmp_path):
    """`harness tune` into a sweep's folder: the sweep's parent run, no second copy of a job run,
    its own table beside the sweep's report, which stays whole for `harness report`."""
    from click.testing import CliRunner

    from harness.cli import main
    from harness.report import load_sweep_from_mlflow
    from harness.tracking import JOB_TAG

    d = dict(sweep_dict, methods=[{"name": "weight_averaging"},
                                  {"name": "task_arithmetic", "label": "ta", "tune": tune_block(n_trials=2)}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", str(f), "-q"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    report = tmp_path / "out" / "report"
    sweep_table = (report / "main.md").read_text()
    assert "| weight_averaging |" in sweep_table and "| ta |" in sweep_table
    r = CliRunner().invoke(main, ["tune", str(f), "--method", "ta", "--trials", "3", "-q"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert (report / "main.md").read_text() == sweep_table
    methods = [line.split("|")[1].strip() for line in (report / "tune-ta.md").read_text().splitlines()[2:]]
    assert methods == ["pretrained", "individual", "ta"], methods
    cfg = validate_config(d)
    assert len(stored_study(cfg, cfg.methods[1]).trials) == 3
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    assert len(client.search_runs([exp], "tags.`harness.kind` = 'sweep'")) == 1
    assert len(client.search_runs([exp], "tags.`harness.kind` = 'tune'")) == 1
    keys = [run.data.tags[JOB_TAG] for run in client.search_runs([exp]) if JOB_TAG in run.data.tags]
    assert len(keys) == len(set(keys)), keys  # every job logged once
    _, results, _ = load_sweep_from_mlflow(cfg.resolved_tracking_uri())
    assert {r.label for r in results if r.kind == "merge"} == {"weight_averaging", "ta"}
    # a method's tuning changed by an override is still this folder's sweep: same parent run, and
    # `harness report` keeps to the jobs of the sweep's own report
    r = CliRunner().invoke(main, ["tune", str(f), "--method", "ta", "methods.1.tune.sampler=random", "-q"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert len(client.search_runs([exp], "tags.`harness.kind` = 'sweep'")) == 1
    assert (report / "main.md").read_text() == sweep_table
    _, results, _ = load_sweep_from_mlflow(cfg.resolved_tracking_uri())
    assert {r.label for r in results if r.kind == "merge"} == {"weight_averaging", "ta"}


def test_tune_command_finds_a_method_by_name_and_stays_quiet(sweep_dict, tmp_path):
    """`--method` takes a labelled method's name when no other tuned method has it; Optuna's own
    warnings (a contour plot over a parameter with one value) stay out of the output."""
    d = dict(sweep_dict, references=False, methods=[
        {"name": "weight_averaging"},
        {"name": TYPED, "label": "typed", "tune": {"n_trials": 2, "n_parallel": 1, "sampler": "random", "space": {
            "scaling": {"type": "float", "low": 0.1, "high": 0.5},
            "mode": {"type": "categorical", "choices": ["sum"]}}}}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), COLUMNS="200")
    r = subprocess.run([sys.executable, "-m", "harness.cli", "tune", str(f), "--method", TYPED], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"^trial 1 typed\(mode=sum, scaling=[\d.]+\): val/acc/avg", r.stderr, re.M), r.stderr
    assert "unique value length" not in r.stdout + r.stderr and "[W " not in r.stdout + r.stderr, r.stderr
    assert len(stored_study(validate_config(d), validate_config(d).methods[1]).trials) == 2


@pytest.mark.parametrize("tuned_first", [False, True])
def test_a_name_shared_by_a_tuned_and_an_untuned_method_means_the_tuned_one(sweep_dict, tuned_first):
    """`harness tune/export --method task_arithmetic` beside a labelled untuned task_arithmetic
    row and a labelled tuned one: only the tuned one can be meant (tune needs a `tune:` block),
    wherever it stands; a name only one method has means that method."""
    from harness.cli import _method_index

    fixed = {"name": "task_arithmetic", "label": "fixed", "params": {"scaling": 0.3}}
    tuned = {"name": "task_arithmetic", "label": "tuned", "tune": tune_block()}
    methods = [{"name": "weight_averaging"}, *([tuned, fixed] if tuned_first else [fixed, tuned])]
    cfg = validate_config(dict(sweep_dict, methods=methods))
    assert cfg.methods[_method_index(cfg, "task_arithmetic", "s.yaml")].display == "tuned"
    assert _method_index(cfg, "weight_averaging", "s.yaml") == 0
    assert cfg.methods[_method_index(cfg, "fixed", "s.yaml")].display == "fixed"


def cli_on_sweep(tmp_path: Path, d: dict, command: str, *args: str):
    """``harness COMMAND s.yaml ARGS`` on sweep ``d`` written to ``tmp_path/s.yaml``, in a wide
    terminal so that no line the tests read is wrapped: the result and the file."""
    from click.testing import CliRunner

    from harness.cli import main

    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    return CliRunner().invoke(main, [command, str(f), *args], env={"COLUMNS": "300"}), f


def test_the_sweep_header_counts_one_job_and_one_trial_in_the_singular(sweep_dict, tmp_path):
    d = dict(sweep_dict, references=False, methods=[{"name": "weight_averaging"},
                                                    {"name": "task_arithmetic", "tune": tune_block(n_trials=1)}])
    r, f = cli_on_sweep(tmp_path, d, "sweep")
    assert r.exit_code == 0, r.output
    assert (f"{d['name']}: 1 job, 0 cached, 1 to run, then 1 Optuna study (1 trial in all, finished ones kept) -> "
            f"{d['output_dir']}\n") in r.output, r.output


def test_tune_command_refuses_an_ambiguous_name_and_a_bad_trial_count(sweep_dict, tmp_path):
    d = dict(sweep_dict, methods=[{"name": "weight_averaging"},
                                  {"name": "task_arithmetic", "label": "a", "tune": tune_block()},
                                  {"name": "task_arithmetic", "label": "b", "tune": tune_block()}])
    r, f = cli_on_sweep(tmp_path, d, "tune", "--method", "task_arithmetic")
    assert r.exit_code == 2
    assert f"error: {f}: 2 methods are named 'task_arithmetic' (labels a, b): give the label" in r.stderr, r.stderr
    r, _ = cli_on_sweep(tmp_path, d, "tune", "--method", "b", "--trials", "0")
    assert r.exit_code == 2
    assert (f"error: <command line> (--trials 0, over {f}): methods.2.tune.n_trials: Input should be greater "
            "than or equal to 1 (got 0)") in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_tune_command_on_an_untuned_row_names_the_tuned_rows_of_its_method(sweep_dict, tmp_path):
    """``--method task_arithmetic`` is the untuned row labelled so (a label wins over a name, as the
    README says); the refusal names the tuned row of that method the user most likely meant."""
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic"},
                                  {"name": "task_arithmetic", "label": "ta_tuned", "tune": tune_block()}])
    r, f = cli_on_sweep(tmp_path, d, "tune", "--method", "task_arithmetic")
    assert r.exit_code == 2
    assert (f"error: {f}: methods.0.tune: method 'task_arithmetic' has no tune block "
            "(tuned task_arithmetic rows: 'ta_tuned')") in r.stderr, r.stderr


def test_collect_says_it_runs_no_study(sweep_dict):
    """``collect`` (like ``--detach``) only gathers submitted jobs: a tuned method's study needs a
    driver that waits on each trial, and the command says where to run it instead of leaving
    its row out in silence."""
    import io

    from rich.console import Console

    d = dict(sweep_dict, executor={"kind": "slurm"},
             methods=[{"name": "task_arithmetic", "label": "tuned", "tune": tune_block(n_trials=2)}])
    cfg = validate_config(d)
    text = io.StringIO()
    with pytest.raises(HarnessError, match="no SLURM submissions recorded"):  # nor were its other jobs submitted
        run_sweep(cfg, console=Console(file=text, width=250), mode="collect")
    assert ("collect runs no Optuna study: run `harness sweep` (or `harness tune FILE --method LABEL`) for tuned"
            in " ".join(text.getvalue().split()))
    assert not (cfg.resolved_output_dir() / "optuna").exists()


def test_collect_with_a_study_storage_it_cannot_open_leaves_the_row_out(sweep_dict, tmp_path):
    """``collect`` looks for a finished study to keep its row; a storage it cannot open (a
    database on a path that does not exist here) is a study not done, not a traceback."""
    import io

    from rich.console import Console

    tune = dict(tune_block(n_trials=2), storage=f"sqlite:///{tmp_path}/no/such/folder/studies.db")
    d = dict(sweep_dict, executor={"kind": "slurm"}, methods=[{"name": "task_arithmetic", "label": "tuned", "tune": tune}])
    text = io.StringIO()
    with pytest.raises(HarnessError, match="no SLURM submissions recorded"):
        run_sweep(validate_config(d), console=Console(file=text, width=250), mode="collect")
    assert "collect runs no Optuna study" in text.getvalue(), text.getvalue()


def test_trial_counts_are_worded_as_a_grids_failed_settings():
    from harness.results import TrialCounts

    assert TrialCounts(20, failed=2, pruned=3).note() == "2 of 20 trials failed, 3 pruned"
    assert TrialCounts(20, failed=2).note() == "2 of 20 trials failed"
    assert TrialCounts(20, pruned=3).note() == "3 of 20 trials pruned"
    assert TrialCounts(20).note() == ""


QUALITY_GRID = {"quality": {"type": "categorical", "choices": [10.0, 50.0, 60.0, 95.0]}}


def quality_study(sweep_dict: dict) -> dict:
    """A grid study over tests.tuning_methods:StopsOrFailsByQuality: quality 10 is pruned after
    reporting 10, 11, 12; 50 and 60 complete; 95 fails."""
    return dict(sweep_dict, references=False, methods=[{
        "name": "tests.tuning_methods:StopsOrFailsByQuality", "label": "q",
        "tune": {"n_trials": 4, "n_parallel": 1, "sampler": "grid", "space": QUALITY_GRID}}])


def sweep_run_status(d: dict) -> str:
    """The MLflow status of the sweep's parent run."""
    cfg = validate_config(d)
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    (run,) = client.search_runs([exp], "tags.`harness.kind` = 'sweep'")
    return run.info.status


def test_tuned_row_counts_its_failed_and_pruned_trials(sweep_dict, tmp_path):
    """As a grid's row says how many settings failed, a tuned row says how many of its study's
    trials failed and were pruned: in the sweep's table and in `harness report`'s, rebuilt from MLflow.
    As a grid with a failed setting does, the sweep ends with a failure summary naming the failed
    trial and its traceback, and exit code 1; run again, it finds every trial done and exits 0."""
    from click.testing import CliRunner

    from harness.cli import main
    from harness.plan import setting_text

    d = quality_study(sweep_dict)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", str(f)], env={"COLUMNS": "200"})
    assert r.exit_code == 1, r.output
    study = stored_study(validate_config(d))
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE", "FAIL", "PRUNED"]
    setting = f"{setting_text(study.best_params)} (1 of 4 trials failed, 1 pruned)"
    assert setting in r.stderr, r.stderr
    (bad,) = [t for t in study.trials if t.state.name == "FAIL"]
    summary = r.stderr[r.stderr.index("1 Optuna trial failed (each study chose among the others):"):]
    assert f"trial {bad.number} q(quality=95.0): RuntimeError: quality 95.0 is too high" in summary, summary
    assert "traceback: " in summary and "jobs failed" not in r.stderr, r.stderr
    assert sweep_run_status(d) == "FAILED"  # as the exit code says
    r = CliRunner().invoke(main, ["sweep", str(f)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "Optuna trial" not in r.stderr, r.output
    assert setting in r.stderr, r.stderr
    assert sweep_run_status(d) == "FINISHED"
    out = tmp_path / "out"
    assert f"| q | {setting} |" in (out / "report" / "main.md").read_text()
    (out / "report" / "main.md").unlink()
    r = CliRunner().invoke(main, ["report", str(out)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert f"| q | {setting} |" in (out / "report" / "main.md").read_text()


def test_report_rebuilds_a_tuned_row_as_the_sweep_wrote_it_after_harness_tune_extends_its_study(
        sweep_dict, tmp_path):
    """`harness tune --trials` extends a study in the sweep's run, and the sweep's own tables stay as
    the last `harness sweep` wrote them: `harness report` rebuilt the tuned row with the extended
    study's trial counts (or none, had the best changed), a row no run had written."""
    from click.testing import CliRunner

    from harness.cli import main
    from harness.plan import setting_text

    space = {"quality": {"type": "categorical", "choices": [50.0, 95.0]}}  # 95 fails
    d = dict(sweep_dict, references=False, methods=[{
        "name": "tests.tuning_methods:StopsOrFailsByQuality", "label": "q",
        "tune": {"n_trials": 1, "n_parallel": 1, "sampler": "random", "space": space}}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    CliRunner().invoke(main, ["sweep", str(f), "-q"], env={"COLUMNS": "200"})
    study = stored_study(validate_config(d))
    states = [t.state.name for t in study.trials]
    assert states.count("FAIL") >= 1, states  # the seed's draws: the row has a note to keep
    row = f"| q | {setting_text(study.best_params)} ({states.count('FAIL')} of {len(states)} trials failed) |"
    table = tmp_path / "out" / "report" / "main.md"
    assert row in table.read_text(), table.read_text()
    r = CliRunner().invoke(main, ["tune", str(f), "--method", "q", "--trials", "4", "-q"], env={"COLUMNS": "200"})
    assert len(stored_study(validate_config(d)).trials) >= len(states) + 3, r.output
    table.unlink()
    r = CliRunner().invoke(main, ["report", str(tmp_path / "out")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert row in table.read_text(), table.read_text()


def test_a_tuned_row_is_exported_with_the_best_trials_setting(sweep_dict, tmp_path):
    """jobs.json holds a tuned row's trial counts beside its job: `harness export` reads the row's
    job from it as from any other row's (it unpacked [label, key] pairs, a ValueError)."""
    from click.testing import CliRunner

    from harness.cli import main
    from harness.plan import setting_text

    d = dict(sweep_dict, references=False, methods=[{"name": "task_arithmetic", "label": "ta",
                                                      "tune": tune_block(n_trials=2, n_parallel=1)}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    assert CliRunner().invoke(main, ["sweep", str(f), "-q"]).exit_code == 0
    r = CliRunner().invoke(main, ["export", str(f), "--method", "ta", "--out", str(tmp_path / "ta.safetensors")])
    assert r.exit_code == 0, r.output
    best = setting_text(stored_study(validate_config(d)).best_params)
    assert f"ta ({best})" in r.stdout and (tmp_path / "ta.safetensors").is_file(), r.stdout


def test_a_pruned_trials_run_holds_the_values_it_reported(sweep_dict):
    """A pruned trial ends without metrics: its run shows the objective it reported at each step
    (10, 11, 12 at steps 0-2) and the step it was stopped after."""
    cfg = validate_config(quality_study(sweep_dict))
    assert not run_sweep(cfg, quiet=True).failed
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    pruned = client.search_runs([exp], "tags.`harness.trial_state` = 'PRUNED'")
    assert len(pruned) == 1
    history = client.get_metric_history(pruned[0].info.run_id, "intermediate/val/acc/avg")
    assert sorted((m.step, m.value) for m in history) == [(0, 10.0), (1, 11.0), (2, 12.0)]
    assert pruned[0].data.tags.get("harness.pruned_at_step") == "2"


def test_a_grid_row_sharing_a_job_with_a_tuned_method_keeps_its_own_note():
    """A grid point and a tuned method's best setting may be one job (keys leave labels out):
    the grid's row says how many of its settings failed, the tuned row its study's trials."""
    from harness.job import JobResult
    from harness.results import TrialCounts, build_rows

    def merge(key: str, label: str, quality: float, ok: bool = True) -> JobResult:
        metrics = {"acc/a": 60.0, "acc/avg": 60.0, "val/acc/avg": 55.0} if ok else {}
        return JobResult(key, "merge", label, {"quality": quality}, None, "ok" if ok else "failed", metrics)

    results = [merge("k50", "grid", 50.0), merge("k95", "grid", 95.0, ok=False), merge("k50", "tuned", 50.0)]
    rows = build_rows(results, ["a"], ["grid", "tuned"], studies={("tuned", "k50"): TrialCounts(4, pruned=1)})
    assert {r.method: r.setting for r in rows} == {"grid": "quality=50.0 (1 of 2 settings failed)",
                                                   "tuned": "quality=50.0 (1 of 4 trials pruned)"}


def test_a_hyperparameter_without_a_default_can_be_tuned(sweep_dict):
    """Its trials give it a value, so the config check does not refuse it as 'Field required' in
    params (nor does the study's digest fail to build the method): the study runs its grid and
    its best scores as task arithmetic at that scaling, run beside it."""
    d = dict(sweep_dict, references=False, methods=[
        {"name": "task_arithmetic", "grid": {"scaling": [0.0, 0.6]}},
        {"name": "tests.tuning_methods:ScalingWithoutDefault", "label": "nodefault", "tune": {
            "n_trials": 2, "n_parallel": 1, "sampler": "grid",
            "space": {"scaling": {"type": "float", "low": 0.0, "high": 0.6, "step": 0.6}}}}])
    out = run_sweep(validate_config(d), quiet=True)
    assert not out.failed, [r.error for r in out.failed]
    final = next(r for r in out.results if r.label == "nodefault" and r.kind == "merge")
    same = next(r for r in out.results if r.label == "task_arithmetic" and r.params["scaling"] == final.params["scaling"])
    assert final.metrics == pytest.approx(same.metrics)


def test_a_hyperparameter_without_a_default_left_out_is_named(sweep_dict):
    d = dict(sweep_dict, methods=[{"name": "tests.tuning_methods:ScalingWithoutDefault"}])
    with pytest.raises(ConfigError) as e:
        validate_config(d, "s.yaml")
    assert str(e.value) == ("s.yaml: methods.0.params.scaling: hyperparameter 'scaling' of "
                            "'tests.tuning_methods:ScalingWithoutDefault' has no default: give it in params, grid "
                            "or tune.space"), str(e.value)


def test_categorical_choices_optuna_cannot_store_are_a_config_error(sweep_dict):
    """Lists as choices (a list-valued hyperparameter) ran every trial, then the study's end (its
    importance plot) crashed on Optuna hashing them; now the space is refused at once."""
    d = dict(sweep_dict, methods=[{"name": "tests.tuning_methods:LayerList", "tune": {
        "space": {"layers": {"type": "categorical", "choices": [[0], [0, 1]]}}}}])
    with pytest.raises(ConfigError) as e:
        validate_config(d, "s.yaml")
    assert str(e.value).startswith("s.yaml: methods.0.tune.space.layers: categorical choices must be numbers, strings, "
                                   "booleans or null, not lists (got [0])"), str(e.value)


@pytest.mark.parametrize("space,fragment", [
    ({"type": "float", "low": 0.5, "high": float("inf")}, "'high' must be a finite number (got inf)"),
    ({"type": "float", "low": float("nan"), "high": 0.5}, "'low' must be a finite number (got nan)"),
    ({"type": "float", "low": float("-inf"), "high": 0.5}, "'low' must be a finite number (got -inf)"),
])
def test_a_space_end_that_is_not_finite_is_a_config_error(space, fragment, sweep_dict):
    """For a hyperparameter without bounds (which the method's own check lets through), .inf or
    .nan as a range end was valid, and the study crashed at its first trial (OverflowError)."""
    d = dict(sweep_dict, methods=[{"name": "tests.tuning_methods:FreeShift", "tune": {"space": {"shift": space}}}])
    with pytest.raises(ConfigError) as e:
        validate_config(d, "s.yaml")
    assert str(e.value).startswith(f"s.yaml: methods.0.tune.space.shift: {fragment}"), str(e.value)


def test_a_range_end_a_method_validator_refuses_is_a_config_error(sweep_dict):
    """lo tuned up to 0.95 with hi fixed at 0.9: the method refuses the end (its model validator,
    not a field bound), as the README says a refused end is refused; a range inside hi is valid,
    and so is one whose end another tuned hyperparameter may make valid."""
    def space(**ranges):
        return dict(sweep_dict, methods=[{"name": "tests.tuning_methods:OrderedRange", "params": {},
                                          "tune": {"space": {k: {"type": "float", "low": lo, "high": hi}
                                                             for k, (lo, hi) in ranges.items()}}}])

    with pytest.raises(ConfigError) as e:
        validate_config(space(lo=(0.1, 0.95)), "s.yaml")
    assert str(e.value) == ("s.yaml: methods.0.tune.space.lo: lo must be below hi, at this end of the range with "
                            "the method's other hyperparameters as params and defaults set them (got 0.95)"), str(e.value)
    validate_config(space(lo=(0.1, 0.5)), "s.yaml")
    validate_config(space(lo=(0.1, 0.95), hi=(0.96, 1.0)), "s.yaml")


def test_a_journal_lock_left_behind_is_waited_for_with_a_line_saying_so(tmp_path, capsys):
    """A driver killed while it wrote to the journal leaves ``journal.log.lock``; Optuna waits its
    grace period for it silently at the harness's log level. The wait is told at once, naming the
    lock file; the lock itself is left to its holder (here one releasing it after 1.5 s)."""
    import threading

    import optuna

    from harness.tuning import open_storage, quiet_optuna

    quiet_optuna()
    journal = tmp_path / "optuna" / "journal.log"
    storage = open_storage(f"journal:{journal}")
    optuna.create_study(study_name="first", storage=storage)
    assert capsys.readouterr().err == ""  # no line while nothing holds the lock
    lock = Path(f"{journal}.lock")
    os.symlink(journal, lock)
    old = time.time() - 120
    os.utime(lock, (old, old), follow_symlinks=False)
    threading.Timer(1.5, lock.unlink).start()
    started = time.monotonic()
    optuna.create_study(study_name="second", storage=open_storage(f"journal:{journal}"))
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"waiting for the Optuna journal's lock file {lock}, held for 12")
    assert "killed while writing left it behind (Optuna removes it after 30 s unchanged)" in err
    assert set(optuna.get_all_study_names(storage)) == {"first", "second"}


def test_a_journal_lock_another_driver_holds_for_a_moment_is_waited_for_without_a_line(tmp_path, capsys):
    """Another driver's write holds the journal's lock for milliseconds (here 0.1 s): waiting for
    it is no news, and a line for each such wait would bury the trials' lines."""
    import threading

    import optuna

    from harness.tuning import open_storage, quiet_optuna

    quiet_optuna()
    journal = tmp_path / "journal.log"
    optuna.create_study(study_name="first", storage=open_storage(f"journal:{journal}"))
    lock = Path(f"{journal}.lock")
    os.symlink(journal, lock)
    threading.Timer(0.1, lock.unlink).start()
    optuna.create_study(study_name="second", storage=open_storage(f"journal:{journal}"))
    assert not lock.exists() and capsys.readouterr().err == ""
    assert set(optuna.get_all_study_names(open_storage(f"journal:{journal}"))) == {"first", "second"}


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_study_run_in_two_goes_draws_what_one_run_draws(sampler, sweep_dict, tmp_path):
    """A study stopped after two trials (killed, or given fewer) and resumed asks the same
    parameters, and picks the same best, as one run to the end: a seeded study is reproducible
    however many runs it took."""
    space = {"scaling": {"type": "float", "low": 0.0, "high": 1.0}, "repeats": {"type": "int", "low": 1, "high": 4}}

    def params(out: str, *n_trials: int) -> tuple[list[dict], dict]:
        for n in n_trials:
            cfg = validate_config({**typed_study(sweep_dict, n_trials=n, sampler=sampler, space=space),
                                   "output_dir": str(tmp_path / out)})
            run_sweep(cfg, quiet=True)
        study = stored_study(cfg)
        return [t.params for t in study.trials], study.best_params

    assert params("two-goes", 2, 5) == params("one-go", 5)


@pytest.mark.parametrize("method", ["adamerging", "wemoe"])
def test_the_best_settings_job_resumes_the_best_trials_adaptation(method, sweep_dict, tmp_path, adam_steps):
    """The best setting's job on test takes over the best trial's saved adaptation (same
    parameters, seed and data) instead of adapting again; its result is the one adapting again
    gives, as a plain job of the same setting in another folder shows."""
    steps = adam_steps
    params = {"steps": 3, "batch_size": 4}
    space = {"lr": {"type": "categorical", "choices": [0.001, 0.01]}}
    d = dict(sweep_dict, references=False, methods=[
        {"name": method, "label": "tuned", "params": params, "tune": {"n_trials": 2, "sampler": "grid", "space": space}}])
    cfg = validate_config(d)
    out = run_sweep(cfg, quiet=True)
    assert not out.failed, [r.error for r in out.failed]
    assert len(steps) == 2 * 3  # two trials adapted; the final job adapted no step
    final = next(r for r in out.results if r.kind == "merge")
    best = stored_study(cfg).best_trial
    assert final.params["lr"] == best.params["lr"]
    assert (cfg.resolved_output_dir() / "work" / final.key).is_dir()

    steps.clear()
    plain = dict(sweep_dict, output_dir=str(tmp_path / "plain"), references=False,
                 methods=[{"name": method, "params": {**params, "lr": best.params["lr"]}}])
    again = run_sweep(validate_config(plain), quiet=True)
    assert len(steps) == 3  # adapting from scratch
    redone = next(r for r in again.results if r.kind == "merge")
    assert redone.key == final.key
    assert redone.metrics == final.metrics

    # A final job that failed (its result file says so) and left no workdir takes the copy too.
    import json
    import shutil

    if method == "adamerging":
        out_dir = cfg.resolved_output_dir()
        result_file = out_dir / "results" / f"{final.key}.json"
        failed = json.loads(result_file.read_text())
        result_file.write_text(json.dumps({**failed, "status": "failed", "error": "killed"}))
        shutil.rmtree(out_dir / "work" / final.key)
        steps.clear()
        rerun = run_sweep(cfg, quiet=True)
        assert steps == [] and not rerun.failed
        assert next(r for r in rerun.results if r.kind == "merge").metrics == final.metrics


def test_best_key_is_none_when_the_method_refuses_the_best_trials_parameters():
    """Its documented answer, not a NameError (ValidationError was not imported there)."""
    from types import SimpleNamespace

    from harness.tuning import StudyRunner
    from methods.task_arithmetic import TaskArithmetic

    runner = StudyRunner.__new__(StudyRunner)
    runner.study = SimpleNamespace(best_trial=SimpleNamespace(_trial_id=0, number=0, params={"scaling": "x"}))

    def spec(trial_id, number, params, study=None):
        TaskArithmetic(**params)  # ValidationError: a scaling that is no number
        raise AssertionError("the method took the parameters")

    runner.spec = spec
    assert runner.best_key() is None


def test_a_study_extended_by_a_rerun_shows_its_current_target_in_mlflow(sweep_dict):
    """MLflow params cannot change: the settings a rerun may change without starting another
    study (``n_trials``, ``n_parallel``, ``pruner``) are the tuning run's tags, the latest run's;
    what defines the study stays its params."""
    d = typed_study(sweep_dict, n_trials=1, sampler="random", space={"scaling": GRID_SPACE["scaling"]})
    run_sweep(validate_config(d), quiet=True)
    d["methods"][0]["tune"].update(n_trials=2, n_parallel=2, pruner="median")
    cfg = validate_config(d)
    run_sweep(cfg, quiet=True)
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    (tune_run,) = client.search_runs([exp], "tags.`harness.kind` = 'tune'")
    assert len(client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{tune_run.info.run_id}'")) == 2
    tags, params = tune_run.data.tags, tune_run.data.params
    assert (tags["tune.n_trials"], tags["tune.n_parallel"], tags["tune.pruner"]) == ("2", "2", "median")
    assert not {"tune.n_trials", "tune.n_parallel", "tune.pruner"} & set(params), params
    assert (params["tune.sampler"], params["tune.space.scaling.high"]) == ("random", "0.6")


def flaky_study(sweep_dict: dict, marker: Path) -> dict:
    """A one-trial study of tests.failing_method:FailsUntilMarked, whose ``marker`` has no default."""
    return dict(sweep_dict, references=False, methods=[
        {"name": "tests.failing_method:FailsUntilMarked", "label": "flaky", "params": {"marker": str(marker)},
         "tune": {"n_trials": 1, "n_parallel": 1, "sampler": "random",
                  "space": {"strength": {"type": "float", "low": 0.1, "high": 0.5}}}}])


def test_a_failed_study_of_a_method_with_a_required_hyperparameter_is_a_failed_row(sweep_dict, tmp_path):
    """Its row's MLflow run (no setting chosen) ends FAILED with the study's reason; it was a
    pydantic traceback (the row's hyperparameters built from no setting) that stopped the sweep."""
    cfg = validate_config(flaky_study(sweep_dict, tmp_path / "never"))
    out = run_sweep(cfg, quiet=True)
    assert [r.setting for r in out.rows if r.method == "flaky"] == ["failed"]
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    (row,) = client.search_runs([exp], "tags.`harness.label` = 'flaky' and tags.`harness.kind` = 'merge'")
    assert row.info.status == "FAILED" and "4 trials failed, the last with: RuntimeError: transient failure" in (
        row.data.tags["harness.failure_reason"])
    assert row.data.params["job.method"] == "tests.failing_method:FailsUntilMarked"
    assert not [k for k in row.data.params if k.startswith("job.hyperparameters.")], row.data.params


def test_a_failed_study_that_completes_on_rerun_keeps_no_failure_reason(sweep_dict, tmp_path):
    """A study that failed (its trials did: a transient failure) and completes on rerun: its
    reopened tuning run ends FINISHED without the earlier run's failure reason."""
    marker = tmp_path / "fixed"
    cfg = validate_config(flaky_study(sweep_dict, marker))
    run_sweep(cfg, quiet=True)
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    (failed,) = client.search_runs([exp], "tags.`harness.kind` = 'tune'")
    assert failed.info.status == "FAILED" and "trials failed" in failed.data.tags["harness.failure_reason"]
    marker.touch()
    run_sweep(cfg, quiet=True)
    (tune_run,) = client.search_runs([exp], "tags.`harness.kind` = 'tune'")
    assert tune_run.info.run_id == failed.info.run_id and tune_run.info.status == "FINISHED"
    assert "harness.failure_reason" not in tune_run.data.tags, tune_run.data.tags


def test_tuned_values_are_logged_and_named_as_the_method_holds_them(sweep_dict):
    """An int range over a float field draws 1, categorical choices 2.0 for an int field: trials,
    ``best.*`` tags, the tuned job's params and its run name read them as the method holds them
    (1.0, 2), as its ``job.hyperparameters.*`` do and as the same values in ``params`` would."""
    d = typed_study(sweep_dict, n_trials=2, sampler="random", space={
        "scaling": {"type": "int", "low": 1, "high": 2}, "repeats": {"type": "categorical", "choices": [2.0, 3.0]}})
    cfg = validate_config(d)
    run_sweep(cfg, quiet=True)
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    (job,) = client.search_runs([exp], "tags.`harness.kind` = 'merge'")
    held = {k: job.data.params[f"job.hyperparameters.{k}"] for k in ("scaling", "repeats")}
    assert held["scaling"] in ("1.0", "2.0") and held["repeats"] in ("2", "3"), held
    assert {k: job.data.params[f"job.params.{k}"] for k in held} == held
    assert job.info.run_name == f"typed(scaling={held['scaling']}, repeats={held['repeats']})"
    (tune_run,) = client.search_runs([exp], "tags.`harness.kind` = 'tune'")
    assert {k: tune_run.data.tags[f"best.{k}"] for k in held} == held
    for trial in client.search_runs([exp], "tags.`harness.kind` = 'trial'"):
        assert trial.data.params["trial.scaling"].endswith(".0") and "." not in trial.data.params["trial.repeats"]


def test_a_study_name_with_a_quote_is_tracked_and_found_again(sweep_dict):
    """``study_name: "bob's study"``: the sweep ran its trials, then stopped on an MLflow
    traceback (its run was searched for with the name inside a quoted filter); a rerun finds the
    same tuning run."""
    d = typed_study(sweep_dict, n_trials=1, sampler="random", study_name="bob's study",
                    space={"scaling": GRID_SPACE["scaling"]})
    cfg = validate_config(d)
    for _ in range(2):
        run_sweep(cfg, quiet=True)
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    (tune_run,) = client.search_runs([exp], "tags.`harness.kind` = 'tune'")
    assert tune_run.data.tags["harness.study"] == "bob's study" and tune_run.info.status == "FINISHED"
    assert len(client.search_runs([exp], "tags.`harness.kind` = 'trial'")) == 1


def test_a_study_name_with_both_quotes_is_a_config_error(sweep_dict):
    d = typed_study(sweep_dict, study_name="""a 'b' "c\"""", space={"scaling": GRID_SPACE["scaling"]})
    with pytest.raises(ConfigError) as e:
        validate_config(d, "s.yaml")
    assert "methods.0.tune.study_name: may hold ' or \", not both (MLflow finds its run by it)" in str(e.value)


def test_a_renamed_tuned_label_names_the_study_that_resumes_it(sweep_dict, monkeypatch):
    """A study is stored under its label, which enters its trials' keys: renamed, it would run
    every trial again. The line printed names the stored study of the same search, and giving
    that as tune.study_name resumes it: no trial or test job runs again."""
    import io

    from rich.console import Console

    block = tune_block(n_trials=2, sampler="random")
    d = dict(sweep_dict, references=False, methods=[{"name": "task_arithmetic", "label": "ta", "tune": block}])
    first = run_sweep(validate_config(d), quiet=True)
    d["methods"] = [{"name": "task_arithmetic", "label": "ta renamed", "tune": dict(block)}]
    shown = io.StringIO()
    run_sweep(validate_config(d), console=Console(file=shown, width=400))
    assert "while study 'toy.ta' holds trials of this same search (a label renamed since?): " \
           "set tune.study_name: toy.ta to resume it" in shown.getvalue(), shown.getvalue()
    d["methods"] = [{"name": "task_arithmetic", "label": "ta again", "tune": dict(block, study_name="toy.ta")}]
    monkeypatch.setattr("harness.executors.local.run_job", lambda *a, **k: pytest.fail("a job ran again"))
    again = run_sweep(validate_config(d), quiet=True)
    assert [r.avg for r in again.rows] == [r.avg for r in first.rows] and again.rows[0].method == "ta again"


def test_a_tuned_rows_setting_is_its_studys_in_the_report_when_its_job_ran_before_a_parameter_joined_the_space(
        sweep_dict, tmp_path):
    """The best setting's job key holds every hyperparameter, defaults included: a study whose
    best is ``k`` at its default reuses the job run before ``k`` joined the space. The sweep's
    table shows the study's values (``k=20.0`` too); `harness report` rebuilt the row from the
    params that job's MLflow run was logged with, which lack ``k``."""
    from click.testing import CliRunner

    from harness.cli import main

    tune = {"n_trials": 2, "n_parallel": 1, "sampler": "grid", "space": {"scaling": {"type": "categorical",
                                                                                   "choices": [0.6]}}}
    d = dict(sweep_dict, references=False, methods=[{"name": "ties", "label": "tt", "tune": tune}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    assert CliRunner().invoke(main, ["sweep", str(f), "-q"]).exit_code == 0
    tune["space"]["k"] = {"type": "categorical", "choices": [20.0]}  # ties' default
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", str(f), "-q"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    table = tmp_path / "out" / "report" / "main.md"
    row = "| tt | k=20.0, scaling=0.6 |"  # the space as the file lists it (safe_dump sorts)
    assert row in table.read_text(), table.read_text()
    table.unlink()
    r = CliRunner().invoke(main, ["report", str(tmp_path / "out")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert row in table.read_text(), table.read_text()


def test_a_tuned_row_sharing_a_grid_rows_job_shows_its_studys_values_in_both_tables(sweep_dict, tmp_path):
    """A grid point and a tuned best with ``k`` at its default are one job (its key holds every
    hyperparameter); each row shows its own setting, in the sweep's table and in `harness report`'s:
    the tuned one showed the grid's, without ``k``."""
    from click.testing import CliRunner

    from harness.cli import main

    space = {"scaling": {"type": "categorical", "choices": [0.6]}, "k": {"type": "categorical", "choices": [20.0]}}
    d = dict(sweep_dict, references=False, methods=[
        {"name": "ties", "label": "g", "grid": {"scaling": [0.6]}},
        {"name": "ties", "label": "tt", "tune": {"n_trials": 1, "n_parallel": 1, "sampler": "grid", "space": space}}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", str(f), "-q"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    table = tmp_path / "out" / "report" / "main.md"
    rows = ["| g | scaling=0.6 |", "| tt | k=20.0, scaling=0.6 |"]
    assert all(row in table.read_text() for row in rows), table.read_text()
    table.unlink()
    r = CliRunner().invoke(main, ["report", str(tmp_path / "out")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert all(row in table.read_text() for row in rows), table.read_text()


def test_a_tuned_bests_run_logged_before_a_parameter_joined_the_space_holds_the_rows_params(sweep_dict):
    """The job's run is named with the row's setting (``k=20.0`` too) on rerun; its ``job.params.*``,
    logged when the job first ran without ``k``, now hold it too (the folder's own store)."""
    d = tuned_ties_then_k_joins(sweep_dict)
    cfg = validate_config(d)
    out = run_sweep(cfg, quiet=True)
    client = MlflowClient(cfg.resolved_tracking_uri())
    run = next(r for r in client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id],
                                             f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
               if r.data.tags["harness.kind"] == "merge")
    assert run.info.run_name == "tt(scaling=0.6, k=20.0)"
    params = {k: v for k, v in run.data.params.items() if k.startswith("job.params.")}
    assert params == {"job.params.scaling": "0.6", "job.params.k": "20.0"}, params
    assert run.data.params["job.hyperparameters.k"] == "20.0"


def test_a_new_database_storage_another_sweep_creates_at_the_same_time_is_opened(sweep_dict, tmp_path, monkeypatch):
    """Two sweeps sharing a new ``sqlite:///`` study storage, started together, both create its
    tables and stamp its schema version: the second stamp failed (UNIQUE constraint failed:
    alembic_version.version_num), refused as a storage that "cannot be opened". The database
    the other sweep made is there: the sweep opens it and runs its study."""
    import optuna
    from alembic.runtime.migration import HeadMaintainer
    from click.testing import CliRunner

    from harness.cli import main

    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic", "tune": tune_block(n_trials=2, storage=storage)}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    real_insert = HeadMaintainer._insert_version

    def other_sweep_stamps_first(self, version):  # after this one found no schema version
        monkeypatch.setattr(HeadMaintainer, "_insert_version", real_insert)
        subprocess.run([sys.executable, "-c", f"import optuna; optuna.storages.RDBStorage({storage!r})"], check=True,
                       timeout=120)
        real_insert(self, version)

    monkeypatch.setattr(HeadMaintainer, "_insert_version", other_sweep_stamps_first)
    r = CliRunner().invoke(main, ["sweep", str(f), "-q"])
    assert r.exit_code == 0, r.output
    (study,) = optuna.get_all_study_summaries(storage)
    assert study.study_name == "toy.task_arithmetic" and study.n_trials == 2


def test_a_new_database_storage_whose_tables_another_process_creates_meanwhile_is_opened(tmp_path, monkeypatch):
    """Two drivers opening one new ``sqlite:///`` storage at once: the other process creates the
    tables after this one found them missing, and this one's CREATE TABLE fails ("table ...
    already exists"). The tables are there: the storage opens and holds studies."""
    import optuna
    from sqlalchemy.sql.ddl import SchemaGenerator

    from harness.tuning import open_storage

    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    real_check = SchemaGenerator._can_create_table

    def other_driver_creates_them_now(self, table):
        missing = real_check(self, table)
        monkeypatch.setattr(SchemaGenerator, "_can_create_table", real_check)
        subprocess.run([sys.executable, "-c", f"import optuna; optuna.storages.RDBStorage({storage!r})"], check=True,
                       timeout=120)
        return missing

    monkeypatch.setattr(SchemaGenerator, "_can_create_table", other_driver_creates_them_now)
    optuna.create_study(study_name="s", storage=open_storage(storage))
    assert optuna.get_all_study_names(storage) == ["s"]


def test_a_database_storage_that_cannot_be_opened_is_tried_once(tmp_path, monkeypatch):
    """Only a race with another driver creating the database is tried again: a database in a
    folder that does not exist fails at its first try, without waiting between tries."""
    import optuna
    from sqlalchemy.exc import OperationalError

    from harness.tuning import open_storage

    tries = []
    real = optuna.storages.RDBStorage

    def counted(*args, **kwargs):
        tries.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", counted)
    with pytest.raises(OperationalError, match="unable to open database file"):
        open_storage(f"sqlite:///{tmp_path / 'no' / 'such' / 'studies.db'}")
    assert len(tries) == 1


def test_a_database_storage_another_process_holds_locked_is_opened_once_it_is_released(tmp_path):
    """Another sweep's driver writing to a shared ``sqlite:///`` storage holds the database locked
    past SQLite's busy timeout (here 0.3 s): opening it failed with "database is locked", a storage
    that "cannot be opened", instead of opening it once the other process let go."""
    import optuna

    from harness.tuning import open_storage

    db = tmp_path / "studies.db"
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time\n"
                               f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
                               "c.execute('BEGIN EXCLUSIVE'); print('held', flush=True); time.sleep(1.2)\n"
                               "c.execute('COMMIT')"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        storage = open_storage(f"sqlite:///{db}?timeout=0.3")
    finally:
        assert holder.wait(timeout=60) == 0
    optuna.create_study(study_name="s", storage=storage)
    assert optuna.get_all_study_names(f"sqlite:///{db}") == ["s"]


def test_collect_keeps_a_finished_studys_row_whose_robustness_study_failed(sweep_dict, monkeypatch):
    """``collect`` keeps the row of a study an attached sweep finished, from its best setting's
    cached result; that job's in-job robustness study failing costs only the robustness row, yet
    ``collect`` read the result as not cached and left the whole row out (from the tables it
    writes, and from ``report/jobs.json`` that ``harness export`` reads). Truth: the attached
    sweep's own result of the best setting's job."""
    from harness.runner import finished_studies
    from harness.workspace import Workspace

    d = dict(sweep_dict, references={"pretrained": False, "individual": False},
             robustness={"tasks": ["toy_stripes"], "corruptions": ["contrast", "pixelate"], "severity": 2},
             methods=[{"name": "task_arithmetic", "label": "tuned", "tune": tune_block(n_trials=2)}])
    pixelate_split_unreadable(monkeypatch)
    cfg = validate_config(d)
    out = run_sweep(cfg, quiet=True)
    (final,) = out.study_failed
    ws = Workspace(cfg, build=False)
    kept = finished_studies(cfg, ws.identity, ws.task_identity(), out.output_dir / "results")
    assert [(spec.key, r.label, r.metrics, r.study_error) for spec, r, _ in kept] == [
        (final.key, "tuned", final.metrics, final.study_error)]


def test_a_studys_final_job_whose_robustness_study_failed_runs_again_on_a_rerun(sweep_dict, monkeypatch):
    """The best setting's job on test whose robustness study failed is run again by the next sweep
    (once the split reads, the row gains its robustness numbers), not reused from the cache as
    it stands; the trials are not run again. Truth: the same sweep run whole into another folder
    with the split readable throughout."""
    d = dict(sweep_dict, references={"pretrained": False, "individual": False},
             robustness={"tasks": ["toy_stripes"], "corruptions": ["contrast", "pixelate"], "severity": 2},
             methods=[{"name": "task_arithmetic", "label": "tuned", "tune": tune_block(n_trials=2)}])
    pixelate_split_unreadable(monkeypatch)
    out = run_sweep(validate_config(d), quiet=True)
    (final,) = out.study_failed
    monkeypatch.undo()
    again = run_sweep(validate_config(d), quiet=True)
    assert again.executed == [final.key] and not again.failed and not again.study_failed
    (row,) = again.rows
    (truth,) = run_sweep(validate_config(dict(d, output_dir=d["output_dir"] + "-truth")), quiet=True).rows
    assert (row.setting, row.metrics["acc/avg"]) == (truth.setting, pytest.approx(final.metrics["acc/avg"]))
    assert row.metrics["robust/pixelate/avg"] == pytest.approx(truth.metrics["robust/pixelate/avg"])


def test_the_best_trials_adaptation_is_copied_only_into_a_final_job_without_one(tmp_path):
    """The best setting's job on test starts from a copy of the best trial's workdir, unless it has
    its own already (a rerun after a kill in that job: its progress is kept, not replaced); the
    copy holds the trial's saved files, not its hidden lock files, and leaves no half copy."""
    from harness.runner import reuse_adaptation

    work = tmp_path / "work"
    (work / "trial").mkdir(parents=True)
    (work / "trial" / "coefficients-tta.pt").write_bytes(b"the trial's adaptation")
    (work / "trial" / ".coefficients-tta.pt.k1ll3d.tmp").write_bytes(b"a write in progress")
    (work / "final").mkdir()
    (work / "final" / "coefficients-tta.pt").write_bytes(b"the final job's own progress")
    reuse_adaptation(work, "trial", "final")
    assert [(p.name, p.read_bytes()) for p in (work / "final").iterdir()] == [
        ("coefficients-tta.pt", b"the final job's own progress")]
    reuse_adaptation(work, "trial", "fresh")
    assert [(p.name, p.read_bytes()) for p in (work / "fresh").iterdir()] == [
        ("coefficients-tta.pt", b"the trial's adaptation")]
    assert sorted(p.name for p in work.iterdir()) == ["final", "fresh", "trial"]


def test_a_pruned_trial_a_stopped_driver_did_not_log_is_logged_by_the_rerun(sweep_dict, monkeypatch):
    """A driver stopped after the study recorded a pruned trial but before its MLflow run was
    written: the rerun logs that trial's run from its cached result (a pruned trial's result is
    kept, as a completed one's), without running it again. Truth: the study's own trial states."""
    import pytest

    from harness.tracking import Tracker

    d = quality_study(sweep_dict)
    cfg = validate_config(d)
    log_trial = Tracker.log_trial

    def stopped_at_the_pruned(self, tune_run, study, number, params, result, state, *args):
        if state == "PRUNED":
            raise KeyboardInterrupt
        return log_trial(self, tune_run, study, number, params, result, state, *args)

    with monkeypatch.context() as m:
        m.setattr(Tracker, "log_trial", stopped_at_the_pruned)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(cfg, quiet=True)
    (pruned,) = [t for t in stored_study(cfg).trials if t.state.name == "PRUNED"]
    ran = []
    import tests.tuning_methods as tm

    merge = tm.StopsOrFailsByQuality.merge
    monkeypatch.setattr(tm.StopsOrFailsByQuality, "merge", lambda self, *a: ran.append(self.quality) or merge(self, *a))
    run_sweep(cfg, quiet=True)
    assert pruned.params["quality"] not in ran
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    runs = {int(r.data.tags["harness.trial_number"]): r.data.tags["harness.trial_state"]
            for r in client.search_runs([exp], "tags.`harness.kind` = 'trial'")}
    assert runs == {t.number: t.state.name for t in stored_study(cfg).trials}


def test_each_space_type_becomes_the_optuna_distribution_it_names():
    """Hand-written: log ranges stay log, an int range stays int (step 1 unless given), a float
    step stays, choices stay in order: what the sampler draws from is the space as written."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from harness.config import TuneSpec
    from harness.tuning import distributions

    tune = TuneSpec(space={"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                           "scaling": {"type": "float", "low": 0.1, "high": 0.9, "step": 0.2},
                           "plain": {"type": "float", "low": 0.0, "high": 1.0},
                           "depth": {"type": "int", "low": 1, "high": 64, "log": True},
                           "steps": {"type": "int", "low": 2, "high": 10, "step": 4},
                           "repeats": {"type": "int", "low": 1, "high": 4},
                           "mode": {"type": "categorical", "choices": ["sum", "mean", None]}})
    assert distributions(tune) == {
        "lr": FloatDistribution(1e-4, 1e-1, log=True),
        "scaling": FloatDistribution(0.1, 0.9, step=0.2),
        "plain": FloatDistribution(0.0, 1.0),
        "depth": IntDistribution(1, 64, log=True),
        "steps": IntDistribution(2, 10, step=4),
        "repeats": IntDistribution(1, 4),
        "mode": CategoricalDistribution(["sum", "mean", None]),
    }


@pytest.mark.parametrize("name, cls", [("tpe", "TPESampler"), ("random", "RandomSampler"), ("cmaes", "CmaEsSampler"),
                                       ("grid", "GridSampler")])
def test_each_sampler_name_is_the_optuna_sampler_it_names(name, cls):
    """TPE samples at random for its first 10 trials (Optuna's ``n_startup_trials``), so a short
    study's points do not tell the two apart: each trial draws with Optuna's class of that name."""
    import optuna

    from harness.config import TuneSpec
    from harness.tuning import trial_seeded_sampler

    tune = TuneSpec(sampler=name, space=GRID_SPACE)
    sampler = trial_seeded_sampler(tune, 0)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.ask()  # the sampler a trial draws with is made as the trial starts
    drawn_with = getattr(sampler, "per_trial", sampler)
    assert isinstance(drawn_with, getattr(optuna.samplers, cls)), type(drawn_with).__mro__


@pytest.mark.parametrize("name, cls", [("median", "MedianPruner"), ("hyperband", "HyperbandPruner"),
                                       ("none", "NopPruner")])
def test_each_pruner_name_is_the_optuna_pruner_it_names(name, cls):
    """A study prunes as its ``pruner`` says: ``hyperband`` is Hyperband, not no pruning."""
    import optuna

    from harness.tuning import make_pruner

    assert type(make_pruner(name)) is getattr(optuna.pruners, cls)


def test_a_grid_study_asks_its_points_in_the_order_optunas_grid_sampler_of_its_seed_does():
    """The seed orders a grid: the study of seed 5 asks the 6 points in the order Optuna's
    GridSampler seeded 5 asks them (not in seed 0's order)."""
    import optuna

    from harness.config import TuneSpec
    from harness.tuning import trial_seeded_sampler

    tune = TuneSpec(sampler="grid", space=GRID_SPACE)
    values = {k: p.grid_values() for k, p in tune.space.items()}

    def order(sampler) -> list[tuple[float, str]]:
        study = optuna.create_study(direction="maximize", sampler=sampler)
        trials = [study.ask() for _ in range(6)]
        return [(t.suggest_float("scaling", 0.2, 0.6, step=0.2), t.suggest_categorical("mode", ["sum", "mean"]))
                for t in trials]

    assert order(trial_seeded_sampler(tune, 5)) == order(optuna.samplers.GridSampler(values, seed=5))
    assert order(optuna.samplers.GridSampler(values, seed=5)) != order(optuna.samplers.GridSampler(values, seed=0))


def test_a_grid_study_has_every_combination_of_its_points_and_no_more_trials():
    """3 scalings (0.2, 0.4, 0.6) x 2 modes x 2 flips = 12 points: n_trials beyond them is cut to
    12; other samplers run n_trials as given."""
    from harness.config import TuneSpec
    from harness.tuning import grid_size, n_trials_possible

    space = {**GRID_SPACE, "flip": {"type": "categorical", "choices": [False, True]}}
    grid = TuneSpec(n_trials=20, sampler="grid", space=space)
    assert grid_size(grid) == 12 and n_trials_possible(grid) == 12
    assert n_trials_possible(TuneSpec(n_trials=4, sampler="grid", space=space)) == 4
    assert n_trials_possible(TuneSpec(n_trials=20, sampler="random", space=space)) == 20


def test_each_trial_draws_under_its_own_seed():
    """Trials of one study, and one trial of two studies' seeds, get distinct sampler seeds (one
    seed for all would ask one point over and over); the same pair always the same seed."""
    from harness.tuning import trial_seed

    seeds = {trial_seed(0, n) for n in range(50)} | {trial_seed(1, n) for n in range(50)}
    assert len(seeds) == 100
    assert trial_seed(3, 7) == trial_seed(3, 7)


def _study_of(tmp_path, values: list[tuple[float, float]]):
    """A study as the driver opens it (journal storage), holding trials (scaling, objective)."""
    import optuna
    from optuna.distributions import FloatDistribution

    from harness.tuning import make_pruner, open_storage, open_study

    study, _ = open_study(open_storage(f"journal:{tmp_path / 'journal.log'}"), "s", "d", "m",
                          optuna.samplers.RandomSampler(seed=0), make_pruner("none"))
    for scaling, value in values:
        study.add_trial(optuna.trial.create_trial(params={"scaling": scaling}, value=value,
                                                  distributions={"scaling": FloatDistribution(0.0, 2.0)}))
    return study


def test_pruned_trials_count_toward_n_trials_and_each_state_is_counted_as_itself(tmp_path):
    """2 complete, 1 pruned, 2 failed and 1 running trial: 3 finished toward ``n_trials`` (a
    pruned trial is done, a failed one is not), and the row's counts are 5 ended, 2 failed, 1 pruned."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    from harness.results import TrialCounts
    from harness.tuning import StudyRunner

    study = _study_of(tmp_path, [(0.1, 60.0), (0.5, 80.0)])
    for state in (TrialState.PRUNED, TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING):
        study.add_trial(optuna.trial.create_trial(params={"scaling": 0.2}, state=state,
                                                  distributions={"scaling": FloatDistribution(0.0, 2.0)}))
    runner = StudyRunner.__new__(StudyRunner)
    runner.study = study
    assert runner.finished(study.get_trials()) == 3
    assert runner.counts() == TrialCounts(total=5, failed=2, pruned=1)


def test_the_best_setting_is_the_highest_objective_the_earliest_of_ties(sweep_dict, tmp_path):
    """The objective is maximised (an accuracy): of 60, 80, 80 and 70 the best is the first 80,
    with the row's fixed params beside it."""
    from harness.tuning import StudyRunner

    d = typed_study(sweep_dict, space={"scaling": {"type": "float", "low": 0.0, "high": 2.0}})
    d["methods"][0]["params"] = {"mode": "mean"}
    runner = StudyRunner.__new__(StudyRunner)
    runner.m = validate_config(d).methods[0]
    runner.study = _study_of(tmp_path, [(0.1, 60.0), (0.5, 80.0), (0.9, 80.0), (1.3, 70.0)])
    assert runner.best_params() == {"mode": "mean", "scaling": 0.5}


def test_a_trial_is_told_its_objective_not_another_metric(tmp_path):
    """A per-task objective scores the trial, not the average beside it; a job without the
    objective among its metrics is a failed trial, and a pruned job a pruned one."""
    from types import SimpleNamespace

    import optuna

    from harness.job import JobResult
    from harness.tuning import StudyRunner

    study = _study_of(tmp_path, [])
    runner = StudyRunner.__new__(StudyRunner)
    runner.study, runner.tune = study, SimpleNamespace(objective="val/acc/toy_colours")
    outcomes = []
    for status, metrics in [("ok", {"val/acc/avg": 50.0, "val/acc/toy_colours": 90.0}), ("ok", {"val/acc/avg": 50.0}),
                            ("pruned", {})]:
        trial = study.ask({"scaling": optuna.distributions.FloatDistribution(0.0, 2.0)})
        spec = SimpleNamespace(trial={"number": trial.number})
        result = JobResult("k", "trial", "typed", {}, None, status, metrics)
        outcomes.append(runner.tell(spec, result))
    assert outcomes == ["COMPLETE", "FAIL", "PRUNED"]
    assert [(t.state.name, t.value) for t in study.trials] == [("COMPLETE", 90.0), ("FAIL", None), ("PRUNED", None)]


def test_a_finished_job_without_the_objective_is_recorded_as_a_failed_trial_saying_why(tmp_path):
    """The job ran, but its metrics lack the objective: its result, which the trial's run is
    logged from, is failed with the reason, as the study's trial is."""
    from types import SimpleNamespace

    import optuna

    from harness.job import JobResult
    from harness.tuning import StudyRunner

    study = _study_of(tmp_path, [])
    runner = StudyRunner.__new__(StudyRunner)
    runner.study, runner.tune = study, SimpleNamespace(objective="val/acc/toy_colours")
    trial = study.ask({"scaling": optuna.distributions.FloatDistribution(0.0, 2.0)})
    result = JobResult("k", "trial", "typed", {}, None, "ok", {"val/acc/avg": 50.0})
    assert runner.tell(SimpleNamespace(trial={"number": trial.number}), result) == "FAIL"
    assert (result.status, result.error) == ("failed", "objective 'val/acc/toy_colours' not among the job's metrics")


def test_a_trial_job_is_scored_on_val_only_and_a_merge_job_on_both_splits(sweep_dict, tmp_path):
    """A trial's result holds validation accuracies alone (test labels stay unseen while tuning);
    the same setting run as the sweep's job holds the same val accuracies and the test ones too."""
    import dataclasses

    from harness.job import run_job
    from harness.plan import JobSpec as Spec
    from harness.plan import with_key
    from harness.runtime import resolve_device
    from harness.workspace import Workspace

    cfg = validate_config(sweep_dict)
    ws = Workspace(cfg, progress=False)
    identity, task_identity = ws.identity, ws.task_identity()
    cpu = resolve_device("cpu")
    job = with_key(cfg, Spec("merge", "ta", method="task_arithmetic", params={"scaling": 0.3}), identity,
                   task_identity)
    trial = run_job(dataclasses.replace(job, kind="trial"), ws, cpu, tmp_path / "trial")  # no pruner to report to
    merge = run_job(job, ws, cpu, tmp_path / "merge")
    assert trial.status == merge.status == "ok", (trial.error, merge.error)
    val = {f"val/acc/{t}" for t in cfg.task_names} | {"val/acc/avg"}
    assert set(trial.metrics) == val and trial.test_correct == {}
    assert {k: merge.metrics[k] for k in val} == trial.metrics
    assert {f"acc/{t}" for t in cfg.task_names} <= set(merge.metrics) and set(merge.test_correct) == set(cfg.task_names)


def test_tune_command_on_an_untuned_row_names_only_the_tuned_rows_of_that_method(sweep_dict, tmp_path):
    """The refusal's hint names the tuned rows of the row's own method, not every tuned row."""
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic"},
                                  {"name": "ties", "label": "ties_tuned", "tune": tune_block()},
                                  {"name": "task_arithmetic", "label": "ta_tuned", "tune": tune_block()}])
    r, f = cli_on_sweep(tmp_path, d, "tune", "--method", "task_arithmetic")
    assert r.exit_code == 2
    assert r.stderr == (f"error: {f}: methods.0.tune: method 'task_arithmetic' has no tune block "
                        "(tuned task_arithmetic rows: 'ta_tuned')\n"), r.stderr
    assert not (tmp_path / "out").exists()


def study_of(values: list[tuple[dict[str, float], float]]):
    """An in-memory maximised study holding one completed trial per (params, objective)."""
    import optuna
    from optuna.distributions import FloatDistribution

    study = optuna.create_study(direction="maximize")
    for params, value in values:
        dists = {name: FloatDistribution(0.0, 1.0) for name in params}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))
    return study


@pytest.mark.parametrize("names", [["a"], ["a", "b"], ["a", "b", "c"]])
def test_study_plots_are_the_history_importances_and_contour_of_its_trials(names, tmp_path, monkeypatch):
    """Optuna's optimization-history, importance and contour plots (README), one PNG each in the
    folder given (made when new): the history marks each trial's objective and draws the best so
    far, the importances name the tuned parameters, the contour plots one parameter against
    another; a study of one parameter has nothing to contour. No figure is left open."""
    import matplotlib.figure
    import matplotlib.pyplot as plt

    from harness.tuning import save_study_plots

    objectives = [10.0, 30.0, 20.0, 25.0, 15.0]
    points = [0.1, 0.5, 0.9, 0.3, 0.7]
    study = study_of([({n: (p + 0.17 * i) % 1.0 for i, n in enumerate(names)}, v)
                      for p, v in zip(points, objectives)])
    drawn: dict[str, list] = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def seen(fig, path, *args, **kwargs):
        drawn[Path(path).name] = fig.axes
        return real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", seen)
    plt.close("all")
    folder = tmp_path / "optuna" / "tuned"
    files = save_study_plots(study, folder)
    want = ["optimization_history.png", "param_importances.png", *(["contour.png"] if len(names) >= 2 else [])]
    assert [f.name for f in files] == want and all(f.parent == folder for f in files)
    assert all(f.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for f in files)
    assert plt.get_fignums() == []
    history = drawn["optimization_history.png"][0]
    assert history.get_title() == "Optimization History Plot" and history.get_xlabel() == "Trial"
    marks = [xy for c in history.collections for xy in c.get_offsets().tolist()]
    assert marks == [[float(i), v] for i, v in enumerate(objectives)]
    assert [line.get_ydata().tolist() for line in history.lines] == [[10.0, 30.0, 30.0, 30.0, 30.0]]
    importances = drawn["param_importances.png"][0]
    assert sorted(t.get_text() for t in importances.get_yticklabels()) == names
    if len(names) >= 2:
        contour = drawn["contour.png"]
        pairs = {(ax.get_xlabel(), ax.get_ylabel()) for ax in contour if ax.get_xlabel()}
        assert ("a", "b") in pairs and pairs <= {(x, y) for x in names for y in names}
        assert contour[-1].get_ylabel() == "Objective Value"  # the colour bar


@pytest.mark.parametrize("error", [ValueError, RuntimeError, ZeroDivisionError])
def test_a_study_plot_optuna_cannot_draw_is_left_out_and_the_next_ones_drawn(error, tmp_path, monkeypatch):
    """A plot Optuna refuses (too few trials for its importance evaluator) costs that plot only:
    the history before it and the contour after it are still drawn."""
    from optuna.visualization import matplotlib as ovm

    from harness.tuning import save_study_plots

    def refuses(study):
        raise error("too few trials")

    monkeypatch.setattr(ovm, "plot_param_importances", refuses)
    study = study_of([({"a": a, "b": 1.0 - a}, 10.0 * a) for a in (0.1, 0.4, 0.8)])
    assert [f.name for f in save_study_plots(study, tmp_path)] == ["optimization_history.png", "contour.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["contour.png", "optimization_history.png"]
