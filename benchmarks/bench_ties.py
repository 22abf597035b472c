"""Benchmark: TIES-merging and task arithmetic, ours against a literal dense TIES and FusionBench.

Builds random task vectors of an open_clip image encoder offline (the architecture only,
random weights; fine-tuned = pretrained + per-tensor-scaled Gaussian noise), then runs each
implementation end to end (inputs -> merged encoder) in its own subprocess, on identical
inputs, so that peak RSS (``VmHWM`` of that process) is per implementation; ``--repeats``
rounds (default 3) in which the implementations alternate, the order rotating each round, so
that load coming and going on the machine weighs on each alike:

- TIES (k, disjoint mean or sum): ``streaming`` (ours, :class:`methods.ties.TiesMerging`),
  ``dense`` (:func:`methods.ties.ties_merge_dense`, the common reference code written out)
  and ``fusionbench`` (FusionBench's ``TiesMergingAlgorithm``);
- task arithmetic: ``ta`` (ours, :class:`methods.task_arithmetic.TaskArithmetic`) and
  ``fusionbench-ta`` (FusionBench's ``TaskArithmeticAlgorithm``).

Prints the machine, the median wall and CPU time, the highest peak RSS against the input size,
the ratios of the medians, and the largest absolute difference of every merged encoder from ours. The FusionBench rows need
``pip install -e '.[bench]'``; without it they are skipped with a note.

    OMP_NUM_THREADS=1 python benchmarks/bench_ties.py            # ViT-B-32, 8 tasks
    OMP_NUM_THREADS=1 python benchmarks/bench_ties.py --tasks 4
    OMP_NUM_THREADS=1 python benchmarks/bench_ties.py --small    # harness-tiny-vit, 4 tasks
    OMP_NUM_THREADS=1 python benchmarks/bench_ties.py --only streaming fusionbench
    OMP_NUM_THREADS=1 python benchmarks/bench_ties.py --trim-scope tensor --only streaming dense

The dense TIES and FusionBench's peak at about 7x and 9x the input size (measured with four
ViT-B/32 encoders: 12 and 16 GB; eight would need about 22 and 27 GB). An implementation whose estimated peak exceeds the available
memory is skipped with a note (``--force`` runs it anyway).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import fusionbench_ref  # noqa: E402
from bench_common import (  # noqa: E402
    alternating_rounds,
    arch_arg,
    device_arg,
    peak_rss_bytes,
    percent,
    positive_int,
    proc_kib_bytes,
)

TIES_IMPLS = ["streaming", "dense", "fusionbench"]
TA_IMPLS = ["ta", "fusionbench-ta"]
LABELS = {
    "streaming": "TIES ours (streaming)", "dense": "TIES literal dense", "fusionbench": "TIES FusionBench",
    "ta": "TA ours", "fusionbench-ta": "TA FusionBench",
}
#: (peak - baseline RSS) / input bytes, measured with ViT-B-32 at 4 tasks; used to skip what cannot fit.
PEAK_FACTOR = {"streaming": 1.4, "dense": 7.2, "fusionbench": 9.1, "ta": 1.4, "fusionbench-ta": 1.7}


def _rss_bytes() -> int:
    return proc_kib_bytes("/proc/self/status", "VmRSS")


def _available_bytes() -> int:
    return proc_kib_bytes("/proc/meminfo", "MemAvailable")


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
    from methods.task_arithmetic import TaskArithmetic
    from methods.ties import TiesMerging, ties_merge_dense

    impl = args.child
    if impl.startswith("fusionbench"):
        fusionbench_ref.preload()
    device = torch.device(args.device)
    # The streaming TIES reads CPU-resident checkpoints chunk by chunk: it runs on the CPU.
    on_device = device if impl != "streaming" else torch.device("cpu")
    base_rss = _rss_bytes()

    t0 = time.perf_counter()
    pretrained, finetuned = build_inputs(args.model, args.tasks, args.seed)
    pretrained = pretrained.to(on_device)
    finetuned = {name: m.to(on_device) for name, m in finetuned.items()}
    build_s = time.perf_counter() - t0
    input_bytes = sum(
        v.numel() * v.element_size() for m in [pretrained, *finetuned.values()] for v in float_state(m).values()
    )
    rss_before = _rss_bytes()

    def sync() -> None:
        if on_device.type == "cuda":
            torch.cuda.synchronize(on_device)

    if on_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(on_device)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    if impl == "dense":
        taus = task_vectors(pretrained, finetuned)
        merged = ties_merge_dense(list(taus.values()), args.k, args.merge_function, args.trim_scope)
        del taus
        base = float_state(pretrained)
        result = with_state(pretrained, {key: base[key] + args.scaling * value for key, value in merged.items()})
    elif impl == "streaming":
        method = TiesMerging(k=args.k, scaling=args.scaling, merge_function=args.merge_function,
                             trim_scope=args.trim_scope)
        result = method.merge(pretrained, finetuned, MergeContext())
    elif impl == "fusionbench":
        result = fusionbench_ref.ties_merging(pretrained, finetuned, args.k, args.scaling, args.merge_function)
    elif impl == "ta":
        result = TaskArithmetic(scaling=args.ta_scaling).merge(pretrained, finetuned, MergeContext(device=on_device))
    else:
        result = fusionbench_ref.task_arithmetic(pretrained, finetuned, args.ta_scaling)
    sync()
    merge_s, merge_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    peak = peak_rss_bytes()
    gpu_peak = torch.cuda.max_memory_allocated(on_device) if on_device.type == "cuda" else None

    save_state_dict({k: v.cpu() for k, v in float_state(result).items()}, args.out)
    print(json.dumps({
        "impl": impl, "device": str(on_device), "build_s": build_s, "merge_s": merge_s, "merge_cpu_s": merge_cpu_s,
        "input_bytes": input_bytes, "base_rss": base_rss, "rss_before": rss_before, "peak": peak,
        "gpu_peak": gpu_peak, "machine": fusionbench_ref.describe_machine(device),
    }))


def _compare(path_a: str, path_b: str) -> tuple[float, int]:
    """Largest |a - b| and the number of entries that differ, over all tensors."""
    from harness.models import load_state_dict

    a, b = load_state_dict(path_a), load_state_dict(path_b)
    if set(a) != set(b):
        raise ValueError(f"merged encoders differ in keys: {sorted(set(a) ^ set(b))[:3]}")
    diffs = [(a[key].float() - b[key].float()).abs() for key in a]
    return max(float(d.max()) for d in diffs), sum(int((d != 0).sum()) for d in diffs)


def _failure(impl: str, proc: subprocess.CompletedProcess) -> str:
    """What to print for a child that failed: its exit, a likely cause when killed, its stderr's end."""
    killed = " (killed: out of memory?)" if proc.returncode == -9 else ""
    return f"{LABELS[impl]} failed (exit {proc.returncode}){killed}:\n{proc.stderr[-3000:]}"


