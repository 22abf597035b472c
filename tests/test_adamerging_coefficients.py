"""AdaMerging's coefficients against merges written out by hand: each coefficient scales its
own task's vector whatever the tasks' order, and the merge stays float32 under autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import methods.adamerging as adamerging
from methods.base import MergeContext


class Tiny(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.register_buffer("b", torch.tensor(b))

    def forward(self, x):
        return x * self.w + self.b


def unsorted_tasks():
    """Tasks named out of alphabetical order: 'z' before 'a'. tau_z = (2, 0), (1,);
    tau_a = (0, 4), (-2,)."""
    pre = Tiny([1.0, 1.0], [0.0])
    return pre, {"z": Tiny([3.0, 1.0], [1.0]), "a": Tiny([1.0, 5.0], [-2.0])}


def test_task_coefficients_scale_their_own_task_in_the_given_order():
    """coef = (0.5, 0.25) for (z, a): w = 1 + 0.5 * (2, 0) + 0.25 * (0, 4) = (2, 2),
    b = 0.5 * 1 + 0.25 * -2 = 0 (by hand)."""
    pre, ft = unsorted_tasks()
    enc = adamerging.AdaMergedEncoder(pre, ft, granularity="task", clamp=False)
    assert enc.tasks == ["z", "a"]
    with torch.no_grad():
        enc.coef.copy_(torch.tensor([0.5, 0.25]))
    out = enc.export()
    assert out.w.tolist() == [2.0, 2.0] and out.b.tolist() == [0.0]


def test_layer_coefficients_scale_their_own_task_and_tensor_in_the_given_order():
    """Rows are tasks (z, a), columns tensors (w, b): w = 1 + 0.5 * (2, 0) + 0.75 * (0, 4) =
    (2, 4), b = 0.25 * 1 + 1.0 * -2 = -1.75 (by hand)."""
    pre, ft = unsorted_tasks()
    enc = adamerging.AdaMergedEncoder(pre, ft, granularity="layer")
    assert enc.names == ["w", "b"]
    with torch.no_grad():
        enc.coef.copy_(torch.tensor([[0.5, 0.25], [0.75, 1.0]]))
    out = enc.export()
    assert out.w.tolist() == [2.0, 4.0] and out.b.tolist() == [-1.75]


def test_the_report_pairs_each_task_with_its_coefficient():
    """steps = 0 with tasks out of order: the report lists them as given, each at init_lambda,
    and the merge is theta_0 + 0.5 * (tau_z + tau_a) = (2, 3), (-0.5,) (by hand)."""
    pre, ft = unsorted_tasks()
    ctx = MergeContext(heads={"z": torch.ones(2, 2), "a": torch.ones(2, 2)})
    out = adamerging.AdaMerging(steps=0, init_lambda=0.5).merge(pre, ft, ctx)
    report = ctx.artifacts["adamerging_coefficients"]
    assert report["tasks"] == ["z", "a"] and report["values"] == [0.5, 0.5]
    assert out.w.tolist() == [2.0, 3.0] and out.b.tolist() == [-0.5]


def test_the_merge_under_an_enclosing_autocast_is_float32(monkeypatch):
    """Only the encoder's forward follows an enclosing autocast: the merged weights it is given
    are theta_0 + lambda * tau in float32 (lambda = 0.3 below, by hand), not a bfloat16 product
    (0.3 * 1.001 rounds to 0.30078125 in bfloat16)."""
    pre = Tiny([1.0, -2.0], [0.5])
    ft = {"t": Tiny([2.001, -1.0], [1.5])}
    enc = adamerging.AdaMergedEncoder(pre, ft, granularity="task", init_lambda=0.3)
    seen = {}
    call = adamerging.functional_call
    monkeypatch.setattr(adamerging, "functional_call",
                        lambda module, state, args: (seen.update(state), call(module, state, args))[1])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        enc(torch.ones(1, 2))
    tau_w = torch.tensor([2.001]) - torch.tensor([1.0])
    expected_w = torch.stack([torch.tensor(1.0) + torch.tensor(0.3) * tau_w[0], torch.tensor(-2.0 + 0.3)])
    assert seen["w"].dtype == seen["b"].dtype == torch.float32
    torch.testing.assert_close(seen["w"], expected_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["b"], torch.tensor([0.8]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_coefficients_start_at_init_lambda_for_every_task_and_tensor(granularity):
    """Every coefficient starts at init_lambda (0.3 by default, the paper's)."""
    pre, ft = unsorted_tasks()
    enc = adamerging.AdaMergedEncoder(pre, ft, granularity=granularity)
    assert torch.equal(enc.coefficients(), torch.full((2, 2), 0.3))
    enc = adamerging.AdaMergedEncoder(pre, ft, granularity=granularity, init_lambda=0.55)
    assert torch.equal(enc.coefficients(), torch.full((2, 2), 0.55))


def test_a_half_model_is_merged_with_one_rounding():
    """Half weights: theta_0 = 3, theta_t = 2048, coefficient 0.7: 3 + 0.7 * 2045 = 1434.5 in
    float32, 1434 in half (even). The update rounded to half first (1431.5 -> 1432) and then added
    (1435) is a step off."""
    pre, ft = Tiny([3.0], [0.0]).half(), {"a": Tiny([2048.0], [0.0]).half()}
    enc = adamerging.AdaMergedEncoder(pre, ft, granularity="task", clamp=False)
    with torch.no_grad():
        enc.coef.copy_(torch.tensor([0.7]))
    out = enc.export()
    assert out.w.dtype == torch.float16 and out.w.tolist() == [1434.0]
