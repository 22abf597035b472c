"""A new SQLite tracking store is seeded from a migrated empty one kept in the cache."""

from __future__ import annotations

import sqlite3
import time
import types
from pathlib import Path

import pytest

from harness.config import validate_config
from harness.tracking import seed_sqlite_store
from tests.conftest import free_port


def _experiments(db):
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT experiment_id, name, artifact_location FROM experiments").fetchall()
    con.close()
    return rows


def test_seeded_store_is_a_working_mlflow_store(tmp_path):
    from mlflow.tracking import MlflowClient

    cache = tmp_path / "cache"
    first, second = tmp_path / "a" / "mlflow.db", tmp_path / "b" / "mlflow.db"
    assert seed_sqlite_store(f"sqlite:///{first}", cache)
    (template,) = (cache / "mlflow").glob("empty-store-*.db")
    built = template.stat().st_mtime_ns
    assert seed_sqlite_store(f"sqlite:///{second}", cache)
    assert template.stat().st_mtime_ns == built  # the template is built once, then copied
    assert _experiments(second) == [(0, "Default", str(second.parent / "mlruns" / "0"))]

    client = MlflowClient(tracking_uri=f"sqlite:///{second}")
    exp = client.create_experiment("x", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "acc/avg", 51.5)
    assert client.get_run(run.info.run_id).data.metrics == {"acc/avg": 51.5}
    assert [e.name for e in client.search_experiments()] == ["x", "Default"]


