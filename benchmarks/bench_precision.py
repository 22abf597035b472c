"""Benchmark: evaluation at ``eval.precision`` bf16 / fp16 against fp32, on the same images.

Builds an open_clip image tower (random weights; speed does not depend on them) with a random
zero-shot-style head, and scores ``--images`` random images through the harness's evaluation
path (``harness.evaluation.correct_predictions``, which wraps the forward in
``harness.precision.autocast``) at each precision, ``--repeats`` rounds in which the precisions
alternate, best time kept. Prints
the times, fp32's time over each, and how many top-1 predictions agree with fp32's: the speed
asked for and the price paid in predictions.

    OMP_NUM_THREADS=2 python benchmarks/bench_precision.py                  # ViT-B/32 on the CPU
    python benchmarks/bench_precision.py --device cuda --precisions fp32 bf16 fp16 --images 4096
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from bench_common import arch_arg, device_or_auto, positive_int


def alternating(precisions: list[str], repeats: int, score: Callable[[str], torch.Tensor],
                device: torch.device) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Best time and last output of ``score`` per precision, the precisions alternating in every
    round, so that load that comes and goes on the machine weighs on each of them alike."""
    times = {precision: float("inf") for precision in precisions}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for precision in precisions:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            outputs[precision] = score(precision)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[precision] = min(times[precision], time.perf_counter() - t)
    return times, outputs


def main() -> None:
    from harness.evaluation import correct_predictions
    from harness.models import ImageClassifier, build_clip
    from harness.precision import PrecisionError, check_precision
    from harness.runtime import resolve_device

    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=arch_arg, default="ViT-B-32")
    p.add_argument("--images", type=positive_int, default=256)
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--classes", type=positive_int, default=100)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--device", type=device_or_auto, default="auto")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    args = p.parse_args()
    device = resolve_device(args.device)
    for precision in args.precisions:
        try:
            check_precision(precision, device)
        except PrecisionError as exc:
            p.error(str(exc))
    torch.manual_seed(0)
    tower = build_clip(args.arch).visual.eval().to(device)
    size = tower.image_size if isinstance(tower.image_size, int) else tower.image_size[0]
    width = tower.output_dim
    head = F.normalize(torch.randn(args.classes, width), dim=-1) * 100.0
    clf = ImageClassifier(tower, head).to(device)
    images = torch.randn(args.images, 3, size, size)
    with torch.no_grad():  # fp32's top-1 as the labels: a precision's "accuracy" is its agreement with fp32
        reference = torch.cat([clf(x.to(device)).argmax(-1).cpu() for x in images.split(args.batch)])
    data = TensorDataset(images, reference)

    print(f"{args.arch} at {size} px, {args.images} images in batches of {args.batch}, {args.classes} classes, "
          f"on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads)")

    def score(precision: str) -> torch.Tensor:
        return correct_predictions(clf, data, args.batch, device, precision=precision)

    times, agreeing = alternating(args.precisions, args.repeats, score, device)
    for precision, best in times.items():
        agree = float(agreeing[precision].float().mean()) * 100
        print(f"{precision}: {best:.3f} s ({args.images / best:.0f} images/s), top-1 agreeing with fp32: {agree:.1f}%")
    base = times.get("fp32")
    if base is not None:
        for precision, t in times.items():
            if precision != "fp32":
                print(f"time fp32 / {precision}: {base / t:.2f}x")


if __name__ == "__main__":
    main()
