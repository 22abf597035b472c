"""WeMoE: the vectorised MoE forward against a per-sample loop, routing, TTA, checkpoints, saving."""

from __future__ import annotations

import copy
import errno
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods.wemoe as wemoe
from tests.conftest import perturbed_micro_encoders
from methods.base import MergeContext, PruneTrial, with_state
from methods.task_arithmetic import task_arithmetic_state
from methods.tta import entropy, run_tta

TASKS = ["a", "b", "c"]
CLASSES = 5


@pytest.fixture(scope="module")
def models():
    return perturbed_micro_encoders(TASKS)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def heads(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t: 10 * F.normalize(torch.randn(CLASSES, 32, generator=g), dim=-1) for t in TASKS}


def fixed_unlabeled(n_batches: int = 1, size: int = 4) -> dict:
    """Deterministic iterator factories: each task cycles through its own fixed batches."""
    data = {t: [images(size, 100 * i + j) for j in range(n_batches)] for i, t in enumerate(TASKS)}
    return {t: (lambda t=t: iter(data[t])) for t in TASKS}


def randomize_routers(model: nn.Module, seed: int, std: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".router." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if name.endswith("scale") else 0.0))


class OracleMLP(nn.Module):
    """Per-sample loop: routing from the router's raw tensors, W_i built from the checkpoints."""

    def __init__(self, router: wemoe.Router, base: nn.Module, experts: list[nn.Module], batch_reduce: bool):
        super().__init__()
        self.router, self.base, self.experts, self.batch_reduce = router, base, experts, batch_reduce

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        r = self.router
        rows = []
        for xi in x:  # xi [N, D]
            if r.depth == 0:
                logits = r.const.clone()
            elif r.depth == 1:
                logits = (xi @ r.net[0].weight.T + r.net[0].bias).mean(0)
            else:
                hidden = torch.relu(xi @ r.net[0].weight.T + r.net[0].bias)
                logits = (hidden @ r.net[2].weight.T + r.net[2].bias).mean(0)
            if r.routing == "clamp":
                logits = logits.clamp(0, 1)
            elif r.routing == "softmax":
                logits = r.scale * torch.softmax(logits, 0)
            rows.append(logits)
        g = torch.stack(rows)
        return g.mean(0, keepdim=True).expand_as(g) if self.batch_reduce else g

    def weight(self, layer: str, kind: str, g: torch.Tensor) -> torch.Tensor:
        w0 = getattr(getattr(self.base, layer), kind)
        return w0 + sum(g[t] * (getattr(getattr(e, layer), kind) - w0) for t, e in enumerate(self.experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.routing(x)
        out = []
        for i, xi in enumerate(x):
            h = F.gelu(F.linear(xi, self.weight("c_fc", "weight", g[i]), self.weight("c_fc", "bias", g[i])))
            out.append(F.linear(h, self.weight("c_proj", "weight", g[i]), self.weight("c_proj", "bias", g[i])))
        return torch.stack(out)


def oracle_encoder(moe: nn.Module, pre: nn.Module, finetuned: dict, init_lambda: float, batch_reduce: bool) -> nn.Module:
    model = with_state(pre, task_arithmetic_state(pre, finetuned, init_lambda))
    for i, (block, layer) in enumerate(zip(model.transformer.resblocks, wemoe.moe_layers(moe))):
        experts = [finetuned[t].transformer.resblocks[i].mlp for t in TASKS]
        block.mlp = OracleMLP(layer.router, pre.transformer.resblocks[i].mlp, experts, batch_reduce)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("routing", ["raw", "clamp", "softmax"])
@pytest.mark.parametrize("batch_reduce", [False, True])
def test_forward_matches_per_sample_oracle(models, depth, routing, batch_reduce):
    pre, ft = models
    moe = wemoe.build_wemoe(pre, ft, init_lambda=0.4, router_depth=depth, routing=routing, batch_reduce=batch_reduce)
    randomize_routers(moe, seed=depth)
    oracle = oracle_encoder(moe, pre, ft, 0.4, batch_reduce)
    x = images(6, 7)
    with torch.no_grad():
        ref = oracle(x)
        for impl, block_bytes in (("auto", None), ("weights", 0), ("weights", 2048), ("stacked", None)):
            for m in wemoe.moe_layers(moe):
                m.implementation, m.block_bytes = impl, block_bytes
            assert rel_err(moe(x), ref) <= 1e-5, (impl, block_bytes)
        with wemoe.recording(moe) as layers:
            moe(x)
            g = layers[0].last_routing
    if depth > 0 and not batch_reduce:  # the test exercises genuinely per-sample routing
        assert (g - g[0]).abs().max() > 1e-3


@pytest.mark.parametrize("impl,block_bytes,batch_reduce", [("weights", 0, False), ("weights", 2048, False),
                                                          ("stacked", None, False), ("auto", None, True)])
def test_router_gradients_match_oracle(models, impl, block_bytes, batch_reduce):
    pre, ft = models
    moe = wemoe.build_wemoe(pre, ft, router_depth=2, routing="softmax", batch_reduce=batch_reduce)
    randomize_routers(moe, 11)
    for m in wemoe.moe_layers(moe):
        m.implementation, m.block_bytes = impl, block_bytes
    oracle = oracle_encoder(moe, pre, ft, 0.3, batch_reduce)
    x, target = images(5, 3), torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    grads = []
    for model in (oracle, moe):
        moe.zero_grad(set_to_none=True)
        (model(x) * target).sum().backward()
        grads.append({n: p.grad.clone() for n, p in moe.named_parameters() if p.requires_grad})
    for name, ref in grads[0].items():
        assert rel_err(grads[1][name], ref) <= 1e-4, name


def test_single_sample_batch_matches_oracle_with_gradients(models):
    """auto runs a one-sample batch through its merged W; outputs and router gradients stay the oracle's."""
    pre, ft = models
    moe = wemoe.build_wemoe(pre, ft, router_depth=2, routing="softmax")
    randomize_routers(moe, 5)
    oracle = oracle_encoder(moe, pre, ft, 0.3, False)
    x, target = images(1, 9), torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    grads = []
    for model in (oracle, moe):
        moe.zero_grad(set_to_none=True)
        out = model(x)
        (out * target).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in moe.named_parameters() if p.requires_grad}))
    assert rel_err(grads[1][0], grads[0][0]) <= 1e-5
    for name, ref in grads[0][1].items():
        assert rel_err(grads[1][1][name], ref) <= 1e-4, name


@pytest.mark.parametrize("impl", ["auto", "weights", "stacked"])
def test_mixed_precision_runs_the_moe_in_float32(models, impl):
    """Under autocast (and for a bfloat16 input) each MoE layer still computes the float32
    per-sample oracle's output, forward and backward."""
    pre, ft = models
    moe = wemoe.build_wemoe(pre, ft, router_depth=2, routing="softmax")
    randomize_routers(moe, 8)
    oracle = oracle_encoder(moe, pre, ft, 0.3, False)
    layer, ref_layer = wemoe.moe_layers(moe)[1], oracle.transformer.resblocks[1].mlp
    layer.implementation = impl
    x = torch.randn(5, 17, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ref_layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.float32 and rel_err(out, ref) <= 1e-5
        half = layer(x.bfloat16())
        assert half.dtype == torch.bfloat16
        assert torch.equal(half, ref_layer(x.bfloat16().float()).bfloat16())
    target = torch.randn(5, 17, 32, generator=torch.Generator().manual_seed(4))
    grads = []
    for module, autocast in ((ref_layer, False), (layer, True)):
        moe.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(x)
        (out * target).sum().backward()  # outside autocast, as PyTorch recommends
        grads.append({n: p.grad.clone() for n, p in layer.router.named_parameters()})
    for name, g in grads[0].items():
        assert rel_err(grads[1][name], g) <= 1e-4, name
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(moe(images(3, 5))).all()  # the whole tower runs under autocast


@pytest.mark.parametrize("rows", [7, 3, 1])
def test_per_sample_linear_gradcheck(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(3, 4, 5, dtype=torch.double, generator=g, requires_grad=True)
    coef = torch.randn(3, 3, dtype=torch.double, generator=g, requires_grad=True)
    weight = torch.randn(3, 7, 5, dtype=torch.double, generator=g)
    bias = torch.randn(3, 7, dtype=torch.double, generator=g)
    fn = lambda x, c: wemoe.PerSampleLinear.apply(x, c, weight, bias, rows, wemoe.Workspace())  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, coef))


