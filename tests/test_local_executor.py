"""The local worker pool lives as long as the sweep: workers start once, survive phases and
batches, and a pool broken by a dead worker is replaced for the next batch."""

from __future__ import annotations

import os
import signal
import time

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



def _scripted_pools(ex, monkeypatch, breaks: dict[int, set[int]]) -> list:
    """Has ``ex`` hand jobs to fake pools whose workers' deaths are scripted: ``breaks`` maps a
    pool's number (0: the first) to the hand-outs (0-based) that find it broken; a job handed out
    gets an ok result at once. Returns the pools made, in order."""
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
