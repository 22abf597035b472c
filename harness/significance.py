"""Is one method's average accuracy really above another's? A paired bootstrap over test images.

Two merged models are scored on the same test images, so their accuracies are correlated and
the question is about the images where they disagree. Resampling every task's test images
(stratified by task, the same draw for both models) and averaging the per-task differences
as the tables do gives a confidence interval for the difference of the averages. With about a
thousand test images per task a difference of a point can be noise; the tables alone do not
say which.

Per image the difference of two models' correctness is +1, 0 or -1, so resampling ``n`` images
with replacement draws the three counts from a multinomial: the bootstrap runs in O(resamples)
per task, whatever the split's size, with the same distribution as resampling indices.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


def pack_correct(correct: Sequence[bool] | np.ndarray) -> str:
    """``"<n>:<base64 of the bits>"``: one test split's per-image correctness, 1/8 byte per image
    (a job's result file stays small even for SUN397's 19,850 test images)."""
    bits = np.asarray(correct, dtype=bool)
    return f"{bits.size}:{base64.b64encode(np.packbits(bits).tobytes()).decode('ascii')}"


def unpack_correct(packed: str) -> np.ndarray:
    """Inverse of :func:`pack_correct`."""
    n, _, data = packed.partition(":")
    bits = np.unpackbits(np.frombuffer(base64.b64decode(data), dtype=np.uint8))
    if not n.isdigit() or bits.size < int(n) or bits.size - int(n) >= 8:
        raise ValueError(f"malformed per-image record (claims {n!r} images, holds {bits.size} bits)")
    return bits[: int(n)].astype(bool)


@dataclass(frozen=True)
class Difference:
    """``a``'s average accuracy minus ``b``'s, in points, with its bootstrap interval."""

    diff: float
    low: float
    high: float
    p: float  # two-sided: twice the smaller share of resampled differences on either side of 0
    images: int  # test images behind the comparison, over all tasks


def paired_bootstrap(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], tasks: Sequence[str],
                     resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Difference:
    """The difference of the task-averaged accuracies of two models scored on the same images.

    ``a[t]``, ``b[t]``: per-image correctness on task ``t``'s test split, in the same order."""
    if not tasks:
        raise ValueError("no tasks to compare on")
    rng = np.random.default_rng(seed)
    pairs = []
    for t in tasks:
        x, y = np.asarray(a[t], dtype=bool), np.asarray(b[t], dtype=bool)
        if x.shape != y.shape or x.ndim != 1 or x.size == 0:
            raise ValueError(f"{t}: per-image records of different or empty splits ({x.shape} vs {y.shape})")
        pairs.append((x, y))
    sizes = [x.size for x, _ in pairs]
    common = math.lcm(*sizes)
    # The sign of a resampled difference decides the p-value, and a difference of exactly 0 (as
    # frequent as a few percent of the resamples) counts on both sides. Summed in floating point,
    # 0.1 + 0.2 - 0.3 points is not 0: the sign is taken from the exact sum, in units of
    # 1 / lcm(split sizes) (Python integers where int64 could overflow).
    exact_dtype = np.int64 if len(tasks) * common < 2**62 else object
    exact = np.zeros(resamples, dtype=exact_dtype)
    total = np.zeros(resamples)
    observed = 0.0
    for (x, y), n in zip(pairs, sizes):
        wins, losses = int((x & ~y).sum()), int((~x & y).sum())
        counts = rng.multinomial(n, [wins / n, losses / n, (n - wins - losses) / n], size=resamples)
        delta = counts[:, 0] - counts[:, 1]
        total += 100.0 * delta / n
        exact += delta.astype(exact_dtype) * (common // n)
        observed += 100.0 * (wins - losses) / n
    total /= len(tasks)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(total, [alpha, 1.0 - alpha])
    p = min(1.0, 2.0 * min(float((exact <= 0).mean()), float((exact >= 0).mean())))
    return Difference(observed / len(tasks), float(low), float(high), p, sum(sizes))


CORRECT_FILE = "test_correct.json"


def write_correct(test_correct: Mapping[str, str], folder: Path) -> Path:
    """A job's per-image records as the file its MLflow run carries (``harness report`` reads it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CORRECT_FILE
    path.write_text(json.dumps(dict(test_correct), sort_keys=True))
    return path


def read_correct(path: Path) -> dict[str, str]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"{path}: expected an object of task name -> packed per-image record")
    return data
