"""Benchmark: test-time adaptation's unlabeled streams of a disk-backed split, read in the adapting
process against read by forked workers (``harness.evaluation.UnlabeledStream``).

Writes a EuroSAT-style image-folder tree of ``--images`` JPEGs of ``--source-px`` noise (the
paper's datasets are mostly 200-700 px photos) in a temporary folder, reads it as the ``eurosat``
task at 224 px, and draws ``--steps`` steps of one ``--batch`` batch from each of ``--streams``
streams, as an adaptation step does: in this process (``workers=0``, as before) and with
:func:`harness.evaluation.stream_workers` workers per stream. With ``--compute-ms`` each step
also spends that long on one core in a matrix product (the model's step; on an accelerator the
process mostly waits for it). Then times a resume at step ``--steps``: ``skip`` against reading
the batches. Checks that both give the same batches. Each comparison runs ``--repeats`` rounds
(default 3) in which its two ways alternate, the order rotating each round, and compares their
medians: load coming and going on the machine, or the page cache the first read warms, weighs
on both alike.

    OMP_NUM_THREADS=1 python benchmarks/bench_streams.py
    OMP_NUM_THREADS=1 python benchmarks/bench_streams.py --compute-ms 100 --steps 10
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_common import alternating_rounds, non_negative_float, positive_int


def write_tree(root: Path, n_test: int, px: int) -> None:
    from tasks.vision8 import _EUROSAT_FOLDERS

    rng = np.random.RandomState(0)
    for folder in _EUROSAT_FOLDERS:
        for split, n in (("train", 1), ("test", -(-n_test // len(_EUROSAT_FOLDERS)))):
            d = root / "EuroSAT_splits" / split / folder
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.fromarray(rng.randint(0, 256, (px, px, 3), np.uint8)).save(d / f"{k}.jpg", quality=90)


def spend(ms: float) -> None:
    """About ``ms`` milliseconds of one core's matrix products."""
    if ms <= 0:
        return
    a = torch.randn(256, 256)
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def adapt(ds, args, workers: int) -> tuple[float, list[torch.Tensor], int]:
    """Seconds, the batches drawn, and the readers a stream actually used (none for a split no
    larger than a batch, whatever ``workers`` asks)."""
    from harness.evaluation import unlabeled_batches

    streams = [unlabeled_batches(ds, args.batch, seed=s, workers=workers) for s in range(args.streams)]
    t = time.perf_counter()
    got = []
    for _ in range(args.steps):
        got += [next(s) for s in streams]
        spend(args.compute_ms)
    return time.perf_counter() - t, got, streams[0].workers


def resume(ds, args, skip: bool) -> tuple[float, torch.Tensor]:
    """Seconds to bring one stream to step ``args.steps``, skipping or reading the batches, and
    the batch it draws next."""
    from harness.evaluation import unlabeled_batches

    t = time.perf_counter()
    stream = unlabeled_batches(ds, args.batch, seed=0)
    if skip:
        stream.skip(args.steps)
    else:
        for _ in itertools.islice(stream, args.steps):
            pass
    return time.perf_counter() - t, next(stream)


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=positive_int, default=400)
    ap.add_argument("--source-px", type=positive_int, default=400)
    ap.add_argument("--streams", type=positive_int, default=8)
    ap.add_argument("--batch", type=positive_int, default=16)
    ap.add_argument("--steps", type=positive_int, default=8)
    ap.add_argument("--compute-ms", type=non_negative_float, default=0.0)
    ap.add_argument("--repeats", type=positive_int, default=3, help="alternating rounds (medians are compared)")
    args = ap.parse_args()

    import tasks.vision8 as v8
    from harness.evaluation import stream_workers
    from harness.runtime import available_cores

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_tree(Path(tmp) / "data", args.images, args.source_px)
        ds = v8.eurosat(str(Path(tmp) / "data"), image_size=224).dataset("test")
        readers = {"in-process": 0, "workers": stream_workers(args.streams)}
        want: list[torch.Tensor] = []  # the first run's batches: every run must draw them

        def adapt_with(way: str) -> tuple[float, bool, int]:
            seconds, got, used = adapt(ds, args, readers[way])
            if not want:
                want.extend(got)
            return seconds, all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), used

        runs = alternating_rounds(list(readers), args.repeats, adapt_with)
        alone, ours = (statistics.median(r[0] for r in runs[way]) for way in readers)
        same = all(r[1] for way in readers for r in runs[way])
        print(f"{args.streams} streams x {args.steps} steps of {args.batch} images ({args.source_px} px JPEG -> 224), "
              f"{args.compute_ms:g} ms compute a step, {available_cores()} cores; "
              f"median of {args.repeats} rounds alternating the two ways")
        print(f"in-process {alone:.2f} s; {runs['workers'][0][2]} worker(s) a stream {ours:.2f} s: {alone / ours:.2f}x; "
              f"identical: {same}")

        resumed = alternating_rounds(["read", "skip"], args.repeats, lambda way: resume(ds, args, way == "skip"))
        reading, skipping = (statistics.median(r[0] for r in resumed[way]) for way in ("read", "skip"))
        first = resumed["read"][0][1]
        print(f"resume at step {args.steps}, one stream: reading the batches {reading:.2f} s, skip {skipping * 1000:.1f} ms; "
              f"next batch identical: {all(torch.equal(r[1], first) for way in resumed for r in resumed[way])}")


if __name__ == "__main__":
    main()
