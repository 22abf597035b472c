"""The command line: list, validate / dry run, sweep output, and the MLflow UI server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from harness.cli import main
from tests.conftest import free_port, make_sweep_dict, stop_process_group


def test_list_methods_shows_hyperparameters():
    r = CliRunner().invoke(main, ["list", "methods"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "task_arithmetic" in r.output and "weight_averaging" in r.output
    line = next(line for line in r.output.splitlines() if "scaling" in line and "float" in line)
    assert "0.3" in line  # the default


def test_list_methods_shows_a_default_to_give_or_from_a_factory(tmp_path, monkeypatch):
    """A hyperparameter without a default reads '(required)' and a default_factory's value is
    shown, not pydantic's PydanticUndefined for both."""
    (tmp_path / "no_defaults.py").write_text(
        "from pydantic import Field\n"
        "from methods import MergeMethod\n\n\n"
        "class Needs(MergeMethod):\n"
        "    strength: float = Field(ge=0.0)\n"
        "    layers: list[int] = Field(default_factory=lambda: [3, 5])\n\n"
        "    def merge(self, pretrained, finetuned, ctx):\n"
        "        return pretrained\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = CliRunner().invoke(main, ["list", "methods", "no_defaults:Needs"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "PydanticUndefined" not in r.output, r.output
    strength = next(line for line in r.output.splitlines() if "strength" in line)
    layers = next(line for line in r.output.splitlines() if "layers" in line)
    assert "(required)" in strength and "[3, 5]" in layers, r.output


MY_METHODS = """
from typing import Literal

from pydantic import Field

from methods import MergeMethod
from methods.ties import TiesMerging  # imported, not defined here: not one of this module's methods


class Blend(MergeMethod):
    alpha: float = Field(0.25, ge=0.0, le=1.0, description="share of the mean task vector")
    mode: Literal["sum", "mean"] = "mean"

    def merge(self, pretrained, finetuned, ctx):
        return pretrained


class Base(MergeMethod):
    steps: int = 3  # no merge(): not a method a sweep can run


class Plain(Base):
    def merge(self, pretrained, finetuned, ctx):
        return pretrained
"""


def _rows(output: str) -> dict[str, list[list[str]]]:
    """The methods table's rows by method, each row's cells (continuation rows under their method)."""
    rows: dict[str, list[list[str]]] = {}
    method = None
    for line in output.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip()[1:-1].split("│")]
        if len(cells) == 6:
            method = cells[0] or method
            rows.setdefault(method, []).append(cells[1:])
    return rows


def test_list_methods_of_ones_own(tmp_path, monkeypatch):
    """A module's method classes (those it defines, with merge()), a class by import path, and
    a sweep file's methods, with their hyperparameters as for the built-in ones."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_methods.py").write_text(MY_METHODS)
    r = CliRunner().invoke(main, ["list", "methods", "my_methods"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert _rows(r.output) == {
        "my_methods:Blend": [["alpha", "float", "0.25", "[0.0, 1.0]", "share of the mean task vector"],
                             ["mode", "sum|mean", "'mean'", "", ""]],
        "my_methods:Plain": [["steps", "int", "3", "", ""]],
    }
    r = CliRunner().invoke(main, ["list", "methods", "my_methods:Base", "weight_averaging"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert _rows(r.output) == {"my_methods:Base": [["steps", "int", "3", "", ""]],
                               "weight_averaging": [["-", "", "", "", "no hyperparameters"]]}

    sweep = tmp_path / "s.yaml"  # a wrong hyperparameter does not hide the list that shows the right ones
    sweep.write_text(yaml.safe_dump({"name": "s", "methods": [
        "weight_averaging", {"name": "my_methods:Blend", "params": {"alpah": 2}}]}))
    r = CliRunner().invoke(main, ["list", "methods", "--sweep", str(sweep)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert list(_rows(r.output)) == ["weight_averaging", "my_methods:Blend"]


def test_list_methods_names_what_it_cannot_find(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "methods": ["ties", {"name": "nowhere:Gone"}]}))
    r = CliRunner().invoke(main, ["list", "methods", "--sweep", str(sweep)], env={"COLUMNS": "300"})
    assert r.exit_code == 2
    assert r.stderr.strip() == (f"error: {sweep}: methods.1.name: cannot import module 'nowhere' "
                                "(No module named 'nowhere')")
    sweep.write_text(yaml.safe_dump({"name": "s", "methods": ["ties", "nowhere:Gone"]}))  # the name alone is the entry
    r = CliRunner().invoke(main, ["list", "methods", "--sweep", str(sweep)], env={"COLUMNS": "300"})
    assert r.exit_code == 2
    assert r.stderr.strip() == (f"error: {sweep}: methods.1: cannot import module 'nowhere' "
                                "(No module named 'nowhere')")
    r = CliRunner().invoke(main, ["list", "methods", "tiess"], env={"COLUMNS": "300"})
    assert r.exit_code == 2
    assert r.stderr.strip().startswith("error: harness list methods: NAMES: 'tiess' is neither a method")
    assert r.stderr.strip().endswith("; did you mean 'ties'?")
    r = CliRunner().invoke(main, ["list", "tasks", "ties"])
    assert r.exit_code == 2 and "`harness list tasks` takes neither" in r.output


def test_list_methods_names_every_method_it_cannot_find_at_once(tmp_path):
    """Two unknown methods in the sweep and one among NAMES: the first alone was told, one fix
    per run; each is a line of one error, as ``validate`` tells a sweep's."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "methods": ["tie", "ties", {"name": "nowhere:Gone"}]}))
    r = CliRunner().invoke(main, ["list", "methods", "--sweep", str(sweep), "tiess"], env={"COLUMNS": "300"})
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert [line.removeprefix("error: ").split(": ")[:2] for line in lines] == [
        [str(sweep), "methods.0"], [str(sweep), "methods.2.name"], ["harness list methods", "NAMES"]], lines
    assert lines[0].endswith("; did you mean 'ties'?") and lines[2].endswith("; did you mean 'ties'?")


