"""A driver killed outright (SIGKILL: no handler, no atexit) takes its local worker pool with
it: the workers, their server and the resource tracker exit within seconds instead of living on
under init while holding gigabytes."""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.config import validate_config
from methods.base import MergeMethod
from tests.conftest import process_running

ROOT = Path(__file__).resolve().parents[1]


class Hangs(MergeMethod):
    """Writes its worker's pid to a file in ``pid_dir``, then blocks: a long job in progress."""

    pid_dir: str
    tag: int = 0

    def merge(self, pretrained, finetuned, ctx):
        Path(self.pid_dir, str(os.getpid())).write_text("")
        time.sleep(300)
        return copy.deepcopy(pretrained)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_killed_driver_takes_its_workers_with_it(sweep_dict, tmp_path):
    pid_dir = tmp_path / "busy"
    pid_dir.mkdir()
    sweep = dict(sweep_dict, references=False,
                 methods=[{"name": "tests.test_driver_death:Hangs", "params": {"pid_dir": str(pid_dir)},
                           "grid": {"tag": [0, 1]}}])
    code = textwrap.dedent(f"""
        import json
        from multiprocessing import forkserver, resource_tracker
        from harness.executors.server import prestart
        prestart()
        from harness.config import validate_config
        from harness.executors.local import LocalExecutor
        from harness.plan import plan_jobs
        from harness.workspace import Workspace
        cfg = validate_config(json.loads({json.dumps(json.dumps(sweep))}))
        ws = Workspace(cfg)
        specs = plan_jobs(cfg, ws.identity, ws.task_identity())
        ex = LocalExecutor(cfg, ws, workers=2)
        ex.start(len(specs))
        helpers = list(ex._pool._processes) + [forkserver._forkserver._forkserver_pid,
                                                resource_tracker._resource_tracker._pid]
        print(json.dumps([p for p in helpers if p]), flush=True)
        for _ in ex.run(specs):
            pass
    """)
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        helpers = json.loads(driver.stdout.readline() or "null")
        assert helpers and len(helpers) >= 3, "the driver did not start its pool"
        deadline = time.monotonic() + 60
        while len(list(pid_dir.iterdir())) < 2 and time.monotonic() < deadline:  # both workers busy
            assert driver.poll() is None, "the driver exited early"
            time.sleep(0.1)
        busy = {int(p.name) for p in pid_dir.iterdir()}
        assert len(busy) == 2 and busy <= set(helpers)
    finally:
        driver.kill()
        driver.wait()
        driver.stdout.close()
    t0 = time.monotonic()
    while any(process_running(p) for p in helpers) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    alive = [p for p in helpers if process_running(p)]
    for p in alive:  # leave nothing behind for the next test, whatever the outcome
        os.kill(p, signal.SIGKILL)
    assert not alive, f"still running {time.monotonic() - t0:.1f} s after the driver was killed: {alive}"


