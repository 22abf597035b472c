"""Whether entropy minimisation can find WeMoE's right routing on a sweep's models (validation split by default).

Prints, per merged task and head temperature, a Markdown table (see harness/routing_diagnostics.py
for what each column measures):

    python scripts/wemoe_diagnostics.py sweeps/wemoe.yaml --temperatures 0.5 1 2
    python scripts/wemoe_diagnostics.py sweeps/wemoe.yaml --diversity-weights 0 0.5 1 2

Forward passes run on the sweep's device at its ``eval.precision``, as its jobs evaluate.
Overrides of the sweep file follow its path, as `harness sweep` takes them
(`... sweeps/wemoe.yaml model.suite.pretrain_steps=2000`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from statistics import fmean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.config import load_config_or_usage  # noqa: E402
from harness.routing_diagnostics import diagnose, expert_scores  # noqa: E402
from harness.workspace import Workspace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("sweep")
    ap.add_argument("overrides", nargs="*", metavar="key.path=value",
                    help="overrides of the sweep file, as `harness sweep` takes them")
    ap.add_argument("--split", default="val", choices=["val", "test"])
    ap.add_argument("--scaling", type=float, default=None,
                    help="task arithmetic's scaling outside the MLPs (default: the sweep's first routing_bound_lambda)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    ap.add_argument("--batch-size", type=int, default=16, help="images per batch of the batch-level columns")
    ap.add_argument("--diversity-weights", type=float, nargs="+", default=[0.0],
                    help="weights of the batch's marginal entropy in the batch-level choice (WeMoE's diversity_weight)")
    args = ap.parse_args()
    cfg = load_config_or_usage(ap, args.sweep, args.overrides)
    scaling = cfg.references.bound_lambdas[0] if args.scaling is None else args.scaling
    scores = expert_scores(Workspace(cfg, progress=True), args.split, scaling)
    print(f"{args.split} split, one-hot routing, task arithmetic {scaling:g} outside the MLPs\n")
    print("| task | head temperature | diversity weight | own expert (acc) | lowest entropy is own expert (%) "
          f"| batch objective lowest for own expert, {args.batch_size} images (%) | each batch's chosen expert (acc) "
          "| lowest-entropy expert (acc) | mean entropy: start / own expert / lowest (nats) "
          "| AUROC of entropy for own expert's correctness |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for temperature in args.temperatures:
        for weight in args.diversity_weights:
            rows = [diagnose(s, temperature, args.batch_size, cfg.seed, weight) for s in scores]
            for r in rows:
                print(f"| {r.task} | {temperature:g} | {weight:g} | {r.own:.1f} | {r.identified:.1f} | {r.identified_batch:.1f} "
                      f"| {r.batch_accuracy:.1f} | {r.min_entropy:.1f} "
                      f"| {r.entropy_start:.3f} / {r.entropy_own:.3f} / {r.entropy_min:.3f} | {r.auroc:.3f} |")
            finite = [r.auroc for r in rows if not math.isnan(r.auroc)]
            print(f"| **mean** | {temperature:g} | {weight:g} | {fmean(r.own for r in rows):.1f} "
                  f"| {fmean(r.identified for r in rows):.1f} | {fmean(r.identified_batch for r in rows):.1f} "
                  f"| {fmean(r.batch_accuracy for r in rows):.1f} | {fmean(r.min_entropy for r in rows):.1f} "
                  f"| {fmean(r.entropy_start for r in rows):.3f} / {fmean(r.entropy_own for r in rows):.3f} / "
                  f"{fmean(r.entropy_min for r in rows):.3f} | {fmean(finite) if finite else math.nan:.3f} |")


if __name__ == "__main__":
    main()
