"""The MLflow UI of a finished sweep, opened in a real headless Chromium (Debian `chromium`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from harness.config import validate_config
from harness.runner import run_sweep
from tests.conftest import free_port, stop_process_group

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("HARNESS_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--virtual-time-budget=15000",
         "--window-size=1400,900"]


def chromium(args: list[str], profile: Path) -> str:
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                       timeout=120)
    return r.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Debian package 'chromium' is not installed (setup.sh installs it as root)")
def test_mlflow_ui_shows_the_sweep(sweep_dict, tmp_path):
    cfg = validate_config(sweep_dict)
    out = run_sweep(cfg, quiet=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "ui", str(out.output_dir), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        exp = None
        deadline = time.time() + 90
        while exp is None and time.time() < deadline:
            try:
                url = f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={cfg.name}"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    exp = json.loads(resp.read())["experiment"]["experiment_id"]
            except OSError:
                time.sleep(0.5)
        assert exp is not None, "the MLflow UI server did not start"
        runs_page = chromium(["--dump-dom", f"{base}/#/experiments/{exp}/runs"], tmp_path / "p1")
        assert cfg.name in runs_page
        assert f"<strong>{len(out.results) + 1}</strong> matching runs" in runs_page  # parent + nested runs
        job = next(r for r in out.results if r.label == "task_arithmetic")
        from mlflow.tracking import MlflowClient

        run = MlflowClient(cfg.resolved_tracking_uri()).search_runs(
            [exp], f"tags.`harness.job_key` = '{job.key}'")[0]
        run_page = chromium(["--dump-dom", f"{base}/#/experiments/{exp}/runs/{run.info.run_id}"], tmp_path / "p2")
        assert "acc/avg" in run_page and "norm_acc/avg" in run_page
        assert run.info.run_id in run_page or "task_arithmetic" in run_page
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "mlflow-ui-runs.png"
        chromium([f"--screenshot={shot}", f"{base}/#/experiments/{exp}/runs"], tmp_path / "p3")
        assert shot.is_file() and shot.stat().st_size > 10_000
    finally:
        stop_process_group(proc)
