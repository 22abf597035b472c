"""A merge method of one's own, named by import path: what a sweep does when its code changes
and when it returns an encoder the heads cannot take."""

from __future__ import annotations

import sys
from typing import ClassVar

import pytest
import torch
import yaml
from click.testing import CliRunner

from harness.cli import main
from harness.config import validate_config
from harness.runner import run_sweep
from methods import MergeMethod
from tests.test_reliability import failing_sweep

SCALED_SUM = '''
from methods import MergeMethod
from methods.base import float_state, task_vectors, with_state

SCALING = {scaling}


class ScaledSum(MergeMethod):
    """Task arithmetic with a scaling fixed in the code (what a user edits between runs)."""

    tag: int = 0  # changes nothing: a grid of it gives several jobs

    def merge(self, pretrained, finetuned, ctx):
        taus = task_vectors(pretrained, finetuned)
        return with_state(pretrained, {{k: v + SCALING * sum(t[k] for t in taus.values())
                                       for k, v in float_state(pretrained).items()}})
'''


def _write_module(folder, scaling: float) -> None:
    (folder / "scaled_sum.py").write_text(SCALED_SUM.format(scaling=scaling))
    sys.modules.pop("scaled_sum", None)  # as a new process would import it


def test_editing_a_methods_code_runs_its_jobs_again(sweep_dict, tmp_path, monkeypatch):
    """Results of the old code are not reused: after the edit the method's row equals task
    arithmetic at the new scaling, computed in the same sweep; the built-in rows stay cached."""
    monkeypatch.syspath_prepend(str(tmp_path))
    d = dict(sweep_dict, references={"pretrained": False, "individual": False},
             methods=[{"name": "task_arithmetic", "grid": {"scaling": [0.0, 0.6]}},
                                  {"name": "scaled_sum:ScaledSum", "label": "mine"}])
    _write_module(tmp_path, 0.0)
    first = run_sweep(validate_config(d), quiet=True)
    mine = next(r for r in first.results if r.label == "mine")
    zero = next(r for r in first.results if r.label == "task_arithmetic" and r.params["scaling"] == 0.0)
    assert mine.metrics["acc/avg"] == zero.metrics["acc/avg"]

    _write_module(tmp_path, 0.0)
    assert run_sweep(validate_config(d), quiet=True).executed == []  # same code: everything cached

    _write_module(tmp_path, 0.6)
    again = run_sweep(validate_config(d), quiet=True)
    mine = next(r for r in again.results if r.label == "mine")
    six = next(r for r in again.results if r.label == "task_arithmetic" and r.params["scaling"] == 0.6)
    assert again.executed == [mine.key]
    assert mine.metrics == pytest.approx(six.metrics)


def test_the_projects_methods_are_identified_by_class_alone(tmp_path, monkeypatch):
    """Keys of built-in methods do not change with the harness's commits; a method of one's own
    carries the digest of its file, which an edit changes."""
    from harness.config import MethodSpec, TuneSpec
    from harness.plan import method_class_id
    from harness.tuning import study_definition

    assert method_class_id("task_arithmetic") == "methods.task_arithmetic:TaskArithmetic"
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_module(tmp_path, 0.3)
    before = method_class_id("scaled_sum:ScaledSum")
    spec = MethodSpec.model_construct(name="scaled_sum:ScaledSum", params={}, tune=TuneSpec.model_construct(
        objective="val/acc/avg", sampler="tpe", space={}))
    study = study_definition(spec)
    assert before.startswith("scaled_sum:ScaledSum@")
    _write_module(tmp_path, 0.4)
    assert method_class_id("scaled_sum:ScaledSum") != before
    assert study_definition(spec) != study  # a study of the old code is not resumed


