"""Task arithmetic (Ilharco et al., 2023): theta = theta_0 + lambda * sum_t (theta_t - theta_0)."""

from __future__ import annotations

from typing import Mapping

import torch
from pydantic import Field
from torch import nn

from methods.base import MergeContext, MergeMethod, float_state, register_method, task_vectors, with_state


def task_arithmetic_state(
    pretrained: nn.Module, finetuned: Mapping[str, nn.Module], scaling: float
) -> dict[str, torch.Tensor]:
    """The merged state dict; shared by methods that merge non-expert weights this way."""
    base = float_state(pretrained)
    merged = {k: v.float().clone() for k, v in base.items()}
    for tau in task_vectors(pretrained, finetuned).values():
        for k in merged:
            merged[k].add_(tau[k].float(), alpha=scaling)
    return merged


@register_method("task_arithmetic")
class TaskArithmetic(MergeMethod):
    """Adds the scaled sum of task vectors to the pretrained weights."""

    scaling: float = Field(0.3, ge=0.0, le=10.0, description="lambda, the task-vector scale")

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        return with_state(pretrained, task_arithmetic_state(pretrained, finetuned, self.scaling))
