"""The local worker pool lives as long as the sweep: workers start once, survive phases and
batches, and a pool broken by a dead worker is replaced for the next batch."""

from __future__ import annotations

import os
import signal
import time

import pytest

from harness.config import validate_config
from harness.executors.local import LocalExecutor
from harness.plan import plan_jobs
from harness.workspace import Workspace


def _specs(sweep_dict, methods):
    cfg = validate_config(dict(sweep_dict, methods=methods, references=False))
    ws = Workspace(cfg)
    return cfg, ws, plan_jobs(cfg, ws.identity, ws.task_identity())


def test_one_pool_serves_every_batch(sweep_dict):
    cfg, ws, specs = _specs(sweep_dict, [{"name": "tests.worker_probe:WorkerPid", "grid": {"tag": [0, 1, 2, 3]}}])
    ex = LocalExecutor(cfg, ws, workers=2)
    try:
        ex.start(len(specs))
        first = [r for _, r in ex.run(specs[:2])]
        second = [r for _, r in ex.run(specs[2:])]
    finally:
        ex.close()
    assert all(r.status == "ok" for r in first + second)
    pids = {r.artifacts["pid"] for r in first + second}
    assert len(pids) <= 2 and os.getpid() not in pids  # the same two workers ran both batches


def test_a_dead_worker_fails_its_batch_and_the_next_batch_gets_a_new_pool(sweep_dict):
    cfg, ws, specs = _specs(sweep_dict, [{"name": "tests.worker_probe:KillsWorker", "label": "dies"},
                                         {"name": "tests.worker_probe:WorkerPid", "grid": {"tag": [0, 1]}}])
    dies = [s for s in specs if s.label == "dies"]
    probes = [s for s in specs if s.label != "dies"]
    ex = LocalExecutor(cfg, ws, workers=2)
    try:
        broken = [r for _, r in ex.run(dies + probes[:1])]
        again = [r for _, r in ex.run(probes)]
    finally:
        ex.close()
    dead = next(r for r in broken if r.label == "dies")
    assert dead.status == "failed" and "worker process failed" in dead.error
    assert [r.status for r in again] == ["ok", "ok"]


