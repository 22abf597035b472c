"""Methods that SLURM must stop (memory, time limit), for tests/test_slurm_kills.py; the nodes
import them by path."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from pydantic import Field

from methods.base import MergeMethod
from methods.wemoe import WeMoE


class EatsMemory(MergeMethod):
    """Holds ``gb`` GB of touched memory until something kills it; if nothing does, it fails
    with a message that says so (the cluster does not enforce memory)."""

    gb: float = Field(1.5, gt=0, le=64)
    hold_s: float = Field(60.0, gt=0, le=600)

    def merge(self, pretrained, finetuned, ctx):
        block = np.ones(int(self.gb * 1e9), dtype=np.uint8)  # every page written: resident
        time.sleep(self.hold_s)
        raise RuntimeError(f"held {block.nbytes / 1e9:.1f} GB for {self.hold_s:.0f} s and was not killed")


class Overstays(MergeMethod):
    """Sleeps past any test time limit and saves nothing in its workdir: it cannot resume."""

    seconds: float = Field(600.0, gt=0)

    def merge(self, pretrained, finetuned, ctx):
        time.sleep(self.seconds)
        raise RuntimeError(f"slept {self.seconds:.0f} s and was not stopped")


class _Steps:
    """A progress sink for the adaptation loop: logs ``<pid> start N`` / ``<pid> step N`` to
    ``path`` and sleeps ``delay`` seconds after each step of a run that began at step 0; a run
    resumed from a checkpoint goes at full speed, so the first attempt always outlasts SLURM's
    time-limit warning and a resumed one finishes well within its limit."""

    def __init__(self, path: Path, delay: float):
        self.path, self.delay, self.resumed = path, delay, False

    def _write(self, line: str) -> None:
        with open(self.path, "a") as fh:
            fh.write(f"{os.getpid()} {line}\n")

    def add_task(self, description, total=None, completed=0, **fields):
        self.resumed = completed > 0
        self._write(f"start {completed}")
        return 0

    def update(self, task, completed=None, **fields):
        self._write(f"step {completed}")
        if not self.resumed:
            time.sleep(self.delay)


class SlowStartWeMoE(WeMoE):
    """WeMoE whose first attempt is slowed by ``first_attempt_step_delay`` seconds a step; steps
    are logged to ``<workdir>.steps.log``, beside the workdir, so that the log is not mistaken
    for a checkpoint (only what a method saves in its workdir makes a timed-out job requeue)."""

    first_attempt_step_delay: float = Field(0.0, ge=0.0, le=10.0)

    def merge(self, pretrained, finetuned, ctx):
        workdir = Path(ctx.workdir)
        ctx.progress = _Steps(workdir.with_name(workdir.name + ".steps.log"), self.first_attempt_step_delay)
        return super().merge(pretrained, finetuned, ctx)