def test_an_encoder_the_heads_cannot_take_is_named_with_its_method(sweep_dict, tmp_path):
    """Not ``mat1 and mat2 shapes cannot be multiplied`` from the evaluation: the method, the
    features it gave for one image and the width the heads take."""
    d = dict(sweep_dict, references=False, methods=[
        {"name": "tests.faulty_methods:WrongWidth", "label": "wide"},
        {"name": "tests.faulty_methods:NotAnImageEncoder", "label": "linear"},
        {"name": "tests.faulty_methods:NanWeights", "label": "nan"},
    ])
    _, err = failing_sweep(d, tmp_path)
    first = d["tasks"][0]
    assert (f"wide: TypeError: merge() of tests.faulty_methods:WrongWidth returned an encoder that maps one "
            f"image of {first} to [1, 7]; the heads take features [1, 32]") in err
    assert (f"linear: TypeError: merge() of tests.faulty_methods:NotAnImageEncoder returned an encoder that "
            f"fails on one validation image of {first} (float32 [1, 3, 16, 16], as evaluation gives them): "
            "RuntimeError: mat1 and mat2 shapes cannot be multiplied") in err
    assert (f"nan: FloatingPointError: merge() of tests.faulty_methods:NanWeights returned an encoder that "
            f"maps one image of {first} to non-finite features") in err


