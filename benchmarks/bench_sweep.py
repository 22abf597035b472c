"""End-to-end sweep timing, cold cache vs warm cache vs fully cached, with a per-stage breakdown.

    python benchmarks/bench_sweep.py                       # sweeps/wemoe.yaml (embedded suite)
    python benchmarks/bench_sweep.py --sweep sweeps/quick.yaml --skip-cold

cold: an empty cache folder (the embedded suite fine-tunes its 8 encoders; data is generated),
warm: the cache from the cold run but a new output folder (every job runs again),
rerun: the warm run's output folder again (every job is read from the result cache).
The cold cache and the outputs are in a temporary folder, removed at the end.
Stages: prepare (models, data, heads), merge, adapt (merges with test-time adaptation),
evaluate, logging (MLflow and reports), other (the rest), from the runner's and the jobs' timers.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(sweep: str, overrides: list[str]) -> dict[str, float]:
    from harness.config import load_config
    from harness.runner import run_sweep

    cfg = load_config(sweep, overrides)
    t0 = time.perf_counter()
    out = run_sweep(cfg, quiet=True)
    total = time.perf_counter() - t0
    stages: dict[str, float] = defaultdict(float)
    stages["prepare"] = out.timings.get("prepare", 0.0)
    stages["logging"] = out.timings.get("logging", 0.0)
    executed = set(out.executed)
    for r in out.results:
        if r.key in executed:
            kind = "adapt" if r.kind == "merge" and r.artifacts.get("curves") else "merge"
            stages[kind] += r.timings.get("merge", 0.0)
            t = r.timings  # reference jobs only load and evaluate
            stages["evaluate"] += t.get("evaluate", t.get("total", 0.0) - t.get("load", 0.0))
    stages["other"] = total - sum(stages.values())  # MLflow store set-up, per-job logging, planning
    stages["total"] = total
    stages["jobs run"] = len(executed)
    return dict(stages)


def timed_runs(sweep: str, overrides: list[str], root: Path, skip_cold: bool) -> dict[str, dict[str, float]]:
    """The cold (unless ``skip_cold``), warm and rerun stages, with their caches and outputs under ``root``."""
    cache = [] if skip_cold else [f"cache_dir={root / 'cache'}"]
    rows = {}
    if not skip_cold:
        rows["cold"] = run(sweep, [*overrides, *cache, f"output_dir={root / 'cold'}"])
    rows["warm"] = run(sweep, [*overrides, *cache, f"output_dir={root / 'warm'}"])
    rows["rerun"] = run(sweep, [*overrides, *cache, f"output_dir={root / 'warm'}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default="sweeps/wemoe.yaml")
    ap.add_argument("--skip-cold", action="store_true", help="reuse the user cache instead of an empty one")
    ap.add_argument("overrides", nargs="*", help="key.path=value overrides for the sweep")
    args = ap.parse_args()
    from harness.config import load_config_or_usage
    from harness.config_errors import ConfigError
    from harness.errors import FieldError, HarnessError

    load_config_or_usage(ap, args.sweep, args.overrides)  # a bad sweep stops here, not inside the first timed run
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:  # the cold cache alone is hundreds of MB
        try:
            rows = timed_runs(args.sweep, args.overrides, Path(tmp), args.skip_cold)
        except HarnessError as exc:  # found once the sweep runs (a device this machine lacks): one line
            ap.error(str(ConfigError.of_field(args.sweep, exc, args.overrides) if isinstance(exc, FieldError) else exc))
    stages = ["prepare", "merge", "adapt", "evaluate", "logging", "other", "total", "jobs run"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch threads {os.environ['OMP_NUM_THREADS']}, "
          f"python {platform.python_version()}; sweep {args.sweep}")
    print(f"{'stage':<10}" + "".join(f"{name:>12}" for name in rows))
    for s in stages:
        print(f"{s:<10}" + "".join(f"{rows[n].get(s, 0.0):>12.1f}" for n in rows))
    if "cold" in rows:
        print(f"warm/cold total: {rows['warm']['total'] / rows['cold']['total']:.3f}   "
              f"rerun/cold total: {rows['rerun']['total'] / rows['cold']['total']:.3f}")


if __name__ == "__main__":
    main()