def test_a_worker_killed_between_batches_costs_no_job(sweep_dict):
    cfg, ws, specs = _specs(sweep_dict, [{"name": "tests.worker_probe:WorkerPid", "grid": {"tag": [0, 1]}}])
    ex = LocalExecutor(cfg, ws, workers=2)
    try:
        first = [r for _, r in ex.run(specs)]
        os.kill(first[0].artifacts["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not ex._pool._broken and time.monotonic() < deadline:  # the pool notices the death
            time.sleep(0.1)
        again = [r for _, r in ex.run(specs)]
    finally:
        ex.close()
    assert [r.status for r in again] == ["ok", "ok"]
    assert first[0].artifacts["pid"] not in {r.artifacts["pid"] for r in again}


def test_abort_stops_the_workers_instead_of_waiting_for_them(sweep_dict):
    """A sweep that fails after its pool started stops the workers at once instead of waiting
    for them to finish starting (building their models) or their jobs."""
    cfg, ws, specs = _specs(sweep_dict, [{"name": "tests.worker_probe:WorkerPid", "grid": {"tag": [0, 1]}}])
    ex = LocalExecutor(cfg, ws, workers=2)
    ex.start(len(specs))
    procs = list(ex._pool._processes.values())
    ex.close(abort=True)
    assert len(procs) == 2
    assert all(p.exitcode == -signal.SIGTERM for p in procs)


def test_a_worker_refuses_a_method_file_edited_after_planning(sweep_dict, tmp_path, monkeypatch):
    """Workers import a method of one's own when their first job needs it: after an edit that is
    the new code, whose results would be stored under the keys of the planned code."""
    import multiprocessing as mp

    import harness.executors.local as local
    from tests.test_plugin_methods import SCALED_SUM, _planned

    cfg, specs = _planned(sweep_dict, tmp_path, monkeypatch, [0, 1])
    (tmp_path / "scaled_sum.py").write_text(SCALED_SUM.format(scaling=0.6))
    # spawned: a worker gets this process's sys.path (the method's folder), not the server's
    monkeypatch.setattr(local, "worker_context", lambda: mp.get_context("spawn"))
    ex = LocalExecutor(cfg, Workspace(cfg), workers=2)
    try:
        results = [r for _, r in ex.run(specs)]
    finally:
        ex.close()
    assert len(results) == 2
    for r in results:
        assert r.status == "failed" and r.metrics == {}
        assert r.error.startswith(f"MethodChanged: scaled_sum:ScaledSum: {tmp_path / 'scaled_sum.py'} changed "
                                  "since the sweep was submitted"), r.error


def test_a_worker_returns_a_result_whose_artifacts_could_not_be_pickled(sweep_dict):
    """An artifact a worker could not send back (a lock) no longer loses the finished job: it
    comes back as its repr, with the warning naming it."""
    cfg, ws, specs = _specs(sweep_dict, [{"name": "tests.faulty_methods:OddArtifacts", "grid": {"tag": [0, 1]}}])
    ex = LocalExecutor(cfg, ws, workers=2)
    try:
        results = [r for _, r in ex.run(specs)]
    finally:
        ex.close()
    for r in results:
        assert r.status == "ok", r.error
        assert r.artifacts["lock"].startswith("<unlocked _thread.lock object")
        assert any("ctx.artifacts['lock'] is a _thread.lock" in w for w in r.warnings)


def test_a_dead_worker_fails_only_the_jobs_in_flight(sweep_dict):
    """The whole batch went to the pool at once, so one worker's death (out of memory on one grid
    point) failed every job of the batch not yet finished: 182 of a 202-job merge phase. Jobs are
    handed out two per worker now: those in flight fail with the worker, the rest run in a new pool."""
    cfg, ws, specs = _specs(sweep_dict, [{"name": "tests.worker_probe:KillsWorker", "label": "dies"},
                                         {"name": "tests.worker_probe:WorkerPid", "grid": {"tag": list(range(12))}}])
    ex = LocalExecutor(cfg, ws, workers=2)
    try:
        results = {s.key: r for s, r in ex.run(specs)}
    finally:
        ex.close()
    assert len(results) == 13
    dead = next(r for r in results.values() if r.label == "dies")
    assert dead.status == "failed" and "worker process failed" in dead.error
    probes = [r for r in results.values() if r.label != "dies"]
    assert sum(r.status == "ok" for r in probes) >= 12 - 3  # at most 2 * workers in flight, "dies" one of them


class _FinishesWhenWaitedOn(list):
    """A future's waiters: the job finishes once the driver waits for it, not before."""

    def __init__(self, future):
        super().__init__()
        self.future = future

    def append(self, waiter):
        super().append(waiter)
        if not self.future.done():
            self.future.set_result(self.future.result_dict)


class _FakePool:
    """A process pool's failure semantics without processes: ``breaks()`` fails every job it
    holds and refuses new ones (BrokenProcessPool); shutdown(cancel_futures) cancels the jobs
    not done. ``done_at_once``: how many of the first jobs it finishes as they are handed over;
    the others finish once the driver waits for them."""

    def __init__(self, done_at_once):
        self.futures, self.broken, self.done_at_once = [], False, done_at_once

    def submit(self, fn, spec_dict):
        import concurrent.futures as cf
        import concurrent.futures.process  # noqa: F401  (cf.process)

        from harness.job import JobResult
        from harness.plan import JobSpec

        if self.broken:
            raise cf.process.BrokenProcessPool("broken")
        future = cf.Future()
        future.result_dict = JobResult.of(JobSpec.from_dict(spec_dict), "ok").to_dict()
        future._waiters = _FinishesWhenWaitedOn(future)
        if len(self.futures) < self.done_at_once:
            future.set_result(future.result_dict)
        self.futures.append(future)
        return future

    def breaks(self):
        import concurrent.futures as cf
        import concurrent.futures.process  # noqa: F401  (cf.process)

        self.broken = True
        for f in self.futures:
            if not f.done():
                f.set_exception(cf.process.BrokenProcessPool("a worker died"))

    def shutdown(self, wait=True, cancel_futures=False):
        for f in self.futures:
            if cancel_futures and f.cancel():
                f.set_running_or_notify_cancel()


def test_a_failed_job_of_a_replaced_pool_leaves_its_replacement_running():
    """A pool that broke while the driver handed out a result was replaced as the next job was
    handed over, and each of its jobs in flight, failing after that, shut the replacement down:
    the jobs just handed to it were cancelled (reported as dead workers; a real pool's cancelled
    job is never done, so the wait could hang). Only the jobs in flight in the broken pool fail."""
    from harness.executors.local import LocalExecutor
    from harness.plan import JobSpec

    specs = [JobSpec("merge", f"j{i}", key=f"k{i}") for i in range(6)]
    ex = LocalExecutor(None, None, workers=1)
    ex.workers, pools = 2, []

    def ensure_pool(n):
        if ex._pool is None:
            pools.append(_FakePool(done_at_once=1 if not pools else 0))
            ex._pool = pools[-1]
        return ex._pool

    ex._ensure_pool = ensure_pool
    outcomes = {}
    for spec, result in ex._run_in_pool(specs):
        outcomes[spec.key] = result
        if len(outcomes) == 1:  # a worker dies while the driver records the first result
            pools[0].breaks()
    assert set(outcomes) == {s.key for s in specs}
    failed = {k: r.error for k, r in outcomes.items() if r.status != "ok"}
    assert set(failed) == {"k1", "k2", "k3"}, failed  # the first pool's jobs in flight when it broke


@pytest.mark.parametrize("process", ["pool worker", "slurm job"])
def test_a_jobs_warnings_are_plain_lines_as_the_drivers(sweep_dict, tmp_path, process):
    """A job's process builds its model, and open_clip's module-level ``logging.warning`` then
    configures the root logger: a job's warning (an unreadable checkpoint, adapting from the
    start) read ``WARNING:harness:...`` with ``workers: 2`` or in a SLURM job's log, and the plain
    ``path: message`` line with one worker (the driver's command keeps them plain). Truth: the
    line as the job wrote it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    cfg = validate_config(dict(sweep_dict, methods=[{"name": "weight_averaging"}], references=False))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    start = {"pool worker": "from harness.executors.local import _init_worker\n"
                            "_init_worker(cfg, 1, dict(os.environ))\n",
             "slurm job": "from harness.executors.slurm import SweepJob\n"
                          "from harness.plan import plan_jobs\n"
                          "from harness.workspace import Workspace\n"
                          "from harness.config import SweepConfig\n"
                          "ws = Workspace(SweepConfig.model_validate(cfg))\n"
                          "spec = plan_jobs(ws.cfg, ws.identity, ws.task_identity())[0]\n"
                          "assert SweepJob(cfg, progress=False)(spec.to_dict())['status'] == 'ok'\n"}[process]
    script = ("import json, logging, os, sys\n"
              "cfg = json.loads(open(sys.argv[1]).read())\n" + start +
              "logging.getLogger('harness').warning('work/k/ckpt.pt: unreadable; adapting from the start')\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cfg.json")], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == "work/k/ckpt.pt: unreadable; adapting from the start", done.stderr


def _scripted_pools(ex, monkeypatch, breaks: dict[int, set[int]], unreadable: str | None = None) -> list:
    """Has ``ex`` hand jobs to fake pools whose workers' deaths are scripted: ``breaks`` maps a
    pool's number (0: the first) to the hand-outs (0-based) that find it broken; a job handed out
    gets an ok result at once, but for job ``unreadable``, whose result cannot be read. Returns the
    pools made, in order."""
    import concurrent.futures as cf
    from concurrent.futures.process import BrokenProcessPool

    from harness.job import JobResult
    from harness.plan import JobSpec

    pools = []

    class ScriptedPool:
        def __init__(self):
            self.number, self.handed = len(pools), 0
            pools.append(self)

        def submit(self, fn, spec_dict):
            self.handed += 1
            if self.handed - 1 in breaks.get(self.number, ()):
                raise BrokenProcessPool("A child process terminated abruptly")
            future = cf.Future()
            if spec_dict["key"] == unreadable:
                future.set_exception(RuntimeError("result could not be read"))
            else:
                future.set_result(JobResult.of(JobSpec.from_dict(spec_dict), "ok").to_dict())
            return future

        def shutdown(self, wait=True, cancel_futures=False):
            pass

    def ensure_pool(n_jobs):
        if ex._pool is None:
            ex._pool, ex._size = ScriptedPool(), min(ex.workers, n_jobs)
        return ex._pool

    monkeypatch.setattr(ex, "_ensure_pool", ensure_pool)
    return pools


def test_every_pool_that_breaks_after_running_jobs_is_replaced(sweep_dict, monkeypatch):
    """A pool found broken when a job is handed to it is replaced by a new one; only a new pool
    that breaks before taking any job (its workers cannot even start) fails the rest of the
    batch. Here the first pool is broken before its first job and the second after three: a third
    pool runs the rest, and every job gets its own (ok) result."""
    cfg, ws, specs = _specs(sweep_dict, [{"name": "tests.worker_probe:WorkerPid", "grid": {"tag": list(range(8))}}])
    ex = LocalExecutor(cfg, ws, workers=2)
    pools = _scripted_pools(ex, monkeypatch, {0: {0}, 1: {3}})
    try:
        results = [(s.key, r.status) for s, r in ex.run(specs)]
    finally:
        ex.close()
    assert sorted(results) == sorted((s.key, "ok") for s in specs) and len(pools) == 3


def test_workers_that_cannot_start_fail_every_job_left_each_with_a_result(sweep_dict, monkeypatch):
    """A new pool broken before its first job too (workers that cannot start): the jobs not yet
    handed out are failed, each with its own result naming the worker's failure; none is dropped
    (the sweep records what it gets: a job without a result would be neither cached nor reported)."""
    cfg, ws, specs = _specs(sweep_dict, [{"name": "tests.worker_probe:WorkerPid", "grid": {"tag": list(range(6))}}])
    ex = LocalExecutor(cfg, ws, workers=2)
    pools = _scripted_pools(ex, monkeypatch, {0: {2}, 1: {0}})  # two jobs ran, then no pool takes one
    try:
        results = {s.key: r for s, r in ex.run(specs)}
    finally:
        ex.close()
    assert sorted(results) == sorted(s.key for s in specs) and len(pools) == 2
    assert sorted(r.status for r in results.values()) == ["failed"] * 4 + ["ok"] * 2
    assert all(r.error == "worker process failed: BrokenProcessPool: A child process terminated abruptly"
               for r in results.values() if r.status == "failed")


class _RecordedPool:
    """A process pool that records how it was made and what it was handed, starting nothing."""

    made: list["_RecordedPool"] = []

    def __init__(self, max_workers, mp_context=None, initializer=None, initargs=()):
        self.max_workers, self.cores, self.handed, self.shut = max_workers, initargs[1], 0, False
        _RecordedPool.made.append(self)

    def submit(self, fn, *args):
        import concurrent.futures as cf

        self.handed += 1
        future = cf.Future()
        future.set_result(None)
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        self.shut = True


@pytest.fixture
def recorded_pools(monkeypatch):
    """Pools made by :class:`LocalExecutor` are :class:`_RecordedPool` s, on a machine of 8 cores."""
    import harness.executors.local as local

    _RecordedPool.made = []
    monkeypatch.setattr(local.cf, "ProcessPoolExecutor", _RecordedPool)
    monkeypatch.setattr(local, "available_cores", lambda: 8)
    monkeypatch.setattr(local, "worker_context", lambda: None)
    monkeypatch.setattr(local, "prestart", lambda: None)
    return _RecordedPool.made


def test_a_pool_has_no_more_workers_than_jobs_and_they_share_the_cores(recorded_pools):
    """Up to ``workers`` workers, never more than the batch has jobs, each given its share of the
    cores for its threads; a larger later batch gets a larger pool (the old one shut down), a smaller
    one keeps it; a single job starts none (it runs in this process). Truth: 8 cores split by hand."""
    from types import SimpleNamespace

    ex = LocalExecutor(SimpleNamespace(model_dump=lambda mode: {}), None, workers=4)
    ex.start(1)
    assert recorded_pools == []
    ex.start(2)
    assert [(p.max_workers, p.cores, p.handed) for p in recorded_pools] == [(2, 4, 2)]
    ex.start(3)
    assert [(p.max_workers, p.cores, p.shut) for p in recorded_pools] == [(2, 4, True), (3, 2, False)]
    ex.start(10)
    assert [(p.max_workers, p.cores) for p in recorded_pools[2:]] == [(4, 2)] and recorded_pools[1].shut
    ex.start(2)
    assert len(recorded_pools) == 3 and not recorded_pools[2].shut
    ex.close()
    assert recorded_pools[2].shut


def test_a_job_whose_result_cannot_be_read_fails_alone(sweep_dict, monkeypatch):
    """A worker's job that ends in an error other than a dead worker (a result that cannot be
    unpickled) fails that job, naming the error, and the batch goes on in the same pool: each other
    job gets its own ok result."""
    cfg, ws, specs = _specs(sweep_dict, [{"name": "tests.worker_probe:WorkerPid", "grid": {"tag": list(range(5))}}])
    unreadable = specs[2].key
    ex = LocalExecutor(cfg, ws, workers=2)
    made = _scripted_pools(ex, monkeypatch, {}, unreadable)
    results = {s.key: r for s, r in ex.run(specs)}
    assert sorted(results) == sorted(s.key for s in specs) and len(made) == 1
    assert all(r.key == k for k, r in results.items())
    assert results[unreadable].status == "failed"
    assert results[unreadable].error == "worker process failed: RuntimeError: result could not be read"
    assert sorted(k for k, r in results.items() if r.status == "ok") == sorted(s.key for s in specs if s.key != unreadable)


def test_a_batch_of_one_job_runs_in_this_process(sweep_dict, recorded_pools):
    """One job gains nothing from a worker, which would first build its own model: it runs in the
    driver, and no pool is started for it."""
    cfg, ws, specs = _specs(sweep_dict, [{"name": "tests.worker_probe:WorkerPid"}])
    ex = LocalExecutor(cfg, ws, workers=2)
    ex.start(1)
    results = [r for _, r in ex.run(specs[:1])]
    ex.close()
    assert [(r.status, r.artifacts["pid"]) for r in results] == [("ok", os.getpid())] and recorded_pools == []


def test_a_worker_runs_a_job_in_its_workdir_on_the_sweeps_device_with_its_share_of_cores(sweep_dict, monkeypatch):
    """A pool worker runs a job where a job run in the driver would: ``work/<key>`` (its checkpoints,
    read back by a rerun), on the device the sweep names (``cpu`` on a machine with a GPU), and
    with its share of the cores for threads. Run in this process, the pool's plumbing left out.
    Truth: the config's fields by hand."""
    import torch

    import harness.executors.local as local
    from harness.job import JobResult

    cfg, _, specs = _specs(sweep_dict, [{"name": "tests.worker_probe:WorkerPid"}])
    cfg_json = dict(cfg.model_dump(mode="json"), device="cpu")
    seen = {}
    monkeypatch.setattr(local, "_WORKER_WS", None)
    monkeypatch.setattr(local.signal, "signal", lambda *args: None)
    monkeypatch.setattr(local, "configure_threads", lambda threads, n_params=None, cores=None: seen.update(cores=cores))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def run_job(spec, ws, device, workdir):
        seen.update(device=device, workdir=workdir)
        return JobResult.of(spec, "ok")

    monkeypatch.setattr(local, "run_job", run_job)
    local._init_worker(cfg_json, 3, dict(os.environ))
    assert local._work(specs[0].to_dict())["status"] == "ok"
    assert seen == {"cores": 3, "device": torch.device("cpu"),
                    "workdir": cfg.resolved_output_dir() / "work" / specs[0].key}


def test_a_later_pool_leaves_the_pipe_an_earlier_pools_workers_watch_open():
    """Workers exit at EOF on the pipe ``_driver_alive`` hands them. A later pool asking for it gets
    the same pipe: a new one in its place would drop the old write end, and the earlier pool's
    workers, watching the old read end, would see EOF and exit while the driver lives."""
    import gc

    from harness.executors.local import _driver_alive

    first = _driver_alive()
    later = _driver_alive()
    gc.collect()
    assert not first.poll(0)  # EOF would make it readable
    assert later is first
