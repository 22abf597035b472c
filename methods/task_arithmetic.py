"""Task arithmetic (Ilharco et al., 2023): theta = theta_0 + lambda * sum_t (theta_t - theta_0)."""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from pydantic import Field
from torch import nn

from methods.base import MergeContext, MergeMethod, StateDict, check_same_keys, float_state, register_method, with_state


def add_task_vectors(merged: StateDict, base: StateDict, finetuned: Mapping[str, nn.Module], scaling: float) -> None:
    """``merged[k] += scaling * (theta_t[k] - base[k])`` for every task, in place.

    One task and one tensor at a time through a reused scratch buffer: peak memory stays at
    the inputs plus the output, where building every task vector first costs tasks x params.
    """
    scratch = torch.empty(max((v.numel() for v in merged.values()), default=0), dtype=torch.float32,
                          device=next(iter(merged.values())).device if merged else None)
    for task, model in finetuned.items():
        sd = float_state(model)
        check_same_keys(base, sd, task)
        for k, out in merged.items():
            tau = scratch[: out.numel()].view(out.shape)
            if sd[k].dtype == torch.float32 and base[k].dtype == torch.float32:
                torch.sub(sd[k], base[k], out=tau)
            else:  # half weights: subtracted in float32 (into ``out=`` it would be rounded to half first)
                tau.copy_(sd[k]).sub_(base[k])
            out.add_(tau, alpha=scaling)


def task_arithmetic_state(
    pretrained: nn.Module, finetuned: Mapping[str, nn.Module], scaling: float
) -> dict[str, torch.Tensor]:
    """The merged state dict (float32); shared by methods that merge non-expert weights this way."""
    base = float_state(pretrained)
    merged = {k: v.float().clone() for k, v in base.items()}
    add_task_vectors(merged, base, finetuned, scaling)
    return merged


@register_method("task_arithmetic")
class TaskArithmetic(MergeMethod):
    """Adds the scaled sum of task vectors to the pretrained weights."""

    seeded = False  # deterministic: draws nothing

    scaling: float = Field(0.3, ge=0.0, le=10.0, description="lambda, the task-vector scale")

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        target = float_state(pretrained)
        if any(v.dtype != torch.float32 for v in target.values()):  # accumulate in float32, then cast
            return with_state(pretrained, task_arithmetic_state(pretrained, finetuned, self.scaling))
        model = copy.deepcopy(pretrained)  # float32: add into the copy's own tensors, no second copy
        own: StateDict = {}
        for k, v in float_state(model).items():  # a tied tensor (one storage, two names) is added to once
            if all(v.data_ptr() != o.data_ptr() for o in own.values()):
                own[k] = v
        add_task_vectors(own, target, finetuned, self.scaling)
        return model