def test_batch_first_false_layout(models):
    pre, ft = models
    moe = wemoe.build_wemoe(pre, ft, router_depth=2)
    randomize_routers(moe, 3)
    layer = wemoe.moe_layers(moe)[0]
    x = torch.randn(4, 5, 32)
    with torch.no_grad():
        expected = layer(x)
        layer.batch_first = False
        got = layer(x.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(got, expected)


def test_mlp_with_more_than_fc_gelu_proj_is_refused():
    from collections import OrderedDict

    def mlp(extra: nn.Module) -> nn.Sequential:
        return nn.Sequential(OrderedDict([("c_fc", nn.Linear(8, 16)), ("gelu", nn.GELU()),
                                          ("ln", extra), ("c_proj", nn.Linear(16, 8))]))

    router = wemoe.Router(8, 2, 1, 0.3)
    with pytest.raises(ValueError, match=r"also has \['ln'\]"):
        wemoe.WeightEnsemblingMLP(mlp(nn.LayerNorm(16)), [mlp(nn.LayerNorm(16))] * 2, router)
    layer = wemoe.WeightEnsemblingMLP(mlp(nn.Identity()), [mlp(nn.Identity())] * 2, router)
    assert layer.num_experts == 2


def test_moe_is_on_forward_path(models):
    pre, ft = models
    moe = wemoe.build_wemoe(pre, ft, router_depth=2)
    layers = wemoe.moe_layers(moe)
    assert len(layers) == len(pre.transformer.resblocks)
    assert all(b.mlp is m for b, m in zip(moe.transformer.resblocks, layers))
    x = images(3, 1)
    with torch.no_grad():
        before = moe(x)
        for m in layers:
            m.router.net[-1].bias.add_(0.5)
        after = moe(x)
    assert (before - after).abs().max() > 1e-3


@pytest.mark.parametrize("task", TASKS)
def test_one_hot_routing_equals_task_mlps(models, task):
    pre, ft = models
    moe = wemoe.build_wemoe(pre, ft, init_lambda=0.3, router_depth=0)
    with torch.no_grad():
        for m in wemoe.moe_layers(moe):
            m.router.const.copy_(F.one_hot(torch.tensor(TASKS.index(task)), len(TASKS)).float())
    state = task_arithmetic_state(pre, ft, 0.3)
    state.update({k: v for k, v in ft[task].state_dict().items() if ".mlp." in k})
    reference = with_state(pre, state)
    x = images(4, 2)
    with torch.no_grad():
        assert rel_err(moe(x), reference(x)) <= 1e-5


@pytest.mark.parametrize("routing", ["raw", "softmax"])
def test_only_routers_train(models, routing):
    pre, ft = models
    moe = wemoe.build_wemoe(pre, ft, routing=routing)
    trainable = {n for n, p in moe.named_parameters() if p.requires_grad}
    routers = {n for n, _ in moe.named_parameters() if ".mlp.router." in n}
    assert trainable == routers and trainable
    # Init as specified: last bias init_lambda (raw) or 0 with scale init_lambda * T (softmax).
    r = wemoe.moe_layers(moe)[0].router
    expected_bias = 0.0 if routing == "softmax" else 0.3
    torch.testing.assert_close(r.net[-1].bias, torch.full((3,), expected_bias))
    assert float(r.net[0].bias.detach().abs().max()) == 0.0
    assert 0.005 < float(r.net[0].weight.detach().std()) < 0.015
    if routing == "softmax":
        assert float(r.scale.detach()) == pytest.approx(0.9)


def total_entropy(model: nn.Module, hd: dict, unlabeled: dict) -> float:
    with torch.no_grad():
        return sum(float(entropy(F.normalize(model(next(unlabeled[t]())), dim=-1) @ hd[t].T)) for t in TASKS)


def test_tta_reduces_entropy_and_records_routing(models):
    pre, ft = models
    unlabeled = fixed_unlabeled()
    hd = heads()
    method = wemoe.WeMoE(steps=12, lr=1e-2, checkpoint_every=0, routing_stats_batches=2)
    start = total_entropy(method.build(pre, ft), hd, unlabeled)
    ctx = MergeContext(heads=hd, unlabeled=unlabeled)
    model = method.merge(pre, ft, ctx)
    end = total_entropy(model, hd, unlabeled)
    assert ctx.artifacts["tta_loss"][0] == pytest.approx(start, rel=1e-5)
    assert end < start - 0.05
    assert not any(p.requires_grad for p in model.parameters())
    routing = ctx.artifacts["routing"]
    assert routing["experts"] == TASKS
    assert [len(routing["mean_weight"][t]) for t in TASKS] == [2, 2, 2]
    assert len(routing["mean_weight"]["a"][0]) == 3
    assert set(ctx.artifacts["router_task_id"]["per_task"]) == set(TASKS)


def constant_routers(models, consts: list[torch.Tensor]) -> nn.Module:
    """A depth-0 WeMoE encoder whose MoE layer i routes every input by the weights ``consts[i]``."""
    pre, ft = models
    moe = wemoe.build_wemoe(pre, ft, router_depth=0)
    with torch.no_grad():
        for m, const in zip(wemoe.moe_layers(moe), consts, strict=True):
            m.router.const.copy_(const)
    return moe


def test_routing_statistics_known_routing(models):
    const = torch.tensor([0.1, 0.7, 0.2])
    moe = constant_routers(models, [const, const])
    routing, task_id = wemoe.routing_statistics(moe, MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2)), 3)
    for t in TASKS:
        torch.testing.assert_close(torch.tensor(routing["mean_weight"][t], dtype=torch.float64), const.double().expand(2, 3))
    assert task_id["per_task"] == {"a": [0.0, 0.0], "b": [1.0, 1.0], "c": [0.0, 0.0]}
    assert task_id["mean_per_layer"] == pytest.approx([1 / 3, 1 / 3])


def test_routing_statistics_keep_each_layers_own_numbers(models):
    """Layer 0's routers favour expert a, layer 1's expert c: a's images are identified at layer 0
    only, c's at layer 1 only, b's nowhere, and each layer's mean weights are its own router's."""
    consts = [torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.3, 0.6])]
    moe = constant_routers(models, consts)
    routing, task_id = wemoe.routing_statistics(moe, MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2)), 2)
    for t in TASKS:
        torch.testing.assert_close(torch.tensor(routing["mean_weight"][t], dtype=torch.float64),
                                   torch.stack(consts).double())
    assert task_id["per_task"] == {"a": [1.0, 0.0], "b": [0.0, 0.0], "c": [0.0, 1.0]}
    assert task_id["mean_per_layer"] == pytest.approx([1 / 3, 1 / 3])


