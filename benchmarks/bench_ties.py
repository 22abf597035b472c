"""Benchmark: TIES-merging, dense reference vs the streaming implementation.

Builds random task vectors of an open_clip image encoder offline (the architecture only,
random weights; fine-tuned = pretrained + per-tensor-scaled Gaussian noise), then runs each
implementation end to end (inputs -> merged encoder) in its own subprocess so that peak RSS
(``ru_maxrss`` of that process) is per implementation. Prints wall time, peak RSS, input
size, the ratios, and the largest absolute difference between the two merged encoders.

    OMP_NUM_THREADS=1 python benchmarks/bench_ties.py            # ViT-B-32, 8 tasks
    OMP_NUM_THREADS=1 python benchmarks/bench_ties.py --small    # harness-tiny-vit, 4 tasks
    OMP_NUM_THREADS=1 python benchmarks/bench_ties.py --tasks 4 --only streaming

The dense reference needs roughly 6x the input size in RAM (about 20 GB for eight ViT-B/32
encoders): check ``free -g`` first.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def build_inputs(model: str, tasks: int, seed: int):
    """Pretrained image encoder and ``tasks`` perturbed copies (deterministic in ``seed``)."""
    import torch

    from harness.models import build_clip

    torch.manual_seed(seed)
    pretrained = build_clip(model).visual.eval()
    generator = torch.Generator().manual_seed(seed + 1)
    finetuned = {}
    for t in range(tasks):
        encoder = copy.deepcopy(pretrained)
        with torch.no_grad():
            for tensor in encoder.state_dict().values():
                if tensor.is_floating_point():
                    scale = 0.01 * float(tensor.float().std()) if tensor.numel() > 1 else 0.01
                    tensor.add_(torch.randn(tensor.shape, generator=generator), alpha=scale or 0.01)
        finetuned[f"task{t}"] = encoder
    return pretrained, finetuned


def run_child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    from harness.models import save_state_dict
    from methods.base import MergeContext, float_state, task_vectors, with_state
    from methods.ties import TiesMerging, ties_merge_dense

    t0 = time.perf_counter()
    pretrained, finetuned = build_inputs(args.model, args.tasks, args.seed)
    build_s = time.perf_counter() - t0
    input_bytes = sum(
        v.numel() * v.element_size() for m in [pretrained, *finetuned.values()] for v in float_state(m).values()
    )
    rss_before = _rss_bytes()
    peak_before = _peak_rss_bytes()

    t0, c0 = time.perf_counter(), time.process_time()
    if args.child == "dense":
        taus = task_vectors(pretrained, finetuned)
        merged = ties_merge_dense(list(taus.values()), args.k, args.merge_function)
        del taus
        base = float_state(pretrained)
        result = with_state(pretrained, {key: base[key] + args.scaling * value for key, value in merged.items()})
    else:
        method = TiesMerging(k=args.k, scaling=args.scaling, merge_function=args.merge_function)
        result = method.merge(pretrained, finetuned, MergeContext())
    merge_s, merge_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    peak = _peak_rss_bytes()

    save_state_dict(float_state(result), args.out)
    print(json.dumps({
        "impl": args.child, "build_s": build_s, "merge_s": merge_s, "merge_cpu_s": merge_cpu_s, "input_bytes": input_bytes,
        "rss_before": rss_before, "peak_before": peak_before, "peak": peak,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="open_clip architecture (default ViT-B-32)")
    parser.add_argument("--tasks", type=int, default=None, help="number of fine-tuned encoders (default 8)")
    parser.add_argument("--small", action="store_true", help="quick run: harness-tiny-vit, 4 tasks")
    parser.add_argument("--k", type=float, default=20.0)
    parser.add_argument("--scaling", type=float, default=1.0)
    parser.add_argument("--merge-function", choices=["mean", "sum"], default="mean")
    parser.add_argument("--only", choices=["dense", "streaming"], default=None, help="run one implementation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["dense", "streaming"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or ("harness-tiny-vit" if args.small else "ViT-B-32")
    args.tasks = args.tasks or (4 if args.small else 8)
    if args.child:
        run_child(args)
        return

    impls = [args.only] if args.only else ["dense", "streaming"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in impls:
            out = os.path.join(tmp, f"{impl}.safetensors")
            cmd = [sys.executable, __file__, "--child", impl, "--out", out, "--model", args.model,
                   "--tasks", str(args.tasks), "--k", str(args.k), "--scaling", str(args.scaling),
                   "--merge-function", args.merge_function, "--seed", str(args.seed)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{impl} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[impl]["path"] = out
        diff = None
        if len(results) == 2:
            from harness.models import load_state_dict

            a = load_state_dict(results["dense"]["path"])
            b = load_state_dict(results["streaming"]["path"])
            diff = max(float((a[key].float() - b[key].float()).abs().max()) for key in a)

    gib = 1024**3
    input_bytes = next(iter(results.values()))["input_bytes"]
    print(f"model {args.model}, {args.tasks} tasks, k={args.k}, merge={args.merge_function}, "
          f"input {input_bytes / gib:.2f} GiB (pretrained + {args.tasks} fine-tuned float tensors), 1 thread")
    print(f"{'impl':<10} {'merge s':>8} {'cpu s':>7} {'RSS before':>11} {'peak RSS':>9} {'peak/input':>10} {'(peak-before)/input':>20}")
    for impl, r in results.items():
        print(f"{impl:<10} {r['merge_s']:>8.2f} {r['merge_cpu_s']:>7.2f} {r['rss_before'] / gib:>9.2f}Gi {r['peak'] / gib:>7.2f}Gi "
              f"{r['peak'] / input_bytes:>10.2f} {(r['peak'] - r['rss_before']) / input_bytes:>20.2f}")
    if len(results) == 2:
        d, s = results["dense"], results["streaming"]
        print(f"speed-up {d['merge_s'] / s['merge_s']:.1f}x wall, {d['merge_cpu_s'] / s['merge_cpu_s']:.1f}x cpu, peak RSS ratio dense/streaming "
              f"{d['peak'] / s['peak']:.1f}x, max |dense - streaming| = {diff:.3g}")


if __name__ == "__main__":
    main()
