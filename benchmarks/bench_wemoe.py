"""Forward time of the WeMoE vision tower against the dense merged tower and a per-sample loop.

Builds an open_clip vision tower (random weights; speed does not depend on them), T perturbed
copies as the fine-tuned experts, a task-arithmetic dense tower and WeMoE towers (depth-2
routers with random weights, so every sample gets its own routing). Prints absolute times,
ratios to dense, and the largest relative difference of each WeMoE kernel from the naive
per-sample loop (which builds each W_i and runs the MLP sample by sample).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_wemoe.py --arch ViT-B-32 --batch 16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.models import build_clip
from methods.base import with_state
from methods.task_arithmetic import task_arithmetic_state
from methods.wemoe import WeightEnsemblingMLP, build_wemoe, moe_layers


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


@torch.no_grad()
def interleaved(variants: dict[str, Callable[[], torch.Tensor]], repeats: int,
                clock: Callable[[], float] = time.perf_counter) -> tuple[dict, dict]:
    """Min time of each variant over ``repeats`` rounds, variants alternating within a round.

    Alternating and taking the minimum keeps the ratios meaningful on a machine whose other
    load comes and goes.
    """
    outputs = {name: fn() for name, fn in variants.items()}  # warm-up and outputs
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {k: min(v) for k, v in times.items()}, outputs


def bench(arch: str, batches: list[int], tasks: int, repeats: int, skip: set[str],
          clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    torch.manual_seed(0)
    pre = build_clip(arch).visual.eval()
    finetuned = {f"t{i}": perturbed(pre, i) for i in range(tasks)}
    dense = with_state(pre, task_arithmetic_state(pre, finetuned, 0.3)).eval()
    moe = build_wemoe(pre, finetuned, router_depth=2)
    del finetuned
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if ".router." in name:
                p.normal_(0.0, 0.05, generator=g)
    size = pre.image_size if isinstance(pre.image_size, int) else pre.image_size[0]

    def run_moe(x: torch.Tensor, impl: str, batch_reduce: bool = False, block_bytes: int | None = None) -> torch.Tensor:
        with_impl(moe, impl, batch_reduce, block_bytes)
        return moe(x)

    def run_naive(x: torch.Tensor) -> torch.Tensor:
        with naive_mode(moe):
            return moe(x)

    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        variants = {"dense (TA)": lambda: dense(x)}
        if "naive" not in skip:
            variants["naive loop"] = lambda: run_naive(x)
        if "weights" not in skip:
            variants["wemoe weights"] = lambda: run_moe(x, "weights")
            variants["wemoe weights 8MB-blk"] = lambda: run_moe(x, "weights", block_bytes=8 << 20)
        if "stacked" not in skip:
            variants["wemoe stacked"] = lambda: run_moe(x, "stacked")
        if "reduce" not in skip:
            variants["wemoe batch_reduce"] = lambda: run_moe(x, "auto", True)
        times, outputs = interleaved(variants, repeats, clock)
        with_impl(moe, "auto")
        ref = outputs.get("naive loop")
        for name, t in times.items():
            err = None
            if ref is not None and "reduce" not in name and name != "dense (TA)":
                err = float((outputs[name] - ref).abs().max() / ref.abs().max())
            rows.append(dict(arch=arch, batch=batch, impl=name, s=t, ratio=t / times["dense (TA)"], err=err))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["harness-tiny-vit", "ViT-B-32"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: this thread's CPU time (robust to other load; 1 thread only), wall: elapsed time")
    parser.add_argument("--skip", nargs="*", default=[], choices=["naive", "weights", "stacked", "reduce"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread; use --clock wall with several threads")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.tasks} experts, "
          f"{args.clock} time, min of {args.repeats} interleaved rounds")
    print(f"{'arch':<18}{'batch':>6}  {'implementation':<20}{'seconds':>10}{'x dense':>9}{'rel. diff vs loop':>19}")
    for arch in args.arch:
        for r in bench(arch, args.batch, args.tasks, args.repeats, set(args.skip), clock):
            err = "" if r["err"] is None else f"{r['err']:.1e}"
            print(f"{r['arch']:<18}{r['batch']:>6}  {r['impl']:<20}{r['s']:>10.4f}{r['ratio']:>9.2f}{err:>19}",
                  flush=True)


if __name__ == "__main__":
    main()
