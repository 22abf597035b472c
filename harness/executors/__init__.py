"""Executors run JobSpecs and yield JobResults as they finish; same interface for all.

Each executor is imported when chosen: ``server`` must stay importable without torch."""

__all__ = ["make_executor"]


def make_executor(cfg, workspace, progress: bool = False, console=None):
    kind = cfg.executor.kind
    if kind == "local":
        from harness.executors.local import LocalExecutor

        return LocalExecutor(cfg, workspace, workers=cfg.executor.workers)
    if kind in ("slurm", "debug"):  # submitit: SLURM job arrays, or its in-process debug executor
        from harness.executors.slurm import SlurmExecutor

        return SlurmExecutor(cfg, workspace, progress=progress, console=console)
    raise ValueError(f"unknown executor kind {kind!r}")
