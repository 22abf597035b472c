"""WeMoE: Weight-Ensembling Mixture of Experts (Tang et al., ICML 2024, arXiv 2402.00433).

Every Transformer block's MLP of the vision tower becomes a :class:`WeightEnsemblingMLP`
holding the pretrained MLP weights W0 and the frozen task vectors tau_t of all its weights
and biases; everything else is merged by task arithmetic with ``init_lambda``. A router
reads the MLP's input tokens, gives T routing weights per token, averaged over each
sample's tokens; sample i then runs the MLP with W_i = W0 + sum_t g_it tau_t. Only the
routers train, by entropy minimisation on unlabeled test batches (:mod:`methods.tta`).

Routing (``routing``): "raw" (the paper: g is the router output, unbounded), "clamp"
(g clipped to [0, 1]) or "softmax" (g = s * softmax(logits) with a learned per-layer scale s
initialised to init_lambda * T, last router bias 0). The transform applies to the
token-averaged router output. Raw routing is the paper-faithful default; on small models
entropy keeps falling while raw weights grow past useful values, which the bounded variants
prevent.

Objective (``task_id_weight``): 0 is the paper's, the summed entropy of every task's head on
that task's unlabeled batch. A positive weight adds the cross-entropy between each layer's
routing logits and the expert of the task the batch came from (softmax routing only). The
adaptation loop already knows each batch's task (it picks the head); inference does not, so
the routers must still recognise the task from the input. On the embedded suite entropy alone
routes many samples to wrong experts and stays below task arithmetic; with this term the
routers identify the task and WeMoE reaches the perfect-routing bound (see the README).

Which implementation runs (all give the same outputs up to float rounding; B samples, N
tokens each, T experts, an MLP matrix of H x D):

* ``batch_reduce``: routing averaged over the batch, one merged W per batch and a plain
  ``F.linear`` - the cheapest, and a different (less faithful) model.
* "weights" (:class:`PerSampleLinear`): every sample's W_i built by one GEMM
  ``[B, 1+T] @ [1+T, H*D]`` into a reused workspace, then one batched matmul (``baddbmm``)
  of each sample's tokens with its W_i. Multiply-adds: B*T*H*D to build + B*N*H*D to apply,
  against B*N*H*D dense, an overhead of T/N (8/50 for ViT-B/32). Backward rebuilds W_i
  instead of keeping B*H*D floats per matrix, so training memory stays at the activations;
  reusing the workspace also avoids the page faults of fresh large CPU allocations, which
  cost as much as the matmuls. Rows are built in blocks of at most ``block_bytes``
  (default 256 MiB) to bound the workspace; on a CPU with fewer than 32 tokens per sample,
  4 MiB, so each block is used from cache: each W_i entry then serves fewer than 32
  multiply-adds, which costs less than writing it to memory and reading it back.
* "stacked": one matmul of the tokens with [W0; tau_1..tau_T] stacked (B*N*(T+1)*H*D),
  combined with g before the GELU for c_fc and after it for c_proj: (T+1)x the dense cost.
* "auto" (default) takes whichever needs fewer multiply-adds: "weights", unless samples
  have a single token ("stacked") or the batch is one sample (its merged W, as ``batch_reduce``).

Measured with ``benchmarks/bench_wemoe.py`` (CPU time, 1 thread, 8 experts, depth-2
routers), "auto" against the dense merged tower: ViT-B/32 1.99x at batch 1, 1.74x at 16,
2.0-2.6x at 64 (run to run; "stacked" 6.1x and a per-sample loop 2.9x at 16); the tiny 32x32
ViT (17 tokens) 1.96-2.14x at batch 16 and 2.2x at 64 with cache-sized blocks (one 256 MiB
block: 2.1x and 5.5x, as writing B*H*D weights to memory dominates).

A per-sample Python loop (the obvious implementation) is kept only as the test oracle.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence, get_args

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from methods.base import MergeContext, MergeMethod, register_method, with_state
from methods.task_arithmetic import task_arithmetic_state
from methods.tta import BatchStream, run_tta

Routing = Literal["raw", "clamp", "softmax"]
Implementation = Literal["auto", "weights", "stacked"]
FORMAT = "wemoe-routers/1"
#: Where :meth:`WeMoE.merge` saves the adapted routers, in the job's workdir.
MODEL_FILE = "wemoe.safetensors"
#: Per-sample weights are built in blocks of at most this many bytes (bounds the workspace).
DEFAULT_BLOCK_BYTES = 256 << 20
#: The block size on a CPU when samples have few tokens (see "weights" above): cache-sized.
CACHE_BLOCK_BYTES = 4 << 20
FEW_TOKENS = 32


class Router(nn.Module):
    """Per-sample routing weights [B, T] from an MLP input [B, N, D].

    Depth 0: a learned constant vector; 1: Linear(D, T); 2: Linear(D, D), ReLU, Linear(D, T).
    Token outputs are averaged per sample, then the routing transform applies.
    """

    def __init__(self, dim: int, num_experts: int, depth: int, init_lambda: float,
                 routing: Routing = "raw", generator: torch.Generator | None = None):
        super().__init__()
        if depth not in (0, 1, 2):
            raise ValueError(f"router depth must be 0, 1 or 2, got {depth}")
        self.depth, self.routing, self.num_experts = depth, routing, num_experts
        last_bias = 0.0 if routing == "softmax" else init_lambda
        if depth == 0:
            self.const = nn.Parameter(torch.full((num_experts,), float(last_bias)))
        else:
            dims = [dim] * depth + [num_experts]
            layers: list[nn.Module] = []
            for i in range(depth):
                lin = nn.Linear(dims[i], dims[i + 1])
                nn.init.normal_(lin.weight, 0.0, 0.01, generator=generator)
                nn.init.constant_(lin.bias, last_bias if i == depth - 1 else 0.0)
                layers += [lin, nn.ReLU()] if i < depth - 1 else [lin]
            self.net = nn.Sequential(*layers)
        if routing == "softmax":
            self.scale = nn.Parameter(torch.tensor(float(init_lambda * num_experts)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Token-averaged router output [B, T] before the routing transform."""
        if self.depth == 0:
            return self.const.expand(x.shape[0], -1)
        if self.depth == 1:  # linear: the mean of token outputs is the output of the mean token
            return self.net(x.mean(1))
        return self.net(x).mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(self.logits(x))

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        if self.routing == "raw":
            return logits
        if self.routing == "clamp":
            return logits.clamp(0.0, 1.0)
        return self.scale * torch.softmax(logits, dim=-1)