def test_routing_statistics_of_a_data_task_without_an_expert_give_weights_not_identification(models):
    """Unlabeled images of a task no expert was fine-tuned on have mean routing weights but no
    own expert to identify: identification is over the experts' own tasks only, and the layer
    count is the encoder's MoE layers (two), not its experts (three)."""
    const = torch.tensor([0.1, 0.7, 0.2])
    moe = constant_routers(models, [const, const])
    unlabeled = {**fixed_unlabeled(2), "z": lambda: iter([images(4, 999)])}
    routing, task_id = wemoe.routing_statistics(moe, MergeContext(heads=heads(), unlabeled=unlabeled), 2)
    assert routing["layers"] == 2
    torch.testing.assert_close(torch.tensor(routing["mean_weight"]["z"], dtype=torch.float64),
                               const.double().expand(2, 3))
    assert task_id["per_task"] == {"a": [0.0, 0.0], "b": [1.0, 1.0], "c": [0.0, 0.0]}
    assert task_id["mean_per_layer"] == pytest.approx([1 / 3, 1 / 3])


class Interrupt(Exception):
    pass


def router_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".router." in n}


def router_norm(model: nn.Module) -> dict[str, float]:
    """A validation stand-in that depends on the routers' current state."""
    return {"router_norm": float(sum(v.double().norm() for v in router_state(model).values()))}


def run_killed_and_resumed(method: wemoe.WeMoE, pre, ft, tmp_path):
    """``method`` run whole, and run again killed at its third validation then resumed: each
    run's context and model, (full_ctx, full, resumed_ctx, resumed)."""
    full_ctx = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2), workdir=str(tmp_path / "full"),
                            validate=router_norm)
    full = method.merge(pre, ft, full_ctx)
    calls = []

    def stop_at_third(model):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupt
        return router_norm(model)

    workdir = str(tmp_path / "resumed")
    with pytest.raises(Interrupt):
        method.merge(pre, ft, MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2), workdir=workdir,
                                           validate=stop_at_third))
    resumed_ctx = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2), workdir=workdir, validate=router_norm)
    return full_ctx, full, resumed_ctx, method.merge(pre, ft, resumed_ctx)


def test_checkpoint_resume_matches_uninterrupted(models, tmp_path):
    pre, ft = models
    method = wemoe.WeMoE(steps=6, lr=1e-2, cosine=True, checkpoint_every=2, eval_every=3,
                         router_depth=1, routing_stats_batches=0)
    # validations at steps 0, 3, 6: killed at the last, checkpointed at 4
    full_ctx, full, resumed_ctx, resumed = run_killed_and_resumed(method, pre, ft, tmp_path)
    a, b = router_state(full), router_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed_ctx.artifacts["tta_loss"] == full_ctx.artifacts["tta_loss"]
    assert len(full_ctx.artifacts["tta_loss"]) == 6
    history = full_ctx.artifacts["tta_validation"]
    assert [row["step"] for row in history] == [0, 3, 6]
    assert resumed_ctx.artifacts["tta_validation"] == history
    assert history[0]["router_norm"] == router_norm(method.build(pre, ft))["router_norm"]
    assert history[-1]["router_norm"] == router_norm(full)["router_norm"]
    assert "tta_entropy" not in history[0] and history[1]["tta_entropy"] == full_ctx.artifacts["tta_loss"][2]
    init = router_state(method.build(pre, ft))
    assert any(not torch.equal(init[k], a[k]) for k in a)


def test_report_true_prunes(models):
    pre, ft = models
    calls = []

    def report(step, metrics):
        calls.append((step, metrics))
        return True

    ctx = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(), validate=lambda m: {"acc": 0.5}, report=report)
    with pytest.raises(PruneTrial):
        wemoe.WeMoE(steps=5, eval_every=2, checkpoint_every=0).merge(pre, ft, ctx)
    assert [c[0] for c in calls] == [0]
    assert calls[0][1]["acc"] == 0.5 and "tta_entropy" not in calls[0][1]

    calls.clear()
    ctx = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(), validate=lambda m: {"acc": 0.5},
                       report=lambda step, metrics: calls.append((step, metrics)) or step >= 2)
    with pytest.raises(PruneTrial):
        wemoe.WeMoE(steps=5, eval_every=2, checkpoint_every=0).merge(pre, ft, ctx)
    assert [c[0] for c in calls] == [0, 2]
    assert calls[1][1]["tta_entropy"] == ctx.artifacts["tta_validation"][1]["tta_entropy"]


def test_save_load_round_trip(models, tmp_path):
    pre, ft = models
    moe = wemoe.build_wemoe(pre, ft, init_lambda=0.2, router_depth=1, routing="softmax", batch_reduce=True)
    randomize_routers(moe, 5)
    path = tmp_path / "routers.safetensors"
    wemoe.save_wemoe(moe, path, {"checkpoints": ["a.safetensors", "b.safetensors"]})
    shuffled = {t: ft[t] for t in reversed(TASKS)}  # order restored from the file
    loaded = wemoe.load_wemoe(path, pre, shuffled)
    assert loaded.wemoe_meta == {"checkpoints": ["a.safetensors", "b.safetensors"]}
    assert loaded.wemoe_config == moe.wemoe_config
    x = images(4, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), moe(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=re.escape(f"{path}: built from tasks ['a', 'b', 'c']; "
                                                   "no fine-tuned model given for ['c']")):
        wemoe.load_wemoe(path, pre, {"a": ft["a"], "b": ft["b"]})


def test_load_refuses_models_other_than_those_the_routers_were_trained_with(models, tmp_path):
    pre, ft = models
    moe = wemoe.build_wemoe(pre, ft, router_depth=1)
    path = tmp_path / "routers.safetensors"
    wemoe.save_wemoe(moe, path)
    changed = copy.deepcopy(ft["b"])
    with torch.no_grad():
        changed.transformer.resblocks[0].attn.in_proj_weight[0, 0] += 1e-3  # not even an MLP weight
    with pytest.raises(ValueError, match=r"routers\.safetensors: the fine-tuned model of 'b' differ"):
        wemoe.load_wemoe(path, pre, {**ft, "b": changed})
    with pytest.raises(ValueError, match="the pretrained model differ"):
        wemoe.load_wemoe(path, changed, ft)
    moved = {t: copy.deepcopy(m) for t, m in ft.items()}  # same content elsewhere (a moved file) loads
    moved["d"] = changed  # an extra model the routers never used is ignored
    loaded = wemoe.load_wemoe(path, copy.deepcopy(pre), moved)
    x = images(3, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), moe(x))


