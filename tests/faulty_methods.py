"""Methods that fail in the ways real jobs do, for isolation tests."""

from typing import Mapping

import torch
from torch import nn

from methods.base import MergeContext, MergeMethod, with_state
from methods.task_arithmetic import task_arithmetic_state


class NanWeights(MergeMethod):
    """Returns an encoder whose weights are NaN (a diverged merge)."""

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        state = task_arithmetic_state(pretrained, finetuned, 0.3)
        return with_state(pretrained, {k: torch.full_like(v, float("nan")) for k, v in state.items()})


class OutOfMemory(MergeMethod):
    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        raise MemoryError()


class NanLoss(MergeMethod):
    """Stops like an adaptation whose loss became NaN."""

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        loss = torch.tensor(float("nan"))
        if not torch.isfinite(loss):
            raise FloatingPointError("adaptation loss is NaN at step 3")
        return pretrained


class FailsOnce(MergeMethod):
    """Fails the first time (creating ``marker``), works from then on: a transient failure."""

    marker: str

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        import os

        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError("transient failure")
        return with_state(pretrained, task_arithmetic_state(pretrained, finetuned, 0.3))


class ReturnsNone(MergeMethod):
    """Forgets to return the merged encoder."""

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        task_arithmetic_state(pretrained, finetuned, 0.3)
