"""A job runs only with the harness code the driver planned it with: a node importing another
installation of the harness (``sbatch --export=NONE``, another environment or PYTHONPATH), or
files edited since submission, fails the job with HarnessChanged instead of storing results of
other code under the planned keys."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import pytest

from harness.config import validate_config
from harness.plan import (CODE_PACKAGES, HarnessChanged, JobSpec, check_harness_code, code_digest, harness_code_id,
                          plan_jobs, with_key)

REPO = Path(__file__).resolve().parent.parent


def _copy_packages(dest: Path) -> Path:
    for package in CODE_PACKAGES:
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def test_the_check_passes_on_the_planned_code_and_names_both_places_otherwise():
    spec = JobSpec("merge", "mine", key="k", harness_dir="/b/harness", harness_code="3c4d")
    check_harness_code(spec, ("/b/harness", "3c4d"))
    check_harness_code(spec, ("/mnt/b/harness", "3c4d"))  # the same code seen under another mount: fine

    with pytest.raises(HarnessChanged) as moved:
        check_harness_code(spec, ("/a/harness", "1a2b"))
    assert str(moved.value) == (
        "the node runs harness from /a/harness (code 1a2b), the sweep was planned with /b/harness (code 3c4d): "
        "results would be stored under keys of other code; make the node import the driver's harness (for sbatch "
        "--export=NONE, add a setup line that activates the same environment) or rerun the sweep")
    assert "\n" not in str(moved.value)

    with pytest.raises(HarnessChanged) as edited:
        check_harness_code(spec, ("/b/harness", "1a2b"))
    assert str(edited.value) == (
        "harness code changed since the sweep was submitted (/b/harness: code 3c4d when planned, now 1a2b): "
        "results would be stored under keys of other code; rerun the sweep")


def test_specs_planned_before_the_code_was_recorded_are_not_checked():
    """A spec of an older driver (a pickled submission, an Optuna trial) has no digest; one of a
    newer driver with fields this code does not know still reaches the check."""
    old = {"kind": "merge", "label": "mine", "method": None, "params": {}, "task": None, "key": "k", "trial": None,
           "protocol": "main", "method_id": None, "task_code": {}}
    spec = JobSpec.from_dict(old)
    assert (spec.harness_dir, spec.harness_code) == ("", "")
    check_harness_code(spec, ("/a/harness", "1a2b"))

    newer = JobSpec.from_dict({**old, "harness_dir": "/b/harness", "harness_code": "3c4d", "from_the_future": 1})
    with pytest.raises(HarnessChanged, match="planned with /b/harness"):
        check_harness_code(newer, ("/a/harness", "1a2b"))


def test_the_digest_follows_the_code_not_where_it_lies(tmp_path):
    one, two = _copy_packages(tmp_path / "one"), _copy_packages(tmp_path / "two")
    assert code_digest(one) == code_digest(two) == code_digest(REPO)
    assert len(code_digest(one)) == 16

    (two / "harness" / "__pycache__").mkdir(exist_ok=True)
    (two / "harness" / "__pycache__" / "stale.py").write_text("x = 1\n")  # not the code
    (two / "methods" / "notes.txt").write_text("not python")
    assert code_digest(two) == code_digest(one)

    edited = two / "methods" / "ties.py"
    edited.write_text(edited.read_text() + "# edited\n")
    assert code_digest(two) != code_digest(one)
    edited.write_text(edited.read_text().removesuffix("# edited\n"))
    assert code_digest(two) == code_digest(one)

    (two / "tasks" / "extra.py").write_text("")  # a file more is other code too
    assert code_digest(two) != code_digest(one)


def test_this_process_plans_with_its_own_code_and_keeps_the_keys(sweep_dict):
    from harness.workspace import Workspace

    where, digest = harness_code_id()
    assert harness_code_id() is harness_code_id()  # once per process
    assert Path(where) == REPO / "harness" and digest == code_digest(REPO)
    cfg = validate_config(dict(sweep_dict, methods=[{"name": "weight_averaging"}]))
    ws = Workspace(cfg)
    specs = plan_jobs(cfg, ws.identity, ws.task_identity())
    assert specs and all((s.harness_dir, s.harness_code) == (where, digest) for s in specs)
    for s in specs:  # not in the key: the same job of a driver elsewhere keeps its cached result
        planned_elsewhere = dataclasses.replace(s, harness_dir="/b/harness", harness_code="3c4d")
        assert with_key(cfg, planned_elsewhere, ws.identity, ws.task_identity()).key == s.key


def _planned(sweep_dict):
    from harness.workspace import Workspace

    cfg = validate_config(dict(sweep_dict, references=False, methods=[
        {"name": "weight_averaging", "label": "wa"}, {"name": "task_arithmetic", "grid": {"scaling": [0.3]}}]))
    ws = Workspace(cfg)
    return cfg, plan_jobs(cfg, ws.identity, ws.task_identity())


def test_a_slurm_job_on_other_harness_code_fails_with_the_message(sweep_dict, capsys):
    """The node's entry point: the job fails (a result, not a crash) before building its workspace."""
    from harness.executors.slurm import SweepJob

    cfg, (spec, _) = _planned(sweep_dict)
    job = SweepJob(cfg.model_dump(mode="json"), progress=False)
    assert job(spec.to_dict())["status"] == "ok"

    where, now = harness_code_id()
    moved = dataclasses.replace(spec, harness_dir="/elsewhere/harness", harness_code="0123456789abcdef")
    result = job(moved.to_dict())
    assert result["status"] == "failed" and result["metrics"] == {}
    assert result["error"] == (
        f"HarnessChanged: the node runs harness from {where} (code {now}), the sweep was planned with "
        "/elsewhere/harness (code 0123456789abcdef): results would be stored under keys of other code; make the "
        "node import the driver's harness (for sbatch --export=NONE, add a setup line that activates the same "
        "environment) or rerun the sweep")
    assert f"harness job {spec.title} failed: {result['error']}" in capsys.readouterr().err  # its stderr log

    edited = dataclasses.replace(spec, harness_code="0123456789abcdef")
    result = job(edited.to_dict())
    assert result["status"] == "failed"
    assert result["error"].startswith(f"HarnessChanged: harness code changed since the sweep was submitted ({where}: "
                                      f"code 0123456789abcdef when planned, now {now})")


