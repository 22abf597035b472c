"""Measure the embedded suite: generation time, split sizes, and learnability baselines.

``python -m tasks.embedded.report [--size full|tiny] [--cnn]`` regenerates every task
without the cache (one thread) and fits a multinomial logistic regression on raw pixels
(train -> test): a floor that tells whether a task is trivial. ``--cnn`` also trains a
small convolutional net for a few epochs, which shows that tasks the linear floor finds
hard (translation- and colour-invariant ones) are learnable.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from tasks.embedded.data import EMBEDDED_TASKS, SPECS, build_splits, source_variant
from tasks.embedded.pool import pretraining_pool


def pixel_baseline(arrays: dict[str, np.ndarray], max_iter: int = 300) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def flat(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1).astype(np.float32) / 255.0

    scaler = StandardScaler().fit(flat(arrays["train_x"]))
    clf = LogisticRegression(max_iter=max_iter, C=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(scaler.transform(flat(arrays["train_x"])), arrays["train_y"])
    return float((clf.predict(scaler.transform(flat(arrays["test_x"]))) == arrays["test_y"]).mean())


def cnn_baseline(arrays: dict[str, np.ndarray], epochs: int = 8, seed: int = 0) -> float:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255.0).sub(0.5)

    x, y = tensor(arrays["train_x"]), torch.from_numpy(arrays["train_y"]).long()
    n_classes = int(max(arrays["train_y"].max(), arrays["test_y"].max())) + 1
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, n_classes),
    )
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        pred = net(tensor(arrays["test_x"])).argmax(1).numpy()
    return float((pred == arrays["test_y"]).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__)
    parser.add_argument("--size", default="full", choices=["full", "tiny"])
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--cnn", action="store_true", help="also train a small CNN per task")
    parser.add_argument("--pool", type=int, default=5000, help="pool images to time")
    args = parser.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    print("| task | analog | source | classes | train | val | test | gen s (wall) | gen s (cpu) | logreg test acc "
          "| small CNN test acc | chance |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    total = total_cpu = 0.0
    for name in EMBEDDED_TASKS:
        variant = source_variant(name)
        t0, c0 = time.perf_counter(), time.process_time()
        arrays = build_splits(name, args.size, variant)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        total += dt
        total_cpu += dc
        c = len(SPECS[name].classnames)
        acc = "-" if args.no_baseline else f"{pixel_baseline(arrays):.3f}"
        cnn = f"{cnn_baseline(arrays):.3f}" if args.cnn else "-"
        print(f"| {name} | {SPECS[name].analog} | {variant} | {c} | {len(arrays['train_y'])} | "
              f"{len(arrays['val_y'])} | {len(arrays['test_y'])} | {dt:.1f} | {dc:.1f} | {acc} | {cnn} | "
              f"{1 / c:.3f} |", flush=True)
    print(f"\nsuite generation: {total:.1f} s wall, {total_cpu:.1f} s cpu")
    if args.pool:
        t0, c0 = time.perf_counter(), time.process_time()
        pretraining_pool(args.pool, seed=1, size=args.size)
        print(f"pretraining pool: {args.pool} images in {time.perf_counter() - t0:.1f} s wall, "
              f"{time.process_time() - c0:.1f} s cpu")


if __name__ == "__main__":
    main()