def test_a_method_without_merge_is_a_config_error(sweep_dict, tmp_path, monkeypatch):
    (tmp_path / "no_merge.py").write_text("from methods import MergeMethod\n\n\nclass Idea(MergeMethod):\n"
                                          "    scaling: float = 0.3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(dict(sweep_dict, methods=["weight_averaging", "no_merge:Idea"])))
    r = CliRunner().invoke(main, ["validate", str(f)], env={"COLUMNS": "300"})
    assert r.exit_code == 2
    assert (f"error: {f}: methods.1: no_merge:Idea ({tmp_path / 'no_merge.py'}) does not define "
            "merge(self, pretrained, finetuned, ctx)") in " ".join(r.stderr.split())


def _planned(sweep_dict, tmp_path, monkeypatch, grid: list[int]):
    """A sweep of ScaledSum (written with scaling 0.0) planned with keys, as a driver submits it."""
    from harness.plan import plan_jobs
    from harness.workspace import Workspace

    monkeypatch.syspath_prepend(str(tmp_path))
    _write_module(tmp_path, 0.0)
    cfg = validate_config(dict(sweep_dict, references=False, methods=[
        {"name": "scaled_sum:ScaledSum", "label": "mine", "grid": {"tag": grid}}]))
    ws = Workspace(cfg)
    return cfg, plan_jobs(cfg, ws.identity, ws.task_identity())


def test_a_slurm_job_refuses_a_method_file_edited_after_submission(sweep_dict, tmp_path, monkeypatch):
    """A node imports the method when its job starts: after an edit that is the new code, whose
    result would be stored under the key of the code the sweep was planned with."""
    from harness.executors.slurm import SweepJob

    cfg, (spec,) = _planned(sweep_dict, tmp_path, monkeypatch, [0])
    job = SweepJob(cfg.model_dump(mode="json"), progress=False)
    _write_module(tmp_path, 0.0)  # imported again, unchanged: the job runs
    assert job(spec.to_dict())["status"] == "ok"

    _write_module(tmp_path, 0.6)
    result = job(spec.to_dict())
    assert result["status"] == "failed" and result["metrics"] == {}
    assert result["error"].startswith(
        f"MethodChanged: scaled_sum:ScaledSum: {tmp_path / 'scaled_sum.py'} changed since the sweep was submitted")
    assert result["error"].endswith("rerun the sweep")


def test_planning_keeps_the_code_the_process_imported(sweep_dict, tmp_path, monkeypatch):
    """In the process that imported the method, an edit of its file does not change the identity
    (the imported code still runs, so its jobs still match their keys); a fresh import does."""
    from harness.job import run_job
    from harness.plan import method_class_id
    from harness.runtime import resolve_device
    from harness.workspace import Workspace

    cfg, (spec,) = _planned(sweep_dict, tmp_path, monkeypatch, [0])
    (tmp_path / "scaled_sum.py").write_text(SCALED_SUM.format(scaling=0.6))  # not imported again
    assert method_class_id("scaled_sum:ScaledSum") == spec.method_id
    assert run_job(spec, Workspace(cfg), resolve_device("cpu"), tmp_path / "work").status == "ok"
    sys.modules.pop("scaled_sum")
    assert method_class_id("scaled_sum:ScaledSum") != spec.method_id


def test_artifacts_json_cannot_hold_are_converted_or_named(sweep_dict, tmp_path):
    """Tensors, numpy values and sets are stored as the numbers they hold; an object of the
    method's own is stored as its repr with a warning naming the method and the artifact, and
    the job's result is kept. The stored file reads back (cached rerun, report) and the loss
    curve reaches MLflow."""
    import io
    import json
    import math

    from mlflow.tracking import MlflowClient
    from rich.console import Console

    d = dict(sweep_dict, references={"pretrained": False, "individual": False},
             methods=[{"name": "tests.faulty_methods:OddArtifacts", "label": "odd"}])
    cfg = validate_config(d)
    out = io.StringIO()
    run = run_sweep(cfg, console=Console(file=out, width=300))
    (result,) = run.results
    assert result.status == "ok"
    def no_constant(token):
        raise ValueError(f"{token} is not JSON")

    # standard JSON, as jq or a browser reads it: no NaN or Infinity tokens, null in their place
    stored = json.loads((cfg.resolved_output_dir() / "results" / f"{result.key}.json").read_text(),
                        parse_constant=no_constant)
    artifacts = stored["artifacts"]
    assert artifacts == {"coefs": [[0.5, 0.25], [1.0, 2.0]], "mask": [[0.0, 2.0], [3.0, 0.0]], "array": [0, 1, 2], "scalar": 0.5, "count": 7,
                         "flag": True, "tags": ["a", "b", "c"], "nested": {"pair": [1, 2.5], "3": 1.5},
                         "odd": "Widget(3)", "lock": artifacts["lock"], "ratio": None,
                         "curves": {"tta/loss": [3.0, None, 1.0]}}
    assert artifacts["lock"].startswith("<unlocked _thread.lock object")
    text = " ".join(out.getvalue().split())
    assert ("warning odd: tests.faulty_methods:OddArtifacts: ctx.artifacts['odd'] is a "
            "tests.faulty_methods.Widget, which the result file (JSON) cannot hold: stored as its repr") in text
    assert "ctx.artifacts['lock'] is a _thread.lock" in text
    assert stored["warnings"] == result.warnings and len(result.warnings) == 2

    client = MlflowClient(cfg.resolved_tracking_uri())
    (job_run,) = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id],
                                    f"tags.`harness.job_key` = '{result.key}'")
    assert job_run.data.tags["harness.warnings"] == "\n".join(result.warnings)
    def logged_curve(run_id):
        history = sorted(client.get_metric_history(run_id, "tta/loss"), key=lambda m: m.step)
        return [(m.step, "nan" if math.isnan(m.value) else m.value) for m in history]

    assert logged_curve(job_run.info.run_id) == [(0, 3.0), (1, "nan"), (2, 1.0)]

    again = run_sweep(cfg, quiet=True)  # read back from the result file
    assert again.executed == [] and again.results[0].artifacts == artifacts
    client.delete_run(job_run.info.run_id)  # logged again from the result file: the NaN step is NaN again
    run_sweep(cfg, quiet=True)
    (relogged,) = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id],
                                     f"tags.`harness.job_key` = '{result.key}'")
    assert logged_curve(relogged.info.run_id) == [(0, 3.0), (1, "nan"), (2, 1.0)]
    r = CliRunner().invoke(main, ["report", str(cfg.resolved_output_dir())], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output


def test_a_runtime_only_name_that_is_no_hyperparameter_is_a_config_error(sweep_dict, tmp_path, monkeypatch):
    (tmp_path / "typo.py").write_text(
        "from methods import MergeMethod\n\n\nclass Idea(MergeMethod):\n"
        "    runtime_only = frozenset({'chekpoint_every'})\n    checkpoint_every: int = 5\n\n"
        "    def merge(self, pretrained, finetuned, ctx):\n        return pretrained\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(dict(sweep_dict, methods=["typo:Idea"])))
    r = CliRunner().invoke(main, ["validate", str(f)], env={"COLUMNS": "300"})
    assert r.exit_code == 2, r.stderr
    assert (f"error: {f}: methods.0: typo:Idea ({tmp_path / 'typo.py'}) declares runtime_only "
            "['chekpoint_every'], which are not its hyperparameters; did you mean 'checkpoint_every'?"
            ) in " ".join(r.stderr.split())


@pytest.mark.filterwarnings("ignore:Field name .* shadows an attribute in parent")
@pytest.mark.parametrize("line, name, write", [
    ("seeded: bool = False", "seeded", "seeded = False"),
    ("uses_test_data: bool = True", "uses_test_data", "uses_test_data = True"),
])
def test_a_class_level_declaration_written_with_an_annotation_is_a_config_error(line, name, write, sweep_dict,
                                                                                tmp_path, monkeypatch):
    """Annotated, ``seeded`` or ``uses_test_data`` is a hyperparameter (pydantic only warns that it
    shadows the base class's attribute) and the declaration it meant is not made: the seed stayed in
    the job keys, or reading test batches failed saying to set what the class had set."""
    (tmp_path / "annotated.py").write_text(
        "from methods import MergeMethod\n\n\nclass Idea(MergeMethod):\n"
        f"    {line}\n\n    def merge(self, pretrained, finetuned, ctx):\n        return pretrained\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("annotated", None)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(dict(sweep_dict, methods=["annotated:Idea"])))
    for command in ("validate", "sweep"):
        r = CliRunner().invoke(main, [command, str(f)], env={"COLUMNS": "300"})
        assert r.exit_code == 2, r.stderr
        assert (f"error: {f}: methods.0: annotated:Idea ({tmp_path / 'annotated.py'}) annotates {name!r}, which makes "
                f"it a hyperparameter instead of setting MergeMethod.{name}: write it without an annotation ({write})"
                ) in " ".join(r.stderr.split()), r.stderr
    assert not (tmp_path / "out").exists()
    sys.modules.pop("annotated", None)


def test_checking_the_encoder_leaves_the_rng_and_train_mode_alone():
    """The check reads one image of a disk-backed split (not a TensorDataset) without a DataLoader,
    whose iterator draws a seed from torch's global generator, and restores the encoder's mode."""
    from types import SimpleNamespace

    from torch import nn
    from torch.utils.data import Dataset

    from harness.job import check_encoder
    from harness.plan import JobSpec

    class Images(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int):
            return torch.full((3, 4, 4), float(i)), i

    ws = SimpleNamespace(task=lambda name: SimpleNamespace(dataset=lambda split: Images()),
                         cfg=SimpleNamespace(eval=SimpleNamespace(precision="fp32")))
    encoder = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(48, 5)).train()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    check_encoder(JobSpec("merge", "m", method="mine:M"), encoder, ws, {"t": torch.zeros(3, 5)}, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)
    assert encoder.training


def test_a_study_of_an_edited_method_says_its_code_changed(sweep_dict, tmp_path, monkeypatch):
    """Editing the method's file (and nothing in the sweep) starts a study of its own; the line
    saying so names the edit, not 'another space, fixed params, objective or sampler', none of
    which changed."""
    import io

    from rich.console import Console

    monkeypatch.syspath_prepend(str(tmp_path))
    d = dict(sweep_dict, references=False, methods=[{"name": "scaled_sum:ScaledSum", "label": "mine", "tune": {
        "n_trials": 1, "n_parallel": 1, "sampler": "random", "space": {"tag": {"type": "int", "low": 0, "high": 3}}}}])
    _write_module(tmp_path, 0.0)
    run_sweep(validate_config(d), quiet=True)
    _write_module(tmp_path, 0.6)
    shown = io.StringIO()
    out = run_sweep(validate_config(d), console=Console(file=shown, width=300))
    assert not out.failed, [r.error for r in out.failed]
    text = shown.getvalue()
    assert "study 'toy.mine' was run with other code of its method (its file was edited since): starting study" in text, text
    assert "another space" not in text, text


def test_a_study_changed_twice_names_each_change_its_first_study_was_run_without(sweep_dict, tmp_path, monkeypatch):
    """The method's file edited, then the space changed: the study under the sweep's name was run
    with other code and another space, and the line says both (it said only 'other code')."""
    import io

    from rich.console import Console

    monkeypatch.syspath_prepend(str(tmp_path))
    tune = {"n_trials": 1, "n_parallel": 1, "sampler": "random", "space": {"tag": {"type": "int", "low": 0, "high": 3}}}
    d = dict(sweep_dict, references=False, methods=[{"name": "scaled_sum:ScaledSum", "label": "mine", "tune": tune}])
    _write_module(tmp_path, 0.0)
    run_sweep(validate_config(d), quiet=True)
    _write_module(tmp_path, 0.6)
    run_sweep(validate_config(d), quiet=True)
    tune["space"]["tag"]["high"] = 2
    shown = io.StringIO()
    out = run_sweep(validate_config(d), console=Console(file=shown, width=300))
    assert not out.failed, [r.error for r in out.failed]
    assert ("study 'toy.mine' was run with other code of its method (its file was edited since) and with another "
            "space, fixed params, objective or sampler: starting study") in shown.getvalue(), shown.getvalue()


class FirstBatches(MergeMethod):
    """A test-time-adaptation method that keeps the first unlabeled batch of each task it is given."""

    uses_test_data: ClassVar[bool] = True
    batch_size: int = 4

    def merge(self, pretrained, finetuned, ctx):
        for task in finetuned:
            FIRST_BATCHES[task] = next(iter(ctx.unlabeled[task]()))
        return pretrained


FIRST_BATCHES: dict[str, torch.Tensor] = {}


def test_each_tasks_unlabeled_batches_are_shuffled_under_the_shuffle_seed_plus_its_index(sweep_dict, tmp_path):
    """Task i of the sweep streams its split in the order of a permutation drawn under
    ``adapt.shuffle_seed + i``: the tasks' orders are independent, and the same as the results
    cached under the same keys were adapted on."""
    from harness.job import merge
    from harness.plan import JobSpec
    from harness.runtime import resolve_device
    from harness.workspace import Workspace

    cfg = validate_config(dict(sweep_dict, adapt={"shuffle_seed": 7}))
    ws = Workspace(cfg, progress=False)
    FIRST_BATCHES.clear()
    merge(JobSpec("merge", "fb", method="tests.test_plugin_methods:FirstBatches"), ws, resolve_device("cpu"),
          tmp_path / "work")
    assert list(FIRST_BATCHES) == cfg.task_names
    for i, task in enumerate(cfg.task_names):
        images = torch.stack([image for image, _ in ws.task(task).dataset(cfg.adapt.split)])
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(7 + i))
        assert torch.equal(FIRST_BATCHES[task], images[order[:4]]), task


def test_a_methods_code_identity_is_the_one_its_cached_keys_hold(tmp_path, monkeypatch):
    """The identity of a method of one's own enters every key of its jobs: computed another way
    from the same file, it would rerun every job of sweeps cached under it (pinned when written)."""
    from harness.plan import method_class_id

    monkeypatch.syspath_prepend(str(tmp_path))
    _write_module(tmp_path, 0.0)
    assert method_class_id("scaled_sum:ScaledSum") == "scaled_sum:ScaledSum@92f5884b1897e67e"


def test_a_class_of_a_main_module_without_a_file_has_no_source_file(monkeypatch):
    """A method class defined in a notebook or ``python -c`` (a ``__main__`` without a file) has no
    source to digest or name: None, as for a built-in, rather than Python's OSError; a class of a
    module has that module's file."""
    import types

    from harness.imports import source_file

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    assert source_file(type("Blend", (), {"__module__": "__main__"})) is None
    assert source_file(int) is None
    assert source_file(MergeMethod) == sys.modules[MergeMethod.__module__].__file__


REGISTERED = '''
from methods import MergeMethod, register_method


@register_method("registered_identity")
class RegisteredIdentity(MergeMethod):
    """The pretrained encoder, named in a sweep by its registered name."""

    seeded = False

    def merge(self, pretrained, finetuned, ctx):
        return pretrained
'''


def test_a_registered_name_runs_in_a_process_that_has_not_imported_its_module(sweep_dict, tmp_path, monkeypatch):
    """The driver resolves a registered name below the entry that imports its module; a worker
    (a local pool's process, a SLURM node) starts without that import, and makes it as the driver
    did instead of failing the job with 'unknown method'."""
    import methods.base
    from harness.executors.slurm import SweepJob
    from harness.plan import plan_jobs
    from harness.workspace import Workspace

    monkeypatch.setattr(methods.base, "_METHODS", dict(methods.base._METHODS))  # the test's name, then gone
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "registered_identity.py").write_text(REGISTERED)
    monkeypatch.delitem(sys.modules, "registered_identity", raising=False)
    cfg = validate_config(dict(sweep_dict, references=False, methods=[
        {"name": "registered_identity:RegisteredIdentity", "label": "by path"},
        {"name": "registered_identity", "label": "by name"}]))
    ws = Workspace(cfg)
    (spec,) = [s for s in plan_jobs(cfg, ws.identity, ws.task_identity()) if s.label == "by name"]

    del methods.base._METHODS["registered_identity"]  # as in a fresh process
    del sys.modules["registered_identity"]
    result = SweepJob(cfg.model_dump(mode="json"), progress=False)(spec.to_dict())
    assert result["status"] == "ok", result["error"]


