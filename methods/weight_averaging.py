"""Weight averaging: the mean of the fine-tuned weights (a 'model soup' of task experts)."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from methods.base import MergeContext, MergeMethod, float_state, register_method, with_state, check_same_keys


@register_method("weight_averaging")
class WeightAveraging(MergeMethod):
    """theta = mean_t theta_t. No hyperparameters."""

    seeded = False  # deterministic: draws nothing

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        if not finetuned:  # the mean of no models: 0 / 0 would make every weight NaN, silently
            raise ValueError("weight averaging needs at least one fine-tuned model")
        base = float_state(pretrained)
        total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in base.items()}
        for task, model in finetuned.items():
            sd = float_state(model)
            check_same_keys(base, sd, task)
            for k in total:
                total[k] += sd[k].float()
        n = len(finetuned)
        return with_state(pretrained, {k: v / n for k, v in total.items()})
