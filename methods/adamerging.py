"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by test-time entropy minimisation.

theta = theta_0 + sum_t lambda_t tau_t, with one lambda per task ("task") or one per task
per parameter tensor ("layer"). The encoder runs functionally
(``torch.func.functional_call``) on the merged tensors, so the entropy loss reaches lambda.
Like the original code, coefficients are clamped to [0, 1] in the forward pass
(``clamp=True``; a coefficient that leaves [0, 1] gets zero gradient and stays at the bound's
value). The result is a plain merged encoder; the learned coefficients go to
``ctx.artifacts["adamerging_coefficients"]``.
"""

from __future__ import annotations

import copy
from typing import Literal, Mapping

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.func import functional_call

from methods.base import MergeContext, MergeMethod, checked_float_states, float_state, register_method, with_state
from methods.tta import run_tta

Granularity = Literal["task", "layer"]


class AdaMergedEncoder(nn.Module):
    """The pretrained encoder evaluated at theta_0 + sum_t lambda_t tau_t (lambda trainable).

    ``coef`` is [T] (task-wise) or [T, P] (layer-wise, P = merged tensors, in ``names`` order).
    """

    def __init__(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], *,
                 granularity: Granularity = "task", init_lambda: float = 0.3, clamp: bool = True):
        super().__init__()
        if not finetuned:
            raise ValueError("AdaMerging needs at least one fine-tuned model")
        self.tasks = list(finetuned)
        self.clamp = clamp
        self.encoder = copy.deepcopy(pretrained).requires_grad_(False)
        base = float_state(pretrained)
        states = checked_float_states(base, finetuned)
        self.names = list(base)
        for j, name in enumerate(self.names):  # tensor by tensor: never every task vector beside the stacks
            stacked = torch.empty((len(self.tasks), *base[name].shape), dtype=torch.float32, device=base[name].device)
            for i, t in enumerate(self.tasks):  # float32: a half model's difference is not rounded to half
                torch.sub(states[t][name].float(), base[name].float(), out=stacked[i])
            self.register_buffer(f"tau_{j}", stacked, persistent=False)
        shape = (len(self.tasks),) if granularity == "task" else (len(self.tasks), len(self.names))
        self.coef = nn.Parameter(torch.full(shape, float(init_lambda)))

    def coefficients(self) -> torch.Tensor:
        """Effective coefficients [T, P] (expanded over tensors, clamped if enabled)."""
        coef = self.coef.clamp(0.0, 1.0) if self.clamp else self.coef
        return coef.unsqueeze(1).expand(-1, len(self.names)) if coef.dim() == 1 else coef

    def merged_state(self) -> dict[str, torch.Tensor]:
        coef = self.coefficients()
        base = dict(self.encoder.named_parameters()) | dict(self.encoder.named_buffers())
        out = {}
        for j, name in enumerate(self.names):
            tau = getattr(self, f"tau_{j}")
            merged = base[name].float() + torch.tensordot(coef[:, j], tau, dims=1)  # one rounding for half weights
            out[name] = merged.to(base[name].dtype)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder at the merged weights. The merge (coefficients times task vectors) runs in
        float32 with autocast off; only the encoder's forward follows an enclosing autocast
        (``eval.precision``), which casts the float32 merged weights per operation."""
        with torch.autocast(images.device.type, enabled=False):
            state = self.merged_state()
        return functional_call(self.encoder, state, (images,))

    def export(self) -> nn.Module:
        """A plain encoder holding the current merged weights."""
        with torch.no_grad():
            state = {k: v.detach() for k, v in self.merged_state().items()}
        return with_state(self.encoder, state)


@register_method("adamerging")
class AdaMerging(MergeMethod):
    """Task- or layer-wise merging coefficients learned by entropy minimisation on test batches."""

    uses_test_data = True
    seeded = False  # coefficients start at init_lambda; its batches are drawn by adapt.shuffle_seed
    runtime_only = frozenset({"checkpoint_every"})
    added_hyperparameters = frozenset({"diversity_weight"})

    granularity: Granularity = Field("task", description="one coefficient per task, or per task per tensor")
    init_lambda: float = Field(0.3, ge=0.0, le=10.0, description="initial coefficient")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate of the coefficients")
    steps: int = Field(500, ge=0, le=1_000_000, description="test-time-adaptation steps")
    batch_size: int = Field(16, ge=1, le=4096, description="unlabeled images per task per step (the data iterators use it)")
    clamp: bool = Field(True, description="clamp coefficients to [0, 1] in the forward pass (as the original code)")
    cosine: bool = Field(False, description="cosine-anneal the learning rate to 0")
    eval_every: int = Field(0, ge=0, description="validate and report every N steps (0: never)")
    checkpoint_every: int = Field(100, ge=0, description="checkpoint coefficients to the workdir every N steps (0: never)")
    diversity_weight: float = Field(0.0, ge=0.0, le=100.0, description=(
        "weight of each task batch's marginal entropy, maximised (0: the paper's objective)"))

    @model_validator(mode="after")
    def _init_inside_clamp(self) -> "AdaMerging":
        # A clamped coefficient outside [0, 1] has zero gradient: it would never move.
        if self.clamp and self.init_lambda > 1.0:
            raise ValueError(f"init_lambda {self.init_lambda} > 1 with clamp: true never learns (clamped "
                             "coefficients outside [0, 1] get zero gradient); lower it or set clamp: false")
        return self

    def build(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module]) -> AdaMergedEncoder:
        return AdaMergedEncoder(pretrained, finetuned, granularity=self.granularity,
                                init_lambda=self.init_lambda, clamp=self.clamp)

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        model = self.build(pretrained, finetuned).to(ctx.device)
        losses = run_tta(model, ctx, lr=self.lr, steps=self.steps, cosine=self.cosine,
                         checkpoint_every=self.checkpoint_every, eval_every=self.eval_every,
                         joint_forward=True, export=model.export, diversity_weight=self.diversity_weight,
                         name="adamerging")
        ctx.artifacts["tta_loss"] = losses
        coef = model.coefficients().detach().cpu()
        ctx.artifacts["adamerging_coefficients"] = {
            "tasks": model.tasks,
            "tensors": model.names if self.granularity == "layer" else None,
            "values": coef[:, 0].tolist() if self.granularity == "task" else coef.tolist(),
        }
        return model.export().to(ctx.device)