def test_module_digest_is_hashed_once_until_the_module_changes(models, monkeypatch):
    """A job builds WeMoE from the same models once more per corruption: their digests are hashed
    once, and any change (in place, through .data, by load_state_dict) hashes them again."""
    import hashlib

    pre, _ = models
    module = copy.deepcopy(pre)
    module.__dict__.pop("_wemoe_digest", None)

    def fresh(m: torch.nn.Module) -> str:  # a copy without the memo: hashed from its bytes
        other = copy.deepcopy(m)
        other.__dict__.pop("_wemoe_digest", None)
        return wemoe.module_digest(other)

    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(wemoe.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    first = wemoe.module_digest(module)
    assert wemoe.module_digest(module) == first and len(calls) == 1
    weight = module.transformer.resblocks[0].mlp.c_fc.weight
    with torch.no_grad():
        weight[0, 0] += 1.0
    assert wemoe.module_digest(module) == fresh(module) != first
    weight.data[0, 1] += 1.0  # bypasses the version counter
    assert wemoe.module_digest(module) == fresh(module)
    module.load_state_dict(pre.state_dict())
    assert wemoe.module_digest(module) == first


def test_load_names_the_file_when_routers_do_not_fit_the_architecture(models, tmp_path):
    pre, ft = models
    moe = wemoe.build_wemoe(pre, ft, router_depth=2)
    del moe.wemoe_inputs  # a file without digests: only the router shapes can tell
    path = tmp_path / "routers.safetensors"
    wemoe.save_wemoe(moe, path)
    shallow = copy.deepcopy(pre)
    shallow.transformer.resblocks = shallow.transformer.resblocks[:-1]
    with pytest.raises(ValueError, match=r"routers\.safetensors: has routers for layers \['1'\]; this model has 1"):
        wemoe.load_wemoe(path, shallow, {t: shallow for t in ft})
    (tmp_path / "other.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="other.safetensors: not a WeMoE router file"):
        wemoe.load_wemoe(tmp_path / "other.safetensors", pre, ft)


def test_merge_saves_the_adapted_model_and_what_it_was_built_from(models, tmp_path):
    """A job's workdir keeps the adapted routers: loaded back they give the very logits of the merged model."""
    pre, ft = models
    sources = {"arch": "harness-micro-vit", "pretrained": "pre.safetensors",
               "finetuned": {t: f"{t}.safetensors" for t in TASKS}}
    ctx = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2), workdir=str(tmp_path), sources=sources)
    method = wemoe.WeMoE(steps=3, lr=1e-2, routing="softmax", checkpoint_every=0, routing_stats_batches=0)
    merged = method.merge(pre, ft, ctx)
    loaded = wemoe.load_wemoe(tmp_path / wemoe.MODEL_FILE, pre, ft)
    assert loaded.wemoe_meta == {"sources": sources, "hyperparameters": method.model_dump(), "adapted_on": {},
                                 "adaptation": {k: ctx.artifacts[k] for k in ("tta_loss", "tta_parts", "tta_validation")}}
    router = next(n for n, _ in merged.named_parameters() if ".router." in n)
    assert not torch.equal(dict(merged.named_parameters())[router],
                           dict(wemoe.build_wemoe(pre, ft, routing="softmax").named_parameters())[router])  # adapted
    for n in (1, 5):
        x = images(n, 30 + n)
        with torch.no_grad():
            assert torch.equal(loaded(x), merged(x))


FOG = {"split": "test", "corruption": "fog", "severity": 3, "corruption_seed": 0}


def test_an_adaptation_that_ended_goes_on_from_the_saved_model_without_checkpoints(models, tmp_path, monkeypatch):
    """With ``checkpoint_every: 0`` a job requeued or rerun after its adaptation ended (cut in
    evaluation by a time limit) goes on from the adapted model it saved, with the same loss
    history, instead of adapting again at every requeue; other data or hyperparameters adapt again."""
    import shutil

    pre, ft = models
    method = wemoe.WeMoE(steps=3, lr=1e-2, checkpoint_every=0, eval_every=2, router_depth=1, routing_stats_batches=0)

    def ctx(workdir, adapted_on=FOG) -> MergeContext:
        return MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2), workdir=str(workdir), validate=router_norm,
                            adapted_on=adapted_on)

    first = ctx(tmp_path / "job")
    merged = method.merge(pre, ft, first)
    real, calls = wemoe.run_tta, []
    monkeypatch.setattr(wemoe, "run_tta", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = ctx(tmp_path / "job")
    resumed = method.model_copy(update={"checkpoint_every": 7}).merge(pre, ft, again)  # a runtime-only change
    assert calls == []
    a, b = router_state(merged), router_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for k in ("tta_loss", "tta_parts", "tta_validation"):
        assert again.artifacts[k] == first.artifacts[k], k
    assert [row["step"] for row in again.artifacts["tta_validation"]] == [0, 2, 3]
    for name, other, data in (("data", method, {**FOG, "severity": 5}),
                              ("hyperparameters", method.model_copy(update={"lr": 2e-2}), FOG)):
        shutil.copytree(tmp_path / "job", tmp_path / name)
        other.merge(pre, ft, ctx(tmp_path / name, data))
        assert len(calls) == 1, name
        calls.clear()


def test_a_saved_adaptation_is_found_again_when_its_checkpoint_files_moved(models, tmp_path, monkeypatch):
    """The job key holds the models' content, not their paths: a rerun after a kill in evaluation
    with the cache (or checkpoint) folder moved, same files, is the same job and goes on from its
    saved adapted model (``checkpoint_every: 0`` leaves nothing else to resume from) instead of
    adapting again; a fine-tuned model of other content still adapts again."""
    import copy
    import shutil

    pre, ft = models
    method = wemoe.WeMoE(steps=3, lr=1e-2, checkpoint_every=0, router_depth=1, routing_stats_batches=0)

    def ctx(workdir, root: str) -> MergeContext:
        sources = {"arch": "harness-micro-vit", "pretrained": f"{root}/pretrained.safetensors",
                   "finetuned": {t: f"{root}/{t}.safetensors" for t in TASKS}}
        return MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2), workdir=str(workdir), sources=sources)

    first = ctx(tmp_path / "job", "/old/cache")
    merged = method.merge(pre, ft, first)
    shutil.copytree(tmp_path / "job", tmp_path / "changed")
    real, calls = wemoe.run_tta, []
    monkeypatch.setattr(wemoe, "run_tta", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = ctx(tmp_path / "job", "/new/cache")
    resumed = method.merge(pre, ft, again)
    assert calls == []
    a, b = router_state(merged), router_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.artifacts["tta_loss"] == first.artifacts["tta_loss"]
    other = {**ft, TASKS[0]: copy.deepcopy(ft[TASKS[0]])}
    with torch.no_grad():
        next(other[TASKS[0]].parameters()).add_(1e-3)
    method.merge(pre, other, ctx(tmp_path / "changed", "/old/cache"))
    assert calls == [1]


def test_saved_model_records_the_corruption_and_implementation_it_was_adapted_with(models, tmp_path):
    pre, ft = models
    ctx = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(), workdir=str(tmp_path), adapted_on=FOG)
    method = wemoe.WeMoE(steps=2, lr=1e-2, router_depth=1, implementation="stacked", checkpoint_every=0,
                         routing_stats_batches=0)
    merged = method.merge(pre, ft, ctx)
    config, meta = wemoe.read_wemoe_meta(tmp_path / wemoe.MODEL_FILE)
    assert meta["adapted_on"] == FOG and config["implementation"] == "stacked"
    loaded = wemoe.load_wemoe(tmp_path / wemoe.MODEL_FILE, pre, ft)
    assert loaded.wemoe_adapted_on == FOG
    assert {m.implementation for m in wemoe.moe_layers(loaded)} == {"stacked"}
    other = wemoe.load_wemoe(tmp_path / wemoe.MODEL_FILE, pre, ft, implementation="weights")
    assert {m.implementation for m in wemoe.moe_layers(other)} == {"weights"}
    x = images(4, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x), merged(x))
        torch.testing.assert_close(other(x), merged(x), rtol=1e-5, atol=1e-5)  # speed only: same outputs


def test_files_saved_before_the_adaptation_data_was_recorded_still_load(models, tmp_path):
    pre, ft = models
    moe = wemoe.build_wemoe(pre, ft, router_depth=1, implementation="stacked")
    randomize_routers(moe, 3)
    old_config = {k: v for k, v in moe.wemoe_config.items() if k != "implementation"}
    moe.wemoe_config = old_config  # the header as files of the previous format hold it
    path = tmp_path / "old.safetensors"
    wemoe.save_wemoe(moe, path, {"sources": {"arch": "harness-micro-vit"}})
    loaded = wemoe.load_wemoe(path, pre, ft)
    assert loaded.wemoe_adapted_on is None
    assert {m.implementation for m in wemoe.moe_layers(loaded)} == {"auto"}
    x = images(3, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), moe(x), rtol=1e-5, atol=1e-5)


