"""Why TIES-merging does or does not pay off on a sweep's models: validation data only.

Prints, for the sweep's merged tasks: how often the task vectors disagree in sign per entry,
how much of each task vector's squared norm its top-k% entries hold, each task vector's own
validation accuracy after trimming (at scale 1 and 2), TIES's average validation accuracy
with the trim threshold over the whole model (the paper) or per tensor (as mergekit does), and
task arithmetic's beside it, the bar TIES is meant to clear.

    python scripts/ties_diagnostics.py sweeps/wemoe.yaml [key.path=value ...]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.config import load_config_or_usage  # noqa: E402
from harness.job import task_accuracy  # noqa: E402
from harness.workspace import Workspace  # noqa: E402
from methods.ties import keep_count, ties_merge_dense, trim_thresholds  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("sweep")
    ap.add_argument("overrides", nargs="*", metavar="key.path=value",
                    help="overrides of the sweep file, as `harness sweep` takes them")
    ap.add_argument("--ks", type=float, nargs="+", default=[10, 20, 50])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 1.4, 1.8, 2.2, 2.6])
    ap.add_argument("--ta-lambdas", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                    help="task arithmetic's scalings (on the sum of the task vectors)")
    args = ap.parse_args()
    cfg = load_config_or_usage(ap, args.sweep, args.overrides)
    ws = Workspace(cfg, progress=True)
    tasks = cfg.merge_tasks
    pre = ws.pretrained_encoder
    base = {k: v.detach().clone() for k, v in pre.state_dict().items() if v.is_floating_point()}
    taus = [{k: ws.finetuned_encoder(t).state_dict()[k].float() - base[k] for k in base} for t in tasks]
    flat = torch.stack([torch.cat([tv[k].flatten() for k in base]) for tv in taus])
    n = flat.shape[1]

    def val_acc(delta: dict[str, torch.Tensor], scale: float, only: str | None = None) -> float:
        enc = copy.deepcopy(pre)
        state = enc.state_dict()
        for k in base:
            state[k].copy_(base[k] + scale * delta[k])
        names = [only] if only else tasks
        return sum(task_accuracy(ws, enc, t, ws.task(t).dataset("val"), torch.device("cpu")) for t in names) / len(names)

    both = ((flat > 0).any(0) & (flat < 0).any(0)).float().mean().item()
    print(f"{len(tasks)} task vectors, {n:,} entries each")
    print(f"entries where the tasks disagree in sign: {100 * both:.1f}% "
          f"(independent random signs: {100 * (1 - 2 ** (1 - len(tasks))):.1f}%)")
    energy = flat.pow(2).sort(dim=1, descending=True).values.cumsum(1) / flat.pow(2).sum(1, keepdim=True)
    for k in args.ks:
        print(f"squared norm in the top {k:g}% of entries: {100 * energy[:, keep_count(n, k) - 1].mean():.1f}% (task mean)")

    print("\nown-task validation accuracy of each trimmed task vector (task mean)")
    print(f"  untrimmed: {sum(val_acc(tv, 1.0, t) for tv, t in zip(taus, tasks)) / len(tasks):.1f}")
    for k in args.ks:
        accs = {1.0: [], 2.0: []}
        for tv, kth, t in zip(taus, trim_thresholds(taus, k), tasks):
            trimmed = {key: torch.where(v.abs() >= kth, v, torch.zeros_like(v)) for key, v in tv.items()}
            for scale in accs:
                accs[scale].append(val_acc(trimmed, scale, t))
        print(f"  k={k:g}: x1 {sum(accs[1.0]) / len(tasks):.1f}, x2 {sum(accs[2.0]) / len(tasks):.1f}")

    print("\nTIES average validation accuracy by lambda")
    summed = {key: sum(tv[key] for tv in taus) for key in base}
    print("  task arithmetic: " + ", ".join(f"{lam:g}: {val_acc(summed, lam):.1f}" for lam in args.ta_lambdas))
    for k in args.ks:
        for scope, merged in (("over the whole model", ties_merge_dense(taus, k)),
                              ("per tensor", ties_merge_dense(taus, k, trim_scope="tensor"))):
            row = ", ".join(f"{lam:g}: {val_acc(merged, lam):.1f}" for lam in args.lambdas)
            print(f"  k={k:g}, threshold {scope}: {row}")


if __name__ == "__main__":
    main()