class Workspace:
    """Scratch memory reused by every MoE layer of a model (layers run one at a time).

    Reusing it instead of allocating B x out x in floats per matrix per call avoids the
    page faults of fresh large CPU allocations and keeps training memory at the activations.
    Not safe for concurrent forwards of the same model from several threads.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, slot: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        key = (slot, like.device, like.dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, device=like.device, dtype=like.dtype)
        return buf[:numel].view(shape)

    def __deepcopy__(self, memo: dict) -> "Workspace":
        return Workspace()


class PerSampleLinear(torch.autograd.Function):
    """y_i = x_i W_i^T + b_i with W_i = sum_e coef_ie W_e, for every sample i, without a sample loop.

    ``x`` [B, N, in], ``coef`` [B, E], ``weight`` [E, out, in], ``bias`` [E, out]. Rows of
    W_i are built ``rows`` at a time into the workspace (one GEMM ``coef @ weight_block``) and
    applied with one batched matmul. Nothing of size B x out x in is kept for backward: the
    blocks are rebuilt there. Gradients flow to ``x`` and ``coef`` (the experts are frozen).
    """

    @staticmethod
    def forward(ctx, x, coef, weight, bias, rows, workspace):  # noqa: D102 (autograd API)
        ctx.save_for_backward(x, coef)
        ctx.weight, ctx.bias, ctx.rows, ctx.workspace = weight, bias, rows, workspace
        out = weight.shape[1]
        biases = coef @ bias
        ys = []
        for r0 in range(0, out, rows):
            r1 = min(out, r0 + rows)
            w = _build(coef, weight, r0, r1, workspace, 0)
            ys.append(torch.baddbmm(biases[:, None, r0:r1], x, w.transpose(1, 2)))
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):  # noqa: D102
        x, coef = ctx.saved_tensors
        weight, bias, rows, workspace = ctx.weight, ctx.bias, ctx.rows, ctx.workspace
        n, e = coef.shape
        out, inp = weight.shape[1:]
        dy = dy.contiguous()
        dx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        dcoef = dy.sum(1) @ bias.t() if ctx.needs_input_grad[1] else None
        for r0 in range(0, out, rows):
            r1 = min(out, r0 + rows)
            dyb = dy[..., r0:r1]
            if dx is not None:
                dx.baddbmm_(dyb, _build(coef, weight, r0, r1, workspace, 0))
            if dcoef is not None:
                grad_w = workspace.get(1, (n, r1 - r0, inp), x)
                torch.bmm(dyb.transpose(1, 2), x, out=grad_w)
                dcoef.addmm_(grad_w.view(n, -1), weight[:, r0:r1].reshape(e, -1).t())
        return dx, dcoef, None, None, None, None


def _build(coef: torch.Tensor, weight: torch.Tensor, r0: int, r1: int, workspace: Workspace, slot: int) -> torch.Tensor:
    """Rows r0:r1 of every sample's W_i, [B, r1 - r0, in], in the workspace."""
    n, e = coef.shape
    w = workspace.get(slot, (n, r1 - r0, weight.shape[2]), coef)
    torch.mm(coef, weight[:, r0:r1].reshape(e, -1), out=w.view(n, -1))
    return w