def test_an_existing_store_and_other_backends_are_left_alone(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not touched")
    assert not seed_sqlite_store(f"sqlite:///{db}", tmp_path / "cache")
    assert db.read_bytes() == b"not touched"
    assert not seed_sqlite_store(f"file://{tmp_path / 'mlruns'}", tmp_path / "cache")
    assert not seed_sqlite_store("http://localhost:5000", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_tracker_opens_mlflow_on_first_use_and_reopens_the_sweep_run(sweep_dict):
    """A sweep's first result does not wait for MLflow: the store appears when the tracker is
    first used, and a second tracker for the same sweep finds the same parent run."""
    from harness.tracking import Tracker

    cfg = validate_config(sweep_dict)
    db = cfg.resolved_output_dir() / "mlflow.db"
    tracker = Tracker(cfg)
    tracker.start_sweep("d1", {"a": 1})
    assert not db.exists()
    assert not tracker.is_logged("job-1")
    assert db.exists()
    parent = tracker.parent_id
    assert parent
    again = Tracker(cfg)
    again.start_sweep("d1", {"a": 1})
    assert again.parent_id == parent
    other = Tracker(cfg)
    other.start_sweep("d2", {"a": 2})
    assert other.parent_id != parent


def test_of_two_runs_of_one_sweep_the_rerun_reopens_the_newest(sweep_dict):
    """Two parent runs of one sweep (two drivers raced to create it): a rerun continues the one
    started last, the run ``harness report`` reads, not the older one its jobs would be lost in."""
    from harness.tracking import SWEEP_TAG, Tracker

    cfg = validate_config(sweep_dict)
    first = Tracker(cfg)
    first.start_sweep("d1", {})
    first.finish(True)
    start = first.client.get_run(first.parent_id).info.start_time
    newer = first.client.create_run(first.experiment_id, start_time=start + 60_000,
                                    tags={SWEEP_TAG: "d1", "harness.kind": "sweep"}).info.run_id
    first.client.set_terminated(newer, status="FINISHED")
    rerun = Tracker(cfg)
    rerun.start_sweep("d1", {})
    assert rerun.parent_id == newer


def test_job_runs_carry_the_git_commit_they_were_logged_with(sweep_dict, monkeypatch):
    """As the README says of job runs: their tags hold the git commit when available, not only the
    parent's (which keeps the commit of the run that created it, while a resumed sweep logs its
    jobs from the code it runs now)."""
    from harness.job import JobResult
    from harness.tracking import Tracker

    cfg = validate_config(sweep_dict)
    monkeypatch.setattr("harness.tracking.git_commit", lambda: "c0ffee")
    tracker = Tracker(cfg)
    tracker.start_sweep("d1", {"a": 1})
    tracker.log_job(JobResult("k1", "merge", "ta", {}, None, "ok", metrics={"acc/avg": 50.0}), {}, "d1")
    monkeypatch.setattr("harness.tracking.git_commit", lambda: "beef42")
    resumed = Tracker(cfg)
    resumed.start_sweep("d1", {"a": 1})
    resumed.log_job(JobResult("k2", "merge", "ta", {}, None, "ok", metrics={"acc/avg": 51.0}), {}, "d1")
    monkeypatch.setattr("harness.tracking.git_commit", lambda: None)
    unknown = Tracker(cfg)
    unknown.start_sweep("d1", {"a": 1})
    unknown.log_job(JobResult("k3", "merge", "ta", {}, None, "ok", metrics={"acc/avg": 52.0}), {}, "d1")
    client = unknown.client
    parent = client.get_run(unknown.parent_id).data.tags
    assert parent["mlflow.source.git.commit"] == "c0ffee"
    jobs = {r.data.tags["harness.job_key"]: r.data.tags for r in client.search_runs(
        [unknown.experiment_id], f"tags.`mlflow.parentRunId` = '{unknown.parent_id}'")}
    assert jobs["k1"]["mlflow.source.git.commit"] == "c0ffee"
    assert jobs["k2"]["mlflow.source.git.commit"] == "beef42"
    assert "mlflow.source.git.commit" not in jobs["k3"]


def test_an_unreachable_tracking_server_fails_the_sweep_before_any_job(sweep_dict, monkeypatch):
    from harness.errors import HarnessError
    from harness.runner import run_sweep

    port = free_port()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

    def no_job(*a, **k):
        raise AssertionError("a job ran before the tracking server was checked")

    monkeypatch.setattr("harness.executors.local.run_job", no_job)
    cfg = validate_config({**sweep_dict, "tracking_uri": f"http://127.0.0.1:{port}"})
    with pytest.raises(HarnessError, match=f"tracking_uri 'http://127.0.0.1:{port}'"):
        run_sweep(cfg, quiet=True)
    assert not (cfg.resolved_output_dir() / "results").exists()


def test_a_tracking_uri_mlflow_cannot_open_fails_the_sweep_before_any_job_in_one_line(sweep_dict, monkeypatch):
    """A store MLflow has no backend for (a misspelt scheme): the sweep ran its first jobs, then
    crashed with MLflow's traceback when it first logged; like a server address, it is opened at
    the start, and refused naming the field and the URI."""
    from harness.errors import HarnessError
    from harness.runner import run_sweep

    monkeypatch.setattr("harness.executors.local.run_job",
                        lambda *a, **k: pytest.fail("a job ran before the tracking store was opened"))
    cfg = validate_config({**sweep_dict, "tracking_uri": "sqlit:///mlflow.db"})
    with pytest.raises(HarnessError, match=r"^tracking_uri 'sqlit:///mlflow.db': MLflow cannot open it \(.*"
                                           r"unsupported URI 'sqlit:///mlflow.db'"):
        run_sweep(cfg, quiet=True)
    assert not (cfg.resolved_output_dir() / "results").exists()


def test_a_refused_tracking_server_is_reported_at_once_in_one_line(sweep_dict, refused_tracking_port, capfd):
    """MLflow's client retries a refused connection with backoff (by default seven times, about
    four minutes, a warning line each): the address is checked first, without retries."""
    from harness.errors import HarnessError
    from harness.tracking import Tracker

    port = refused_tracking_port
    tracker = Tracker(validate_config({**sweep_dict, "tracking_uri": f"http://127.0.0.1:{port}"}))
    t0 = time.monotonic()
    with pytest.raises(HarnessError, match=rf"tracking_uri 'http://127.0.0.1:{port}': MLflow cannot be reached "
                                           r"\(.*Connection refused\)$"):
        tracker.start_sweep("d", {})
    assert time.monotonic() - t0 < 10
    assert "Retrying" not in capfd.readouterr().err


@pytest.mark.parametrize("server", ["down", "silent"])
def test_a_database_store_that_takes_no_connection_is_reported_at_once_in_one_line(sweep_dict, server, monkeypatch):
    """A PostgreSQL store that is down made MLflow retry for about 100 s before saying so, and one
    that takes the connection and never answers held the sweep, and ``harness report``, forever:
    both are refused with the driver's words before MLflow opens the store."""
    import re
    import socket

    from harness import path_checks
    from harness.errors import HarnessError
    from harness.report import load_sweep_from_mlflow
    from harness.tracking import Tracker

    monkeypatch.setattr(path_checks, "CONNECT_TIMEOUT_S", 1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        if server == "silent":
            sock.listen(8)  # the kernel completes the connection; nothing ever answers
        uri = f"postgresql+psycopg2://user:pw@127.0.0.1:{sock.getsockname()[1]}/mlflow"
        words = "timeout expired" if server == "silent" else "Connection refused"
        for open_store in (lambda: Tracker(validate_config({**sweep_dict, "tracking_uri": uri})).start_sweep("d", {}),
                           lambda: load_sweep_from_mlflow(uri)):
            t0 = time.monotonic()
            reached = rf"MLflow cannot be reached \(connection to server at \"127.0.0.1\", port \d+ failed: {words}\)$"
            with pytest.raises(HarnessError, match=rf"^tracking_uri '{re.escape(uri)}': {reached}"):
                open_store()
            assert time.monotonic() - t0 < 30


def test_a_sweep_on_a_tracking_server_prints_its_table_without_mlflows_run_links(sweep_dict, tmp_path, monkeypatch,
                                                                                 capfd):
    """MLflow's client printed "View run ... at: URL" and "View experiment at: URL" to stdout as
    each run on a server ended: two lines per job between the progress and the table (and with
    -q). The runs are all on the server, and nothing of MLflow's is printed."""
    import subprocess
    import sys
    import urllib.request

    from mlflow.tracking import MlflowClient

    from harness.runner import run_sweep
    from tests.conftest import stop_process_group

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'server.db'}", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "the MLflow server did not start"
                time.sleep(0.5)
        d = {**sweep_dict, "tracking_uri": uri, "methods": [{"name": "weight_averaging"}]}
        outcome = run_sweep(validate_config(d), quiet=False)
        out, err = capfd.readouterr()
        client = MlflowClient(uri)
        (exp,) = [e for e in client.search_experiments() if e.name == "toy"]
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == len(outcome.results) + 1  # the jobs' and the sweep's runs are on the server
        assert "View run" not in out and "View experiment" not in out and uri not in out, out
        assert "weight_averaging" in err  # the table, on the driver's console
    finally:
        stop_process_group(server)


def test_a_copied_output_folder_keeps_its_artifacts_to_itself(sweep_dict, tmp_path):
    """MLflow stores absolute artifact paths: a copy extended by a rerun must write into the
    copy, and read the copied artifacts, so the original can be deleted."""
    import shutil

    from harness.report import load_sweep_from_mlflow
    from harness.runner import run_sweep

    run_sweep(validate_config(dict(sweep_dict, output_dir=str(tmp_path / "a"))), quiet=True)
    before = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / "mlartifacts").rglob("*"))
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    methods = [{"name": "weight_averaging"}, {"name": "task_arithmetic", "grid": {"scaling": [0.2, 0.6, 0.9]}}]
    second = run_sweep(validate_config(dict(sweep_dict, output_dir=str(tmp_path / "c"), methods=methods)), quiet=True)
    assert len(second.executed) == 1
    assert sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / "mlartifacts").rglob("*")) == before
    shutil.rmtree(tmp_path / "a")
    _, results, _ = load_sweep_from_mlflow(f"sqlite:///{tmp_path / 'c' / 'mlflow.db'}")
    assert {r.key for r in results} == {r.key for r in second.results}
    assert all(r.test_correct for r in results)  # artifacts read from the copy


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_template_is_rebuilt(tmp_path, damage):
    """A damaged template in the cache would break every new sweep's store: it is rebuilt."""
    from mlflow.tracking import MlflowClient

    cache = tmp_path / "cache"
    assert seed_sqlite_store(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", cache)
    (template,) = (cache / "mlflow").glob("empty-store-*.db")
    data = template.read_bytes()
    template.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x01" * 4096}[damage])
    db = tmp_path / "b" / "mlflow.db"
    assert seed_sqlite_store(f"sqlite:///{db}", cache)
    assert _experiments(db) == [(0, "Default", str(db.parent / "mlruns" / "0"))]
    with sqlite3.connect(template) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.create_run(client.create_experiment("x"))
    client.log_metric(run.info.run_id, "acc/avg", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"acc/avg": 1.0}
    assert sorted(p.name for p in db.parent.iterdir()) == ["mlflow.db"]
    assert sorted(p.name for p in template.parent.iterdir() if p.suffix == ".tmp") == []


def test_a_failed_seeding_leaves_no_temp_file(tmp_path, monkeypatch):
    import harness.tracking as tracking

    seed_sqlite_store(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", tmp_path / "cache")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracking.os, "replace", full_disk)
    monkeypatch.setattr(tracking.os, "link", full_disk)  # how the copy is published where hard links work
    with pytest.raises(OSError, match="No space left"):
        seed_sqlite_store(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}", tmp_path / "cache")
    assert list((tmp_path / "b").iterdir()) == []


def test_a_store_another_sweep_seeded_meanwhile_keeps_its_runs(sweep_dict, tmp_path, monkeypatch):
    """Two sweeps (other folders) share a new ``tracking_uri``: both find it missing and seed it.
    The one that publishes second must not replace the store the first has already logged to."""
    import shutil
    import subprocess
    import sys

    import harness.tracking as tracking

    store = tmp_path / "shared" / "mlflow.db"
    uri = f"sqlite:///{store}"
    cfg = {**sweep_dict, "tracking_uri": uri, "experiment": "shared"}
    other = {**cfg, "name": "other", "output_dir": str(tmp_path / "other")}
    mine = validate_config({**cfg, "name": "mine", "output_dir": str(tmp_path / "mine")})
    real_copy = shutil.copyfile

    def other_seeds_and_logs(src, dst, *args, **kwargs):  # while this one's copy is not in place yet
        out = real_copy(src, dst, *args, **kwargs)
        if Path(dst).name.startswith(".mlflow.db."):
            subprocess.run([sys.executable, "-c", (
                "from harness.config import validate_config; from harness.tracking import Tracker; "
                f"t = Tracker(validate_config({other!r})); t.start_sweep('d-other', {{}}); t.finish(ok=True)")],
                check=True, cwd=Path(__file__).parents[1])
        return out

    monkeypatch.setattr(tracking.shutil, "copyfile", other_seeds_and_logs)
    tracker = tracking.Tracker(mine)
    tracker.start_sweep("d-mine", {})
    tracker.finish(ok=True)
    with sqlite3.connect(store) as con:
        runs = sorted(con.execute("SELECT name, status FROM runs").fetchall())
    con.close()
    assert runs == [("mine", "FINISHED"), ("other", "FINISHED")]
    assert not list(store.parent.glob(".mlflow.db.*.tmp"))


def test_an_experiment_another_sweep_created_meanwhile_is_joined(sweep_dict, tmp_path, monkeypatch):
    """Two sweeps (other folders) log to one store and ``experiment``, new: both find no
    experiment; the one that creates it second joins the first's instead of failing."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from harness.tracking import Tracker

    store = tmp_path / "shared" / "mlflow.db"
    cfg = {**sweep_dict, "tracking_uri": f"sqlite:///{store}", "experiment": "shared"}
    other = {**cfg, "name": "other", "output_dir": str(tmp_path / "other")}
    tracker = Tracker(validate_config({**cfg, "name": "mine", "output_dir": str(tmp_path / "mine")}))
    real_get = MlflowClient.get_experiment_by_name

    def other_creates_it_meanwhile(self, name):
        found = real_get(self, name)
        monkeypatch.setattr(MlflowClient, "get_experiment_by_name", real_get)
        subprocess.run([sys.executable, "-c", (
            "from harness.config import validate_config; from harness.tracking import Tracker; "
            f"t = Tracker(validate_config({other!r})); t.start_sweep('d-other', {{}}); t.finish(ok=True)")],
            check=True, cwd=Path(__file__).parents[1])
        return found

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", other_creates_it_meanwhile)
    tracker.start_sweep("d-mine", {})
    tracker.finish(ok=True)
    with sqlite3.connect(store) as con:
        runs = sorted(con.execute("SELECT r.name, r.status, e.name FROM runs r JOIN experiments e "
                                  "USING (experiment_id)").fetchall())
    con.close()
    assert runs == [("mine", "FINISHED", "shared"), ("other", "FINISHED", "shared")]


def test_a_sweep_runs_over_a_damaged_template_and_clears_old_temp_files(sweep_dict):
    from harness.runner import run_sweep

    cfg = validate_config(dict(sweep_dict, methods=[{"name": "weight_averaging"}], references=False))
    template = seed_template(cfg)
    template.write_bytes(template.read_bytes()[:5000])
    out = cfg.resolved_output_dir()
    out.mkdir(parents=True)
    (out / ".mlflow.db.12345.tmp").write_bytes(template.read_bytes())  # a crashed earlier seeding's
    outcome = run_sweep(cfg, quiet=True)
    assert not outcome.failed and outcome.parent_run_id
    assert not list(out.glob(".mlflow.db.*.tmp"))


def seed_template(cfg):
    """The sweep's cache with its MLflow template built; returns the template's path."""
    scratch = cfg.resolved_cache_dir() / "scratch" / "mlflow.db"
    seed_sqlite_store(f"sqlite:///{scratch}", cfg.resolved_cache_dir())
    (template,) = (cfg.resolved_cache_dir() / "mlflow").glob("empty-store-*.db")
    return template


def test_another_sweep_logging_to_this_folders_store_keeps_its_artifacts(sweep_dict, tmp_path):
    """Sweep B (another folder) logs to sweep A's mlflow.db through ``tracking_uri``; its
    artifacts lie in B's folder. Rerunning A on its own store must not take B's experiment for
    a copied one and point it at A's folder, where B's artifacts are not: B's report, read from
    MLflow, must still find them."""
    from harness.report import load_sweep_from_mlflow
    from harness.runner import run_sweep

    a = validate_config(dict(sweep_dict, output_dir=str(tmp_path / "a")))
    store = f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    b = validate_config(dict(sweep_dict, name="other", output_dir=str(tmp_path / "b"), tracking_uri=store,
                             methods=[{"name": "task_arithmetic"}]))
    run_sweep(a, quiet=True)
    second = run_sweep(b, quiet=True)
    run_sweep(a, quiet=True)  # all cached: reopens A's store
    locations = {name: loc for _, name, loc in _experiments(tmp_path / "a" / "mlflow.db")}
    assert locations["other"] == (tmp_path / "b" / "mlartifacts").resolve().as_uri()
    cfg, results, _ = load_sweep_from_mlflow(store, sweep=b)
    assert cfg.name == "other" and {r.key for r in results} == {r.key for r in second.results}
    assert all(r.test_correct for r in results)  # per-image records read from B's artifacts


def test_two_folders_of_one_experiment_in_one_store_each_report_their_own_tables(sweep_dict, tmp_path):
    """Sweep B, the same experiment as A in another folder with fewer methods, logging to A's
    store, shares A's parent run and logs its config and job list there last: ``harness report A``
    gave B's table (task arithmetic's row gone); each folder reports its own, as its sweep wrote it."""
    from click.testing import CliRunner

    from harness.cli import main
    from harness.runner import run_sweep

    store = f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    a = validate_config(dict(sweep_dict, output_dir=str(tmp_path / "a")))
    b = validate_config(dict(sweep_dict, output_dir=str(tmp_path / "b"), tracking_uri=store,
                             methods=[{"name": "weight_averaging"}]))
    run_sweep(a, quiet=True)
    run_sweep(b, quiet=True)
    for folder in ("a", "b"):
        r = CliRunner().invoke(main, ["report", str(tmp_path / folder), "--out", str(tmp_path / f"rep-{folder}")])
        assert r.exit_code == 0, r.output
        for name in ("main.csv", "significance.csv", "jobs.json"):
            assert (tmp_path / f"rep-{folder}" / name).read_text() == (tmp_path / folder / "report" / name).read_text()
    assert "task_arithmetic" in (tmp_path / "rep-a" / "main.csv").read_text()
    assert "task_arithmetic" not in (tmp_path / "rep-b" / "main.csv").read_text()
    (tmp_path / "a" / "report" / "jobs.json").unlink()
    r = CliRunner().invoke(main, ["report", str(tmp_path / "a"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 2
    assert " ".join(r.stderr.split()).startswith(f"error: {tmp_path / 'a' / 'report' / 'jobs.json'}: missing or "
                                                 "damaged, and sweep run ")
    assert f"last logged to by the sweep of output folder {tmp_path / 'b'} (the same experiment)" in " ".join(
        r.stderr.split())


@pytest.mark.parametrize("kind,call", [("sweep", "create_run"), ("merge", "create_run"), ("tune", "create_run"),
                                       ("trial", "create_run"), ("tune", "log_batch")])
def test_ctrl_c_just_after_a_run_is_created_leaves_no_run_running(kind, call, sweep_dict, monkeypatch):
    """Ctrl-C lands once MLflow has stored a run but before the driver holds its id (the end of
    ``create_run``, or while a new study's params are logged): the run still ends KILLED."""
    from mlflow.tracking import MlflowClient

    from harness.runner import run_sweep

    d = dict(sweep_dict, references=False, methods=[
        {"name": "weight_averaging"},
        {"name": "task_arithmetic", "tune": {"n_trials": 1, "space": {"scaling": {"type": "float", "low": 0.1,
                                                                                  "high": 0.9}}}}])
    cfg = validate_config(d)
    real_create, real_batch = MlflowClient.create_run, MlflowClient.log_batch
    created: dict[str, str] = {}

    def create_run(self, experiment_id, *args, tags=None, **kwargs):
        run = real_create(self, experiment_id, *args, tags=tags, **kwargs)
        created[run.info.run_id] = (tags or {}).get("harness.kind")
        if call == "create_run" and created[run.info.run_id] == kind:
            raise KeyboardInterrupt
        return run

    def log_batch(self, run_id, *args, **kwargs):
        if call == "log_batch" and created.get(run_id) == kind:
            raise KeyboardInterrupt
        return real_batch(self, run_id, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_run", create_run)
    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, quiet=True)
    monkeypatch.undo()
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    status = {r.data.tags.get("harness.kind"): r.info.status for r in client.search_runs([exp])
              if r.info.run_id in created and created[r.info.run_id] == kind}
    assert status == {kind: "KILLED"}


def test_ctrl_c_while_a_run_is_created_ends_only_that_run(tmp_path):
    """The run being created is found by its tag: another driver's RUNNING run with the same tag
    (one sweep run from two folders against one tracking server), started earlier, is not it."""
    from mlflow.tracking import MlflowClient

    from harness.tracking import JOB_TAG, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("x")
    other = client.create_run(exp, tags={JOB_TAG: "k1"}).info.run_id
    time.sleep(0.01)
    real_create = MlflowClient.create_run

    def interrupted(self, *args, **kwargs):
        real_create(self, *args, **kwargs)
        raise KeyboardInterrupt

    tracker = Tracker.__new__(Tracker)
    tracker._client, tracker.experiment_id, tracker._writing, tracker._parent_id = client, exp, set(), None
    tracker._creating = None
    client.create_run = types.MethodType(interrupted, client)
    with pytest.raises(KeyboardInterrupt):
        tracker._create_run({JOB_TAG: "k1"}, JOB_TAG)
    tracker.abandon("KILLED")
    status = {r.info.run_id: r.info.status for r in client.search_runs([exp])}
    assert status.pop(other) == "RUNNING" and list(status.values()) == ["KILLED"]


def test_ctrl_c_as_a_tracking_server_gets_the_sweeps_run_leaves_it_killed(sweep_dict, monkeypatch):
    """A tracking server's parent run is created by ``start_sweep``, before any job: Ctrl-C then
    ends it KILLED too."""
    from mlflow.tracking import MlflowClient

    from harness.runner import run_sweep
    from harness.tracking import Tracker

    real = Tracker.start_sweep

    def start_sweep(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self._open()  # as for an http(s):// store
        raise KeyboardInterrupt

    monkeypatch.setattr(Tracker, "start_sweep", start_sweep)
    cfg = validate_config(dict(sweep_dict, references=False, methods=[{"name": "weight_averaging"}]))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, quiet=True)
    client = MlflowClient(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.name).experiment_id
    assert [r.info.status for r in client.search_runs([exp])] == ["KILLED"]


def test_a_live_sweep_of_another_folder_in_this_experiment_keeps_its_runs_running(sweep_dict, tmp_path):
    """Sweep B (another folder) logs to A's mlflow.db under A's name, so in A's experiment, and
    runs: A's rerun ends runs a killed driver left RUNNING, not B's live ones (B holds its folder's
    lock). Once B's driver is gone (its lock released, its run left RUNNING), A's rerun ends it."""
    from harness.runner import _output_lock, run_sweep
    from harness.tracking import Tracker

    a = validate_config(dict(sweep_dict, output_dir=str(tmp_path / "a"), methods=[{"name": "weight_averaging"}]))
    store = f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    b = validate_config(dict(sweep_dict, output_dir=str(tmp_path / "b"), tracking_uri=store, eval={"max_samples": 8}))
    run_sweep(a, quiet=True)
    (tmp_path / "b").mkdir()

    def status(run_id):
        with sqlite3.connect(tmp_path / "a" / "mlflow.db") as con:
            (found,) = con.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
        con.close()
        return found

    with _output_lock(tmp_path / "b"):  # B's driver, running: its parent run and a job run being logged
        tracker = Tracker(b)
        tracker.start_sweep(b.digest(), {})
        job = tracker.client.create_run(tracker.experiment_id, tags={
            "mlflow.parentRunId": tracker.parent_id, "harness.kind": "merge", "harness.job_key": "k"}).info.run_id
        assert tracker.experiment_id == Tracker(a).client.get_experiment_by_name("toy").experiment_id
        run_sweep(a, quiet=True)
        assert (status(tracker.parent_id), status(job)) == ("RUNNING", "RUNNING")
    run_sweep(a, quiet=True)  # B's driver gone, its runs left RUNNING
    assert (status(tracker.parent_id), status(job)) == ("KILLED", "KILLED")


def test_a_copied_folders_experiment_without_runs_moves_to_the_copy(tmp_path):
    """An experiment of the copied folder that has no run yet tells nothing by its artifacts, yet
    its location names the original folder (which still exists): it moves to the copy, or the
    copy's first runs would write their artifacts into the original."""
    from harness.tracking import relocate_copied_store

    old, new = tmp_path / "a", tmp_path / "c"
    (old / "mlartifacts").mkdir(parents=True)
    new.mkdir()
    with sqlite3.connect(new / "mlflow.db") as con:
        con.execute("CREATE TABLE experiments (experiment_id INTEGER, artifact_location TEXT)")
        con.execute("CREATE TABLE runs (experiment_id INTEGER, artifact_uri TEXT)")
        con.execute("INSERT INTO experiments VALUES (1, ?)", ((old / "mlartifacts").as_uri(),))
    con.close()
    assert relocate_copied_store(f"sqlite:///{new / 'mlflow.db'}", new) == str(old.resolve())
    with sqlite3.connect(new / "mlflow.db") as con:
        assert con.execute("SELECT artifact_location FROM experiments").fetchall() == [
            ((new / "mlartifacts").resolve().as_uri(),)]
    con.close()


@pytest.mark.parametrize("experiments, empty", [([0], True), ([0, 1], False)])
def test_a_template_holding_another_experiment_is_not_taken_for_an_empty_store(tmp_path, experiments, empty):
    """A template that gained an experiment (written to by mistake) would hand it to every new
    store seeded from it: only the Default experiment alone makes a template fit to copy."""
    from harness.tracking import _is_empty_store

    db = tmp_path / "template.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE alembic_version (version_num TEXT)")
        con.execute("INSERT INTO alembic_version VALUES ('head')")
        con.execute("CREATE TABLE experiments (experiment_id INTEGER)")
        con.executemany("INSERT INTO experiments VALUES (?)", [(e,) for e in experiments])
    con.close()
    assert _is_empty_store(db) is empty
