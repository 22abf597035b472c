"""Fine-tuning an image encoder against a frozen classification head (task-vectors protocol).

The protocol of the task-arithmetic lineage: only the image encoder trains; the head is the
frozen zero-shot text head; AdamW with linear warmup then cosine decay, gradient clipping.

Optional *feature preservation* (a deviation from the plain protocol, off by default): the
loss gains ``preserve_weight`` times the relative squared distance between the fine-tuned and
the pretrained encoder's outputs on a few general (pretraining-pool) images per step. Large
pretrained models keep their general features when fine-tuned; a tiny model does not, and
then task vectors do not compose. This term emulates the former.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from harness.models import ImageClassifier

ProgressFn = Callable[[int, int, dict[str, float]], None]


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The lr multiplier at ``step`` (0-based): linear warmup to 1, then cosine to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    rest = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, rest) / rest))


def _dataset_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels as two tensors (in-memory tasks are already TensorDatasets)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0], dataset.tensors[1].long()
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(list(images)), torch.as_tensor(labels).long()


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled index batches: full passes over the data, reshuffled each epoch."""
    batch_size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def relative_feature_distance(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """sum ||f - f0||^2 / sum ||f0||^2 over the batch: scale-free, 0 when nothing moved."""
    return (features.float() - reference.float()).pow(2).sum() / reference.float().pow(2).sum().clamp_min(1e-12)


def finetune_encoder(
    encoder: nn.Module,
    head: torch.Tensor,
    dataset: Dataset,
    *,
    steps: int,
    lr: float = 1e-4,
    weight_decay: float = 0.1,
    batch_size: int = 64,
    warmup: int = 50,
    grad_clip: float = 1.0,
    seed: int = 0,
    preserve_weight: float = 0.0,
    preserve_images: torch.Tensor | None = None,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    progress: ProgressFn | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A fine-tuned copy of ``encoder`` (the argument is left untouched).

    ``head`` is a ``[classes, dim]`` weight used through :class:`ImageClassifier` and never
    trained. ``preserve_images`` are preprocessed images ``[N, 3, H, W]``; with
    ``preserve_weight > 0`` each step draws ``batch_size // 2`` of them and adds
    ``preserve_weight * relative_feature_distance(encoder(x), pretrained_encoder(x))``.
    ``progress(step, steps, {"loss": ..., "acc": ...})`` is called after every step.
    The result depends only on the inputs and ``seed`` (data order and preservation batches
    come from one seeded generator).
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    if preserve_weight < 0:
        raise ValueError("preserve_weight must be >= 0")
    if preserve_weight > 0 and (preserve_images is None or len(preserve_images) == 0):
        raise ValueError("preserve_weight > 0 needs preserve_images")
    device = torch.device(device)
    model = copy.deepcopy(encoder).to(device).float()
    for p in model.parameters():
        p.requires_grad_(True)
    classifier = ImageClassifier(model, head.detach()).to(device)
    images, labels = _dataset_tensors(dataset)

    reference: nn.Module | None = None
    if preserve_weight > 0:
        reference = copy.deepcopy(encoder).to(device).float().eval()
        for p in reference.parameters():
            p.requires_grad_(False)

    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup))
    batches = _batches(len(images), batch_size, generator)
    model.train()
    for step in range(steps):
        idx = next(batches)
        x, y = images[idx].to(device), labels[idx].to(device)
        logits = classifier(x)
        loss = F.cross_entropy(logits, y)
        metrics = {"ce": loss.item(), "acc": (logits.argmax(-1) == y).float().mean().item() * 100}
        if reference is not None:
            pidx = torch.randint(len(preserve_images), (max(1, batch_size // 2),), generator=generator)
            px = preserve_images[pidx].to(device)
            with torch.no_grad():
                target = reference(px)
            drift = relative_feature_distance(model(px), target)
            loss = loss + preserve_weight * drift
            metrics["drift"] = drift.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip and grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        scheduler.step()
        metrics["loss"] = loss.item()
        if progress is not None:
            progress(step + 1, steps, metrics)
    return model.eval()
