"""Helpers shared by the benchmark scripts: peak memory of this process, alternating timed
rounds, and checked CLI values."""

from __future__ import annotations

import argparse
from typing import Callable, Sequence, TypeVar

_T = TypeVar("_T")


def proc_kib_bytes(path: str, field: str) -> int:
    """A ``field: N kB`` line of a /proc file, in bytes (0 when absent)."""
    with open(path) as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """This process's own peak RSS (``VmHWM``).

    Not ``getrusage``'s ``ru_maxrss``: Linux carries the parent's high-water mark into a child
    started with (v)fork + exec, so a benchmark child launched by a large process would report
    the parent's peak instead of its own.
    """
    return proc_kib_bytes("/proc/self/status", "VmHWM")


def alternating_rounds(variants: Sequence[str], repeats: int,
                       run: Callable[[str], _T | None]) -> dict[str, list[_T]]:
    """``run(variant)``'s results per variant over ``repeats`` rounds in which the variants
    alternate, the order rotating each round: timing one variant after the other once lets load
    that comes and goes on the machine (or a cache the first one warms) bias their ratio. A
    variant whose ``run`` returns None (skipped or failed) is not run again."""
    results: dict[str, list[_T]] = {v: [] for v in variants}
    dropped: set[str] = set()
    for r in range(repeats):
        for variant in [*variants[r % len(variants):], *variants[:r % len(variants)]] if variants else []:
            if variant in dropped:
                continue
            out = run(variant)
            if out is None:
                dropped.add(variant)
            else:
                results[variant].append(out)
    return {v: got for v, got in results.items() if got}


def positive_int(text: str) -> int:
    """argparse type for a size, count or repeat: an integer of at least 1.

    Zero or a negative value would otherwise run an empty benchmark or fail deep in torch.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def non_negative_float(text: str) -> float:
    """argparse type for a duration: a number of at least 0."""
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def device_arg(text: str) -> str:
    """argparse type for ``--device``: ``cpu``, ``cuda`` or ``cuda:N`` of a GPU present here.

    Checked in the parent, so that a typo is one usage line rather than a child's traceback
    after the inputs were built.
    """
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported here (cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} GPU(s)")
    return text


def device_or_auto(text: str) -> str:
    """:func:`device_arg`, or ``auto`` (a GPU when there is one)."""
    return text if text == "auto" else device_arg(text)


def percent(text: str) -> float:
    """argparse type for a share kept, in percent: a number in (0, 100]."""
    value = _number(text)
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"must be in (0, 100], got {text}")
    return value


def arch_arg(text: str) -> str:
    """argparse type for an open_clip architecture that this process can build.

    Checked at parsing (harness.models.resolve_arch, with its did-you-mean) instead of in the
    tower's construction, where a typo ended in a traceback (bench_ties: one per child).
    """
    from harness.errors import HarnessError
    from harness.models import resolve_arch

    try:
        resolve_arch(text)
    except HarnessError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
