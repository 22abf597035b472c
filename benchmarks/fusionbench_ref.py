"""Adapters that run FusionBench's reference implementations on the benchmarks' inputs.

FusionBench (PyPI ``fusion-bench``, github.com/tanganke/fusion_bench) is the code most
model-merging papers compare against, so the benchmarks put its numbers next to ours on the
same tensors. It is optional (``pip install -e '.[bench]'``): :func:`available` says whether
it can be imported, and the benchmarks print :data:`INSTALL_HINT` and skip its columns when
not. Its modules are imported lazily, inside the adapters.

Also here: :func:`describe_machine`, the header line both benchmarks print.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Mapping, Sequence

import torch
from torch import nn

INSTALL_HINT = "FusionBench columns skipped: fusion-bench is not installed (pip install -e '.[bench]')"


def available() -> bool:
    """True when ``fusion_bench`` can be imported."""
    return importlib.util.find_spec("fusion_bench") is not None


def version() -> str:
    try:
        return importlib.metadata.version("fusion-bench")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe_machine(device: torch.device | str = "cpu") -> str:
    """CPU model, cores, torch version, threads and (for CUDA) the GPU: for comparable tables."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
            f"python {platform.python_version()}, fusion-bench {version()}")
    device = torch.device(device)
    if device.type == "cuda":
        text += f", device {torch.cuda.get_device_name(device)}"
    return text


def preload() -> None:
    """Import FusionBench's merging algorithms (seconds: it pulls in lightning and transformers).

    Called before a measurement so that neither the import time nor its memory is counted.
    """
    import fusion_bench.method.task_arithmetic.task_arithmetic  # noqa: F401
    import fusion_bench.method.ties_merging.ties_merging  # noqa: F401
    import fusion_bench.models.we_moe  # noqa: F401


@contextlib.contextmanager
def _quiet():
    """FusionBench prints progress to stdout; the benchmark children talk JSON there."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def ties_merging(pretrained: nn.Module, finetuned: Mapping[str, nn.Module], k: float, scaling: float,
                 merge_function: str) -> nn.Module:
    """FusionBench's ``TiesMergingAlgorithm`` end to end (``remove_keys=[]``, as its CLIP configs).

    ``k`` is the percentage kept; it is passed as the fraction ``k / 100`` because FusionBench
    reads a ``threshold`` above 1 as a percentage but one of at most 1 as a fraction (k = 1
    would keep everything, k = 0.5 half). It overwrites ``pretrained`` in place and returns
    it, as FusionBench does.
    """
    from fusion_bench.method.ties_merging.ties_merging import TiesMergingAlgorithm

    algorithm = TiesMergingAlgorithm(scaling_factor=scaling, threshold=k / 100, remove_keys=[],
                                     merge_func=merge_function)
    with _quiet():
        return algorithm.run({"_pretrained_": pretrained, **finetuned})


def task_arithmetic(pretrained: nn.Module, finetuned: Mapping[str, nn.Module], scaling: float) -> nn.Module:
    """FusionBench's ``TaskArithmeticAlgorithm`` (in place on ``pretrained``, as FusionBench does)."""
    from fusion_bench.method.task_arithmetic.task_arithmetic import TaskArithmeticAlgorithm

    algorithm = TaskArithmeticAlgorithm(scaling_factor=scaling)
    with _quiet():
        return algorithm.run({"_pretrained_": pretrained, **finetuned})


def router_params(router: nn.Module) -> list[torch.Tensor]:
    """The parameters of one of our routers (methods.wemoe.Router), in :func:`gate_params` order."""
    if router.depth == 0:
        return [router.const]
    layers = [router.net[0]] if router.depth == 1 else [router.net[0], router.net[2]]
    return [t for lin in layers for t in (lin.weight, lin.bias)]


def gate_params(gate: nn.Module) -> list[torch.Tensor]:
    """The parameters of a FusionBench gate, in :func:`router_params` order."""
    if gate.num_hidden_layers == 0:
        return [gate.weight]
    layers = [gate.fc] if gate.num_hidden_layers == 1 else [gate.fc1, gate.fc2]
    return [t for lin in layers for t in (lin.weight, lin.bias)]


def copy_router(router: nn.Module, gate: nn.Module) -> None:
    """Load the weights of one of our routers into a FusionBench gate."""
    with torch.no_grad():
        for ours, theirs in zip(router_params(router), gate_params(gate), strict=True):
            theirs.copy_(ours)


def moe_gates(model: nn.Module) -> list[nn.Module]:
    """The gates of a tower built by :func:`wemoe_tower`, in block order."""
    from fusion_bench.models.we_moe import WeightEnsemblingMoE

    return [m.gate for m in model.modules() if isinstance(m, WeightEnsemblingMoE)]


def wemoe_tower(merged: nn.Module, pretrained: nn.Module, finetuned: Sequence[nn.Module],
                routers: Sequence[nn.Module], init_lambda: float = 0.3) -> nn.Module:
    """An open_clip vision tower whose block MLPs are FusionBench ``WeightEnsemblingMoE`` layers.

    ``merged`` supplies everything outside the MLPs (task arithmetic with ``init_lambda``, as
    in WeMoE); block i's MoE is built from block i of ``pretrained`` and of every model in
    ``finetuned`` (FusionBench forms tau = finetuned - pretrained itself), and gets the weights
    of ``routers[i]``. Only the gates require grad. Switch FusionBench's batch-reduced
    variant with :func:`set_batch_reduce`.
    """
    from fusion_bench.models.we_moe import WeightEnsemblingMoE

    if any(r.routing != "raw" for r in routers):
        raise ValueError("FusionBench's WeMoE routes with the raw router output only")
    model = copy.deepcopy(merged).requires_grad_(False)
    blocks = model.transformer.resblocks
    if len(routers) != len(blocks):
        raise ValueError(f"{len(routers)} routers for {len(blocks)} blocks")
    batch_first = getattr(model.transformer, "batch_first", True)
    for i, block in enumerate(blocks):
        base = copy.deepcopy(pretrained.transformer.resblocks[i].mlp).requires_grad_(True)
        experts = [copy.deepcopy(f.transformer.resblocks[i].mlp).requires_grad_(True) for f in finetuned]
        moe = WeightEnsemblingMoE(hidden_size=base.c_fc.in_features, base_model=base, expert_models=experts,
                                  init_lambda=init_lambda, batch_first=batch_first,
                                  router_hidden_layers=routers[i].depth, batch_reduce=False)
        copy_router(routers[i], moe.gate)
        block.mlp = moe
    return model


def set_batch_reduce(model: nn.Module, batch_reduce: bool) -> nn.Module:
    """Switch every FusionBench MoE layer of ``model`` between per-sample and batch-reduced routing."""
    from fusion_bench.models.we_moe import WeightEnsemblingMoE

    for m in model.modules():
        if isinstance(m, WeightEnsemblingMoE):
            m.batch_reduce = batch_reduce
    return model