def test_adaptation_checkpoint_of_another_corruption_is_refused_not_resumed(models, tmp_path):
    pre, ft = models
    method = wemoe.WeMoE(steps=2, lr=1e-2, router_depth=1, checkpoint_every=1, routing_stats_batches=0)

    def ctx(adapted_on: dict) -> MergeContext:
        return MergeContext(heads=heads(), unlabeled=fixed_unlabeled(), workdir=str(tmp_path), adapted_on=adapted_on)

    method.merge(pre, ft, ctx(FOG))
    with pytest.raises(ValueError, match=r"wemoe-tta\.pt: checkpoint adapted on .*'fog'.*reads .*'snow'"):
        method.merge(pre, ft, ctx({**FOG, "corruption": "snow"}))
    with pytest.raises(ValueError, match=r"adapted on .*'severity': 3.*reads .*'severity': 5"):
        method.merge(pre, ft, ctx({**FOG, "severity": 5}))
    again = ctx(FOG)
    method.merge(pre, ft, again)  # the same data: resumed (finished already)
    assert len(again.artifacts["tta_loss"]) == 2


def test_adaptation_checkpoint_written_before_parts_were_recorded_resumes(models, tmp_path):
    """A checkpoint of the previous format (no data record, no loss parts) resumes; the parts of
    the steps it ran are unknown, so they are logged from the first step run after it."""
    from methods.tta import checkpoint_path

    pre, ft = models
    kwargs = dict(lr=1e-2, router_depth=1, checkpoint_every=1, routing_stats_batches=0)
    wemoe.WeMoE(steps=2, **kwargs).merge(pre, ft, MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2),
                                                              workdir=str(tmp_path)))
    path = checkpoint_path(tmp_path, "wemoe")
    state = torch.load(path, weights_only=True)
    for key in ("adapted_on", "parts", "parts_start"):
        del state[key]
    torch.save(state, path)
    ctx = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2), workdir=str(tmp_path), adapted_on=FOG)
    wemoe.WeMoE(steps=4, **kwargs).merge(pre, ft, ctx)
    full = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2))
    wemoe.WeMoE(steps=4, **kwargs).merge(pre, ft, full)
    assert ctx.artifacts["tta_loss"] == full.artifacts["tta_loss"]
    assert ctx.artifacts["tta_parts"] == {"entropy": [[2, full.artifacts["tta_loss"][2]],
                                                      [3, full.artifacts["tta_loss"][3]]]}


def test_logged_loss_parts_are_the_entropy_and_the_task_identification_term(models):
    """With ``task_id_weight``, ``tta/loss`` is the sum of ``tta/entropy`` and ``tta/task_id``.
    Truth at step 0: the entropy of the unadapted model's logits written out, and a router of
    constant zero logits (depth 0, softmax) whose cross-entropy with any expert is log T."""
    from harness.job import artifact_metrics

    pre, ft = models
    unlabeled, hd = fixed_unlabeled(), heads()
    method = wemoe.WeMoE(steps=3, lr=1e-2, router_depth=0, routing="softmax", task_id_weight=2.0,
                         checkpoint_every=0, routing_stats_batches=0)
    init = method.build(pre, ft)
    expected = 0.0
    with torch.no_grad():
        for t in TASKS:
            p = torch.softmax(F.normalize(init(next(unlabeled[t]())), dim=-1) @ hd[t].T, dim=-1).double()
            expected += float(-(p * p.log()).sum(-1).mean())
    ctx = MergeContext(heads=hd, unlabeled=unlabeled)
    method.merge(pre, ft, ctx)
    parts, total = ctx.artifacts["tta_parts"], ctx.artifacts["tta_loss"]
    assert set(parts) == {"entropy", "task_id"}
    assert parts["entropy"][0] == pytest.approx(expected, rel=1e-5)
    assert parts["task_id"][0] == pytest.approx(len(TASKS) * 2.0 * math.log(len(TASKS)), rel=1e-6)
    for e, a, loss in zip(parts["entropy"], parts["task_id"], total):
        assert e + a == pytest.approx(loss, rel=1e-12)
    artifacts = dict(ctx.artifacts)
    artifact_metrics(artifacts)
    assert artifacts["curves"]["tta/loss"] == total
    assert artifacts["curves"]["tta/entropy"] == parts["entropy"]
    assert artifacts["curves"]["tta/task_id"] == parts["task_id"]


def test_diversity_weight_adds_the_marginal_entropy_term(models):
    """WeMoE passes ``diversity_weight`` to the loop: at step 0 (the unadapted model) the
    diversity part is -w x the summed entropy of each task batch's mean prediction, written out
    here, beside the entropy and task-identification parts; the three add up to the loss."""
    from harness.job import artifact_metrics

    pre, ft = models
    unlabeled, hd = fixed_unlabeled(), heads()
    method = wemoe.WeMoE(steps=3, lr=1e-2, router_depth=0, routing="softmax", task_id_weight=2.0,
                         diversity_weight=0.5, checkpoint_every=0, routing_stats_batches=0)
    init = method.build(pre, ft)
    expected = 0.0
    with torch.no_grad():
        for t in TASKS:
            mean = torch.softmax(F.normalize(init(next(unlabeled[t]())), dim=-1) @ hd[t].T, dim=-1).double().mean(0)
            expected += -0.5 * float(-(mean * mean.log()).sum())
    ctx = MergeContext(heads=hd, unlabeled=unlabeled)
    method.merge(pre, ft, ctx)
    parts, total = ctx.artifacts["tta_parts"], ctx.artifacts["tta_loss"]
    assert set(parts) == {"entropy", "diversity", "task_id"}
    assert parts["diversity"][0] == pytest.approx(expected, rel=1e-5) and expected < -0.1
    for e, d, a, loss in zip(parts["entropy"], parts["diversity"], parts["task_id"], total):
        assert e + d + a == pytest.approx(loss, rel=1e-12)
    artifacts = dict(ctx.artifacts)
    artifact_metrics(artifacts)
    assert artifacts["curves"]["tta/diversity"] == parts["diversity"]


def test_validation_reports_the_entropy_and_the_whole_loss_apart(models):
    """With ``task_id_weight``, what validation reports as ``tta_entropy`` is the step's summed
    entropy (``tta/entropy``), not the loss with the task-identification term (``tta_loss``)."""
    from harness.job import artifact_metrics

    pre, ft = models
    calls = []
    ctx = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(), validate=lambda m: {"val/acc/avg": 50.0},
                       report=lambda step, metrics: calls.append((step, dict(metrics))) and False)
    wemoe.WeMoE(steps=4, lr=1e-2, router_depth=0, routing="softmax", task_id_weight=2.0, eval_every=2,
                checkpoint_every=0, routing_stats_batches=0).merge(pre, ft, ctx)
    parts, total = ctx.artifacts["tta_parts"], ctx.artifacts["tta_loss"]
    assert [step for step, _ in calls] == [0, 2, 4]
    assert "tta_entropy" not in calls[0][1] and "tta_loss" not in calls[0][1]
    for step, metrics in calls[1:]:
        assert metrics["tta_entropy"] == parts["entropy"][step - 1]
        assert metrics["tta_loss"] == total[step - 1]
        assert metrics["tta_loss"] - metrics["tta_entropy"] == pytest.approx(parts["task_id"][step - 1], rel=1e-9)
        assert parts["task_id"][step - 1] > 0.1  # the two differ: the term is not negligible
    artifacts = dict(ctx.artifacts)
    artifact_metrics(artifacts)  # both are dense curves already (tta/entropy, tta/loss): no sparse copies
    assert set(artifacts["curves"]) == {"tta/loss", "tta/entropy", "tta/task_id", "tta/val/acc/avg"}


