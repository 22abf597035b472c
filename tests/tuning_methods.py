"""A method whose intermediate reports a pruner can act on, for tuning tests."""

from typing import Mapping

from pydantic import Field
from torch import nn

from methods.base import MergeContext, MergeMethod, PruneTrial
from methods.task_arithmetic import TaskArithmetic


class ReportingTaskArithmetic(MergeMethod):
    """Task arithmetic that first 'adapts' for 5 steps, reporting its own quality as val accuracy."""

    scaling: float = Field(0.3, ge=0.0, le=2.0)
    quality: float = Field(50.0, ge=0.0, le=100.0)

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        for step in range(5):
            if ctx.report and ctx.report(step, {"val/acc/avg": self.quality}):
                raise PruneTrial(f"pruned at step {step}")
        return TaskArithmetic(scaling=self.scaling).merge(pretrained, finetuned, ctx)
