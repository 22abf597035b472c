"""Forward and adaptation-step time of the WeMoE vision tower against dense, a loop and FusionBench.

Builds an open_clip vision tower (random weights; speed does not depend on them), T perturbed
copies as the fine-tuned experts, a task-arithmetic dense tower and WeMoE towers (depth-2
routers with random weights, so every sample gets its own routing). When FusionBench is
installed (``pip install -e '.[bench]'``) it also builds the same tower with FusionBench's
``WeightEnsemblingMoE`` in every block (same experts, our router weights copied into its
gates) and times its per-sample and batch-reduced forwards next to ours.

Table 1 (forward): absolute times, ratios to dense, FusionBench's time over ours, and the
largest relative difference of each per-sample kernel from the naive per-sample loop (which
builds each W_i and runs the MLP sample by sample; FusionBench's batch-reduced variant is
compared with ours). Table 2 (one test-time-adaptation step: forward, entropy loss of a
random zero-shot head, backward into the routers): ours against FusionBench, with the
relative differences of the loss and of the router gradients.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_wemoe.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_wemoe.py --arch ViT-B-32 --batch 16
    python benchmarks/bench_wemoe.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import fusionbench_ref  # noqa: E402
from bench_common import arch_arg, device_arg, peak_rss_bytes, positive_int  # noqa: E402
from harness.models import ImageClassifier, build_clip  # noqa: E402
from methods.base import with_state  # noqa: E402
from methods.task_arithmetic import task_arithmetic_state  # noqa: E402
from methods.tta import entropy  # noqa: E402
from methods.wemoe import WeightEnsemblingMLP, build_wemoe, moe_layers  # noqa: E402

FB_PER_SAMPLE = "fusionbench per-sample"
FB_REDUCE = "fusionbench batch_reduce"


class NaiveMLP(nn.Module):
    """The obvious implementation: for each sample, W_i = W0 + sum_t g_it tau_t, then the MLP."""

    def __init__(self, moe: WeightEnsemblingMLP):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.moe
        g = m.router(x)
        out = []
        for i in range(x.shape[0]):
            w = {k: getattr(m, k)[0] + torch.tensordot(g[i], getattr(m, k)[1:], dims=1)
                 for k in ("c_fc_weight", "c_fc_bias", "c_proj_weight", "c_proj_bias")}
            h = m.act(F.linear(x[i], w["c_fc_weight"], w["c_fc_bias"]))
            out.append(F.linear(h, w["c_proj_weight"], w["c_proj_bias"]))
        return torch.stack(out)


def perturbed(model: nn.Module, seed: int, scale: float = 0.01) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1.0))
    return out


def with_impl(model: nn.Module, impl: str, batch_reduce: bool = False, block_bytes: int | None = None) -> nn.Module:
    for m in moe_layers(model):
        m.implementation, m.batch_reduce, m.block_bytes = impl, batch_reduce, block_bytes
    return model


@contextlib.contextmanager
def naive_mode(moe: nn.Module):
    """Swap every MoE layer for the loop over the same tensors (no second copy of the experts)."""
    blocks = moe.transformer.resblocks
    layers = [b.mlp for b in blocks]
    for block, layer in zip(blocks, layers):
        block.mlp = NaiveMLP(layer)
    try:
        yield moe
    finally:
        for block, layer in zip(blocks, layers):
            block.mlp = layer


def interleaved(variants: dict[str, Callable[[], object]], calls: int,
                clock: Callable[[], float] = time.perf_counter, grad: bool = False) -> tuple[dict, dict]:
    """Min time of each variant over ``calls`` rounds, variants alternating within a round.

    Alternating and taking the minimum keeps the ratios meaningful on a machine whose other
    load comes and goes. The outputs are those of the first round. Autograd is off unless
    ``grad``.
    """
    outputs: dict[str, object] = {}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.set_grad_enabled(grad):
        for _ in range(max(1, calls)):
            for name, fn in variants.items():
                t0 = clock()
                out = fn()
                times[name].append(clock() - t0)
                outputs.setdefault(name, out)
                del out
    return {k: min(v) for k, v in times.items()}, outputs


def bound_heap() -> bool:
    """Have glibc serve allocations of 1 MiB and more with mmap and give them back on free.

    FusionBench's per-sample adaptation step allocates and frees many matrix-sized tensors
    while autograd keeps one merged matrix per sample and layer alive; with glibc's default
    (dynamic) mmap threshold the freed memory stays in a fragmented heap and RSS grew by
    several GB per step (a ViT-B/32 step at batch 16 ran this 23 GB machine out of memory).
    Applied before the adaptation-step table only, for every variant alike. False where
    glibc is not there.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 20) == 1
    libc.malloc_trim(0)
    return ok


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