def test_progress_shows_the_loss_parts(models):
    from methods.tta import _loss_text

    assert _loss_text(1.5, {"entropy": 1.5}) == "1.5000"
    assert _loss_text(1.75, {"entropy": 1.5, "task_id": 0.25}) == "1.7500 (entropy 1.5000 + task_id 0.2500)"


def test_hyperparameter_bounds():
    """Router depth is 0 (a constant vector), 1 (linear) or 2 (two-layer MLP), both ends taken;
    routing is one of the three transforms. A refusal names the field it refuses."""
    for depth in (0, 1, 2):
        assert wemoe.WeMoE(router_depth=depth).router_depth == depth
    for depth in (-1, 3):
        with pytest.raises(ValueError, match=r"(?m)^router_depth\n"):
            wemoe.WeMoE(router_depth=depth)
    for routing in ("raw", "clamp", "softmax"):
        assert wemoe.WeMoE(routing=routing).routing == routing
    with pytest.raises(ValueError, match=r"(?m)^routing\n.*'raw', 'clamp' or 'softmax'"):
        wemoe.WeMoE(routing="topk")
    assert wemoe.WeMoE.uses_test_data


def test_task_identification_loss_is_the_mean_layer_cross_entropy(models):
    pre, ft = models
    moe = wemoe.build_wemoe(pre, ft, router_depth=0, routing="softmax")
    consts = [torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.0, 1.5, -0.5])]
    with torch.no_grad():
        for m, c in zip(wemoe.moe_layers(moe), consts):
            m.router.const.copy_(c)
    loss = wemoe.task_identification_loss(moe, 2.0)
    with wemoe.keeping_logits(moe):
        moe(images(3, 4))
        got = loss("b")
    # by hand: -log softmax(c)[1], averaged over the two layers, times the weight
    expected = 2.0 * sum(float(torch.logsumexp(c, 0) - c[1]) for c in consts) / 2
    assert got.requires_grad
    assert float(got.detach()) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="no expert"):
        with wemoe.keeping_logits(moe):
            moe(images(1, 4))
            loss("unknown")


def separable_unlabeled(size: int = 6) -> dict:
    """Each task's images carry a task-specific offset, so the task is visible in the input."""
    offsets = {"a": -2.0, "b": 0.0, "c": 2.0}
    data = {t: [images(size, 10 * i + j) * 0.5 + offsets[t] for j in range(2)] for i, t in enumerate(TASKS)}
    return {t: (lambda t=t: iter(data[t])) for t in TASKS}


def test_task_identification_loss_teaches_routers_the_task(models):
    pre, ft = models
    kwargs = dict(steps=40, lr=2e-2, router_depth=1, routing="softmax", checkpoint_every=0, routing_stats_batches=2)
    plain_ctx = MergeContext(heads=heads(), unlabeled=separable_unlabeled())
    wemoe.WeMoE(**kwargs).merge(pre, ft, plain_ctx)
    ctx = MergeContext(heads=heads(), unlabeled=separable_unlabeled())
    wemoe.WeMoE(task_id_weight=5.0, **kwargs).merge(pre, ft, ctx)
    with_loss = ctx.artifacts["router_task_id"]["mean_per_layer"]
    without = plain_ctx.artifacts["router_task_id"]["mean_per_layer"]
    assert min(with_loss) == 1.0  # every sample of every task routed mostly to its own expert
    assert max(without) < 1.0


def test_task_identification_loss_needs_softmax_routing():
    with pytest.raises(ValueError, match="routing: softmax"):
        wemoe.WeMoE(task_id_weight=1.0, routing="raw")
    assert wemoe.WeMoE(task_id_weight=1.0, routing="softmax").task_id_weight == 1.0


def test_adaptation_matches_the_reference_rule(models):
    """Three adaptation steps against the references' rule, written out: non-MLP weights by task
    arithmetic at init_lambda; per MLP a two-layer router on the MLP's input tokens, its outputs
    averaged over each sample's tokens, and per sample the pretrained MLP plus the routed task
    vectors (a functional call per sample); per task the batch-mean entropy of normalised features
    times the head, gradients accumulated over tasks, then one Adam step (lr 1e-4)."""
    from torch.func import functional_call

    pre, ft = models
    hd = heads(2)
    data = {t: [images(4, 10 * i + j) for j in range(3)] for i, t in enumerate(TASKS)}
    ours = wemoe.build_wemoe(pre, ft, init_lambda=0.3, router_depth=2, seed=0)

    class RoutedMLP(nn.Module):
        def __init__(self, base, experts, router):
            super().__init__()
            self.base, self.router = base, router
            self.taus = [{n: dict(e.named_parameters())[n].detach() - p.detach() for n, p in base.named_parameters()}
                         for e in experts]

        def forward(self, h):
            g = self.router(h).mean(1)
            out = []
            for i in range(h.shape[0]):
                params = {n: p + sum(g[i, t] * tau[n] for t, tau in enumerate(self.taus))
                          for n, p in self.base.named_parameters()}
                out.append(functional_call(self.base, params, (h[i:i + 1],)))
            return torch.cat(out)

    ref = with_state(pre, task_arithmetic_state(pre, ft, 0.3)).requires_grad_(False)
    for i, (block, layer) in enumerate(zip(ref.transformer.resblocks, wemoe.moe_layers(ours))):
        router = copy.deepcopy(layer.router.net).requires_grad_(True)
        base = copy.deepcopy(pre.transformer.resblocks[i].mlp).requires_grad_(False)
        block.mlp = RoutedMLP(base, [ft[t].transformer.resblocks[i].mlp for t in TASKS], router)
    opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=1e-4)
    for step in range(3):
        for t in TASKS:
            f = ref(data[t][step])
            logits = f / f.norm(dim=-1, keepdim=True) @ hd[t].T
            (-(logits.softmax(1) * logits.log_softmax(1)).sum(1)).mean().backward()
        opt.step()
        opt.zero_grad()

    ctx = MergeContext(heads=hd, unlabeled={t: (lambda t=t: iter(data[t])) for t in TASKS})
    run_tta(ours, ctx, lr=1e-4, steps=3, name="reference")
    moved = 0.0
    for layer, block in zip(wemoe.moe_layers(ours), ref.transformer.resblocks):
        for got, want in zip(layer.router.net.parameters(), block.mlp.router.parameters()):
            assert torch.allclose(got, want, atol=1e-6, rtol=0)  # Adam steps of 1e-4, float rounding
        moved = max(moved, float((layer.router.net[2].bias.detach() - 0.3).abs().max()))
    assert moved > 1e-5  # the steps moved the routers
    x = images(5, 99)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) <= 1e-5


def test_robustness_adaptation_per_corruption_records_its_corruption(sweep_dict):
    """``robustness.adapt: corrupted`` adapts once more per corruption in ``corrupted-<c>/``: each
    saved model says which data it was adapted on, so the files side by side are told apart."""
    from pathlib import Path

    from harness.config import validate_config
    from harness.runner import run_sweep

    d = dict(sweep_dict, references={"pretrained": False, "individual": False},
             robustness={"tasks": ["toy_stripes"], "corruptions": ["contrast", "fog"], "severity": 4, "seed": 7},
             methods=[{"name": "wemoe", "params": {"steps": 1, "router_depth": 0, "routing_stats_batches": 0,
                                                    "implementation": "stacked"}}])
    cfg = validate_config(d)
    out = run_sweep(cfg, quiet=True)
    assert not out.failed, [r.error for r in out.failed]
    work = Path(cfg.resolved_output_dir()) / "work" / out.results[0].key
    config, meta = wemoe.read_wemoe_meta(work / wemoe.MODEL_FILE)
    assert meta["adapted_on"] == {"split": "test", "corruption": None}
    assert config["implementation"] == "stacked"
    for c in ("contrast", "fog"):
        _, meta = wemoe.read_wemoe_meta(work / f"corrupted-{c}" / wemoe.MODEL_FILE)
        assert meta["adapted_on"] == {"split": "test", "corruption": c, "severity": 4, "corruption_seed": 7}