def _run_child(impl: str, args: argparse.Namespace, out: str, input_bytes: int | None, notes: list[str],
               failures: list[str]) -> dict | None:
    """One run of ``impl`` in its own process: its measurements, or None (with a note or a
    failure) when it looks too big for the memory available or failed."""
    if input_bytes and not args.force and args.device == "cpu":
        need = PEAK_FACTOR[impl] * input_bytes + 1024**3
        if need > _available_bytes():
            notes.append(f"{LABELS[impl]} skipped: needs about {need / 1024**3:.1f} GiB, "
                         f"{_available_bytes() / 1024**3:.1f} GiB available (--force runs it)")
            return None
    cmd = [sys.executable, __file__, "--child", impl, "--out", out, "--model", args.model,
           "--tasks", str(args.tasks), "--k", str(args.k), "--scaling", str(args.scaling),
           "--merge-function", args.merge_function, "--trim-scope", args.trim_scope,
           "--ta-scaling", str(args.ta_scaling), "--seed", str(args.seed), "--device", args.device]
    print(f"running {LABELS[impl]} ...", file=sys.stderr, flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # the others still run and print: one may take minutes
        failures.append(_failure(impl, proc))
        return None
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "path": out}


def _summary(runs: list[dict]) -> dict:
    """One implementation's row: the median wall and CPU time of its runs, and the memory of its
    run with the highest peak RSS (what it needs)."""
    row = dict(max(runs, key=lambda r: r["peak"]))
    row["merge_s"] = statistics.median(r["merge_s"] for r in runs)
    row["merge_cpu_s"] = statistics.median(r["merge_cpu_s"] for r in runs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=arch_arg, default=None, help="open_clip architecture (default ViT-B-32)")
    parser.add_argument("--tasks", type=positive_int, default=None, help="number of fine-tuned encoders (default 8)")
    parser.add_argument("--small", action="store_true", help="quick run: harness-tiny-vit, 4 tasks")
    parser.add_argument("--k", type=percent, default=20.0, help="TIES: percent kept per task vector")
    parser.add_argument("--scaling", type=float, default=1.0, help="TIES: lambda")
    parser.add_argument("--merge-function", choices=["mean", "sum"], default="mean")
    parser.add_argument("--trim-scope", choices=["model", "tensor"], default="model",
                        help="TIES: trim threshold over the whole model or per tensor")
    parser.add_argument("--ta-scaling", type=float, default=0.3, help="task arithmetic: lambda")
    parser.add_argument("--only", nargs="+", choices=TIES_IMPLS + TA_IMPLS, default=None,
                        help="run only these implementations")
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda (the streaming TIES always runs on the CPU)")
    parser.add_argument("--force", action="store_true", help="run implementations even when they look too big for RAM")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="runs of each implementation, alternating with the others (medians are compared)")
    parser.add_argument("--child", choices=TIES_IMPLS + TA_IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or ("harness-tiny-vit" if args.small else "ViT-B-32")
    args.tasks = args.tasks or (4 if args.small else 8)
    if args.child:
        run_child(args)
        return

    impls = list(args.only or TIES_IMPLS + TA_IMPLS)
    notes = []
    if not fusionbench_ref.available():
        impls = [i for i in impls if not i.startswith("fusionbench")]
        notes.append(fusionbench_ref.INSTALL_HINT)
    if args.trim_scope == "tensor" and "fusionbench" in impls:
        impls.remove("fusionbench")
        notes.append("TIES FusionBench skipped: it trims over the whole model only (--trim-scope model)")
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs: list[int] = []  # the input size, once one run measured it

        def run(impl: str) -> dict | None:
            r = _run_child(impl, args, os.path.join(tmp, f"{impl}.safetensors"), (inputs or [None])[0], notes, failures)
            if r is not None:
                inputs.append(r["input_bytes"])
            return r

        results = {impl: _summary(runs) for impl, runs in alternating_rounds(impls, args.repeats, run).items()}
        if not results:
            sys.exit("nothing ran:\n" + "\n".join(notes + failures))
        for group, ours in (("ties", "streaming"), ("ta", "ta")):
            for impl in results:
                if impl != ours and ours in results and (impl in TIES_IMPLS) == (group == "ties"):
                    results[impl]["diff"] = _compare(results[ours]["path"], results[impl]["path"])

    gib = 1024**3
    first = next(iter(results.values()))
    input_bytes = first["input_bytes"]
    print(f"machine: {first['machine']}")
    print(f"model {args.model}, {args.tasks} tasks, TIES k={args.k} merge={args.merge_function} "
          f"trim={args.trim_scope} lambda={args.scaling}, "
          f"TA lambda={args.ta_scaling}, device {args.device}, 1 thread per process; "
          f"times: median of {args.repeats} runs alternating the implementations, peak RSS: the highest; "
          f"input {input_bytes / gib:.2f} GiB (pretrained + {args.tasks} fine-tuned float tensors)")
    gpu = any(r["gpu_peak"] is not None for r in results.values())
    header = (f"{'implementation':<22} {'wall s':>8} {'cpu s':>8} {'base RSS':>9} {'peak RSS':>9} {'peak/input':>10} "
              f"{'(peak-base)/input':>17} {'max |diff| vs ours':>19} {'#entries differ':>16}")
    print(header + (f" {'GPU peak':>9}" if gpu else ""))
    for impl, r in results.items():
        diff, count = r.get("diff", (None, None))
        line = (f"{LABELS[impl]:<22} {r['merge_s']:>8.2f} {r['merge_cpu_s']:>8.2f} {r['base_rss'] / gib:>7.2f}Gi "
                f"{r['peak'] / gib:>7.2f}Gi {r['peak'] / input_bytes:>10.2f} {(r['peak'] - r['base_rss']) / input_bytes:>17.2f} "
                f"{'' if diff is None else f'{diff:.3g}':>19} {'' if count is None else count:>16}")
        if gpu:
            cell = "" if r["gpu_peak"] is None else f"{r['gpu_peak'] / gib:.2f}Gi"
            line += f" {cell:>9}"
        print(line)
    for ours, others in (("streaming", ["dense", "fusionbench"]), ("ta", ["fusionbench-ta"])):
        for other in others:
            if ours in results and other in results:
                o, r = results[ours], results[other]
                print(f"time {LABELS[other]} / {LABELS[ours]}: {r['merge_s'] / o['merge_s']:.1f}x wall, "
                      f"{r['merge_cpu_s'] / o['merge_cpu_s']:.1f}x cpu; peak RSS ours / theirs {o['peak'] / r['peak']:.2f}")
    for note in notes:
        print(note)
    if failures:
        sys.exit("\n".join(failures))


if __name__ == "__main__":
    main()