def test_list_tasks_and_models():
    r = CliRunner().invoke(main, ["list", "tasks"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "toy_stripes" in r.output
    r = CliRunner().invoke(main, ["list", "models"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "ViT-B-32" in r.output and "harness-tiny-vit" in r.output


def test_validate_and_dry_run_print_plan_and_run_nothing(sweep_dict, tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    for args in (["validate", str(f)], ["sweep", "--dry-run", str(f), "methods.1.grid.scaling=[0.1,0.2,0.3]"]):
        r = CliRunner().invoke(main, args, env={"COLUMNS": "200"})
        assert r.exit_code == 0, r.output
        assert "job plan:" in r.output
        assert "arch: harness-micro-vit" in r.output
    assert "job plan: 7 jobs" in r.output  # pretrained + 2 individual + WA + 3 TA settings
    assert "after its grid" not in r.output  # no robustness block: no follow-up
    assert not Path(sweep_dict["output_dir"]).exists()
    f.write_text(yaml.safe_dump(dict(sweep_dict, robustness={"tasks": ["toy_stripes"], "corruptions": ["contrast"]})))
    r = CliRunner().invoke(main, ["sweep", "--dry-run", str(f)], env={"COLUMNS": "200"})
    follow = [line for line in r.output.splitlines() if "after its grid" in line]
    assert len(follow) == 1 and "task_arithmetic" in follow[0]  # the grid method, not weight averaging


def test_an_output_folder_with_brackets_is_printed_as_it_is_named(sweep_dict, tmp_path):
    """``exp[lr]`` is a folder name, not rich markup to drop."""
    out = tmp_path / "exp[lr]"
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(dict(sweep_dict, output_dir=str(out), methods=[{"name": "task_arithmetic"}])))
    r = CliRunner().invoke(main, ["validate", str(f)], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    assert f"outputs: {out}\ntracking: sqlite:///{out}/mlflow.db" in r.output
    r = CliRunner().invoke(main, ["sweep", str(f)], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    assert f"-> {out}\n" in r.output


def test_sweep_command_prints_table(sweep_dict, tmp_path):
    f = tmp_path / "s.yaml"
    sweep_dict["methods"] = [{"name": "task_arithmetic"}]
    f.write_text(yaml.safe_dump(sweep_dict))
    r = CliRunner().invoke(main, ["sweep", "-q", str(f)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for word in ("pretrained", "individual", "task_arithmetic", "norm avg", "toy_colours"):
        assert word in r.stdout


def test_labels_print_as_written_not_as_emoji(sweep_dict, tmp_path):
    """Labels may hold colons: ``pkg:Boom:`` is a method's name, not rich's ``:boom:`` emoji code."""
    f = tmp_path / "s.yaml"
    sweep_dict["methods"] = [{"name": "tests.failing_method:AlwaysFails", "label": "raiser:boom:"},
                             {"name": "task_arithmetic", "label": "ta:fire:"}]
    f.write_text(yaml.safe_dump(sweep_dict))
    r = CliRunner().invoke(main, ["sweep", str(f)], env={"COLUMNS": "200"})
    assert r.exit_code == 1, r.output
    rows = [line for line in r.output.splitlines() if "ta:fire" in line]
    assert rows and all("ta:fire:" in line for line in rows), r.output  # the table row and the done line
    failed = [line for line in r.output.splitlines() if "deliberate failure" in line]
    assert failed and all("raiser:boom:" in line for line in failed), r.output
    assert "\N{FIRE}" not in r.output and "\N{COLLISION SYMBOL}" not in r.output


def swept_file(sweep_dict, tmp_path) -> Path:
    """``tmp_path/s.yaml``: the sweep with task arithmetic as its one method, run once."""
    f = tmp_path / "s.yaml"
    sweep_dict["methods"] = [{"name": "task_arithmetic"}]
    f.write_text(yaml.safe_dump(sweep_dict))
    assert CliRunner().invoke(main, ["sweep", "-q", str(f)]).exit_code == 0
    return f


def test_report_takes_the_sweep_file(sweep_dict, tmp_path):
    """``harness report FILE`` reports the file's output folder, as ``harness ui FILE`` serves it."""
    f = tmp_path / "s.yaml"
    sweep_dict["methods"] = [{"name": "task_arithmetic"}]
    f.write_text(yaml.safe_dump(sweep_dict))
    r = CliRunner().invoke(main, ["report", str(f)])
    assert r.exit_code == 2
    assert " ".join(r.stderr.split()) == (f"error: {f}: its output folder {sweep_dict['output_dir']} does not "
                                          "exist (the sweep has not run there)")
    assert CliRunner().invoke(main, ["sweep", "-q", str(f)]).exit_code == 0
    written = (Path(sweep_dict["output_dir"]) / "report" / "main.md").read_text()
    r = CliRunner().invoke(main, ["report", str(f), "--out", str(tmp_path / "again")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again" / "main.md").read_text() == written


def test_report_of_a_sweep_file_edited_since_reports_the_sweep_that_ran(sweep_dict, tmp_path):
    """``harness report FILE`` reports the sweep its output folder's ``resolved.yaml`` records, not
    the file as it reads now: a file renamed and given another method since still reports the
    tables that sweep wrote."""
    f = swept_file(sweep_dict, tmp_path)
    written = (Path(sweep_dict["output_dir"]) / "report" / "main.md").read_text()
    f.write_text(yaml.safe_dump(dict(sweep_dict, name="renamed", methods=[{"name": "weight_averaging"}])))
    r = CliRunner().invoke(main, ["report", str(f), "--out", str(tmp_path / "again")])
    assert r.exit_code == 0, r.output + r.stderr
    assert (tmp_path / "again" / "main.md").read_text() == written
    assert "task_arithmetic" in written and "weight_averaging" not in written


def test_report_looks_each_run_up_once_however_many_jobs(sweep_dict, tmp_path, monkeypatch):
    """``harness report`` reads each job's files from the artifact location its run search
    returned: MLflow's client looked the run up again for every listing and download (a second
    a dozen jobs, a minute for a grid of 1000). The tables, the significance one built from the
    per-image files included, are those the sweep wrote."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    lookups = {}
    real = SqlAlchemyStore.get_run

    def counted(self, run_id):
        lookups[grid] = lookups.get(grid, 0) + 1
        return real(self, run_id)

    monkeypatch.setattr(SqlAlchemyStore, "get_run", counted)
    for grid in (2, 6):
        d = dict(sweep_dict, output_dir=str(tmp_path / f"out{grid}"),
                 methods=[{"name": "task_arithmetic", "grid": {"scaling": [0.1 * (i + 1) for i in range(grid)]}}])
        f = tmp_path / f"s{grid}.yaml"
        f.write_text(yaml.safe_dump(d))
        assert CliRunner().invoke(main, ["sweep", "-q", str(f)]).exit_code == 0
        lookups[grid] = 0
        r = CliRunner().invoke(main, ["report", d["output_dir"], "--out", str(tmp_path / f"rep{grid}")])
        assert r.exit_code == 0, r.output
        for name in ("main.csv", "significance.csv"):
            written = (Path(d["output_dir"]) / "report" / name).read_text()
            assert (tmp_path / f"rep{grid}" / name).read_text() == written, name
    assert lookups[6] == lookups[2], lookups


def _ui_experiment(target: str, env: dict[str, str], name: str = "toy") -> dict:
    """``harness ui TARGET`` started as a user starts it: the experiment ``name`` its server
    returns (the server, with its own workers, stopped after)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "ui", target, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}"
        deadline, body = time.time() + 90, None
        while time.time() < deadline and proc.poll() is None and body is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    body = json.loads(resp.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "server not ready"
        return body
    finally:
        stop_process_group(proc)


def test_ui_serves_the_sweep_store(sweep_dict, tmp_path):
    from harness.config import validate_config
    from harness.runner import run_sweep

    sweep_dict["methods"] = []
    cfg = validate_config(sweep_dict)
    run_sweep(cfg, quiet=True)
    assert _ui_experiment(str(cfg.resolved_output_dir()), dict(os.environ))["experiment"]["name"] == "toy"


def test_ctrl_c_in_a_command_that_keeps_nothing_does_not_promise_a_resume(tmp_path, monkeypatch):
    import harness.report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.report, "load_sweep_from_mlflow", interrupted)
    (tmp_path / "mlflow.db").write_bytes(b"")
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code == 130 and r.stderr == "interrupted\n", r.stderr


@pytest.mark.parametrize("command", ["sweep", "collect"])
def test_ctrl_c_in_a_command_a_rerun_resumes_says_what_it_kept(command, sweep_dict, tmp_path, monkeypatch):
    """sweep and collect record each finished job as it ends, so a rerun goes on from there: the
    interrupted line says so, exit code 130 as a shell reports SIGINT."""
    import harness.runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.runner, "run_sweep", interrupted)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    r = CliRunner().invoke(main, [command, "-q", str(f)])
    assert r.exit_code == 130
    assert r.stderr == "interrupted: finished jobs are saved; rerun the same command to resume\n", r.stderr


def test_collect_names_a_missing_checkpoint_in_the_sweep_file_before_waiting(micro_checkpoints, tmp_path, monkeypatch):
    """collect plans the sweep's jobs, whose keys hash the model files: a checkpoint gone since the
    submission is one line naming the sweep file and field, before any job is waited on."""
    import shutil

    import harness.runner

    def waits(*args, **kwargs):
        raise AssertionError("collect waited on jobs")

    monkeypatch.setattr(harness.runner, "run_sweep", waits)
    for name in ("pretrained", "toy_stripes"):
        shutil.copy(micro_checkpoints / f"{name}.safetensors", tmp_path / f"{name}.safetensors")
    d = make_sweep_dict(tmp_path, tmp_path)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["collect", str(f)])
    missing = tmp_path / "toy_colours.safetensors"
    assert r.exit_code == 2
    assert " ".join(r.stderr.split()) == (f"error: {f}: model.finetuned_pattern: checkpoint of task 'toy_colours' "
                                          f"does not exist (got '{missing}')"), r.stderr


def test_ui_refuses_a_port_out_of_range(tmp_path, monkeypatch):
    (tmp_path / "mlflow.db").write_bytes(b"")

    def no_server(*args):
        raise AssertionError("the server was started")

    monkeypatch.setattr(os, "execve", no_server)
    for port in ("99999", "0"):
        r = CliRunner().invoke(main, ["ui", str(tmp_path), "--port", port])
        assert r.exit_code == 2, r.output
        assert "--port" in r.output and "1<=x<=65535" in r.output and "Traceback" not in r.output


def _dry_run(f: Path, *overrides: str) -> tuple[str, dict[str, str]]:
    """The dry run's summary line and each job's status by its row (kind, method, task, params)."""
    r = CliRunner().invoke(main, ["sweep", "--dry-run", str(f), *overrides], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    summary = next(line for line in r.output.splitlines() if " jobs: " in line)
    rows = {}
    for line in r.output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 6 and cells[0].isdigit():
            rows[" ".join(cells[1:5]).strip()] = cells[5]
    return summary, rows


def test_dry_run_shows_which_jobs_are_cached(sweep_dict, tmp_path, monkeypatch):
    """Cached means what the sweep itself decides: a finished result of the job's key (a failed
    one runs again); found from the result store alone, no model built or loaded."""
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    summary, rows = _dry_run(f)
    assert summary == "6 jobs: 0 cached, 6 to run" and set(rows.values()) == {"to run"}
    assert not Path(sweep_dict["output_dir"]).exists()
    assert CliRunner().invoke(main, ["sweep", "-q", str(f)]).exit_code == 0
    results = Path(sweep_dict["output_dir"]) / "results"
    failed = next(p for p in results.glob("*.json") if json.loads(p.read_text())["label"] == "weight_averaging")
    failed.write_text(json.dumps({**json.loads(failed.read_text()), "status": "failed", "error": "boom"}))

    import harness.workspace

    def no_model(*args, **kwargs):
        raise AssertionError("a dry run loads no model")

    monkeypatch.setattr(harness.workspace, "build_clip", no_model)
    monkeypatch.setattr(harness.workspace, "load_state_dict", no_model)
    summary, rows = _dry_run(f, "methods.1.grid.scaling=[0.2, 0.6, 0.4]")
    assert summary == "7 jobs: 5 cached, 2 to run"
    assert rows["merge weight_averaging all"] == "to run"  # failed: the sweep retries it
    assert rows["merge task_arithmetic all scaling=0.4"] == "to run"
    assert rows["merge task_arithmetic all scaling=0.2"] == rows["pretrained pretrained all"] == "cached"
    monkeypatch.undo()
    r = CliRunner().invoke(main, ["sweep", str(f), "methods.1.grid.scaling=[0.2, 0.6, 0.4]"])
    assert r.exit_code == 0 and "7 jobs, 5 cached, 2 to run" in r.output  # the run agrees


def test_dry_run_counts_a_setting_two_labels_share_once_as_the_sweep_runs_it(sweep_dict, tmp_path):
    """Keys hold no label: ``tb``'s scaling 0.6 is ``task_arithmetic``'s job, listed under both
    rows (the second pointing at the first) and counted, and run, once."""
    d = dict(sweep_dict, methods=[*sweep_dict["methods"],
                                  {"name": "task_arithmetic", "label": "tb", "grid": {"scaling": [0.6, 1.0]}}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", "--dry-run", str(f)], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    numbers = {" ".join(c.strip() for c in line.split("│")[2:6]).strip(): line.split("│")[1].strip()
               for line in r.output.splitlines() if line.count("│") >= 7}
    shared = numbers["merge tb all scaling=0.6"]
    assert shared == f"= {numbers['merge task_arithmetic all scaling=0.6']}"
    assert numbers["merge tb all scaling=1.0"].isdigit()
    summary = next(line for line in r.output.splitlines() if " jobs: " in line)
    assert summary == "7 jobs: 0 cached, 7 to run"  # pretrained, 2 individual, WA, TA 0.2 / 0.6, tb 1.0
    r = CliRunner().invoke(main, ["sweep", str(f)])
    assert r.exit_code == 0 and "7 jobs, 0 cached, 7 to run" in r.output  # the run agrees
    summary, _ = _dry_run(f)
    assert summary == "7 jobs: 7 cached, 0 to run"  # the shared job is one cached job, not two


def _embedded_sweep_file(tmp_path: Path, cache_dir: Path, tasks: list[str]) -> Path:
    """``tmp_path/e.yaml``: weight averaging over ``tasks`` of the tiny embedded suite, its models
    cached in ``cache_dir`` and its outputs in ``tmp_path/out``."""
    f = tmp_path / "e.yaml"
    f.write_text(yaml.safe_dump({"name": "e", "output_dir": str(tmp_path / "out"), "cache_dir": str(cache_dir),
                                 "model": {"source": "embedded", "suite": {"size": "tiny"}},
                                 "tasks": tasks, "methods": ["weight_averaging"]}))
    return f


def _recorded_suite_builds(monkeypatch) -> list[dict]:
    """Each call the embedded suite's build gets, as ``{"names", "cache_dir", **options}`` (nothing
    is built: it answers with the paths it would have written)."""
    from types import SimpleNamespace

    import tasks.embedded.pipeline

    asked: list[dict] = []

    def builds(names, cache_dir, **kwargs):
        asked.append({"names": list(names), "cache_dir": Path(cache_dir), **kwargs})
        return SimpleNamespace(arch="a", pretrained="p", finetuned={n: str(cache_dir / f"{n}.pt") for n in names})

    monkeypatch.setattr(tasks.embedded.pipeline, "prepare_suite", builds)
    return asked


def test_dry_run_of_an_unprepared_embedded_suite_builds_nothing(tmp_path):
    """Job keys name the embedded suite's models: before they are built, the dry run says the
    cached jobs are not known rather than training them."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    (out / "results").mkdir(parents=True)
    (out / "results" / "0123.json").write_text("{}")
    f = _embedded_sweep_file(tmp_path, cache, ["emb_mnist", "emb_fashion"])
    r = CliRunner().invoke(main, ["sweep", "--dry-run", str(f)], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    assert "4 jobs: which are cached is not known before the models are built (the embedded suite's" in r.output
    assert not cache.exists()  # nothing trained, nothing written


def test_dry_run_shows_the_robustness_study_of_a_grids_chosen_setting(sweep_dict, tmp_path):
    """A grid method's robustness job runs after its grid, for the setting chosen on val: once
    every grid job is cached that setting is known, and the dry run says whether its job is
    cached too (a sweep killed before it, or whose robustness job failed, runs it)."""
    d = dict(sweep_dict, references={"pretrained": False, "individual": False},
             robustness={"tasks": ["toy_stripes"], "corruptions": ["contrast"], "severity": 2},
             methods=[{"name": "task_arithmetic", "grid": {"scaling": [0.2, 0.6]}}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["sweep", "-q", str(f)])
    assert r.exit_code == 0, r.output
    results = Path(d["output_dir"]) / "results"
    stored = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    [rob] = [x for x in stored if x["kind"] == "robustness"]
    chosen = max((x for x in stored if x["kind"] == "merge"), key=lambda x: x["metrics"]["val/acc/avg"])
    assert rob["params"] == chosen["params"]
    summary, rows = _dry_run(f)
    assert summary == "2 jobs: 2 cached, 0 to run; then 1 robustness job (settings chosen on val): 1 cached, 0 to run"
    r = CliRunner().invoke(main, ["sweep", "--dry-run", str(f)], env={"COLUMNS": "250"})
    shown = [[c.strip() for c in line.split("│")[1:-1]] for line in r.output.splitlines() if "│ robustness " in line]
    assert shown == [["-", "robustness", "task_arithmetic", "toy_stripes", f"scaling={chosen['params']['scaling']}",
                      "cached"]]  # its known setting's row, not also the row saying one will be chosen
    (results / f"{rob['key']}.json").unlink()
    summary, _ = _dry_run(f)
    assert summary == "2 jobs: 2 cached, 0 to run; then 1 robustness job (settings chosen on val): 0 cached, 1 to run"
    r = CliRunner().invoke(main, ["sweep", str(f)])
    assert r.exit_code == 0 and (results / f"{rob['key']}.json").is_file(), r.output  # the run agrees: it ran it
    summary, _ = _dry_run(f, "methods.0.grid.scaling=[0.2, 0.6, 0.4]")
    assert summary == "3 jobs: 2 cached, 1 to run"  # the chosen setting is not known before scaling=0.4 runs


def test_report_of_a_folder_is_its_own_sweep_when_a_store_is_shared(sweep_dict, tmp_path):
    """Two sweeps log to one store: the first to its folder's own mlflow.db, the second (run
    after it, another name and tasks) to that same file through ``tracking_uri``. ``harness
    report`` on either folder (or on either sweep file) rebuilds that sweep's tables, as its
    sweep wrote them, not those of the sweep that ran last in the store; the second folder, which
    holds no mlflow.db, is reported from the store its sweep logged to."""
    first = dict(sweep_dict, name="first", output_dir=str(tmp_path / "a"))
    store = f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    second = dict(sweep_dict, name="second", output_dir=str(tmp_path / "b"), tracking_uri=store,
                  tasks=sweep_dict["tasks"][:1], methods=[{"name": "task_arithmetic"}])
    files = []
    for n, d in enumerate((first, second)):
        f = tmp_path / f"s{n}.yaml"
        f.write_text(yaml.safe_dump(d))
        files.append(f)
        r = CliRunner().invoke(main, ["sweep", "-q", str(f)])
        assert r.exit_code == 0, r.output
    written = {d["name"]: (Path(d["output_dir"]) / "report" / "main.csv").read_text() for d in (first, second)}
    assert written["first"] != written["second"]
    assert not (tmp_path / "b" / "mlflow.db").exists()
    from harness.cli import _store

    assert _store(second["output_dir"]) == (store, str(tmp_path / "b" / "mlartifacts"))  # harness ui FOLDER
    for d, f in zip((first, second), files):
        for n, target in enumerate((d["output_dir"], str(f))):
            out = tmp_path / f"{d['name']}-{n}"
            r = CliRunner().invoke(main, ["report", target, "--out", str(out)], env={"COLUMNS": "200"})
            assert r.exit_code == 0, r.output
            assert (out / "main.csv").read_text() == written[d["name"]], (d["name"], target)


def test_report_of_a_store_whose_artifacts_are_gone_is_one_line(sweep_dict, tmp_path):
    """A store whose artifact folder was deleted (or lies elsewhere): ``harness report`` says
    which run's artifact it could not read and where, as a one-line error, not a traceback."""
    import shutil

    swept_file(sweep_dict, tmp_path)
    shutil.rmtree(Path(sweep_dict["output_dir"]) / "mlartifacts")
    r = CliRunner().invoke(main, ["report", sweep_dict["output_dir"], "--out", str(tmp_path / "rep")])
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert "cannot read its artifact 'resolved.yaml'" in r.stderr and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1


def test_report_and_ui_of_a_copied_folder_whose_original_is_gone(sweep_dict, tmp_path):
    """An output folder copied whole (to a laptop) and reported there, with the original gone and
    no sweep run in the copy yet: MLflow's absolute artifact paths lead into the original, so the
    copy's store is pointed at its own artifacts first. The copy reports the original's tables."""
    import shutil

    from harness.cli import _store

    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    assert CliRunner().invoke(main, ["sweep", "-q", str(f)]).exit_code == 0
    out = Path(sweep_dict["output_dir"])
    written = (out / "report" / "main.csv").read_text()
    copy = tmp_path / "laptop" / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(out)
    r = CliRunner().invoke(main, ["report", str(copy), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "main.csv").read_text() == written
    assert _store(str(copy)) == (f"sqlite:///{copy.resolve() / 'mlflow.db'}", str(copy.resolve() / "mlartifacts"))


def test_report_status_and_ui_of_a_sweep_file_whose_input_variables_are_unset(sweep_dict, micro_checkpoints,
                                                                             tmp_path, monkeypatch):
    """``harness report``, ``ui`` and ``status`` with the sweep file read only its results: a sweep
    whose checkpoint and data paths go through ``${VAR}``s (as the paper sweeps' ``${CKPT}`` and
    ``${DATA}``) still reports where those variables are unset (a laptop), with the tables the
    sweep wrote; the commands that run or plan jobs still say the variable is not set."""
    from harness.cli import _store

    monkeypatch.setenv("HARNESS_TEST_CKPT", str(micro_checkpoints))
    monkeypatch.setenv("HARNESS_TEST_DATA", str(tmp_path))
    sweep_dict["model"]["pretrained"] = "${HARNESS_TEST_CKPT}/pretrained.safetensors"
    sweep_dict["model"]["finetuned_pattern"] = "${HARNESS_TEST_CKPT}/{task}.safetensors"
    sweep_dict["data_root"] = "${HARNESS_TEST_DATA}"
    sweep_dict["executor"] = {"kind": "local", "partition": "${HARNESS_TEST_PARTITION}"}
    monkeypatch.setenv("HARNESS_TEST_PARTITION", "gpu")
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    assert CliRunner().invoke(main, ["sweep", "-q", str(f)]).exit_code == 0
    out = Path(sweep_dict["output_dir"])
    written = (out / "report" / "main.csv").read_text()
    for name in ("HARNESS_TEST_CKPT", "HARNESS_TEST_DATA", "HARNESS_TEST_PARTITION"):
        monkeypatch.delenv(name)
    r = CliRunner().invoke(main, ["report", str(f), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "main.csv").read_text() == written
    assert _store(str(f)) == (f"sqlite:///{out.resolve() / 'mlflow.db'}", str(out.resolve() / "mlartifacts"))
    r = CliRunner().invoke(main, ["status", str(f)])
    assert r.exit_code == 2
    assert "no SLURM submissions recorded" in r.stderr and "not set" not in r.stderr, r.stderr
    for command in (["validate", str(f)], ["sweep", "--dry-run", str(f)],
                    ["export", str(f), "--method", "task_arithmetic", "--out", str(tmp_path / "m.safetensors")]):
        r = CliRunner().invoke(main, command)
        assert r.exit_code == 2, (command, r.output)
        assert r.stderr.startswith(f"error: {f}: "), (command, r.stderr)
        lines = [line.removeprefix("error: ").split(" (got ")[0] for line in r.stderr.strip().splitlines()]
        assert lines == [f"{f}: {field}: environment variable {name} is not set" for field, name in (  # each at once
            ("data_root", "HARNESS_TEST_DATA"), ("model.pretrained", "HARNESS_TEST_CKPT"),
            ("model.finetuned_pattern", "HARNESS_TEST_CKPT"), ("executor.partition", "HARNESS_TEST_PARTITION"))], (
            command, r.stderr)


def test_a_report_folder_that_is_a_file_is_one_line_before_any_work(tmp_path, monkeypatch):
    """report writes into the output folder's report/, a folder: a file standing at that very
    path is named, untouched, before the store is read."""
    import harness.report

    def reads(*args, **kwargs):
        raise AssertionError("the store was read")

    monkeypatch.setattr(harness.report, "load_sweep_from_mlflow", reads)
    blocker = tmp_path / "report"
    blocker.write_text("keep me")
    (tmp_path / "mlflow.db").write_bytes(b"")
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code == 2, r.output
    assert " ".join(r.stderr.split()) == f"error: report folder {blocker}: {blocker} is a file, not a folder"
    assert blocker.read_text() == "keep me"


def test_tracking_uri_with_a_folder_or_sweep_file_is_refused_before_any_work(tmp_path, monkeypatch):
    """--tracking-uri names the store of a run id: given with an output folder (or sweep file) it
    was ignored without a word, the folder's own store read instead of the one given."""
    import harness.report

    def reads(*args, **kwargs):
        raise AssertionError("the store was read")

    monkeypatch.setattr(harness.report, "load_sweep_from_mlflow", reads)
    (tmp_path / "mlflow.db").write_bytes(b"")
    (tmp_path / "s.yaml").write_text("name: s\n")
    for target, kind in ((tmp_path, "output folder"), (tmp_path / "s.yaml", "file")):
        r = CliRunner().invoke(main, ["report", str(target), "--tracking-uri", "sqlite:///elsewhere.db"])
        assert r.exit_code == 2, r.output
        assert " ".join(r.stderr.split()) == (f"error: --tracking-uri sqlite:///elsewhere.db: for a run id only; "
                                              f"{target} is a sweep {kind}, reported from the store its sweep "
                                              "logged to")


def test_report_of_a_run_id_writes_beside_the_caller_under_its_first_eight_characters(tmp_path, monkeypatch):
    """Without --out, a run id's report goes to ./report-<the id's first 8 characters>, as the
    tables' titles shorten it."""
    from types import SimpleNamespace

    import harness.report

    written = []

    def build(cfg, results, out, *args, **kwargs):
        written.append(out)
        raise KeyboardInterrupt

    parent = SimpleNamespace(info=SimpleNamespace(run_id="0123456789abcdef0123456789abcdef"))
    monkeypatch.setattr(harness.report, "load_sweep_from_mlflow", lambda *a: (None, [], parent))
    monkeypatch.setattr(harness.report, "row_routings", lambda *a: {})
    monkeypatch.setattr(harness.report, "load_study_counts", lambda *a: {})
    monkeypatch.setattr(harness.report, "build_report", build)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["report", "0123456789abcdef", "--tracking-uri", "http://127.0.0.1:9"])
    assert r.exit_code == 130, r.output
    assert written == [Path("report-01234567")]


def test_report_from_a_refused_tracking_server_is_one_line_at_once(refused_tracking_port):
    """MLflow's client retries a refused connection with backoff (by default seven times, about
    four minutes, a warning line each): the address is checked first, without retries."""
    port = refused_tracking_port
    t0 = time.monotonic()
    r = CliRunner().invoke(main, ["report", "0123456789abcdef", "--tracking-uri", f"http://127.0.0.1:{port}"])
    assert time.monotonic() - t0 < 10
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2, r.output
    assert err.startswith(f"error: tracking_uri 'http://127.0.0.1:{port}': MLflow cannot be reached ("), err
    assert "Connection refused" in err and "Retrying" not in err, err


def test_prepare_of_a_sweep_on_model_files_is_refused_building_nothing(sweep_dict, tmp_path, monkeypatch):
    """prepare builds the embedded suite: a sweep whose models are files of one's own has nothing
    for it to build, said in one line naming the source."""
    import tasks.embedded.pipeline

    def builds(*args, **kwargs):
        raise AssertionError("prepare built a suite")

    monkeypatch.setattr(tasks.embedded.pipeline, "prepare_suite", builds)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    r = CliRunner().invoke(main, ["prepare", str(f)])
    assert r.exit_code == 2
    assert r.stderr == f"error: {f}: model.source is 'files'; prepare builds the embedded suite only\n", r.stderr


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://mlflow.example.org"])
def test_ui_of_a_tracking_server_says_to_open_it_rather_than_serving_it(uri, monkeypatch):
    """A tracking server (http or https) serves its own UI: ui says so instead of starting
    another server on top of it."""
    def serves(*args):
        raise AssertionError("ui started a server")

    monkeypatch.setattr(os, "execve", serves)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    r = CliRunner().invoke(main, ["ui"])
    assert r.exit_code == 2
    assert r.stderr == f"error: {uri} is a tracking server: open it in a browser\n", r.stderr


def test_ui_of_a_database_store_that_is_down_says_so_rather_than_serving_it(monkeypatch):
    """MLflow's server retried a PostgreSQL store that is down for about 100 s before it failed:
    ui says so in one line at once."""
    def serves(*args):
        raise AssertionError("ui started a server")

    port = free_port()
    uri = f"postgresql+psycopg2://user:pw@127.0.0.1:{port}/mlflow"
    monkeypatch.setattr(os, "execve", serves)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    r = CliRunner().invoke(main, ["ui"])
    assert r.exit_code == 2
    assert r.stderr == (f"error: tracking_uri {uri!r}: MLflow cannot be reached (connection to server at "
                        f"\"127.0.0.1\", port {port} failed: Connection refused)\n"), r.stderr


@pytest.mark.parametrize("command", ["report", "export", "convert", "import"])
def test_a_destination_under_a_file_is_one_line_before_any_work(command, sweep_dict, micro_checkpoints, tmp_path):
    """An --out (or DST) whose folder a file stands in: one line naming both, exit 2, the file untouched."""
    blocker = tmp_path / "results.txt"
    blocker.write_text("keep me")
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    src = str(micro_checkpoints / "toy_stripes.safetensors")
    dst = str(blocker / "sub" / "m.safetensors")
    args = {"report": ["report", str(tmp_path), "--out", dst],
            "export": ["export", str(f), "--method", "task_arithmetic", "--out", dst],
            "convert": ["convert", src, dst], "import": ["import", src, dst]}[command]
    r = CliRunner().invoke(main, args)
    option = "DST" if command in ("convert", "import") else "--out"
    assert r.exit_code == 2, r.output
    assert " ".join(r.stderr.split()) == f"error: {option} {dst}: {blocker} is a file, not a folder"
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("command", ["convert", "import"])
def test_a_destination_ending_in_a_slash_is_a_folder_to_make(command, micro_checkpoints, tmp_path):
    """``harness convert x.pt ckpt/`` writes ``ckpt/x.safetensors`` (not a file named ``ckpt``)."""
    from safetensors.torch import load_file

    src = micro_checkpoints / "toy_stripes.safetensors"
    dst = tmp_path / "ckpt"
    r = CliRunner().invoke(main, [command, str(src), f"{dst}/"])
    assert r.exit_code == 0, r.output
    out = dst / "toy_stripes.safetensors"
    assert dst.is_dir() and sorted(p.name for p in dst.iterdir()) == [out.name, f"{out.name}.json"]
    written, source = load_file(str(out)), load_file(str(src))
    assert written.keys() == source.keys() and all(torch.equal(written[k], source[k]) for k in source)


@pytest.mark.parametrize("command", ["convert", "import"])
def test_an_existing_destination_is_replaced_only_with_overwrite(command, micro_checkpoints, tmp_path):
    """A DST that is an existing checkpoint was silently replaced. Now one holding another
    checkpoint is refused naming it and kept byte for byte; ``--overwrite`` replaces it with the
    conversion (the source's tensors); a DST holding the same conversion is left as it is."""
    from safetensors.torch import load_file

    src, other = micro_checkpoints / "toy_stripes.safetensors", micro_checkpoints / "toy_colours.safetensors"
    dst = tmp_path / "enc.safetensors"
    assert CliRunner().invoke(main, [command, str(other), str(dst)]).exit_code == 0
    before = dst.read_bytes()
    r = CliRunner().invoke(main, [command, str(src), str(dst)])
    assert r.exit_code == 2, r.output
    assert f"{dst}: exists and holds another checkpoint; not replaced (pass --overwrite" in " ".join(r.output.split())
    assert dst.read_bytes() == before
    r = CliRunner().invoke(main, [command, str(src), str(dst), "--overwrite"])
    assert r.exit_code == 0 and r.output == f"wrote {dst}\n", r.output
    written, source = load_file(str(dst)), load_file(str(src))
    assert written.keys() == source.keys() and all(torch.equal(written[k], source[k]) for k in source)
    converted = dst.read_bytes(), Path(f"{dst}.json").read_bytes()
    r = CliRunner().invoke(main, [command, str(src), str(dst)])
    assert r.exit_code == 0 and r.output == f"{dst}: already there with the same content, nothing written\n", r.output
    assert (dst.read_bytes(), Path(f"{dst}.json").read_bytes()) == converted


@pytest.mark.parametrize("command", ["convert", "import"])
def test_a_conversion_whose_sidecar_was_lost_is_not_said_to_write_nothing(command, micro_checkpoints, tmp_path):
    """Rerun over its own output whose ``.json`` sidecar was deleted, a conversion writes the
    sidecar again (the same one) but said "already there with the same content, nothing written"."""
    src, dst = micro_checkpoints / "toy_stripes.safetensors", tmp_path / "enc.safetensors"
    assert CliRunner().invoke(main, [command, str(src), str(dst)]).exit_code == 0
    side = Path(f"{dst}.json")
    converted = dst.read_bytes(), json.loads(side.read_text())
    side.unlink()
    r = CliRunner().invoke(main, [command, str(src), str(dst)])
    assert r.exit_code == 0 and r.output == f"wrote {dst}\n", r.output
    assert (dst.read_bytes(), json.loads(side.read_text())) == converted


@pytest.mark.parametrize("command", ["convert", "import"])
def test_a_replacing_conversion_stopped_before_its_sidecar_gets_its_own_sidecar_when_rerun(command, micro_checkpoints,
                                                                                            tmp_path, monkeypatch):
    """``--overwrite`` stopped between writing the tensors and the sidecar left the replaced
    conversion's sidecar beside the new tensors; a rerun kept it, so the output named the other
    source (and its digest) as its own. The rerun writes the sidecar of what the file holds."""
    import harness.convert

    old, new = micro_checkpoints / "toy_colours.safetensors", micro_checkpoints / "toy_stripes.safetensors"
    dst = tmp_path / "enc.safetensors"
    assert CliRunner().invoke(main, [command, str(old), str(dst)]).exit_code == 0
    with monkeypatch.context() as m:
        m.setattr(harness.convert, "atomic_write_json", lambda *a, **k: (_ for _ in ()).throw(OSError("stopped")))
        assert CliRunner().invoke(main, [command, str(new), str(dst), "--overwrite"]).exit_code != 0
    assert json.loads(Path(f"{dst}.json").read_text())["source"] == str(old.resolve())
    r = CliRunner().invoke(main, [command, str(new), str(dst)])
    assert r.exit_code == 0 and r.output == f"wrote {dst}\n", r.output
    side = json.loads(Path(f"{dst}.json").read_text())
    assert side["source"] == str(new.resolve())
    assert side["source_sha256"] == hashlib.sha256(new.read_bytes()).hexdigest()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("command", ["convert", "import"])
def test_a_folder_where_the_output_file_goes_is_kept_even_with_overwrite(command, overwrite, micro_checkpoints,
                                                                          tmp_path):
    """DST a folder holding a folder named as the output (``out/toy_stripes.safetensors/``): with
    ``--overwrite`` the write ended in a traceback (IsADirectoryError). Both refuse it naming the
    folder, whose files stay as they were, and leave no partial file."""
    src = micro_checkpoints / "toy_stripes.safetensors"
    taken = tmp_path / "out" / "toy_stripes.safetensors"
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("mine")
    r = CliRunner().invoke(main, [command, str(src), str(tmp_path / "out"), *overwrite])
    assert r.exit_code == 2, r.output
    assert " ".join(r.output.split()) == (f"error: {taken}: is a folder, not a checkpoint file to write (move it, "
                                          "or name another destination)"), r.output
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["notes.txt", "toy_stripes.safetensors"]
    assert (taken / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["convert", "import"])
def test_an_empty_destination_is_refused_before_any_work(command, micro_checkpoints, tmp_path, monkeypatch):
    """`harness convert SRC ""` wrote into the current folder, as `export --out ''` is refused not to."""
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, [command, str(micro_checkpoints / "toy_stripes.safetensors"), ""])
    assert r.exit_code == 2 and r.output == ("error: DST '': an empty path; name the safetensors file or the "
                                             "folder to write into ('.' for the current folder)\n"), r.output
    assert list(tmp_path.iterdir()) == []


def test_an_import_into_a_folder_inside_its_source_skips_its_own_outputs_when_run_again(micro_checkpoints, tmp_path):
    """`harness import SRC SRC/conv` run twice converted its own outputs again, into conv/conv/."""
    import shutil

    from safetensors.torch import load_file

    src = tmp_path / "src"
    (src / "A").mkdir(parents=True)
    shutil.copy(micro_checkpoints / "toy_stripes.safetensors", src / "A" / "finetuned.safetensors")
    shutil.copy(micro_checkpoints / "toy_colours.safetensors", src / "b.safetensors")
    runs = [CliRunner().invoke(main, ["import", str(src), str(src / "conv")]) for _ in range(2)]
    assert all(r.exit_code == 0 for r in runs), [r.output for r in runs]
    again = "".join(f"{line.removeprefix('wrote ')}: already there with the same content, nothing written\n"
                    for line in runs[0].output.splitlines())
    assert runs[1].output == again and runs[0].output.count("wrote ") == 2
    written = sorted(str(p.relative_to(src / "conv")) for p in (src / "conv").rglob("*.safetensors"))
    assert written == ["A/finetuned.safetensors", "b.safetensors"]
    for rel, source in zip(written, ("A/finetuned.safetensors", "b.safetensors")):
        out, given = load_file(str(src / "conv" / rel)), load_file(str(src / source))
        assert out.keys() == given.keys() and all(torch.equal(out[k], given[k]) for k in given)


def test_report_of_a_sweep_that_logged_to_a_folder_store(sweep_dict, tmp_path):
    """A sweep may log to an MLflow folder store (``tracking_uri`` a folder, which it opts into);
    ``harness report`` of its output folder reads it back too, in a process that did not opt in."""
    sweep_dict["methods"] = [{"name": "task_arithmetic"}]
    sweep_dict["tracking_uri"] = str(tmp_path / "mlruns")
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    assert CliRunner().invoke(main, ["sweep", "-q", str(f)]).exit_code == 0
    out = Path(sweep_dict["output_dir"])
    written = (out / "report" / "main.md").read_text()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_FILE_STORE"}  # MLflow caches stores in-process
    r = subprocess.run([sys.executable, "-m", "harness", "report", str(out), "--out", str(tmp_path / "again")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "again" / "main.md").read_text() == written


def test_report_of_a_run_id_in_a_files_path_names_the_uri_meant(tmp_path):
    """``--tracking-uri outputs/x/mlflow.db`` (no ``sqlite:///``) is one line, not MLflow's traceback."""
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"")
    r = CliRunner().invoke(main, ["report", "0123456789abcdef", "--tracking-uri", str(db)])
    assert r.exit_code == 2, r.output
    assert " ".join(r.stderr.split()) == (f"error: --tracking-uri {db}: is a file, not an MLflow store; a SQLite "
                                          f"database is given as sqlite:///{db}")


def test_ui_serves_a_sweep_that_logged_to_a_folder_store(sweep_dict, tmp_path):
    """``tracking_uri`` a folder (an MLflow file store, which a sweep opts into): the UI serves it too,
    in an environment that did not opt in (MLflow refuses such stores unless told)."""
    sweep_dict["methods"] = []
    sweep_dict["tracking_uri"] = str(tmp_path / "mlruns")
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    assert CliRunner().invoke(main, ["sweep", "-q", str(f)]).exit_code == 0
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_FILE_STORE"}
    assert _ui_experiment(sweep_dict["output_dir"], env)["experiment"]["name"] == "toy"


def test_report_of_a_folder_whose_store_is_damaged_is_one_line(tmp_path):
    (tmp_path / "mlflow.db").write_text("not a database\n" * 100)
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code == 2, r.output
    assert " ".join(r.stderr.split()) == (f"error: {tmp_path}: {tmp_path / 'mlflow.db'} is not an SQLite database "
                                          "(file is not a database); move it aside, and the next sweep starts a "
                                          "new store")


def test_convert_of_a_folder_says_it_is_one(tmp_path):
    """A folder given to convert (which takes one file) is not called missing: import takes folders."""
    (tmp_path / "ckpts").mkdir()
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "ckpts"), str(tmp_path / "out.safetensors")])
    assert r.exit_code == 2, r.output
    assert " ".join(r.stderr.split()) == (f"error: {tmp_path / 'ckpts'}: is a folder, not a checkpoint file "
                                          "(harness import converts a folder of them)")
    assert not (tmp_path / "out.safetensors").exists()


def test_ui_of_a_sweep_file_that_has_not_run_says_so_and_creates_nothing(sweep_dict, tmp_path, monkeypatch):
    """As ``harness report FILE`` does: one line naming the missing output folder, exit 2; it was an
    empty UI on a new ``mlflow.db``, made (with its folder) by the MLflow server."""
    def no_server(*args):
        raise AssertionError("the server was started")

    monkeypatch.setattr(os, "execve", no_server)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    r = CliRunner().invoke(main, ["ui", str(f)])
    out = Path(sweep_dict["output_dir"])
    assert r.exit_code == 2, r.output
    assert " ".join(r.stderr.split()) == f"error: {f}: its output folder {out} does not exist (the sweep has not run there)"
    assert not out.exists()


def test_a_method_file_named_by_path_or_not_on_the_import_path_says_how_to_name_it(tmp_path, monkeypatch):
    """A researcher's file beside the sweep: the `harness` command does not import from the current
    folder, and a path is no module name; each error says what to write instead."""
    (tmp_path / "beside_methods.py").write_text("from methods.weight_averaging import WeightAveraging as Mine\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "beside_methods", raising=False)
    r = CliRunner().invoke(main, ["list", "methods", "beside_methods:Mine"], env={"COLUMNS": "300"})
    assert r.exit_code == 2
    assert r.stderr.strip().endswith("beside_methods lies in the current folder, which harness does not import "
                                     "from: run PYTHONPATH=. harness ...")
    for given, module, folder in [("./beside_methods.py:Mine", "beside_methods", "."),
                                  ("sub/beside_methods.py", "beside_methods", "sub")]:
        r = CliRunner().invoke(main, ["list", "methods", given], env={"COLUMNS": "300"})
        assert r.exit_code == 2, r.output
        assert f"is a file path, not a module: name the module as Python imports it ('{module}', " \
               f"run with PYTHONPATH={folder})" in r.stderr, r.stderr


def test_a_missing_module_of_an_importable_package_beside_gets_no_import_path_hint(tmp_path, monkeypatch):
    """The package beside is on the import path (`python -m harness`, PYTHONPATH=.) and only its
    submodule is missing: telling to set PYTHONPATH=. would send one after the wrong cause."""
    (tmp_path / "beside_pkg").mkdir()
    (tmp_path / "beside_pkg" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "beside_pkg", raising=False)
    r = CliRunner().invoke(main, ["list", "methods", "beside_pkg.nope"], env={"COLUMNS": "300"})
    assert r.exit_code == 2, r.output
    assert "cannot import module 'beside_pkg.nope' (No module named 'beside_pkg.nope')" in r.stderr, r.stderr
    assert "PYTHONPATH" not in r.stderr, r.stderr


def test_report_of_a_first_sweep_before_its_end_says_it_has_not_ended(sweep_dict, tmp_path):
    """``harness report`` on the folder of a first sweep still running (or killed before its end,
    here just before its tables): its run has logged its jobs but no tables yet. One line saying
    so, not that its artifacts are missing as if the folder had moved; its rerun reports."""
    import re

    f = tmp_path / "s.yaml"
    sweep_dict["methods"] = [{"name": "task_arithmetic"}]
    f.write_text(yaml.safe_dump(sweep_dict))
    root = Path(__file__).resolve().parents[1]
    killed = subprocess.run([sys.executable, "-m", "harness", "sweep", "-q", str(f)], cwd=root, capture_output=True,
                            env={**os.environ, "HARNESS_FAILPOINT": "report"}, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    r = CliRunner().invoke(main, ["report", sweep_dict["output_dir"], "--out", str(tmp_path / "rep")])
    assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    assert re.fullmatch(r"error: sqlite:///\S+/mlflow\.db: sweep run \w{32} \(toy\) has logged no tables yet: its "
                        r"sweep is still running \(or was killed\): report once it ends, or rerun it\n", r.stderr)
    assert CliRunner().invoke(main, ["sweep", "-q", str(f)]).exit_code == 0
    assert CliRunner().invoke(main, ["report", sweep_dict["output_dir"], "--out", str(tmp_path / "rep")]).exit_code == 0


def test_a_sweep_killed_while_preparing_reports_that_no_job_ran_and_its_rerun_runs_them_all(sweep_dict, tmp_path,
                                                                                           monkeypatch):
    """SIGKILL after the driver made and locked a new output folder, before any job: no handler
    removes the folder, which holds only the lock file. ``report`` and ``ui`` say no job ran there
    (not that its mlflow.db is missing, nor, MLFLOW_TRACKING_URI set, another store's latest
    sweep); ``status`` that nothing was submitted; the rerun runs every job the dry run planned."""
    import re

    out = tmp_path / "new" / "out"
    sweep_dict["output_dir"] = str(out)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    planned = CliRunner().invoke(main, ["sweep", "--dry-run", str(f)])
    n = int(re.search(r"(\d+) jobs: 0 cached, \1 to run", planned.output).group(1))
    root = Path(__file__).resolve().parents[1]
    killed = subprocess.run([sys.executable, "-m", "harness", "sweep", "-q", str(f)], cwd=root, capture_output=True,
                            env={**os.environ, "HARNESS_FAILPOINT": "prepare"}, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [".sweep.lock"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    monkeypatch.setattr(os, "execve", lambda *args: pytest.fail("the MLflow server was started"))
    for command in (["report", str(f)], ["report", str(out)], ["ui", str(out)]):
        r = CliRunner().invoke(main, command)
        assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
        assert " ".join(r.stderr.split()) == (
            f"error: {out}: no job has run in this output folder yet (a sweep stopped while preparing, or preparing "
            "now, leaves only its lock file): run `harness sweep` with its sweep file"), command
    r = CliRunner().invoke(main, ["status", str(f)])
    assert r.exit_code == 2 and "no SLURM submissions recorded under" in r.stderr, r.output
    assert not (tmp_path / "elsewhere.db").exists()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    rerun = CliRunner().invoke(main, ["sweep", "-q", str(f)])
    assert rerun.exit_code == 0, rerun.output
    assert len(list((out / "results").glob("*.json"))) == n
    assert f"{n} jobs: {n} cached, 0 to run" in CliRunner().invoke(main, ["sweep", "--dry-run", str(f)]).output
    assert CliRunner().invoke(main, ["report", str(out), "--out", str(tmp_path / "rep")]).exit_code == 0


def test_report_of_a_sweep_run_whose_jobs_artifact_is_damaged_names_it(sweep_dict, tmp_path):
    """``report/jobs.json`` as logged to the sweep run, cut short or edited: one line naming the
    store, the run and the artifact, as `harness export` names the folder's copy, not a JSON
    traceback; the rerun it names logs it whole again."""
    import re

    f = swept_file(sweep_dict, tmp_path)
    (logged,) = [p for p in Path(sweep_dict["output_dir"]).rglob("jobs.json") if "report" in p.parts
                 and p.parent.parent.name == "artifacts"]
    logged.write_text(logged.read_text()[:5])
    r = CliRunner().invoke(main, ["report", sweep_dict["output_dir"], "--out", str(tmp_path / "rep")])
    assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    assert re.fullmatch(r"error: sqlite:///\S+/mlflow\.db: sweep run \w{32} \(toy\): its artifact report/jobs\.json "
                        r"is damaged \(not the list of jobs a sweep writes\): rerun the sweep \(its finished jobs are "
                        r"cached\) to log it again\n", r.stderr), r.stderr
    assert CliRunner().invoke(main, ["sweep", "-q", str(f)]).exit_code == 0
    assert CliRunner().invoke(main, ["report", sweep_dict["output_dir"], "--out", str(tmp_path / "rep")]).exit_code == 0


def test_warnings_stay_plain_lines_after_a_library_configures_logging(tmp_path):
    """open_clip's module-level ``logging.warning`` (called once a model is built) configures the
    root logger; the harness's own warnings after it were ``WARNING:harness.convert:...`` lines,
    not the ``path: message`` lines before it. Truth: the line as the harness wrote it."""
    script = (
        "import logging\n"
        "from harness.cli import main\n"
        f"try:\n    main(['validate', {str(tmp_path / 'missing.yaml')!r}])\n"
        "except SystemExit:\n    pass\n"
        "logging.warning('a library speaks')\n"
        "logging.getLogger('harness.convert').warning('model.pt: a message')\n"
        "logging.getLogger('harness.convert').info('not shown')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stderr.splitlines()[-2:] == ["a library speaks", "model.pt: a message"], done.stderr


def test_status_counts_each_state_and_what_the_driver_collected(sweep_dict, tmp_path, monkeypatch):
    """Seven submitted jobs, one in each state ``harness status`` tells apart: a result pickle of a
    success (done, and collected: its result file is written) or of an error (failed), SLURM's
    RUNNING, FAILED and PENDING, a job SLURM has no record of long after its submission (lost), and
    one SLURM calls COMPLETED that left no result (failed: it is run again)."""
    import pickle

    import submitit

    from harness.executors import slurm
    from harness.job import JobResult

    states = {"1_0": "COMPLETED", "2_0": "COMPLETED", "3_0": "RUNNING", "4_0": "FAILED", "5_0": "PENDING",
              "6_0": "UNKNOWN", "7_0": "COMPLETED"}
    monkeypatch.setattr("harness.executors.slurm_cluster._run", lambda cmd: "")
    monkeypatch.setattr(slurm, "slurm_states", lambda ids, reasons=None: {i: states[i] for i in ids})
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump({**sweep_dict, "executor": {"kind": "slurm"}}))
    folder = tmp_path / "out" / "slurm"
    folder.mkdir(parents=True)
    jobs = {k: {"job_id": i, "title": k, "submitted_at": "2020-01-01T00:00:00+00:00"}
            for k, i in zip("abcdefg", states)}
    (folder / "submitted.json").write_text(json.dumps({"version": 1, "jobs": jobs}))
    for job_id, result in (("1_0", ("success", {"status": "ok"})), ("2_0", ("error", "Traceback: boom"))):
        submitit.SlurmJob(folder=folder, job_id=job_id).paths.result_pickle.write_bytes(pickle.dumps(result))
    results = tmp_path / "out" / "results"
    results.mkdir()
    done = JobResult(key="a", kind="merge", label="x", params={}, task=None, status="ok", metrics={"acc/avg": 50.0})
    (results / "a.json").write_text(json.dumps(done.to_dict()))
    r = CliRunner().invoke(main, ["status", str(f)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == "1 running, 0 requeued, 3 failed, 1 lost, 1 pending, 1 done, 1 collected"


def test_list_models_says_which_architectures_the_harness_adds(tmp_path):
    """Each architecture's origin: the harness's own configs (the micro and tiny test encoders)
    and open_clip's, one row each; --sweep, like NAMES, is for methods only."""
    r = CliRunner().invoke(main, ["list", "models"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    origins = {cells[0]: cells[1] for cells in (
        [c.strip() for c in line.strip()[1:-1].split("│")] for line in r.output.splitlines() if line.startswith("│"))}
    assert origins["harness-micro-vit"] == origins["harness-tiny-vit"] == "harness"
    assert origins["ViT-B-32"] == origins["ViT-L-14"] == "open_clip"
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "methods": ["ties"]}))
    r = CliRunner().invoke(main, ["list", "models", "--sweep", str(sweep)])
    assert r.exit_code == 2 and "`harness list models` takes neither" in r.output


def test_list_methods_of_a_sweep_and_names_shows_both(tmp_path):
    """NAMES given with --sweep add to the sweep's methods, which come first."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "methods": ["ties"]}))
    r = CliRunner().invoke(main, ["list", "methods", "--sweep", str(sweep), "weight_averaging"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert list(_rows(r.output)) == ["ties", "weight_averaging"]


def test_list_methods_names_a_method_on_its_first_row_only(tmp_path, monkeypatch):
    """A method's further hyperparameters sit under its name, their method cell blank."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_methods.py").write_text(MY_METHODS)
    r = CliRunner().invoke(main, ["list", "methods", "my_methods:Blend"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    cells = [[c.strip() for c in line.strip()[1:-1].split("│")][:2]
             for line in r.output.splitlines() if line.startswith("│")]
    assert cells == [["my_methods:Blend", "alpha"], ["", "mode"]]


def test_report_of_a_run_id_takes_the_given_store_before_the_environments(tmp_path, monkeypatch):
    """--tracking-uri wins over MLFLOW_TRACKING_URI, and a store refused is named by where it came from."""
    given, env = tmp_path / "given.db", tmp_path / "env.db"
    given.write_bytes(b"")
    env.write_bytes(b"")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(env))
    for args, where, db in ((["--tracking-uri", str(given)], "--tracking-uri", given), ([], "MLFLOW_TRACKING_URI", env)):
        r = CliRunner().invoke(main, ["report", "0123456789abcdef", *args])
        assert r.exit_code == 2, r.output
        assert " ".join(r.stderr.split()) == (f"error: {where} {db}: is a file, not an MLflow store; a SQLite "
                                              f"database is given as sqlite:///{db}")


def _ui_server_args(monkeypatch) -> list[list[str]]:
    """The argument lists ``harness ui`` would start the MLflow server with, filled as it starts
    (none is started), with no tracking URI from the environment."""
    started: list[list[str]] = []

    def serves(exe, args, env):
        started.append(args)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", serves)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return started


def test_ui_serves_a_folders_store_and_artifacts_on_the_local_port_by_default(tmp_path, monkeypatch):
    """Without --host and --port the server listens on 127.0.0.1:5000 only (not on every
    interface); the folder's mlflow.db is its store and its mlartifacts/ the artifacts' home."""
    started = _ui_server_args(monkeypatch)
    (tmp_path / "mlflow.db").write_bytes(b"")
    r = CliRunner().invoke(main, ["ui", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert started[0][1:] == ["server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db", "--host",
                              "127.0.0.1", "--port", "5000", "--workers", "1",
                              "--artifacts-destination", f"{tmp_path}/mlartifacts"]
    assert r.stdout == f"MLflow UI for sqlite:///{tmp_path}/mlflow.db at http://127.0.0.1:5000  (Ctrl-C stops)\n"


def test_report_says_how_many_files_it_wrote_and_where(sweep_dict, tmp_path):
    f = swept_file(sweep_dict, tmp_path)
    r = CliRunner().invoke(main, ["report", str(f), "--out", str(tmp_path / "rep")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    files = [p for p in (tmp_path / "rep").rglob("*") if p.is_file()]
    assert len(files) > 3
    assert r.stdout.splitlines()[-1] == f"wrote {len(files)} files to {tmp_path / 'rep'}"


def test_collect_of_a_sweep_nothing_was_submitted_from_runs_nothing(sweep_dict, tmp_path):
    """collect only gathers submitted jobs: with none recorded it says so and runs none itself."""
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({**sweep_dict, "executor": {"kind": "slurm"}}))
    r = CliRunner().invoke(main, ["collect", "-q", str(f)])
    assert r.exit_code == 2, r.output
    folder = Path(sweep_dict["output_dir"]) / "slurm"
    assert " ".join(r.stderr.split()) == (f"error: no SLURM submissions recorded under {folder} (run `harness sweep` "
                                          "with executor.kind slurm, or `harness sweep --detach`)")
    assert not (Path(sweep_dict["output_dir"]) / "results").exists()


@pytest.mark.parametrize("kind", ["local", "debug"])
def test_status_of_a_sweep_run_in_process_says_its_jobs_never_go_to_slurm(kind, sweep_dict, tmp_path):
    """``status`` of a local (or debug) sweep suggested ``harness sweep --detach``, which refuses
    that sweep: it now says its jobs run in-process and where their results are."""
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({**sweep_dict, "executor": {"kind": kind}}))
    r = CliRunner().invoke(main, ["status", str(f)])
    folder = Path(sweep_dict["output_dir"]) / "slurm"
    assert r.exit_code == 2 and " ".join(r.stderr.split()) == (
        f"error: no SLURM submissions recorded under {folder}: this sweep runs its jobs in-process (executor.kind "
        f"{kind}); its results are in `harness report`, or set executor.kind slurm to submit them"), r.output
    assert "--detach" not in r.stderr


@pytest.mark.parametrize("command", ["report", "ui"])
def test_an_mlflow_store_given_for_a_sweep_file_names_its_folder(command, tmp_path):
    """``harness report outputs/x/mlflow.db`` said the file was not UTF-8 text: it is named as the
    store it is, with the folder to give instead."""
    import sqlite3

    db = tmp_path / "out" / "mlflow.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as conn:
        conn.execute("create table t (x int)")
    r = CliRunner().invoke(main, [command, str(db)])
    assert r.exit_code == 2, r.output
    assert " ".join(r.stderr.split()) == (f"error: {db}: an SQLite database (an MLflow store), not a sweep file: "
                                          f"give the output folder it lies in ({db.parent}) or its sweep file")


def test_validate_shows_a_tuned_methods_study_as_one_row_of_the_plan(sweep_dict, tmp_path):
    """A tuned method has no grid job: its plan row says what its study will run (the trial
    count, sampler and searched hyperparameters of its tune block) before the final test run."""
    d = dict(sweep_dict, references={"pretrained": False, "individual": False},
             methods=[{"name": "task_arithmetic", "label": "tuned", "tune": {
                 "n_trials": 3, "sampler": "random", "objective": "val/acc/avg",
                 "space": {"scaling": {"type": "float", "low": 0.1, "high": 1.0}}}}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["validate", str(f)], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in r.output.splitlines() if line.count("│") >= 6]
    assert rows == [["-", "tune", "tuned", "all", "3 trials (random) over scaling, then 1 test run"]], rows
    assert "job plan: 0 jobs" in r.output


def test_prepare_builds_where_the_overrides_say(tmp_path, monkeypatch):
    """``prepare FILE key=value`` reads FILE as the sweep does with the same overrides: the suite
    is built in the cache folder the override names, not in the file's."""
    asked = _recorded_suite_builds(monkeypatch)
    f = _embedded_sweep_file(tmp_path, tmp_path / "c1", ["emb_mnist", "emb_fashion"])
    r = CliRunner().invoke(main, ["prepare", "-q", str(f), f"cache_dir={tmp_path / 'c2'}", "tasks=[emb_mnist]"])
    assert r.exit_code == 0, r.output
    assert [(a["names"], a["cache_dir"]) for a in asked] == [(["emb_mnist"], tmp_path / "c2")]


@pytest.mark.parametrize("flags, from_scratch, progress", [([], False, True), (["--from-scratch", "-q"], True, False)])
def test_prepare_passes_from_scratch_and_quiet_on(flags, from_scratch, progress, tmp_path, monkeypatch):
    """``--from-scratch`` retrains the pretrained model and ``-q`` hides the progress bars: each
    reaches the suite's build as given, and neither is on without its flag."""
    asked = _recorded_suite_builds(monkeypatch)
    f = _embedded_sweep_file(tmp_path, tmp_path / "c", ["emb_mnist"])
    r = CliRunner().invoke(main, ["prepare", *flags, str(f)])
    assert r.exit_code == 0, r.output
    assert len(asked) == 1
    assert asked[0]["from_scratch"] is from_scratch and asked[0]["progress"] is progress


def test_ui_of_a_sweep_file_edited_since_serves_the_store_its_sweep_logged_to(sweep_dict, tmp_path, monkeypatch):
    """``harness ui FILE`` serves the store the sweep that ran logged to (its ``resolved.yaml``),
    as ``report FILE`` reports it: a file whose ``tracking_uri`` was removed since still leads to
    the other store, not to the folder's own ``mlflow.db``."""
    from harness.config import dump_yaml, validate_config

    started = _ui_server_args(monkeypatch)
    out = Path(sweep_dict["output_dir"])
    out.mkdir(parents=True)
    (out / "mlflow.db").write_bytes(b"")
    other = f"sqlite:///{tmp_path / 'other.db'}"
    (out / "resolved.yaml").write_text(dump_yaml(validate_config(dict(sweep_dict, tracking_uri=other), "s.yaml")))
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep_dict))
    r = CliRunner().invoke(main, ["ui", str(f)])
    assert r.exit_code == 0, r.output
    assert started[0][2:4] == ["--backend-store-uri", other]


def test_a_disk_refusing_a_write_outside_the_harness_errors_exits_1_saying_what_was_kept(tmp_path, monkeypatch):
    """A full disk met where no harness error wraps it (an OSError from deep in ``prepare``) is
    not bad input: one line naming the file and what a rerun keeps, exit code 1, not 2."""
    import errno

    import tasks.embedded.pipeline

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "c" / "x.pt"))

    monkeypatch.setattr(tasks.embedded.pipeline, "prepare_suite", full)
    f = _embedded_sweep_file(tmp_path, tmp_path / "c", ["emb_mnist"])
    r = CliRunner().invoke(main, ["prepare", "-q", str(f)])
    assert r.exit_code == 1, r.output
    assert " ".join(r.stderr.split()) == (f"error: cannot write {tmp_path / 'c' / 'x.pt'}: No space left on device; "
                                          "models built so far are cached: free space (or fix the folder's "
                                          "permissions) and rerun the same command")


def _corrupted_splits_line(f: Path, *overrides: str) -> str:
    r = CliRunner().invoke(main, ["sweep", "--dry-run", str(f), *overrides], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    return next(line for line in r.output.splitlines() if line.startswith("robustness study: "))


def test_dry_run_counts_the_corrupted_splits_the_robustness_study_reads_and_builds(sweep_dict, tmp_path, monkeypatch):
    """Checked against the study itself: the splits a run builds are those the dry run counted
    to build; a capped evaluation's are files of their own; a method that adapts again on each
    corruption adds every merged task's splits. No model is loaded and no image corrupted."""
    import harness.workspace
    import tasks.corruptions

    rob = {"tasks": ["toy_stripes"], "corruptions": ["contrast", "gaussian_noise"], "severity": 2}
    adamerging = {"name": "adamerging", "params": {"steps": 2, "batch_size": 8}}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(dict(sweep_dict, methods=["weight_averaging", adamerging], robustness=rob)))
    prefix = "robustness study: corrupted test splits at severity 2: "
    assert _corrupted_splits_line(f) == prefix + "4 (2 tasks x 2 corruptions), 0 cached, 4 to build"
    assert CliRunner().invoke(main, ["sweep", "-q", str(f), "methods=[weight_averaging]"]).exit_code == 0
    built = sorted(p.name for p in (tmp_path / "cache" / "corrupted").glob("*.npy"))
    assert len(built) == 2

    def refused(*args, **kwargs):
        raise AssertionError("a dry run loads no model and corrupts no image")

    for module, name in ((harness.workspace, "build_clip"), (harness.workspace, "load_state_dict"),
                         (tasks.corruptions, "corrupt_images")):
        monkeypatch.setattr(module, name, refused)
    assert _corrupted_splits_line(f, "methods=[weight_averaging]") == prefix + (
        "2 (1 task x 2 corruptions), 2 cached, 0 to build")
    assert _corrupted_splits_line(f, "methods=[weight_averaging]", "eval.max_samples=5") == prefix + (
        "2 (1 task x 2 corruptions), 0 cached, 2 to build")
    assert _corrupted_splits_line(f) == prefix + "4 (2 tasks x 2 corruptions), 2 cached, 2 to build"
    assert _corrupted_splits_line(f, "robustness.adapt=clean") == prefix + (
        "2 (1 task x 2 corruptions), 2 cached, 0 to build")
    monkeypatch.undo()
    assert CliRunner().invoke(main, ["sweep", "-q", str(f)]).exit_code == 0
    now = sorted(p.name for p in (tmp_path / "cache" / "corrupted").glob("*.npy"))
    assert set(built) < set(now) and len(now) == 4 and all(n.startswith("toy_") for n in now)
    assert _corrupted_splits_line(f) == prefix + "4 (2 tasks x 2 corruptions), 4 cached, 0 to build"


def test_dry_run_of_an_unprepared_embedded_suite_counts_no_corrupted_splits(tmp_path):
    """The embedded tasks' data is made when the suite is prepared: before that, the count of
    corrupted splits is not known, and nothing is made to find it."""
    cache = tmp_path / "cache"
    f = _embedded_sweep_file(tmp_path, cache, ["emb_mnist", "emb_fashion"])
    f.write_text(yaml.safe_dump({**yaml.safe_load(f.read_text()),
                                 "robustness": {"tasks": ["emb_mnist"], "corruptions": ["contrast"]}}))
    assert _corrupted_splits_line(f).startswith(
        "robustness study: corrupted test splits at severity 2: which are cached is not known before the models "
        "are built (the embedded suite's")
    assert not cache.exists()