def test_a_checkpoint_write_that_fails_leaves_the_last_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    """A write that fails midway (a full disk, a kill) leaves the previous checkpoint whole and
    nothing beside it, requeue after requeue."""
    from methods import tta

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([w], lr=0.1)
    path = tta.checkpoint_path(tmp_path, "wemoe")
    tta._save_checkpoint(path, {"w": w}, 1, opt, [0.5])
    real_write = Path.write_bytes

    def half_write(self, data):  # the disk fills after the first bytes of the temporary file
        real_write(self, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_write)
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        tta._save_checkpoint(path, {"w": w}, 2, opt, [0.5, 0.4])
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    step, losses, _, _ = tta._load_checkpoint(path, {"w": w}, opt)
    assert step == 1 and losses == [0.5] and torch.equal(w.detach(), torch.ones(3))


def test_a_damaged_adaptation_checkpoint_is_named_and_adaptation_starts_over(models, tmp_path, caplog):
    """A checkpoint cut short (a disk that filled, a copy interrupted) or edited by hand is not a
    failed job on every rerun: one warning names it, and the adaptation runs from the start, to
    the uninterrupted run's losses. A killed write's temporary file beside it is removed."""
    from methods.tta import checkpoint_path

    pre, ft = models
    kwargs = dict(lr=1e-2, router_depth=1, checkpoint_every=1, routing_stats_batches=0)
    full = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2))
    wemoe.WeMoE(steps=3, **kwargs).merge(pre, ft, full)

    wemoe.WeMoE(steps=2, **kwargs).merge(pre, ft, MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2),
                                                              workdir=str(tmp_path)))
    path = checkpoint_path(tmp_path, "wemoe")
    (tmp_path / wemoe.MODEL_FILE).unlink()  # the steps=2 run's adapted model: not this job's anyway
    data = path.read_bytes()
    stale = tmp_path / f".{path.name}.x1y2z3.tmp"
    stale.write_bytes(data[:100])  # what a write killed before its rename leaves
    for damaged in (data[: len(data) // 2], b"garbage"):
        path.write_bytes(damaged)
        caplog.clear()
        ctx = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2), workdir=str(tmp_path))
        with caplog.at_level("WARNING", logger="harness"):
            wemoe.WeMoE(steps=3, **kwargs).merge(pre, ft, ctx)
        assert ctx.artifacts["tta_loss"] == full.artifacts["tta_loss"]
        assert any(str(path) in r.getMessage() and "from the start" in r.getMessage() for r in caplog.records)
        (tmp_path / wemoe.MODEL_FILE).unlink()
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_zero_steps_keeps_the_routers_at_init_and_saves_them(models, tmp_path):
    """``steps: 0`` ("routers stay at init") is a WeMoE at its initial routing, saved as any job's."""
    pre, ft = models
    ctx = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(), workdir=str(tmp_path), seed=3)
    merged = wemoe.WeMoE(steps=0, routing="softmax", routing_stats_batches=1).merge(pre, ft, ctx)
    fresh = wemoe.build_wemoe(pre, ft, routing="softmax", seed=3)
    a, b = router_state(merged), router_state(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (ctx.artifacts["tta_loss"], ctx.artifacts["tta_parts"], ctx.artifacts["tta_validation"]) == ([], {}, [])
    loaded = wemoe.load_wemoe(tmp_path / wemoe.MODEL_FILE, pre, ft)
    x = images(3, 7)
    with torch.no_grad():
        assert torch.equal(loaded(x), fresh(x))


def test_clamped_routing_from_above_one_is_refused_as_it_never_learns(models):
    """Clamped routers started above 1 get no gradient (measured here), so the setting is refused."""
    pre, ft = models
    model = wemoe.build_wemoe(pre, ft, init_lambda=1.5, router_depth=2, routing="clamp")
    model(images(4, 5)).pow(2).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    with pytest.raises(ValueError, match=r"init_lambda 1.5 > 1 with routing: clamp never learns"):
        wemoe.WeMoE(init_lambda=1.5, routing="clamp")
    assert wemoe.WeMoE(init_lambda=1.0, routing="clamp").init_lambda == 1.0
    assert wemoe.WeMoE(init_lambda=1.5, routing="softmax").init_lambda == 1.5


def test_load_with_a_pretrained_model_of_another_architecture_names_the_file_and_that_model(models, tmp_path):
    """A pretrained model of another architecture is the model that differs: the error names the
    router file and it, not a fine-tuned checkpoint as a failed build would."""
    from harness.models import build_clip

    pre, ft = models
    path = tmp_path / "routers.safetensors"
    wemoe.save_wemoe(wemoe.build_wemoe(pre, ft, router_depth=1), path)
    wider = build_clip("harness-tiny-vit").visual
    with pytest.raises(ValueError, match=r"routers\.safetensors: the pretrained model differ") as err:
        wemoe.load_wemoe(path, wider, ft)
    assert "fine-tuned" not in str(err.value)
    with pytest.raises(ValueError, match=r"routers\.safetensors: the fine-tuned model of 'a' differ") as err:
        wemoe.load_wemoe(path, pre, {**ft, "a": wider})
    assert "the pretrained model" not in str(err.value)


def test_loading_a_folder_names_it_and_the_file_expected(tmp_path):
    """A job's work folder given instead of its router file said "No such device (os error 19)"."""
    with pytest.raises(ValueError) as err:
        wemoe.load_wemoe(tmp_path, None, {})
    assert str(err.value) == (f"{tmp_path}: is a folder; expected a WeMoE router file, the wemoe.safetensors a "
                              "WeMoE job saves in <output_dir>/work/<job key>/")
    assert wemoe.MODEL_FILE == "wemoe.safetensors"


def test_a_saved_adaptation_of_another_architecture_is_adapted_again(models, tmp_path, monkeypatch):
    """The same tensors under another architecture (QuickGELU instead of GELU: the digests of the
    models are equal) are another function: routers adapted through one are not the other's."""
    pre, ft = models
    method = wemoe.WeMoE(steps=2, lr=1e-2, checkpoint_every=0, router_depth=1, routing_stats_batches=0)

    def ctx(arch: str) -> MergeContext:
        return MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2), workdir=str(tmp_path / "job"),
                            adapted_on=FOG, sources={"arch": arch, "pretrained": "p.safetensors"})

    method.merge(pre, ft, ctx("harness-micro-vit"))
    real, calls = wemoe.run_tta, []
    monkeypatch.setattr(wemoe, "run_tta", lambda *a, **k: calls.append(1) or real(*a, **k))
    method.merge(pre, ft, ctx("harness-micro-vit"))
    assert calls == []
    method.merge(pre, ft, ctx("harness-micro-vit-quickgelu"))
    assert calls == [1]


@pytest.mark.parametrize("seed", [0, 5])
def test_router_weights_are_drawn_from_the_sweeps_seed(models, seed):
    """Every router's weights are the normal(0, 0.01) draws of one generator seeded with the job's
    seed, in block order: a sweep's seeds give different starting routers, and one seed the same."""
    pre, ft = models
    merged = wemoe.WeMoE(steps=0, router_depth=2, routing_stats_batches=0).merge(
        pre, ft, MergeContext(heads=heads(), unlabeled=fixed_unlabeled(), seed=seed))
    g = torch.Generator().manual_seed(seed)
    for m in wemoe.moe_layers(merged):
        for lin in (m.router.net[0], m.router.net[2]):
            expected = torch.empty(lin.weight.shape).normal_(0.0, 0.01, generator=g)
            assert torch.equal(lin.weight.detach(), expected)


