"""Benchmark: a disk-backed task's corrupted test split, corrupted on every read against cached.

Writes a EuroSAT-style image-folder tree (``--images`` test images of 64 px noise, JPEG, rounded
up to a multiple of its 10 classes; the printed line gives the count read) in a
temporary folder and reads it as the ``eurosat`` task at ``--size`` px (the model's input size,
as a sweep does). For each corruption it times two passes over the split with the on-the-fly
:class:`tasks.corruptions.CorruptedDataset` (every read corrupts the image again), then
``corrupted_split`` with a cache folder (builds the file once) and two passes over it, and two
passes of a second ``corrupted_split`` call (a later job: reads the file only). The build runs
in as many processes as this process may use cores (``build_processes``); it is timed again in
one process, into another cache folder. The corruption's first call (imports, numba
compilation) is made before timing. Checks that the cached reads, the later job's and the
one-process build's included, give the on-the-fly tensors.

    OMP_NUM_THREADS=1 python benchmarks/bench_corruptions.py                      # glass and zoom blur
    OMP_NUM_THREADS=1 python benchmarks/bench_corruptions.py --corruptions motion_blur --images 1000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_common import positive_int


def write_tree(root: Path, n_test: int) -> None:
    from tasks.vision8 import _EUROSAT_FOLDERS

    rng = np.random.RandomState(0)
    for c, folder in enumerate(_EUROSAT_FOLDERS):
        for split, n in (("train", 3), ("test", -(-n_test // len(_EUROSAT_FOLDERS)))):
            d = root / "EuroSAT_splits" / split / folder
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.fromarray(rng.randint(0, 256, (64, 64, 3), np.uint8)).save(d / f"{k}.jpg", quality=90)


def passes(ds, k: int = 2) -> tuple[float, list[torch.Tensor]]:
    t = time.perf_counter()
    for _ in range(k):
        images = [ds[i][0] for i in range(len(ds))]
    return time.perf_counter() - t, images


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Same number of images, each equal."""
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def main() -> None:
    from tasks.corruptions import ALL_CORRUPTIONS

    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--corruptions", nargs="+", choices=ALL_CORRUPTIONS, default=["glass_blur", "zoom_blur"])
    ap.add_argument("--images", type=positive_int, default=200)
    ap.add_argument("--size", type=positive_int, default=224)
    ap.add_argument("--severity", type=int, choices=range(1, 6), default=2)
    args = ap.parse_args()

    import tasks.vision8 as v8
    from tasks.corruptions import CorruptedDataset, build_processes, corrupt_image, corrupted_split

    with tempfile.TemporaryDirectory() as tmp:
        write_tree(Path(tmp) / "data", args.images)
        task = v8.eurosat(str(Path(tmp) / "data"), image_size=args.size)
        n = len(task.dataset("test"))
        for name in args.corruptions:
            corrupt_image(np.zeros((args.size, args.size, 3), np.uint8), name, args.severity, 0)
            cache = Path(tmp) / f"cache-{name}"
            fly, want = passes(CorruptedDataset(task.dataset("test"), name, args.severity))
            t = time.perf_counter()
            ds = corrupted_split(task, name, args.severity, cache)
            build = time.perf_counter() - t
            reads, got = passes(ds)
            later, again = passes(corrupted_split(task, name, args.severity, cache))
            t = time.perf_counter()
            alone = corrupted_split(task, name, args.severity, Path(tmp) / f"cache-{name}-1", processes=1)
            serial = time.perf_counter() - t
            same = identical(got, want) and identical(again, want) and identical(passes(alone, 1)[1], want)
            procs = build_processes(n)
            in_procs = f"{procs} process{'es' if procs != 1 else ''}"
            print(f"{name}, {n} images at {args.size} px: on the fly 2 passes {fly:.1f} s; cached: build {build:.1f} s "
                  f"+ 2 passes {reads:.2f} s = {build + reads:.1f} s ({fly / (build + reads):.1f}x); a later job's "
                  f"2 passes {later:.2f} s ({fly / later:.0f}x); the build in {in_procs} "
                  f"{build:.1f} s against {serial:.1f} s in one ({serial / build:.2f}x); identical: {same}")


if __name__ == "__main__":
    main()
