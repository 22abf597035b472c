"""Executors run JobSpecs and yield JobResults as they finish; same interface for all."""

from harness.executors.local import LocalExecutor

__all__ = ["LocalExecutor", "make_executor"]


def make_executor(cfg, workspace, progress: bool = False):
    kind = cfg.executor.kind
    if kind == "local":
        return LocalExecutor(cfg, workspace, workers=cfg.executor.workers)
    raise ValueError(f"unknown executor kind {kind!r}")