class WeightEnsemblingMLP(nn.Module):
    """Drop-in replacement of an open_clip MLP (c_fc, gelu, c_proj) with per-sample weights.

    Expert tensors are stacked along dim 0: row 0 is the pretrained W0, rows 1..T the task
    vectors. They are non-persistent buffers (frozen, moved with ``.to``, rebuilt from the
    checkpoints rather than saved).
    """

    def __init__(self, base: nn.Module, experts: Sequence[nn.Module], router: Router, *,
                 batch_reduce: bool = False, batch_first: bool = True,
                 implementation: Implementation = "auto", block_bytes: int | None = None,
                 workspace: "Workspace | None" = None):
        super().__init__()
        extra = [name for name, m in base.named_children()
                 if name not in ("c_fc", "gelu", "c_proj") and not isinstance(m, nn.Identity)]
        if extra:  # this module computes c_proj(gelu(c_fc(x))) only; anything else would be dropped
            raise ValueError(f"WeMoE upscales MLPs made of c_fc, gelu, c_proj; this one also has {extra}")
        self.block_bytes = block_bytes
        self.workspace = workspace if workspace is not None else Workspace()
        self.router = router
        self.act = copy.deepcopy(base.gelu)
        self.batch_reduce, self.batch_first, self.implementation = batch_reduce, batch_first, implementation
        for key in ("c_fc", "c_proj"):
            for kind in ("weight", "bias"):
                w0 = getattr(getattr(base, key), kind).detach().float()
                taus = [getattr(getattr(e, key), kind).detach().float() - w0 for e in experts]
                self.register_buffer(f"{key}_{kind}", torch.stack([w0, *taus]).contiguous(), persistent=False)
        self.recording = False
        self.last_routing: torch.Tensor | None = None
        self.keep_logits = False
        self.last_logits: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.c_fc_weight.shape[0] - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP in float32 whatever the input's dtype, autocast included (output in the input's
        dtype): autocast would otherwise run some of its matmuls in half precision against float32
        workspaces and fail, and routing weights and task vectors need the precision.

        This is what ``eval.precision`` asks of merging, so bf16/fp16 evaluation and adaptation
        keep it: the rest of the tower (attention, embeddings) runs under the caller's autocast,
        and its reduced-precision activations enter here, are cast to float32, routed and mixed
        with the float32 task vectors, and leave in the activations' dtype for the next block.
        The routers, the only trained parameters, thus train in float32 end to end, and their
        logits (read by the task-identification loss) are float32."""
        with torch.autocast(x.device.type, enabled=False):
            if not self.batch_first:
                return self._forward(x.transpose(0, 1)).transpose(0, 1)
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        logits = self.router.logits(x)
        if self.keep_logits:  # read (with grad) by the task-identification loss
            self.last_logits = logits
        g = self.router.transform(logits)
        if self.batch_reduce:
            g = g.mean(0, keepdim=True)
        if self.recording:
            self.last_routing = g.detach().expand(x.shape[0], -1)
        impl = self.implementation
        if self.batch_reduce or (impl == "auto" and x.shape[0] == 1):  # one sample: W_1 is the batch's W
            h = self.act(F.linear(x, *self._merged("c_fc", g)))
            return F.linear(h, *self._merged("c_proj", g)).to(dtype)
        if impl == "auto":
            impl = "stacked" if x.shape[1] == 1 else "weights"
        if impl == "stacked":
            h = self.act(self._stacked("c_fc", x, g))
            return self._stacked("c_proj", h, g).to(dtype)
        h = self.act(self._per_sample("c_fc", x, g))
        return self._per_sample("c_proj", h, g).to(dtype)

    def _merged(self, key: str, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """W0 + sum_t g_t tau_t for one routing vector g [1, T]."""
        w, b = getattr(self, f"{key}_weight"), getattr(self, f"{key}_bias")
        t = g.shape[1]
        weight = torch.addmm(w[0].reshape(1, -1), g, w[1:].reshape(t, -1)).view(w.shape[1:])
        bias = torch.addmm(b[0].reshape(1, -1), g, b[1:]).view(b.shape[1:])
        return weight, bias

    def _per_sample(self, key: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        w, b = getattr(self, f"{key}_weight"), getattr(self, f"{key}_bias")
        coef = torch.cat([torch.ones_like(g[:, :1]), g], dim=1)
        budget = self.block_bytes
        if budget is None:
            few = x.device.type == "cpu" and x.shape[1] < FEW_TOKENS
            budget = CACHE_BLOCK_BYTES if few else DEFAULT_BLOCK_BYTES
        n, out, inp = g.shape[0], w.shape[1], w.shape[2]
        rows = out if budget <= 0 else max(1, min(out, budget // (n * inp * w.element_size())))
        return PerSampleLinear.apply(x, coef, w, b, rows, self.workspace)

    def _stacked(self, key: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        w, b = getattr(self, f"{key}_weight"), getattr(self, f"{key}_bias")
        e, out, inp = w.shape
        y = F.linear(x, w.reshape(e * out, inp), b.reshape(e * out)).unflatten(-1, (e, out))
        return y[..., 0, :] + torch.einsum("bnto,bt->bno", y[..., 1:, :], g)


def moe_layers(model: nn.Module) -> list[WeightEnsemblingMLP]:
    """The upscaled MLPs of a WeMoE encoder, in block order."""
    return [m for m in model.modules() if isinstance(m, WeightEnsemblingMLP)]


def _blocks(encoder: nn.Module) -> Sequence[nn.Module]:
    try:
        return encoder.transformer.resblocks
    except AttributeError:
        raise TypeError("WeMoE expects an open_clip VisionTransformer (visual.transformer.resblocks)") from None


def module_digest(module: nn.Module) -> str:
    """First 16 hex digits of the sha256 of a module's state (names, dtypes, shapes, bytes).

    A saved WeMoE file holds only routers: the experts come from the checkpoints given when it
    is loaded, so it records their digests and loading checks them (wherever the files now lie).
    Memoised on the module while its tensors stay as they were (:func:`_state_stamp`): a job
    builds WeMoE from the same models once more per corruption, and hashing nine ViT-B/32
    encoders takes seconds, their stamp a twentieth of that.
    """
    stamp = _state_stamp(module)
    memo = module.__dict__.get("_wemoe_digest")
    if memo is not None and memo[0] == stamp:
        return memo[1]
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy())
    digest = h.hexdigest()[:16]
    module.__dict__["_wemoe_digest"] = (stamp, digest)
    return digest


def _state_stamp(module: nn.Module) -> tuple:
    """Each tensor's name and :func:`harness.models.tensor_stamp` (as the job's input guard checks them)."""
    from harness.models import tensor_stamp

    return tuple((name, tensor_stamp(t)) for name, t in module.state_dict(keep_vars=True).items())


def build_wemoe(
    pretrained: nn.Module,
    finetuned: Mapping[str, nn.Module],
    *,
    init_lambda: float = 0.3,
    router_depth: int = 2,
    routing: Routing = "raw",
    batch_reduce: bool = False,
    implementation: Implementation = "auto",
    seed: int = 0,
) -> nn.Module:
    """The WeMoE encoder before adaptation; only router parameters require grad.

    Experts are ordered as ``finetuned`` is; the result carries ``wemoe_config`` and, in
    ``wemoe_inputs``, the digests of the models it was built from.
    """
    if not finetuned:
        raise ValueError("WeMoE needs at least one fine-tuned model")
    tasks = list(finetuned)
    model = with_state(pretrained, task_arithmetic_state(pretrained, finetuned, init_lambda))
    model.requires_grad_(False)
    batch_first = getattr(model.transformer, "batch_first", True)
    generator = torch.Generator().manual_seed(seed)
    workspace = Workspace()
    base_blocks = _blocks(pretrained)
    expert_blocks = [_blocks(finetuned[t]) for t in tasks]
    for i, block in enumerate(_blocks(model)):
        dim = block.mlp.c_fc.in_features
        router = Router(dim, len(tasks), router_depth, init_lambda, routing, generator)
        block.mlp = WeightEnsemblingMLP(base_blocks[i].mlp, [b[i].mlp for b in expert_blocks], router,
                                        batch_reduce=batch_reduce, batch_first=batch_first,
                                        implementation=implementation, workspace=workspace)
    model.wemoe_config = {
        "tasks": tasks, "init_lambda": init_lambda, "router_depth": router_depth,
        "routing": routing, "batch_reduce": batch_reduce, "implementation": implementation,
    }
    model.wemoe_inputs = {"pretrained": module_digest(pretrained),
                          "experts": {t: module_digest(finetuned[t]) for t in tasks}}
    return model.eval()


@contextlib.contextmanager
def _flagged(layers: list[WeightEnsemblingMLP], flag: str, slot: str) -> Iterator[list[WeightEnsemblingMLP]]:
    """Set ``flag`` on every layer while active; afterwards clear it and drop what ``slot`` kept."""
    for m in layers:
        setattr(m, flag, True)
    try:
        yield layers
    finally:
        for m in layers:
            setattr(m, flag, False)
            setattr(m, slot, None)


def recording(model: nn.Module) -> contextlib.AbstractContextManager[list[WeightEnsemblingMLP]]:
    """While active, every MoE layer keeps its last per-sample routing in ``last_routing``."""
    return _flagged(moe_layers(model), "recording", "last_routing")


def keeping_logits(model: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager[list[WeightEnsemblingMLP]]:
    """While active, every MoE layer keeps its last router logits, with grad, in ``last_logits``."""
    return _flagged(moe_layers(model) if enabled else [], "keep_logits", "last_logits")


def task_identification_loss(model: nn.Module, weight: float):
    """``aux_loss`` for :func:`methods.tta.run_tta`: ``weight`` x the mean over layers of the
    cross-entropy between each sample's routing logits and the expert of the task its unlabeled
    batch came from.

    Why: adaptation already groups unlabeled test batches by task (each task's batch is scored
    by that task's head), so the batch's task is known while adapting, though not at inference.
    On small models entropy alone sends samples to wrong experts; this term teaches the routers
    to recognise the task from the input, which is what perfect routing assumes.
    """
    layers = moe_layers(model)
    experts = list(model.wemoe_config["tasks"])

    def loss(task: str) -> torch.Tensor:
        if task not in experts:
            raise ValueError(f"task-identification loss: task {task!r} has no expert (experts: {experts})")
        target = experts.index(task)
        terms = []
        for m in layers:
            logits = m.last_logits
            if logits is None:
                raise RuntimeError("task-identification loss: no router logits recorded (use keeping_logits)")
            terms.append(F.cross_entropy(logits, torch.full((logits.shape[0],), target, device=logits.device)))
        return weight * torch.stack(terms).mean()

    return loss


@torch.no_grad()
def routing_statistics(model: nn.Module, ctx: MergeContext, batches: int) -> tuple[dict, dict]:
    """Mean routing weight per (data task, layer, expert) and per-layer task identification.

    Task identification: the fraction of a task's samples whose largest routing weight at a
    layer goes to that task's own expert (only for data tasks that are also experts).
    """
    experts = list(model.wemoe_config["tasks"])
    means: dict[str, list[list[float]]] = {}
    task_id: dict[str, list[float]] = {}
    with recording(model) as layers:
        for task, factory in ctx.unlabeled.items():
            stream = BatchStream(factory, task)
            sums = torch.zeros(len(layers), len(experts), dtype=torch.float64)
            hits = torch.zeros(len(layers), dtype=torch.float64)
            count = 0
            for _ in range(batches):
                with ctx.autocast():
                    model(next(stream).to(ctx.device))
                g = torch.stack([m.last_routing for m in layers]).double().cpu()  # [L, B, T]
                sums += g.sum(1)
                if task in experts:
                    hits += (g.argmax(-1) == experts.index(task)).double().sum(1)
                count += g.shape[1]
            means[task] = (sums / max(count, 1)).tolist()
            if task in experts:
                task_id[task] = (hits / max(count, 1)).tolist()
    routing = {"experts": experts, "layers": len(moe_layers(model)), "mean_weight": means}
    per_layer = torch.tensor(list(task_id.values())).mean(0).tolist() if task_id else []
    return routing, {"per_task": task_id, "mean_per_layer": per_layer}


@register_method("wemoe")
class WeMoE(MergeMethod):
    """Weight-Ensembling MoE: per-sample routed MLP experts, routers adapted on test data."""

    uses_test_data = True
    plain_encoder = False  # routed MLPs: its adapted model is work/<key>/wemoe.safetensors
    runtime_only = frozenset({"checkpoint_every", "implementation"})
    added_hyperparameters = frozenset({"diversity_weight"})

    init_lambda: float = Field(0.3, ge=0.0, le=10.0, description="task-arithmetic scale of non-MLP weights and router init")
    router_depth: int = Field(2, ge=0, le=2, description="0: constant vector, 1: linear, 2: two-layer MLP")
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="Adam learning rate of the routers")
    steps: int = Field(1000, ge=0, le=1_000_000, description="test-time-adaptation steps (0: routers stay at init)")
    batch_size: int = Field(16, ge=1, le=4096, description="unlabeled images per task per step (the data iterators use it)")
    cosine: bool = Field(False, description="cosine-anneal the learning rate to 0")
    batch_reduce: bool = Field(False, description="average routing over the batch: one merged MLP per batch")
    routing: Routing = Field("raw", description="raw (paper), clamp to [0,1], or softmax times a learned scale")
    implementation: Implementation = Field("auto", description="per-sample kernel; speed/memory only, same outputs")
    eval_every: int = Field(0, ge=0, description="validate and report every N steps (0: never)")
    checkpoint_every: int = Field(100, ge=0, description="checkpoint routers to the workdir every N steps (0: never)")
    routing_stats_batches: int = Field(4, ge=0, le=1000, description="batches per task for the routing statistics")
    task_id_weight: float = Field(0.0, ge=0.0, le=100.0, description=(
        "weight of a router task-identification loss (0: the paper's objective; needs routing: softmax)"))
    diversity_weight: float = Field(0.0, ge=0.0, le=100.0, description=(
        "weight of each task batch's marginal entropy, maximised (0: the paper's objective)"))

    @model_validator(mode="after")
    def _task_id_needs_softmax(self) -> "WeMoE":
        if self.task_id_weight > 0 and self.routing != "softmax":
            raise ValueError(f"task_id_weight > 0 needs routing: softmax (got routing: {self.routing}): "
                             "raw or clamped routing weights are not a distribution over tasks")
        return self

    @model_validator(mode="after")
    def _init_inside_clamp(self) -> "WeMoE":
        # Routers start with every weight at init_lambda: clipped above 1, none gets a gradient.
        if self.routing == "clamp" and self.init_lambda > 1.0:
            raise ValueError(f"init_lambda {self.init_lambda} > 1 with routing: clamp never learns (routing weights "
                             "clipped to [0, 1] start at the bound and get zero gradient); lower it or use "
                             "routing: raw or softmax")
        return self

    def batch_dependent(self) -> bool:
        """``batch_reduce`` routes every image by its batch's mean routing weights."""
        return self.batch_reduce

    def build(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], seed: int = 0) -> nn.Module:
        return build_wemoe(pretrained, finetuned, init_lambda=self.init_lambda, router_depth=self.router_depth,
                           routing=self.routing, batch_reduce=self.batch_reduce,
                           implementation=self.implementation, seed=seed)

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        model = self.build(pretrained, finetuned, ctx.seed).to(ctx.device)
        path = Path(ctx.workdir) / MODEL_FILE if ctx.workdir else None
        meta = {"sources": dict(ctx.sources), "hyperparameters": self.model_dump(), "adapted_on": dict(ctx.adapted_on)}
        adaptation = self._finished_adaptation(path, model, meta) if path is not None else None
        if adaptation is None:
            aux = task_identification_loss(model, self.task_id_weight) if self.task_id_weight > 0 else None
            with keeping_logits(model, aux is not None):
                losses = run_tta(model, ctx, lr=self.lr, steps=self.steps, cosine=self.cosine,
                                 checkpoint_every=self.checkpoint_every, eval_every=self.eval_every,
                                 joint_forward=False, aux_loss=aux, aux_name="task_id",
                                 diversity_weight=self.diversity_weight, name="wemoe")
            adaptation = {"tta_loss": losses, "tta_parts": ctx.artifacts["tta_parts"],
                          "tta_validation": ctx.artifacts["tta_validation"]}
            if path is not None:
                save_wemoe(model, path, {**meta, "adaptation": adaptation})
        else:
            ctx.artifacts["tta_parts"] = adaptation["tta_parts"]
            ctx.artifacts["tta_validation"] = adaptation["tta_validation"]
        model.requires_grad_(False)
        ctx.artifacts["tta_loss"] = list(adaptation["tta_loss"])
        if self.routing_stats_batches and ctx.unlabeled:
            routing, task_id = routing_statistics(model, ctx, self.routing_stats_batches)
            ctx.artifacts["routing"] = routing
            ctx.artifacts["router_task_id"] = task_id
        return model

    def _finished_adaptation(self, path: Path, model: nn.Module, meta: Mapping[str, Any]) -> dict[str, Any] | None:
        """The loss history of the adaptation saved at ``path`` when it is this one (same models,
        key hyperparameters and data), with its routers loaded into ``model``; else None. A job
        requeued or rerun after its adaptation ended (cut in evaluation, e.g. by a time limit)
        thus goes on from the adapted model even with ``checkpoint_every: 0``. Models are compared
        by architecture and content digest, not by where their files lie: as in the job's key, a
        moved cache or checkpoint folder is the same job."""
        try:
            header = _header(path)
        except ValueError:
            return None
        saved = header["meta"]
        hyper = self.as_key(saved.get("hyperparameters") or {})

        def as_saved(value: Any) -> Any:  # what JSON gives back (tuples as lists)
            return json.loads(json.dumps(value))

        same = ((saved.get("sources") or {}).get("arch") == meta["sources"].get("arch")
                and saved.get("adapted_on") == as_saved(meta["adapted_on"])
                and hyper == as_saved(self.key_params())
                and header["inputs"] == as_saved(model.wemoe_inputs))
        if not same or "adaptation" not in saved:
            return None
        _load_routers(path, model)
        return saved["adaptation"]


