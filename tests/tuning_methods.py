"""Methods for tuning tests: intermediate reports a pruner can act on, hyperparameters of every type."""

from typing import Literal, Mapping

from pydantic import Field, model_validator
from torch import nn

from methods.base import MergeContext, MergeMethod, PruneTrial, with_state
from methods.task_arithmetic import TaskArithmetic, task_arithmetic_state


class ReportingTaskArithmetic(MergeMethod):
    """Task arithmetic that first 'adapts' for 5 steps, reporting its own quality as val accuracy."""

    scaling: float = Field(0.3, ge=0.0, le=2.0)
    quality: float = Field(50.0, ge=0.0, le=100.0)

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        for step in range(5):
            if ctx.report and ctx.report(step, {"val/acc/avg": self.quality}):
                raise PruneTrial(f"pruned at step {step}")
        return TaskArithmetic(scaling=self.scaling).merge(pretrained, finetuned, ctx)


class TypedTaskArithmetic(MergeMethod):
    """Task arithmetic with a hyperparameter of every kind a search space can hold."""

    scaling: float = Field(0.3, ge=0.0, le=2.0)
    repeats: int = Field(1, ge=1, le=4)
    mode: Literal["sum", "mean"] = "sum"
    flip: bool = False

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        scaling = self.scaling * self.repeats / (len(finetuned) if self.mode == "mean" else 1)
        state = task_arithmetic_state(pretrained, finetuned, -scaling if self.flip else scaling)
        return with_state(pretrained, state)


class StopsOrFailsByQuality(MergeMethod):
    """A trial's fate set by ``quality`` alone, whatever order a grid runs it in: above 90 it
    fails before reporting; otherwise it reports ``quality + step`` for steps 0-2, then below
    20 stops there as a pruned trial does (the values it reported are all it leaves)."""

    quality: float = Field(50.0, ge=0.0, le=100.0)

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        if self.quality > 90:
            raise RuntimeError(f"quality {self.quality} is too high")
        for step in range(3):
            if ctx.report:
                ctx.report(step, {"val/acc/avg": self.quality + step})
        if ctx.report and self.quality < 20:
            raise PruneTrial("pruned at step 2")
        return TaskArithmetic(scaling=0.3).merge(pretrained, finetuned, ctx)


class ScalingWithoutDefault(MergeMethod):
    """Task arithmetic whose scaling has no default: a sweep must give it (params, grid or tune)."""

    scaling: float = Field(ge=0.0, le=2.0)

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        return TaskArithmetic(scaling=self.scaling).merge(pretrained, finetuned, ctx)


class LayerList(MergeMethod):
    """A hyperparameter holding a list: a grid can take lists of it, an Optuna space cannot."""

    layers: list[int] = Field(default_factory=lambda: [0])

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        return TaskArithmetic(scaling=0.3 * len(self.layers)).merge(pretrained, finetuned, ctx)


class FreeShift(MergeMethod):
    """A float hyperparameter without bounds: the method takes any value, a search space cannot."""

    shift: float = 0.0

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        return TaskArithmetic(scaling=0.3).merge(pretrained, finetuned, ctx)


class OrderedRange(MergeMethod):
    """Two hyperparameters checked together (a model validator): ``lo`` must lie below ``hi``."""

    lo: float = 0.1
    hi: float = 0.9

    @model_validator(mode="after")
    def _ordered(self) -> "OrderedRange":
        if self.lo >= self.hi:
            raise ValueError("lo must be below hi")
        return self

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        return TaskArithmetic(scaling=self.hi - self.lo).merge(pretrained, finetuned, ctx)


class BatchedTaskArithmetic(MergeMethod):
    """A ``batch_size`` that reads no test data (``uses_test_data`` stays False): no split bounds it."""

    batch_size: int = Field(500, ge=1)

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        return TaskArithmetic(scaling=0.3).merge(pretrained, finetuned, ctx)