def test_a_registered_name_above_the_entry_importing_its_module_says_to_put_it_below(sweep_dict, tmp_path,
                                                                                      monkeypatch):
    """A registered name is found below the entry that imports its module: above it, it was only
    an "unknown method", as for a typo. The line now names the module registering it and the entry
    importing it, and says where the entry goes."""
    import methods.base

    monkeypatch.setattr(methods.base, "_METHODS", dict(methods.base._METHODS))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "registered_identity.py").write_text(REGISTERED)
    monkeypatch.delitem(sys.modules, "registered_identity", raising=False)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(dict(sweep_dict, methods=[
        {"name": "registered_identity"}, {"name": "weight_averaging"},
        {"name": "registered_identity:RegisteredIdentity", "label": "by path"}])))
    r = CliRunner().invoke(main, ["validate", str(f)])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == (f"error: {f}: methods.0.name: unknown method 'registered_identity' here: it is "
                                "registered by registered_identity, imported by methods.2 "
                                "(registered_identity:RegisteredIdentity): put this entry below it"), r.stderr


def test_reloading_a_module_registers_its_new_class_and_another_class_is_still_refused(tmp_path, monkeypatch):
    """A notebook's ``importlib.reload`` of an edited module defines its class again, under the
    name it registered: the new class replaces the old (its code is the one to run) instead of
    being refused as a second method; a class defined elsewhere under that name is refused."""
    import importlib

    import methods.base
    from methods.base import register_method, resolve_method

    monkeypatch.setattr(methods.base, "_METHODS", dict(methods.base._METHODS))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "registered_identity.py").write_text(REGISTERED)
    monkeypatch.delitem(sys.modules, "registered_identity", raising=False)
    module = importlib.import_module("registered_identity")
    first = resolve_method("registered_identity")
    importlib.reload(module)
    assert resolve_method("registered_identity") is module.RegisteredIdentity is not first

    class RegisteredIdentity(MergeMethod):
        def merge(self, pretrained, finetuned, ctx):
            return pretrained

    with pytest.raises(ValueError, match="method name 'registered_identity' is already registered by "
                                         "<class 'registered_identity.RegisteredIdentity'>"):
        register_method("registered_identity")(RegisteredIdentity)