def test_local_workers_run_the_planned_code_and_refuse_other(sweep_dict, monkeypatch):
    """Worker processes compute the digest of the code they imported: the same tree passes, a
    spec planned with other code fails with the message in its result."""
    import harness.executors.local as local
    from harness.executors.local import LocalExecutor
    from harness.workspace import Workspace

    cfg, (spec, other) = _planned(sweep_dict)
    tampered = dataclasses.replace(other, harness_code="0123456789abcdef")
    monkeypatch.setattr(local, "worker_context", lambda: mp.get_context("spawn"))
    ex = LocalExecutor(cfg, Workspace(cfg), workers=2)
    try:
        results = {r.key: r for _, r in ex.run([spec, tampered])}
    finally:
        ex.close()
    assert results[spec.key].status == "ok", results[spec.key].error
    failed = results[tampered.key]
    assert failed.status == "failed" and failed.metrics == {}
    assert failed.error.startswith("HarnessChanged: harness code changed since the sweep was submitted"), failed.error


def test_a_sweep_reports_the_failed_job_with_the_message(sweep_dict, tmp_path, monkeypatch):
    """Through the driver: the job's line, its result and the exit summary carry the message."""
    import io

    from rich.console import Console

    import harness.job as job
    import harness.plan as plan
    from harness.runner import run_sweep

    cfg = validate_config(dict(sweep_dict, references=False, methods=[{"name": "weight_averaging", "label": "wa"}]))
    planned_with = (str(tmp_path / "b" / "harness"), "3c4d3c4d3c4d3c4d")
    real = plan.harness_code_id()
    monkeypatch.setattr(plan, "harness_code_id", lambda: planned_with)  # the driver planned elsewhere ...
    monkeypatch.setattr(job, "check_harness_code", lambda spec: plan.check_harness_code(spec, real))  # ... ran here
    text = io.StringIO()
    outcome = run_sweep(cfg, console=Console(file=text, width=300))
    (failed,) = outcome.failed
    assert failed.error.startswith(f"HarnessChanged: the node runs harness from {real[0]} (code {real[1]}), the sweep "
                                   f"was planned with {planned_with[0]} (code {planned_with[1]})"), failed.error
    assert "HarnessChanged: the node runs harness from" in " ".join(text.getvalue().split())


def test_hidden_files_an_editor_leaves_are_not_code(tmp_path):
    """An emacs lock file (``.#ties.py``, a dangling link while a buffer is modified, unsaved) or a
    notebook's .ipynb_checkpoints/ copy is no module: a worker or node starting meanwhile must not
    find the code changed, or unreadable."""
    one, two = _copy_packages(tmp_path / "one"), _copy_packages(tmp_path / "two")
    (two / "methods" / ".#ties.py").symlink_to("user@host.1234:1700000000")
    (two / "harness" / ".ipynb_checkpoints").mkdir()
    (two / "harness" / ".ipynb_checkpoints" / "plan-checkpoint.py").write_text("x = 1\n")
    assert code_digest(two) == code_digest(one)


def test_a_renamed_module_is_other_code(tmp_path):
    """A module's name decides what imports it: the same bytes under another file name, or two
    files' contents swapped, are other code; an identical tree elsewhere is the same code."""
    def digest(folder: str, files: dict[str, str]) -> str:
        for rel, text in files.items():
            (tmp_path / folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / rel).write_text(text)
        return code_digest(tmp_path / folder)

    base = digest("a", {"harness/x.py": "A = 1\n", "methods/y.py": "B = 2\n"})
    assert digest("b", {"harness/x.py": "A = 1\n", "methods/y.py": "B = 2\n"}) == base
    assert digest("c", {"harness/z.py": "A = 1\n", "methods/y.py": "B = 2\n"}) != base
    assert digest("d", {"harness/x.py": "B = 2\n", "methods/y.py": "A = 1\n"}) != base


def test_the_digest_is_the_same_whatever_order_the_folders_list_their_files(tmp_path, monkeypatch):
    """Two file systems list one tree's files in different orders: a node must not find its
    identical copy of the code changed (every job failing HarnessChanged)."""
    import harness.plan

    tree = _copy_packages(tmp_path / "tree")
    listed = code_digest(tree)
    real = os.walk

    def reversed_walk(top, *args, **kwargs):
        for folder, dirs, names in real(top, *args, **kwargs):
            dirs.reverse()
            yield folder, dirs, names[::-1]

    monkeypatch.setattr(harness.plan.os, "walk", reversed_walk)
    assert code_digest(tree) == listed


def test_a_task_planned_as_code_of_ones_own_and_now_the_projects_is_changed_code():
    """A job planned with a task class of one's own (its digest in the key) whose process now
    builds the task from the project's class (the file gone, the name registered by the project)
    runs other data code than its key says: refused, as an edited file is."""
    from harness.plan import TaskChanged, check_task_code
    from tasks.synthetic import make_toy_task

    spec = JobSpec("merge", "x", method="weight_averaging", task_code={"toy_stripes": "0123456789abcdef"})
    with pytest.raises(TaskChanged, match="toy_stripes"):
        check_task_code(spec, make_toy_task)
    check_task_code(dataclasses.replace(spec, task_code={}), make_toy_task)