class Towers:
    """Dense, WeMoE and (optionally) FusionBench towers over the same pretrained and experts."""

    def __init__(self, arch: str, tasks: int, device: torch.device, fusionbench: bool):
        torch.manual_seed(0)
        pre = build_clip(arch).visual.eval()
        finetuned = {f"t{i}": perturbed(pre, i) for i in range(tasks)}
        self.dense = with_state(pre, task_arithmetic_state(pre, finetuned, 0.3)).eval().requires_grad_(False)
        self.moe = build_wemoe(pre, finetuned, router_depth=2)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in self.moe.named_parameters():
                if ".router." in name:
                    p.normal_(0.0, 0.05, generator=g)
        self.fb = None
        if fusionbench:
            routers = [m.router for m in moe_layers(self.moe)]
            self.fb = fusionbench_ref.wemoe_tower(self.dense, pre, list(finetuned.values()), routers).eval()
            self.fb.to(device)
        del finetuned
        self.dense.to(device)
        self.moe.to(device)
        self.size = pre.image_size if isinstance(pre.image_size, int) else pre.image_size[0]
        self.dim = pre.output_dim
        self.device = device

    def images(self, batch: int) -> torch.Tensor:
        x = torch.randn(batch, 3, self.size, self.size, generator=torch.Generator().manual_seed(batch))
        return x.to(self.device)


