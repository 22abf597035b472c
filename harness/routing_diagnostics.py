"""Does the paper's test-time objective point WeMoE's routers at the right expert?

WeMoE adapts its routers by minimising prediction entropy on unlabeled images, which helps only
where the expert with the lowest entropy on an image is the one that classifies it best: its own
task's. For every task's images this scores every one-hot routing (all MLPs from one task's
fine-tuned model, everything else task arithmetic at the bound's scaling, as the perfect-routing
bound is built) with that task's head, and reports:

- ``own``: accuracy with the image's own expert (the perfect-routing bound on this split);
- ``identified``: % of images whose lowest-entropy expert is their own task's;
- ``min_entropy``: accuracy when each image takes its lowest-entropy expert, the best the
  entropy objective can reach with one-hot routing;
- ``identified_batch``: % of batches of ``batch_size`` images (a seeded shuffle of the split)
  whose lowest mean-entropy expert is their own task's: what routing shared by a batch
  (``batch_reduce``) would be steered to; with ``diversity_weight`` w, the expert with the lowest
  mean entropy minus w x the entropy of the batch's mean prediction (the adaptation's
  ``diversity_weight`` objective), and ``batch_accuracy`` the accuracy when every batch takes
  its chosen expert;
- ``entropy_start`` / ``entropy_own`` / ``entropy_min``: mean entropy (nats) at WeMoE's starting
  point (task arithmetic at the same scaling everywhere, the routers' initial output), with the
  own expert, and with each image's lowest-entropy expert: where the objective would rather be;
- ``auroc``: how well low entropy separates right from wrong predictions of the own expert
  (0.5: entropy says nothing about correctness).

Each at every head temperature asked for (logits / T): a calibrated head changes which expert
is least uncertain, which the raw zero-shot heads may get wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sklearn.metrics import roc_auc_score

from harness.evaluation import iterate_batches
from harness.models import ImageClassifier
from harness.precision import autocast, check_precision
from harness.workspace import Workspace
from methods.tta import marginal_entropy, per_sample_entropy


@dataclass(frozen=True)
class ExpertScores:
    """One task's split scored by every expert: ``logits[e]`` is (images, classes) under expert e."""

    task: str
    experts: list[str]
    logits: torch.Tensor  # (experts, images, classes)
    start: torch.Tensor  # (images, classes) at WeMoE's starting point
    labels: torch.Tensor  # (images,)

    @property
    def own(self) -> int:
        return self.experts.index(self.task)


@dataclass(frozen=True)
class RoutingDiagnosis:
    task: str
    temperature: float
    own: float
    identified: float
    identified_batch: float
    batch_accuracy: float
    min_entropy: float
    entropy_start: float
    entropy_own: float
    entropy_min: float
    auroc: float


@torch.no_grad()
def expert_scores(ws: Workspace, split: str = "val", scaling: float = 0.3,
                  device: torch.device | str | None = None) -> list[ExpertScores]:
    """Logits of every merged task's split under every one-hot routing (the bound's encoders)
    and at WeMoE's starting point.

    Forward passes run on ``device`` (default: the sweep's) at the sweep's ``eval.precision``, as
    its jobs evaluate, so the diagnosis describes the models the sweep scores; logits come back
    float32 on the CPU."""
    from harness.job import perfect_routing_encoder
    from harness.runtime import resolve_device
    from methods.base import with_state
    from methods.task_arithmetic import task_arithmetic_state

    device = resolve_device(ws.cfg.device) if device is None else torch.device(device)
    precision = ws.cfg.eval.precision
    check_precision(precision, device)

    tasks = list(ws.cfg.merge_tasks)
    data = {t: ws.task(t).dataset(split) for t in tasks}

    def batches(t: str):
        return iterate_batches(data[t], ws.cfg.eval.batch_size, ws.cfg.eval.max_samples)

    def logits(encoder: torch.nn.Module, t: str) -> torch.Tensor:
        clf = ImageClassifier(encoder, ws.head(t)).to(device).eval()
        out = []
        for x, _ in batches(t):
            with autocast(precision, device):
                out.append(clf(x.to(device)).float().cpu())
        return torch.cat(out)

    per_expert = {t: [] for t in tasks}
    for expert in tasks:
        encoder = perfect_routing_encoder(ws, expert, scaling)
        for t in tasks:
            per_expert[t].append(logits(encoder, t))
    start = with_state(ws.pretrained_encoder, task_arithmetic_state(ws.pretrained_encoder, ws.finetuned_encoders(), scaling))
    return [ExpertScores(t, tasks, torch.stack(per_expert[t]), logits(start, t), torch.cat([y for _, y in batches(t)]))
            for t in tasks]


def diagnose(scores: ExpertScores, temperature: float = 1.0, batch_size: int = 16, seed: int = 0,
             diversity_weight: float = 0.0) -> RoutingDiagnosis:
    """The measures of the module docstring for one task at one head temperature."""
    ent = per_sample_entropy(scores.logits / temperature)  # (experts, images)
    experts, images = ent.shape
    n = images // batch_size * batch_size
    if n == 0:
        raise ValueError(f"task {scores.task!r}: {images} images, fewer than one batch of {batch_size}")
    order = torch.randperm(images, generator=torch.Generator().manual_seed(seed))[:n]
    objective = ent[:, order].reshape(experts, -1, batch_size).mean(-1)  # (experts, batches)
    if diversity_weight > 0:
        batched = (scores.logits[:, order] / temperature).reshape(experts, -1, batch_size, scores.logits.shape[-1])
        objective = objective - diversity_weight * marginal_entropy(batched)  # (experts, batches)
    batch_chosen = objective.argmin(0)
    correct = scores.logits.argmax(-1) == scores.labels  # temperature never changes the argmax
    batch_correct = correct[:, order].reshape(experts, -1, batch_size).float().mean(-1)  # (experts, batches)
    lowest, chosen = ent.min(0)
    own_correct = correct[scores.own]
    if own_correct.all() or not own_correct.any():
        auroc = float("nan")  # one class only: undefined
    else:
        auroc = float(roc_auc_score(own_correct.numpy(), -ent[scores.own].numpy()))
    return RoutingDiagnosis(
        task=scores.task, temperature=temperature,
        own=100.0 * own_correct.float().mean().item(),
        identified=100.0 * (chosen == scores.own).float().mean().item(),
        identified_batch=100.0 * (batch_chosen == scores.own).float().mean().item(),
        batch_accuracy=100.0 * batch_correct.gather(0, batch_chosen[None]).mean().item(),
        min_entropy=100.0 * correct.gather(0, chosen[None]).float().mean().item(),
        entropy_start=per_sample_entropy(scores.start / temperature).mean().item(),
        entropy_own=ent[scores.own].mean().item(),
        entropy_min=lowest.mean().item(),
        auroc=auroc,
    )
