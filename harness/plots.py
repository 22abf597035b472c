"""Artifacts drawn from job results: routing-weight tables and heatmaps (matplotlib)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def routing_csv(routing: dict[str, Any], path: Path) -> Path:
    """One row per (data task, layer, expert): the mean routing weight."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["data_task", "layer", "expert", "mean_weight"])
        for task, layers in routing["mean_weight"].items():
            for li, weights in enumerate(layers):
                for expert, value in zip(routing["experts"], weights):
                    w.writerow([task, li, expert, f"{value:.6f}"])
    return path


def routing_heatmap(routing: dict[str, Any], path: Path, title: str = "WeMoE routing weights") -> Path:
    """One panel per layer: rows = data task, columns = expert, colour = mean routing weight."""
    import matplotlib.pyplot as plt

    fig = routing_figure(routing, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def routing_figure(routing: dict[str, Any], title: str = "WeMoE routing weights"):
    """The figure :func:`routing_heatmap` saves (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(routing["mean_weight"])
    experts = routing["experts"]
    data = np.array([routing["mean_weight"][t] for t in tasks])  # [tasks, layers, experts]
    n_layers = data.shape[1]
    # a panel 2 in wide held 30 expert names of 6 pt (0.1 in a line) on top of each other: it widens with them
    panel = max(2.0, 0.14 * len(experts))
    fig, axes = plt.subplots(1, n_layers, figsize=(2.2 + panel * n_layers, 1.5 + 0.35 * len(tasks)), squeeze=False,
                             layout="constrained")  # keeps the title clear of the panels' titles
    # one scale object for every panel: where all weights are equal (routing left at its initial
    # weights) the colour bar widens its scale, and a panel holding a copy then drew another colour
    norm = matplotlib.colors.Normalize(float(data.min()), float(data.max()))
    for li, ax in enumerate(axes[0]):
        im = ax.imshow(data[:, li, :], norm=norm, cmap="viridis", aspect="auto")
        ax.set_title(f"layer {li}", fontsize=8)
        ax.set_xticks(range(len(experts)), experts, rotation=90, fontsize=6)
        ax.set_yticks(range(len(tasks)), tasks if li == 0 else [""] * len(tasks), fontsize=6)
        ax.set_xlabel("expert", fontsize=7)
    axes[0][0].set_ylabel("images of task", fontsize=7)
    bar = fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    bar.set_label("mean routing weight", fontsize=7)  # raw routing is unbounded: the scale needs its name
    fig.suptitle(title, fontsize=9)
    return fig


def job_artifact_files(artifacts: dict[str, Any], folder: Path) -> list[Path]:
    """Files to attach to a job's MLflow run, written from its returned artifacts."""
    files = []
    if artifacts.get("routing"):
        files.append(routing_csv(artifacts["routing"], folder / "routing.csv"))
        files.append(routing_heatmap(artifacts["routing"], folder / "routing.png"))
    return files
