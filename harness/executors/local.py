"""Run jobs in this process, or in a small pool of worker processes (spawned, 1 thread each)."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
from pathlib import Path
from typing import Callable, Iterator

from harness.config import SweepConfig
from harness.job import JobResult, run_job
from harness.plan import JobSpec
from harness.runtime import available_cores, configure_threads, resolve_device
from harness.workspace import Workspace

_WORKER_WS: Workspace | None = None


def _init_worker(cfg_json: dict, cores: int) -> None:
    global _WORKER_WS
    cfg = SweepConfig.model_validate(cfg_json)
    _WORKER_WS = Workspace(cfg)
    configure_threads(cfg.threads, _WORKER_WS.encoder_params, cores)


def _work(spec_dict: dict) -> dict:
    ws = _WORKER_WS
    spec = JobSpec(**spec_dict)
    device = resolve_device(ws.cfg.device)
    workdir = ws.cfg.resolved_output_dir() / "work" / spec.key
    return run_job(spec, ws, device, workdir).to_dict()


class LocalExecutor:
    def __init__(self, cfg: SweepConfig, workspace: Workspace, workers: int = 1):
        self.cfg, self.ws, self.workers = cfg, workspace, workers

    def run(self, specs: list[JobSpec], on_start: Callable[[JobSpec], None] | None = None) -> Iterator[tuple[JobSpec, JobResult]]:
        if self.workers <= 1 or len(specs) <= 1:
            device = resolve_device(self.cfg.device)
            for spec in specs:
                if on_start:
                    on_start(spec)
                yield spec, run_job(spec, self.ws, device, self._workdir(spec))
            return
        ctx = mp.get_context("spawn")
        cores = max(1, available_cores() // min(self.workers, len(specs)))  # the workers share the cores
        with cf.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                    initargs=(self.cfg.model_dump(mode="json"), cores)) as pool:
            futures = {pool.submit(_work, s.to_dict()): s for s in specs}
            for fut in cf.as_completed(futures):
                spec = futures[fut]
                try:
                    result = JobResult.from_dict(fut.result())
                except Exception as exc:  # a worker that died (killed, out of memory)
                    result = JobResult.of(spec, "failed", error=f"worker process failed: {type(exc).__name__}: {exc}")
                yield spec, result

    def _workdir(self, spec: JobSpec) -> Path:
        return self.cfg.resolved_output_dir() / "work" / spec.key