def forward_rows(t: Towers, arch: str, batches: list[int], repeats: int, skip: set[str],
                 clock: Callable[[], float], sync: Callable[[], None]) -> list[dict]:
    moe, fb = t.moe, t.fb

    def run_moe(x: torch.Tensor, impl: str, batch_reduce: bool = False, block_bytes: int | None = None):
        with_impl(moe, impl, batch_reduce, block_bytes)
        return moe(x)

    def run_naive(x: torch.Tensor) -> torch.Tensor:
        with naive_mode(moe):
            return moe(x)

    def run_fb(x: torch.Tensor, batch_reduce: bool) -> torch.Tensor:
        fusionbench_ref.set_batch_reduce(fb, batch_reduce)
        return fb(x)

    def synced(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            out = fn()
            sync()
            return out
        return call

    rows = []
    for batch in batches:
        x = t.images(batch)
        variants = {"dense (TA)": lambda: t.dense(x)}
        if "naive" not in skip:
            variants["naive loop"] = lambda: run_naive(x)
        variants["wemoe (auto)"] = lambda: run_moe(x, "auto")  # what a WeMoE model runs by default
        if "blocks" not in skip:
            variants["wemoe weights 8MB-blk"] = lambda: run_moe(x, "weights", block_bytes=8 << 20)
        if "stacked" not in skip:
            variants["wemoe stacked"] = lambda: run_moe(x, "stacked")
        if "reduce" not in skip:
            variants["wemoe batch_reduce"] = lambda: run_moe(x, "auto", True)
        if fb is not None:
            variants[FB_PER_SAMPLE] = lambda: run_fb(x, False)
            if "reduce" not in skip:
                variants[FB_REDUCE] = lambda: run_fb(x, True)
        times, outputs = interleaved({k: synced(v) for k, v in variants.items()}, repeats, clock)
        with_impl(moe, "auto")
        per_sample_ref = "naive loop" if "naive loop" in outputs else "wemoe (auto)"
        for name, s in times.items():
            ref = None
            if name == FB_REDUCE:
                ref = "wemoe batch_reduce" if "wemoe batch_reduce" in outputs else None
            elif name not in ("dense (TA)", "wemoe batch_reduce", per_sample_ref):
                ref = per_sample_ref
            ours = {FB_PER_SAMPLE: "wemoe (auto)", FB_REDUCE: "wemoe batch_reduce"}.get(name)
            rows.append(dict(
                arch=arch, batch=batch, impl=name, s=s, ratio=s / times["dense (TA)"],
                vs_ours=times[name] / times[ours] if ours in times else None,
                err=_rel(outputs[name], outputs[ref]) if ref else None, ref=ref or "",
            ))
    return rows


def tta_rows(t: Towers, arch: str, batch: int, repeats: int, clock: Callable[[], float],
             sync: Callable[[], None]) -> list[dict]:
    """One adaptation step per variant: forward, entropy of a zero-shot head, backward into the routers."""
    head = 100.0 * F.normalize(torch.randn(10, t.dim, generator=torch.Generator().manual_seed(2)), dim=-1)
    ours = ImageClassifier(t.moe, head).to(t.device)
    our_params = [p for m in moe_layers(t.moe) for p in fusionbench_ref.router_params(m.router)]
    x = t.images(batch)

    def step(model: nn.Module, params: list[torch.Tensor]) -> Callable[[], tuple]:
        def call() -> tuple:
            for p in params:
                p.grad = None
            loss = entropy(model(x))
            loss.backward()
            sync()
            return loss.detach(), [p.grad for p in params]
        return call

    def ours_step(batch_reduce: bool) -> Callable[[], tuple]:
        inner = step(ours, our_params)

        def call() -> tuple:
            with_impl(t.moe, "auto", batch_reduce)
            return inner()
        return call

    variants = {"wemoe (auto)": ours_step(False), "wemoe batch_reduce": ours_step(True)}
    if t.fb is not None:
        theirs = ImageClassifier(t.fb, head).to(t.device)
        fb_params = [p for gate in fusionbench_ref.moe_gates(t.fb) for p in fusionbench_ref.gate_params(gate)]
        fb_step = step(theirs, fb_params)

        def fb(batch_reduce: bool) -> Callable[[], tuple]:
            def call() -> tuple:
                fusionbench_ref.set_batch_reduce(t.fb, batch_reduce)
                return fb_step()
            return call

        variants[FB_PER_SAMPLE] = fb(False)
        variants[FB_REDUCE] = fb(True)
    times, outputs = interleaved(variants, repeats, clock, grad=True)
    with_impl(t.moe, "auto", False)
    counterpart = {FB_PER_SAMPLE: "wemoe (auto)", FB_REDUCE: "wemoe batch_reduce"}
    rows = []
    for name, s in times.items():
        ours_name = counterpart.get(name)
        row = dict(arch=arch, batch=batch, impl=name, s=s, vs_ours=None, loss_err=None, grad_err=None, ref="")
        if ours_name:
            loss, grads = outputs[name]
            our_loss, our_grads = outputs[ours_name]
            flat = torch.cat([g.reshape(-1) for g in grads])
            our_flat = torch.cat([g.reshape(-1) for g in our_grads])
            row.update(vs_ours=s / times[ours_name], loss_err=_rel(our_loss, loss), grad_err=_rel(our_flat, flat),
                       ref=ours_name)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", type=arch_arg, default=["harness-tiny-vit", "ViT-B-32"])
    parser.add_argument("--batch", nargs="+", type=positive_int, default=[1, 16, 64])
    parser.add_argument("--tasks", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=2, help="timed calls per forward variant (min is kept)")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                        help="cpu: this thread's CPU time (robust to other load; 1 thread, CPU only), "
                             "wall: elapsed time (default on CUDA or with several threads)")
    parser.add_argument("--skip", nargs="*", default=["blocks", "stacked"],
                        choices=["naive", "blocks", "stacked", "reduce", "fusionbench", "tta"],
                        help="variants left out (default: blocks stacked; a bare --skip runs everything)")
    parser.add_argument("--tta-batch", type=positive_int, default=16, help="batch of the adaptation-step table")
    parser.add_argument("--tta-repeats", type=positive_int, default=1, help="timed adaptation steps per variant (min is kept)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    clock_name = args.clock or ("cpu" if device.type == "cpu" and args.threads == 1 else "wall")
    if clock_name == "cpu" and (args.threads != 1 or device.type != "cpu"):
        parser.error("--clock cpu measures one CPU thread; use --clock wall with several threads or CUDA")
    clock = time.thread_time if clock_name == "cpu" else time.perf_counter

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    wall0, cpu0 = time.perf_counter(), time.process_time()
    skip = set(args.skip)
    use_fb = "fusionbench" not in skip and fusionbench_ref.available()
    print(f"machine: {fusionbench_ref.describe_machine(device)}")
    print(f"device {device}, {args.threads} thread(s), {args.tasks} experts, depth-2 routers, {clock_name} time, "
          f"min of {args.repeats} interleaved calls (adaptation step: {args.tta_repeats}); skipped: {sorted(skip) or 'none'}")
    if "fusionbench" not in skip and not use_fb:
        print(fusionbench_ref.INSTALL_HINT)
    summary: list[str] = []
    towers: dict[str, Towers] = {}
    print(f"{'arch':<18}{'batch':>6}  {'forward':<26}{'seconds':>10}{'x dense':>9}{'FB/ours':>9}"
          f"{'rel. diff':>11}  vs")
    for arch in args.arch:
        t = Towers(arch, args.tasks, device, use_fb)
        rows = forward_rows(t, arch, args.batch, args.repeats, skip, clock, sync)
        for r in rows:
            err = "" if r["err"] is None else f"{r['err']:.1e}"
            vs = "" if r["vs_ours"] is None else f"{r['vs_ours']:.2f}"
            print(f"{r['arch']:<18}{r['batch']:>6}  {r['impl']:<26}{r['s']:>10.4f}{r['ratio']:>9.2f}{vs:>9}"
                  f"{err:>11}  {r['ref']}", flush=True)
        by = {(r["batch"], r["impl"]): r for r in rows}
        if (16, "wemoe (auto)") in by:
            ratio = by[16, "wemoe (auto)"]["ratio"]
            summary.append(f"{arch}: forward, ours / dense at batch 16 = {ratio:.2f}x "
                           f"(goal <= 2x: {'met' if ratio <= 2 else 'NOT met'})")
        for b in args.batch:
            if (b, FB_PER_SAMPLE) in by:
                v = by[b, FB_PER_SAMPLE]["vs_ours"]
                summary.append(f"{arch}: forward, FusionBench per-sample / ours at batch {b} = {v:.2f}x "
                               f"(goal >= 3x: {'met' if v >= 3 else 'NOT met'})")
        if "tta" not in skip:
            towers[arch] = t  # the adaptation steps run after every forward table (see bound_heap)
        del t
    if towers:
        bounded = device.type == "cpu" and bound_heap()
        print()
        if bounded:
            print("adaptation steps with glibc M_MMAP_THRESHOLD = 1 MiB (fixed), for every variant")
        print(f"{'arch':<18}{'batch':>6}  {'adaptation step (fwd+bwd)':<26}{'seconds':>10}{'FB/ours':>9}"
              f"{'loss diff':>11}{'grad diff':>11}  vs")
        for arch in list(towers):
            for r in tta_rows(towers.pop(arch), arch, args.tta_batch, args.tta_repeats, clock, sync):
                vs = "" if r["vs_ours"] is None else f"{r['vs_ours']:.2f}"
                le = "" if r["loss_err"] is None else f"{r['loss_err']:.1e}"
                ge = "" if r["grad_err"] is None else f"{r['grad_err']:.1e}"
                print(f"{r['arch']:<18}{r['batch']:>6}  {r['impl']:<26}{r['s']:>10.4f}{vs:>9}{le:>11}{ge:>11}  "
                      f"{r['ref']}", flush=True)
                if r["impl"] == FB_PER_SAMPLE:
                    summary.append(f"{r['arch']}: adaptation step, FusionBench per-sample / ours at batch {r['batch']} "
                                   f"= {r['vs_ours']:.2f}x (goal >= 3x: {'met' if r['vs_ours'] >= 3 else 'NOT met'})")
    print()
    for line in summary:
        print(line)
    print(f"total {time.perf_counter() - wall0:.0f} s wall, {time.process_time() - cpu0:.0f} s cpu, "
          f"peak RSS {peak_rss_bytes() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
