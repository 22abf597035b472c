"""Helpers shared by the benchmark scripts: peak memory of this process and checked CLI values."""

from __future__ import annotations


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
