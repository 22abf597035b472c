"""Local workers are forked from one server that imported torch and open_clip once; they still
see the driver's environment as it is when their pool starts, and the command line starts the
server before its own imports of torch."""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from harness.executors.server import worker_context
from tests.conftest import process_running, run_fresh


def imported(names: list[str]) -> tuple[int, dict[str, bool]]:
    """Run in a worker with no initializer: what it has imported, it got from the server."""
    return os.getpid(), {n: n in sys.modules for n in names}


def test_a_worker_starts_with_the_libraries_imported():
    if "forkserver" not in mp.get_all_start_methods():
        pytest.skip("this platform has no forkserver: workers are spawned")
    ctx = worker_context()
    with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        pid, mods = pool.submit(imported, ["torch", "open_clip", "harness.job"]).result(timeout=300)
    assert pid != os.getpid()
    assert mods == {"torch": True, "open_clip": True, "harness.job": True}


def test_workers_get_the_environment_of_the_driver_when_their_pool_starts(sweep_dict):
    """The server started with HARNESS_PROBE_OLD set; the pool started after it was removed and
    HARNESS_PROBE_NEW set (as a test's monkeypatch or a user's shell would)."""
    sweep = dict(sweep_dict, references=False, methods=[{"name": "tests.worker_probe:EnvProbe", "grid": {}}])
    out = run_fresh(f"""
        import json, os
        os.environ["HARNESS_PROBE_OLD"] = "1"
        from harness.executors.server import prestart
        prestart()
        del os.environ["HARNESS_PROBE_OLD"]
        os.environ["HARNESS_PROBE_NEW"] = "2"
        from harness.config import validate_config
        from harness.executors.local import LocalExecutor
        from harness.plan import plan_jobs
        from harness.workspace import Workspace
        cfg = validate_config(json.loads({json.dumps(json.dumps(sweep))}))
        ws = Workspace(cfg)
        specs = plan_jobs(cfg, ws.identity, ws.task_identity()) * 2
        ex = LocalExecutor(cfg, ws, workers=2)
        try:
            results = [r for _, r in ex.run(specs)]
        finally:
            ex.close()
        print(json.dumps([[r.status, r.artifacts.get("env")] for r in results]))
    """)
    results = json.loads(out.strip().splitlines()[-1])
    assert results == [["ok", {"HARNESS_PROBE_NEW": "2"}]] * 2


def test_the_command_line_starts_the_server_before_importing_torch(sweep_dict, tmp_path):
    """Only a sweep that runs a local pool starts it, and before config validation imports torch."""
    files = {}
    for name, executor in {"pool": {"kind": "local", "workers": 2}, "inprocess": {"kind": "local", "workers": 1},
                           "slurm": {"kind": "slurm", "workers": 2}}.items():
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(dict(sweep_dict, executor=executor)))
    out = run_fresh(f"""
        import json, sys
        import harness.executors.server as server
        calls = []
        server.prestart = lambda: calls.append("torch" in sys.modules)
        from harness.cli import _load
        _load({str(files["pool"])!r}, (), start_workers=True)  # the first: nothing imported torch yet
        _load({str(files["pool"])!r}, (), start_workers=False)  # --dry-run, --detach
        _load({str(files["inprocess"])!r}, (), start_workers=True)
        _load({str(files["slurm"])!r}, (), start_workers=True)
        _load({str(files["inprocess"])!r}, ("executor.workers=2",), start_workers=True)
        print(json.dumps(calls))
    """)
    assert json.loads(out.strip().splitlines()[-1]) == [False, True]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_server_still_importing_ends_with_the_driver(tmp_path):
    """A driver that exits early (a preflight error, nothing left to run) takes the server with it
    instead of leaving it to import for seconds while holding the driver's output open."""
    log = tmp_path / "out.txt"
    code = textwrap.dedent("""
        from multiprocessing import forkserver
        from harness.executors.server import prestart
        prestart()
        print(forkserver._forkserver._forkserver_pid, flush=True)
    """)
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-c", code], stdout=out, check=True, timeout=120)
    pid = int(log.read_text().split()[0])
    deadline = time.monotonic() + 1.0  # the server's imports take several seconds
    while process_running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_running(pid)


def test_workers_are_spawned_when_the_server_cannot_start(monkeypatch):
    from multiprocessing import forkserver

    import harness.executors.server as server

    def refuse():
        raise OSError("no Unix sockets here")

    monkeypatch.setattr(server, "_failed", None)
    monkeypatch.setattr(forkserver, "ensure_running", refuse)
    with pytest.warns(UserWarning, match="no Unix sockets here"):
        server.prestart()
    ctx = worker_context()
    assert ctx.get_start_method() == "spawn"
    with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        pid, mods = pool.submit(imported, ["open_clip"]).result(timeout=300)
    assert pid != os.getpid() and mods == {"open_clip": False}  # a spawned worker imports for itself
