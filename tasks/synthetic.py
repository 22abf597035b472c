"""Tiny generated tasks for smoke runs and tests: seconds to build, no files needed.

Each family draws images whose class is a visual property (stripe orientation, dominant
colour, blob count, checker scale) under noise, so a tiny ViT can learn them but not
trivially. Deterministic from ``seed``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Annotated

import torch
from pydantic import Field

from tasks.base import InMemoryTask, register_task

Count = Annotated[int, Field(ge=0)]  # an empty split is refused by InMemoryTask, naming the split
Positive = Annotated[int, Field(ge=1)]

TEMPLATES = ["a photo of {}.", "an image showing {}."]


def _noise_background(g: torch.Generator, n: int, size: int) -> torch.Tensor:
    return torch.rand(n, size, size, 3, generator=g) * 0.35


def _stripes(g: torch.Generator, labels: torch.Tensor, size: int, k: int) -> torch.Tensor:
    n = len(labels)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    angle = labels.float() * math.pi / k + 0.15 * torch.randn(n, generator=g)
    freq = 0.6 + 0.3 * torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    proj = xx[None] * torch.cos(angle)[:, None, None] + yy[None] * torch.sin(angle)[:, None, None]
    wave = 0.5 + 0.5 * torch.sin(freq[:, None, None] * proj + phase[:, None, None])
    colour = 0.4 + 0.6 * torch.rand(n, 1, 1, 3, generator=g)
    return wave[..., None] * colour


def _colours(g: torch.Generator, labels: torch.Tensor, size: int, k: int) -> torch.Tensor:
    hues = torch.linspace(0, 1, k + 1)[:-1]
    h = hues[labels] + 0.03 * torch.randn(len(labels), generator=g)
    rgb = torch.stack([0.5 + 0.5 * torch.cos(2 * math.pi * (h - s)) for s in (0.0, 1 / 3, 2 / 3)], -1)
    mask = (torch.rand(len(labels), size, size, 1, generator=g) < 0.6).float()
    return mask * rgb[:, None, None, :]


def _blobs(g: torch.Generator, labels: torch.Tensor, size: int, k: int) -> torch.Tensor:
    n = len(labels)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = torch.zeros(n, size, size, 3)
    for i in range(n):
        for _ in range(int(labels[i]) + 1):
            cy, cx = (torch.rand(2, generator=g) * (size - 4) + 2).tolist()
            r = size / 10
            out[i] += (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).float()[..., None]
    return out.clamp(0, 1) * torch.tensor([0.9, 0.9, 0.3])


def _checks(g: torch.Generator, labels: torch.Tensor, size: int, k: int) -> torch.Tensor:
    n = len(labels)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.zeros(n, size, size, 3)
    for i in range(n):
        cell = int(labels[i]) + 1
        off = torch.randint(0, cell + 1, (2,), generator=g)
        board = (((yy + off[0]) // cell + (xx + off[1]) // cell) % 2).float()
        out[i] = board[..., None] * (0.5 + 0.5 * torch.rand(3, generator=g))
    return out


FAMILIES = {
    "toy_stripes": (_stripes, "stripes at {} degrees", lambda c, k: str(int(180 * c / k))),
    "toy_colours": (_colours, "{} colour", lambda c, k: f"hue {c}"),
    "toy_blobs": (_blobs, "{} blobs", lambda c, k: str(c + 1)),
    "toy_checks": (_checks, "checkerboard of size {}", lambda c, k: str(c + 1)),
}


def make_toy_task(name: str, n_classes: Positive = 4, n_train: Count = 160, n_val: Count = 40,
                  n_test: Count = 80, image_size: Positive = 16, seed: int = 0) -> InMemoryTask:
    draw, pattern, label_name = FAMILIES[name]
    g = torch.Generator().manual_seed(seed * 1000 + sorted(FAMILIES).index(name))
    splits = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = torch.arange(n) % n_classes
        labels = labels[torch.randperm(n, generator=g)]
        img = _noise_background(g, n, image_size) + draw(g, labels, image_size, n_classes)
        splits[split] = ((img.clamp(0, 1) * 255).round().to(torch.uint8), labels)
    classes = [pattern.format(label_name(c, n_classes)) for c in range(n_classes)]
    version = f"toy1-{n_classes}-{n_train}-{n_val}-{n_test}-{image_size}-{seed}"
    return InMemoryTask(name, classes, TEMPLATES, splits, version=version)


def _factory(name: str):
    """The registered factory of one family: it takes ``**options`` (so the sweep gives it no
    ``image_size`` of the model's: a toy task is drawn at its own size), and names
    :func:`make_toy_task` as what checks them."""

    def factory(**options) -> InMemoryTask:
        return make_toy_task(name, **options)

    factory.takes_options_of = partial(make_toy_task, name)
    return factory


for _name in FAMILIES:
    register_task(_name, f"generated {_name[4:]} task (tiny, for smoke runs and tests)")(_factory(_name))