@pytest.mark.parametrize("batch_reduce", [False, True])
def test_batch_dependent_says_whether_an_image_scores_differently_beside_others(models, batch_reduce):
    """Measured: with ``batch_reduce`` an image's features change with the images beside it in its
    batch (its job keys must then hold the evaluation batch size); without, they do not."""
    pre, ft = models
    method = wemoe.WeMoE(steps=0, router_depth=1, batch_reduce=batch_reduce, routing_stats_batches=0)
    model = method.merge(pre, ft, MergeContext(heads=heads(), unlabeled=fixed_unlabeled()))
    randomize_routers(model, seed=2)
    x = images(4, 11)
    with torch.no_grad():
        alone, beside = model(x[:1]), model(x)[:1]
    assert method.batch_dependent() == (rel_err(alone, beside) > 1e-4)


def test_a_validation_at_the_checkpointed_step_is_kept_on_resume(models, tmp_path):
    """Checkpoint and validation at the same step (2): a run killed later resumes from step 2 and
    its history still holds the validation of step 2, as the uninterrupted run's does."""
    pre, ft = models
    method = wemoe.WeMoE(steps=4, lr=1e-2, checkpoint_every=2, eval_every=2, router_depth=1, routing_stats_batches=0)
    # validations at steps 0, 2, 4: killed at 4, checkpointed at 2
    full_ctx, _, resumed_ctx, _ = run_killed_and_resumed(method, pre, ft, tmp_path)
    assert [row["step"] for row in full_ctx.artifacts["tta_validation"]] == [0, 2, 4]
    assert resumed_ctx.artifacts["tta_validation"] == full_ctx.artifacts["tta_validation"]


def test_adaptation_runs_in_eval_mode_and_gives_the_model_back_in_its_mode(models):
    """Adaptation forwards run in eval mode (no dropout, fixed statistics); a model handed over in
    train mode is handed back in train mode, every submodule included."""
    pre, ft = models
    model = wemoe.build_wemoe(pre, ft, router_depth=1).train()
    seen = []
    layer = wemoe.moe_layers(model)[0]
    layer.register_forward_hook(lambda m, args, out: seen.append(m.training))
    run_tta(model, MergeContext(heads=heads(), unlabeled=fixed_unlabeled()), lr=1e-2, steps=1)
    assert seen == [False] * len(TASKS)
    assert all(m.training for m in model.modules())


def test_an_adaptation_checkpoint_whose_tensors_have_other_shapes_is_refused(models, tmp_path):
    """A checkpoint with the same tensor names but other shapes (a broadcastable [1] for a router's
    [3]) is refused, naming the file, rather than broadcast into the routers and resumed."""
    from methods.tta import checkpoint_path

    pre, ft = models
    kwargs = dict(lr=1e-2, router_depth=0, checkpoint_every=1, routing_stats_batches=0)
    wemoe.WeMoE(steps=2, **kwargs).merge(pre, ft, MergeContext(heads=heads(), unlabeled=fixed_unlabeled(),
                                                              workdir=str(tmp_path)))
    path = checkpoint_path(tmp_path, "wemoe")
    state = torch.load(path, weights_only=True)
    state["params"] = {k: v[:1].clone() for k, v in state["params"].items()}
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"wemoe-tta\.pt: checkpoint does not match the model's trainable parameters"):
        wemoe.WeMoE(steps=4, **kwargs).merge(pre, ft, MergeContext(heads=heads(), unlabeled=fixed_unlabeled(),
                                                                  workdir=str(tmp_path)))


def test_routing_statistics_report_negative_raw_weights_as_they_are(models):
    """Raw routing (the paper's) is unbounded: a router that gives an expert -0.4 is reported as
    giving it -0.4, and identification picks the largest weight, not the largest magnitude."""
    const = torch.tensor([-0.4, 0.3, 1.2])
    moe = constant_routers(models, [const, const])
    routing, task_id = wemoe.routing_statistics(moe, MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2)), 2)
    for t in TASKS:
        torch.testing.assert_close(torch.tensor(routing["mean_weight"][t], dtype=torch.float64), const.double().expand(2, 3))
    assert task_id["per_task"] == {"a": [0.0, 0.0], "b": [0.0, 0.0], "c": [1.0, 1.0]}


@pytest.mark.parametrize("size", [2, 3])
def test_an_image_scores_alike_alone_and_in_a_small_batch(models, size):
    """Per-sample routing: each image of a batch of two or three gets the features it gets alone
    (a batch of one takes the merged-weight path, larger ones the per-sample kernels)."""
    pre, ft = models
    moe = wemoe.build_wemoe(pre, ft, router_depth=2, routing="raw")
    randomize_routers(moe, seed=4)
    x = images(size, 12)
    with torch.no_grad():
        alone = torch.cat([moe(x[i : i + 1]) for i in range(size)])
        assert rel_err(moe(x), alone) <= 1e-5


@pytest.mark.parametrize(("routing", "const", "weights"), [
    ("softmax", [0.0, math.log(2.0), math.log(5.0)], [0.9 / 8, 0.9 * 2 / 8, 0.9 * 5 / 8]),
    ("clamp", [-0.4, 0.3, 1.2], [0.0, 0.3, 1.0]),
])
def test_routing_statistics_report_the_weights_after_the_routing_transform(models, routing, const, weights):
    """The statistics are of the weights the MLPs mix with, not of the router logits: softmax
    routing (scale init_lambda x 3 = 0.9) gives 0.9 x softmax(logits), clamped routing the
    logits cut to [0, 1]."""
    pre, ft = models
    moe = wemoe.build_wemoe(pre, ft, router_depth=0, routing=routing, init_lambda=0.3)
    with torch.no_grad():
        for m in wemoe.moe_layers(moe):
            m.router.const.copy_(torch.tensor(const))
    routing_stats, task_id = wemoe.routing_statistics(moe, MergeContext(heads=heads(), unlabeled=fixed_unlabeled(2)), 2)
    for t in TASKS:
        torch.testing.assert_close(torch.tensor(routing_stats["mean_weight"][t], dtype=torch.float64),
                                   torch.tensor(weights, dtype=torch.float64).expand(2, 3), rtol=1e-6, atol=1e-7)
    assert task_id["per_task"] == {"a": [0.0, 0.0], "b": [0.0, 0.0], "c": [1.0, 1.0]}


def test_a_saved_router_file_without_an_adaptation_record_is_adapted_again(models, tmp_path):
    """A router file in the workdir whose meta matches the job but records no adaptation (its
    loss history) is not a finished adaptation: the job adapts again instead of failing on it."""
    pre, ft = models
    method = wemoe.WeMoE(steps=3, lr=1e-2, checkpoint_every=0, router_depth=1, routing_stats_batches=0)
    model = method.merge(pre, ft, MergeContext(heads=heads(), unlabeled=fixed_unlabeled(), workdir=str(tmp_path)))
    path = tmp_path / wemoe.MODEL_FILE
    _, meta = wemoe.read_wemoe_meta(path)
    del meta["adaptation"]
    wemoe.save_wemoe(model, path, meta)
    again = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(), workdir=str(tmp_path))
    method.merge(pre, ft, again)
    assert len(again.artifacts["tta_loss"]) == 3
    assert "adaptation" in wemoe.read_wemoe_meta(path)[1]
