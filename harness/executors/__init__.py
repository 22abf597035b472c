"""Executors run JobSpecs and yield JobResults as they finish; same interface for all."""

from harness.executors.local import LocalExecutor

__all__ = ["LocalExecutor", "make_executor"]


def make_executor(cfg, workspace, progress: bool = False, console=None):
    kind = cfg.executor.kind
    if kind == "local":
        return LocalExecutor(cfg, workspace, workers=cfg.executor.workers)
    if kind in ("slurm", "debug"):  # submitit: SLURM job arrays, or its in-process debug executor
        from harness.executors.slurm import SlurmExecutor

        return SlurmExecutor(cfg, workspace, progress=progress, console=console)
    raise ValueError(f"unknown executor kind {kind!r}")
