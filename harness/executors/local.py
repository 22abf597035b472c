"""Run jobs in this process, or in a small pool of worker processes (1 thread each).

The pool lives as long as the sweep: a worker is forked from a server that imported the
libraries once (``server``) and builds the model once, not once per phase or per batch of
tuning trials."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import threading
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Iterator

from harness.config import SweepConfig
from harness.executors.server import prestart, worker_context
from harness.job import JobResult, run_job
from harness.plan import JobSpec
from harness.progress import plain_warning_lines
from harness.runtime import available_cores, configure_threads, resolve_device
from harness.workspace import Workspace

_WORKER_WS: Workspace | None = None
_DRIVER_ALIVE: tuple[Connection, Connection] | None = None  # (read end for workers, write end kept here)


def _driver_alive() -> Connection:
    """The read end of a pipe whose only write end this (driver) process holds for its whole life.

    Workers watch it (``_exit_with_driver``) so that they exit when the driver dies by any signal,
    SIGKILL included: otherwise they live on under init, never seeing EOF on the pool's pipes (they
    hold both ends), and so do the forkserver and resource tracker (they wait on pipes the workers
    hold). The kernel closes the write end when the driver exits, however it exits, so EOF here means
    exactly that, with no pid reuse to guard against. ``PR_SET_PDEATHSIG`` does not fit: a worker's
    parent is the forkserver, not the driver. Workers are forked from the server or spawned, never
    forked from the driver, so none holds the write end; the read end reaches them as an initarg
    (passed as an fd, like the pool's own pipes). One pipe serves every pool and is never closed."""
    global _DRIVER_ALIVE
    if _DRIVER_ALIVE is None:
        _DRIVER_ALIVE = mp.Pipe(duplex=False)
    return _DRIVER_ALIVE[0]


def _exit_with_driver(alive: Connection) -> None:
    """Exit this worker (whatever job it is in: a rerun resumes) as soon as ``alive`` reaches EOF."""

    def watch() -> None:
        try:
            alive.recv_bytes()  # nothing is ever sent: returns or raises only when the driver is gone
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-driver", daemon=True).start()


def _init_worker(cfg_json: dict, cores: int, environ: dict[str, str], alive: Connection | None = None) -> None:
    global _WORKER_WS
    # Ctrl-C reaches the whole foreground process group; it is the driver's to handle (it stops
    # the workers and says how to resume). A worker's own KeyboardInterrupt, raised wherever it
    # waits (the pool's queue, a model import), would add a traceback to that one line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    plain_warning_lines()  # before the model is built: a job's warnings read as the driver's
    if alive is not None:
        _exit_with_driver(alive)  # first: the driver may die while this worker builds its model
    os.environ.clear()  # the driver's environment now, not the server's when it started
    os.environ.update(environ)
    cfg = SweepConfig.model_validate(cfg_json)
    _WORKER_WS = Workspace(cfg)
    configure_threads(cfg.threads, _WORKER_WS.encoder_params, cores)
    _WORKER_WS.clip  # every job needs the model: build it (importing open_clip) while no job waits


def _work(spec_dict: dict) -> dict:
    ws = _WORKER_WS
    spec = JobSpec.from_dict(spec_dict)
    device = resolve_device(ws.cfg.device)
    workdir = ws.cfg.resolved_output_dir() / "work" / spec.key
    return run_job(spec, ws, device, workdir).to_dict()


def _worker_failed(spec: JobSpec, exc: BaseException) -> JobResult:
    return JobResult.of(spec, "failed", error=f"worker process failed: {type(exc).__name__}: {exc}")


def terminate_workers(pool: cf.ProcessPoolExecutor) -> None:
    """SIGTERM a pool's workers, so that a shutdown after an error or Ctrl-C does not wait for
    their current jobs (a fine-tuning run, a test-time adaptation: minutes)."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate:
        terminate()
        return
    for proc in list(getattr(pool, "_processes", {}).values()):
        proc.terminate()


def _ready() -> None:
    """A no-op task: submitting one per worker starts them all (a pool spawns on demand)."""


class LocalExecutor:
    def __init__(self, cfg: SweepConfig, workspace: Workspace, workers: int = 1):
        self.cfg, self.ws, self.workers = cfg, workspace, workers
        self._pool: cf.ProcessPoolExecutor | None = None
        self._size = 0
        if workers > 1:
            prestart()  # the server imports while the driver prepares (the CLI started it sooner)

    def start(self, n_jobs: int) -> None:
        """Start the worker processes now, when ``n_jobs`` will run, so that each builds its
        model before the first job is handed out. Waits for the server's imports."""
        if self.workers > 1 and n_jobs > 1:
            pool = self._ensure_pool(n_jobs)
            for _ in range(self._size):
                pool.submit(_ready)

    def _ensure_pool(self, n_jobs: int) -> cf.ProcessPoolExecutor:
        """The pool, sized for ``n_jobs`` (at most ``workers``); grown when a later batch is larger."""
        n = min(self.workers, n_jobs)
        if self._pool is not None and n > self._size:
            self.close()
        if self._pool is None:
            cores = max(1, available_cores() // n)  # the workers share the cores
            self._pool = cf.ProcessPoolExecutor(n, mp_context=worker_context(), initializer=_init_worker,
                                                initargs=(self.cfg.model_dump(mode="json"), cores, dict(os.environ),
                                                          _driver_alive()))
            self._size = n
        return self._pool

    def close(self, abort: bool = False) -> None:
        """Shut the pool down; ``abort`` (the sweep failed) stops the workers at once instead of
        letting them finish starting or their current job."""
        if self._pool is None:
            return
        if abort:
            terminate_workers(self._pool)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def run(self, specs: list[JobSpec], on_start: Callable[[JobSpec], None] | None = None) -> Iterator[tuple[JobSpec, JobResult]]:
        if self.workers <= 1 or len(specs) <= 1:
            if not specs:  # a phase whose jobs are all cached needs no device (none here: a finished GPU sweep)
                return
            device = resolve_device(self.cfg.device)
            self.ws.clip  # built once, as in a worker: not part of the first job's time
            for spec in specs:
                if on_start:
                    on_start(spec)
                yield spec, run_job(spec, self.ws, device, self._workdir(spec))
            return
        yield from self._run_in_pool(specs)

    def _run_in_pool(self, specs: list[JobSpec]) -> Iterator[tuple[JobSpec, JobResult]]:
        """Hand jobs out two per worker, not the whole batch at once: a worker's death (out of
        memory) fails the pool's jobs in flight, and the rest of the batch runs in a new pool."""
        todo, futures, retried = list(reversed(specs)), {}, False
        pools: dict[cf.Future, cf.ProcessPoolExecutor] = {}  # each job's pool: a replaced one's failing jobs spare its successor
        while todo or futures:
            while todo and len(futures) < 2 * self.workers:
                try:
                    pool = self._ensure_pool(len(todo) + len(futures))
                    future = pool.submit(_work, todo[-1].to_dict())
                except BrokenProcessPool as exc:  # broke while idle or starting: one new pool
                    self.close()
                    if retried:  # a new pool broke too: workers cannot even start
                        yield from ((spec, _worker_failed(spec, exc)) for spec in reversed(todo))
                        todo = []
                    retried = True
                    continue
                futures[future], pools[future], retried = todo.pop(), pool, False
            done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
            for future in done:
                spec, pool = futures.pop(future), pools.pop(future)
                try:
                    result = JobResult.from_dict(future.result())
                except Exception as exc:  # a worker that died (killed, out of memory)
                    if isinstance(exc, BrokenProcessPool) and pool is self._pool:
                        self.close()  # its jobs in flight fail with it; the next ones get a new pool
                    result = _worker_failed(spec, exc)
                yield spec, result

    def _workdir(self, spec: JobSpec) -> Path:
        return self.cfg.resolved_output_dir() / "work" / spec.key