def _sigint_by_default() -> None:
    """Undo an inherited SIG_IGN: a shell without job control (CI, ``cmd &``) starts background
    commands with SIGINT ignored, and a Python started so never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("workers,how", [(1, "sigint"), (2, "ctrl-c"), (2, "kill")])
def test_ctrl_c_or_kill_ends_with_one_line_on_how_to_resume(sweep_dict, tmp_path, workers, how):
    """SIGINT to the driver alone; to its whole process group, as a terminal's Ctrl-C sends it
    (the pool's workers then get it too); or SIGTERM, as plain ``kill`` sends it: one line, exit
    code 130 (143 for SIGTERM), workers gone, finished jobs kept, the MLflow run KILLED."""
    import yaml

    pid_dir = tmp_path / "busy"
    pid_dir.mkdir()
    sweep = dict(sweep_dict, references=False, executor={"workers": workers},
                 methods=[{"name": "weight_averaging"},
                          {"name": "tests.test_driver_death:Hangs", "params": {"pid_dir": str(pid_dir)}}])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep))
    cli = Path(sys.executable).parent / "harness"
    driver = subprocess.Popen([str(cli), "sweep", "-q", str(f)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                              preexec_fn=_sigint_by_default, start_new_session=True)
    results = Path(sweep_dict["output_dir"]) / "results"
    cfg = validate_config(sweep)
    store = Path(cfg.resolved_tracking_uri().removeprefix("sqlite:///"))

    @functools.cache
    def client() -> MlflowClient:
        return MlflowClient(cfg.resolved_tracking_uri())

    def run_status() -> dict[str, str]:
        # no client before the driver puts its store in place: one made earlier creates the store
        # itself, migrating it while the driver does too (MLflow's "table ... already exists")
        if not store.exists():
            return {}
        exp = client().get_experiment_by_name(cfg.name)
        runs = client().search_runs([exp.experiment_id]) if exp else []
        return {r.data.tags.get("harness.kind"): r.info.status for r in runs}

    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (any(pid_dir.iterdir()) and any(results.glob("*.json"))
                                                   and run_status().get("merge") == "FINISHED"):
            assert driver.poll() is None, driver.stderr.read()
            time.sleep(0.2)
        if how == "ctrl-c":
            os.killpg(driver.pid, signal.SIGINT)
        else:
            driver.send_signal(signal.SIGTERM if how == "kill" else signal.SIGINT)
        _, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        busy = [int(p.name) for p in pid_dir.iterdir()]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(process_running(p) for p in busy if p != driver.pid):
        time.sleep(0.1)
    left = [p for p in busy if p != driver.pid and process_running(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert driver.returncode == (143 if how == "kill" else 130), err
    word = "terminated" if how == "kill" else "interrupted"
    assert err.strip().splitlines()[-1] == f"{word}: finished jobs are saved; rerun the same command to resume"
    assert "Traceback" not in err, err
    assert not left, f"workers still running after Ctrl-C: {left}"
    saved = [json.loads(p.read_text()) for p in results.glob("*.json")]
    assert [r["label"] for r in saved] == ["weight_averaging"]  # the job that finished before Ctrl-C
    assert run_status() == {"sweep": "KILLED", "merge": "FINISHED"}  # not left RUNNING in the UI


def _group_processes(pgid: int, containing: str = "") -> list[str]:
    """Command lines of the live processes in process group ``pgid`` that contain ``containing``."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pgid=,stat=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in ps.splitlines()]
    return [r[2] for r in rows if len(r) == 3 and r[0] == str(pgid) and not r[1].startswith("Z")
            and containing in r[2]]


def test_ctrl_c_stops_the_suites_fine_tuning_workers_at_once(tmp_path):
    """``harness prepare`` fine-tunes in spawned workers; SIGINT to the driver alone must stop
    them now, not after their fine-tuning runs end."""
    import yaml

    sweep = yaml.safe_load((ROOT / "sweeps" / "quick.yaml").read_text())
    sweep["model"]["suite"].update(pretrain_steps=4, finetune_steps=100_000, workers=2)  # would run for hours
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sweep))
    cli = Path(sys.executable).parent / "harness"
    driver = subprocess.Popen([str(cli), "prepare", str(f), f"cache_dir={tmp_path / 'cache'}"], cwd=ROOT,
                              stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"),
                              preexec_fn=_sigint_by_default, start_new_session=True)
    try:
        seen = []
        for line in driver.stdout:  # pretraining's progress lines, until its last
            seen.append(line)
            if line.startswith("pretrain ") and "4/4" in line:
                break
        deadline = time.monotonic() + 60
        while len(_group_processes(driver.pid, "spawn_main")) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert driver.poll() is None and len(_group_processes(driver.pid, "spawn_main")) >= 2, "".join(seen)
        time.sleep(5)  # the workers are fine-tuning now
        t0 = time.monotonic()
        driver.send_signal(signal.SIGINT)
        rest, _ = driver.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _group_processes(driver.pid):
        time.sleep(0.1)
    left = _group_processes(driver.pid)
    if left:
        os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, rest
    assert rest.strip().splitlines()[-1] == ("interrupted: models built so far are cached; "
                                             "rerun the same command to resume")
    assert took < 20, f"{took:.1f} s to stop"
    assert not left, f"still running after Ctrl-C: {left}"
