"""Methods that misbehave on purpose, for the SLURM executor tests (imported on the nodes by path)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pydantic import Field

from methods.base import MergeMethod
from methods.wemoe import WeMoE


class KillsItself(MergeMethod):
    """Dies the way an out-of-memory kill does: SIGKILL, no Python cleanup, no result written."""

    def merge(self, pretrained, finetuned, ctx):
        os.kill(os.getpid(), signal.SIGKILL)


class _StepRecorder:
    """A progress sink for the adaptation loop that logs, per process, where adaptation started
    and every step it completed, and sleeps after each step so a test can interrupt it mid-way."""

    def __init__(self, path: Path, delay: float):
        self.path, self.delay = path, delay

    def _write(self, line: str) -> None:
        with open(self.path, "a") as fh:
            fh.write(f"{os.getpid()} {line}\n")

    def add_task(self, description, total=None, completed=0, **fields):
        self._write(f"start {completed}")
        return 0

    def update(self, task, completed=None, **fields):
        self._write(f"step {completed}")
        time.sleep(self.delay)


class RecordedWeMoE(WeMoE):
    """WeMoE whose adaptation steps are logged to ``<workdir>/steps.log`` and slowed by
    ``step_delay`` seconds; the merge itself is WeMoE's, checkpoints included."""

    step_delay: float = Field(0.0, ge=0.0, le=10.0)

    def merge(self, pretrained, finetuned, ctx):
        Path(ctx.workdir).mkdir(parents=True, exist_ok=True)
        ctx.progress = _StepRecorder(Path(ctx.workdir) / "steps.log", self.step_delay)
        return super().merge(pretrained, finetuned, ctx)