def save_wemoe(model: nn.Module, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> None:
    """Routers, build configuration, the digests of the models it was built from and ``meta``
    (e.g. which checkpoint files) to one safetensors file (tensors and JSON text: no pickle)."""
    from harness.models import save_state_dict

    state = {f"{i}.{k}": v for i, m in enumerate(moe_layers(model)) for k, v in m.router.state_dict().items()}
    save_state_dict(state, path, metadata={
        "format": FORMAT,
        "config": json.dumps(model.wemoe_config),
        "inputs": json.dumps(getattr(model, "wemoe_inputs", {})),
        "meta": json.dumps(dict(meta or {})),
    })


def _header(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed metadata of a router file; ValueError naming the file when it is not one."""
    from safetensors import safe_open

    if Path(path).is_dir():  # safetensors would say only "No such device (os error 19)"
        raise ValueError(f"{path}: is a folder; expected a WeMoE router file, the {MODEL_FILE} a WeMoE job "
                         "saves in <output_dir>/work/<job key>/")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except FileNotFoundError:
        raise ValueError(f"{path}: no such WeMoE router file") from None
    except Exception as exc:  # safetensors raises its own error types for other files
        raise ValueError(f"{path}: not a WeMoE router file ({exc})") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a WeMoE router file (format {header.get('format')!r}, expected {FORMAT!r})")
    out = {}
    for key in ("config", "meta", "inputs"):
        try:
            out[key] = json.loads(header.get(key, "{}"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: field {key!r} of its header is not JSON ({exc})") from None
    missing = [k for k in ("tasks", "init_lambda", "router_depth", "routing", "batch_reduce") if k not in out["config"]]
    if missing:
        raise ValueError(f"{path}: its config lacks {missing}")
    return out


def read_wemoe_meta(path: str | os.PathLike) -> tuple[dict, dict]:
    """(build configuration, user meta) stored by :func:`save_wemoe`."""
    header = _header(path)
    return header["config"], header["meta"]


def load_wemoe(path: str | os.PathLike, pretrained: nn.Module, finetuned: Mapping[str, nn.Module],
               implementation: Implementation | None = None) -> nn.Module:
    """Rebuild a saved WeMoE encoder from the checkpoints it was built from (more fine-tuned
    models than it has experts may be given); ``wemoe_meta`` holds the meta and
    ``wemoe_adapted_on`` what the routers were adapted on (``meta["adapted_on"]``: the split, and
    the corruption with its severity and seed for a robustness study's per-corruption adaptation;
    None for files saved before it was recorded).

    ``implementation`` (speed and memory only, same outputs) defaults to the saved one ("auto"
    for files saved before it was recorded).

    Raises ValueError naming the file when a model differs from the one the routers were
    trained with (a checkpoint changed, another architecture) or the routers do not fit."""
    header = _header(path)
    config, meta, inputs = header["config"], header["meta"], header["inputs"]
    tasks = config["tasks"]
    implementation = implementation or config.get("implementation", "auto")
    if implementation not in get_args(Implementation):
        raise ValueError(f"{path}: implementation {implementation!r} is not one of {list(get_args(Implementation))}")
    missing = [t for t in tasks if t not in finetuned]
    if missing:
        raise ValueError(f"{path}: built from tasks {tasks}; no fine-tuned model given for {missing}")
    changed = _changed_models(inputs, pretrained, {t: finetuned[t] for t in tasks})
    if changed:
        raise ValueError(f"{path}: {', '.join(changed)} differ(s) from the one(s) its routers were trained with "
                         "(content digest); load it with the checkpoints it was built from")
    model = build_wemoe(pretrained, {t: finetuned[t] for t in tasks}, init_lambda=config["init_lambda"],
                        router_depth=config["router_depth"], routing=config["routing"],
                        batch_reduce=config["batch_reduce"],
                        implementation=implementation)
    _load_routers(path, model)
    model.requires_grad_(False)
    model.wemoe_meta = meta
    model.wemoe_adapted_on = meta.get("adapted_on")
    return model


def _changed_models(inputs: Mapping[str, Any], pretrained: nn.Module, experts: Mapping[str, nn.Module]) -> list[str]:
    """The given models whose content digest is not the one saved in ``inputs``, checked before
    building: a model of another architecture would otherwise fail the build with an error that
    blames a fine-tuned checkpoint for a wrong pretrained model, and names no router file."""
    changed = ["the pretrained model"] if inputs.get("pretrained") not in (None, module_digest(pretrained)) else []
    changed += [f"the fine-tuned model of {t!r}" for t, digest in (inputs.get("experts") or {}).items()
                if t in experts and digest != module_digest(experts[t])]
    return changed


def _load_routers(path: str | os.PathLike, model: nn.Module) -> None:
    """The router weights saved at ``path`` into ``model``'s MoE layers; ValueError naming the
    file when they do not fit."""
    from harness.models import load_state_dict

    state = load_state_dict(path)
    layers = moe_layers(model)
    extra = sorted({k.split(".", 1)[0] for k in state} - {str(i) for i in range(len(layers))})
    if extra:
        raise ValueError(f"{path}: has routers for layers {extra}; this model has {len(layers)} MoE layers")
    for i, m in enumerate(layers):
        want = m.router.state_dict()
        got = {k[len(f"{i}."):]: v for k, v in state.items() if k.startswith(f"{i}.")}
        for k in sorted(set(want) | set(got)):
            if k not in got or k not in want or got[k].shape != want[k].shape:
                have = tuple(got[k].shape) if k in got else "missing"
                need = tuple(want[k].shape) if k in want else "none"
                raise ValueError(f"{path}: router tensor {i}.{k} is {have} in the file, the model needs {need} "
                                 "(another architecture?)")
        m.router.load_state_dict(got)
