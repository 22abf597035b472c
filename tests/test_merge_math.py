"""Weight averaging and task arithmetic against hand-computed results on a tiny model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.base import MergeContext, check_same_keys, float_state, task_vectors
from methods.task_arithmetic import TaskArithmetic
from methods.weight_averaging import WeightAveraging


def tiny(w, b) -> nn.Module:
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(w, dtype=torch.float32))
        m.bias.copy_(torch.tensor(b, dtype=torch.float32))
    return m


@pytest.fixture
def models():
    pre = tiny([[1.0, 2.0], [3.0, 4.0]], [0.0, 1.0])
    ft = {
        "a": tiny([[2.0, 2.0], [3.0, 0.0]], [1.0, 1.0]),   # tau_a = [[1,0],[0,-4]], [1,0]
        "b": tiny([[1.0, 5.0], [1.0, 4.0]], [0.0, -1.0]),  # tau_b = [[0,3],[-2,0]], [0,-2]
    }
    return pre, ft


def test_weight_averaging_by_hand(models):
    pre, ft = models
    out = WeightAveraging().merge(pre, ft, MergeContext())
    assert torch.equal(out.weight, torch.tensor([[1.5, 3.5], [2.0, 2.0]]))
    assert torch.equal(out.bias, torch.tensor([0.5, 0.0]))
    assert torch.equal(pre.weight, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # input untouched


def test_weight_averaging_of_no_models_is_refused_not_nan(models):
    pre, _ = models
    with pytest.raises(ValueError, match="at least one fine-tuned model"):
        WeightAveraging().merge(pre, {}, MergeContext())


def test_task_arithmetic_by_hand(models):
    pre, ft = models
    out = TaskArithmetic(scaling=0.5).merge(pre, ft, MergeContext())
    # theta0 + 0.5 * (tau_a + tau_b) = [[1,2],[3,4]] + 0.5*[[1,3],[-2,-4]]
    assert torch.allclose(out.weight, torch.tensor([[1.5, 3.5], [2.0, 2.0]]))
    assert torch.allclose(out.bias, torch.tensor([0.5, 0.0]))
    zero = TaskArithmetic(scaling=0.0).merge(pre, ft, MergeContext())
    assert torch.equal(zero.weight, pre.weight)
    one = TaskArithmetic(scaling=1.0).merge(pre, ft, MergeContext())
    assert torch.allclose(one.weight, torch.tensor([[2.0, 5.0], [1.0, 0.0]]))


def test_task_arithmetic_adds_a_tied_tensor_once():
    def tied(w: float) -> nn.Module:
        m = nn.Module()
        m.a = nn.Parameter(torch.full((2,), w))
        m.b = m.a
        return m

    out = TaskArithmetic(scaling=0.5).merge(tied(1.0), {"x": tied(3.0), "y": tied(2.0)}, MergeContext())
    assert out.a is out.b and torch.equal(out.a.detach(), torch.full((2,), 2.5))  # 1 + 0.5 * (2 + 1)


def test_task_vectors_and_shape_checks(models):
    pre, ft = models
    taus = task_vectors(pre, ft)
    assert torch.equal(taus["b"]["bias"], torch.tensor([0.0, -2.0]))
    other = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"tensor 'weight' has shape \(2, 3\), pretrained has \(2, 2\)"):
        check_same_keys(float_state(pre), float_state(other), "c")
    # which tensors the checkpoint lacks and which it has too many, each under its own word
    with pytest.raises(ValueError, match=r"^checkpoint 'd' does not match the pretrained model: "
                                         r"missing \['bias'\], unexpected \[\]$"):
        check_same_keys(float_state(pre), {"weight": pre.weight.detach()}, "d")
    with pytest.raises(ValueError, match=r"^checkpoint 'e' does not match the pretrained model: "
                                         r"missing \[\], unexpected \['extra'\]$"):
        check_same_keys(float_state(pre), {**float_state(pre), "extra": torch.zeros(1)}, "e")


def test_hyperparameters_are_validated():
    with pytest.raises(Exception, match="greater than or equal to 0"):
        TaskArithmetic(scaling=-0.1)
    with pytest.raises(Exception, match="Extra inputs are not permitted"):
        TaskArithmetic(lam=0.3)
    (hp,) = TaskArithmetic.hyperparameters()
    assert (hp["name"], hp["type"], hp["default"], hp["range"]) == ("scaling", "float", 0.3, "[0.0, 10.0]")


def test_the_methods_declared_unseeded_return_the_same_merge_at_any_seed():
    """Weight averaging, task arithmetic and TIES declare ``seeded = False``, so their job keys
    leave the sweep's seed out: their merges must not change with it (the global generator and
    ``ctx.seed`` both reseeded, on random models large enough for TIES's trimming to matter)."""
    from methods.base import available_methods
    from methods.ties import TiesMerging

    def random(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))

    pre, ft = random(0), {t: random(i + 1) for i, t in enumerate("abc")}
    unseeded = {name for name, cls in available_methods().items()
                if not cls.key_holds_seed() and cls.__module__.startswith("methods.")}
    assert unseeded == {"weight_averaging", "task_arithmetic", "ties", "adamerging"}  # AdaMerging: test_adamerging.py
    for method in (WeightAveraging(), TaskArithmetic(scaling=0.4), TiesMerging(k=30.0, scaling=1.2)):
        merges = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            merges.append(method.merge(pre, ft, MergeContext(seed=seed)).state_dict())
        assert all(torch.equal(merges[0][k], merges[1][k]) for k in merges[0]), type(method).__name__


def test_task_arithmetic_on_a_half_model_accumulates_in_float32_and_casts_once():
    """2048 + 0.375 * (2 + 2) = 2049.5 in float32, which rounds to 2050 in half precision;
    adding 0.75 twice into a half tensor would round each time and stay at 2048."""
    def half(w: float) -> nn.Module:
        m = nn.Linear(1, 1, bias=False).half()
        with torch.no_grad():
            m.weight.fill_(w)
        return m

    out = TaskArithmetic(scaling=0.375).merge(half(2048.0), {"a": half(2050.0), "b": half(2050.0)}, MergeContext())
    assert out.weight.dtype == torch.float16
    assert out.weight.item() == 2050.0


def test_integer_buffers_are_kept_from_the_pretrained_model_not_merged():
    """Only floating-point tensors are merged; an integer buffer (a counter, position ids)
    stays the pretrained model's, while the float weights are merged as usual."""
    from methods.ties import TiesMerging

    def counted(w, b, count: int) -> nn.Module:
        m = tiny(w, b)
        m.register_buffer("count", torch.tensor([count], dtype=torch.long))
        return m

    pre = counted([[1.0, 2.0], [3.0, 4.0]], [0.0, 1.0], 1)
    ft = {"a": counted([[2.0, 2.0], [3.0, 0.0]], [1.0, 1.0], 3),
          "b": counted([[1.0, 5.0], [1.0, 4.0]], [0.0, -1.0], 6)}
    for method in (WeightAveraging(), TaskArithmetic(scaling=0.5), TiesMerging(k=100, scaling=1.0)):
        out = method.merge(pre, ft, MergeContext())
        assert torch.equal(out.count, torch.tensor([1])), type(method).__name__
        assert out.count.dtype == torch.long
    # the float part is merged all the same: weight averaging by hand
    assert torch.equal(WeightAveraging().merge(pre, ft, MergeContext()).bias, torch.tensor([0.5, 0.0]))


def test_hyperparameter_rows_show_open_and_closed_bounds_as_written():
    """``harness list`` rows: ``[`` / ``]`` for ge / le, ``(`` / ``)`` for gt / lt, infinity where
    a side is unbounded, and a Literal's choices as its type."""
    from typing import Literal

    from pydantic import Field

    from methods import MergeMethod

    class Bounds(MergeMethod):
        closed: float = Field(0.5, ge=0.0, le=1.0)
        open_: float = Field(0.5, gt=0.0, lt=1.0)
        low: int = Field(3, gt=2)
        high: float = Field(0.0, le=4.0)
        free: float = 1.0
        mode: Literal["a", "b"] = "a"

    rows = {r["name"]: (r["type"], r["default"], r["range"]) for r in Bounds.hyperparameters()}
    assert rows == {"closed": ("float", 0.5, "[0.0, 1.0]"), "open_": ("float", 0.5, "(0.0, 1.0)"),
                    "low": ("int", 3, "(2, inf)"), "high": ("float", 0.0, "(-inf, 4.0]"),
                    "free": ("float", 1.0, ""), "mode": ("a|b", "a", "")}


def test_a_default_outside_its_own_bounds_is_refused_like_a_given_value():
    """Defaults are validated as given values are: a method whose default breaks its own bound
    (or is a bool for a number) fails when built with it, not in a job with a silently wrong setting."""
    from pydantic import Field, ValidationError

    from methods import MergeMethod

    class OutOfRange(MergeMethod):
        strength: float = Field(2.0, ge=0.0, le=1.0)

    class BoolForNumber(MergeMethod):
        steps: int = True

    with pytest.raises(ValidationError, match="less than or equal to 1"):
        OutOfRange()
    assert OutOfRange(strength=0.5).strength == 0.5
    with pytest.raises(ValidationError, match=r"(?m)^steps\n  Value error, expects a number, not the boolean true"):
        BoolForNumber()


def test_weight_averaging_of_half_models_sums_in_float32_and_casts_once():
    """(2048 + 2050 + 2050) / 3 = 2049.33 in float32, which rounds to 2050 in half precision;
    summing into a half tensor rounds 4098 to 4096 on the way and ends at 2048."""
    def half(w: float) -> nn.Module:
        m = nn.Linear(1, 1, bias=False).half()
        with torch.no_grad():
            m.weight.fill_(w)
        return m

    out = WeightAveraging().merge(half(0.0), {"a": half(2048.0), "b": half(2050.0), "c": half(2050.0)},
                                  MergeContext())
    assert out.weight.dtype == torch.float16
    assert out.weight.item() == 2050.0


def test_a_checkpoint_with_tensors_the_pretrained_model_has_not_is_refused_by_every_merge(models):
    """A fine-tuned model with an extra tensor (another architecture's) is named, with the tensor,
    as a missing one is, by the check and by each merge, instead of merging its other tensors."""
    pre, ft = models
    base = float_state(pre)
    with pytest.raises(ValueError, match=r"^checkpoint 'e' does not match the pretrained model: missing \[\], "
                                         r"unexpected \['scale'\]$"):
        check_same_keys(base, {**base, "scale": torch.ones(1)}, "e")
    with pytest.raises(ValueError, match=r"missing \['bias'\], unexpected \[\]$"):
        check_same_keys(base, {"weight": base["weight"]}, "d")
    wider = tiny([[2.0, 2.0], [3.0, 0.0]], [1.0, 1.0])
    wider.register_buffer("scale", torch.ones(1))
    from methods.adamerging import AdaMerging
    from methods.ties import TiesMerging

    for merge in (WeightAveraging(), TaskArithmetic(), TiesMerging(), AdaMerging(steps=0)):
        with pytest.raises(ValueError, match=r"checkpoint 'b'.*unexpected \['scale'\]"):
            merge.merge(pre, {"a": ft["a"], "b": wider}, MergeContext())


def test_task_arithmetic_on_a_mixed_precision_model_accumulates_its_half_tensors_in_float32():
    """One half tensor is enough to take the float32-accumulating path: 2048 + 0.375 * (2 + 2)
    = 2049.5 rounds to 2050 in half precision, where adding 0.75 twice into the half tensor
    rounds each time and stays at 2048. The float32 tensor is merged as usual (1 + 0.375 * 4)."""
    def mixed(w: float, b: float) -> nn.Module:
        m = nn.Module()
        m.w = nn.Parameter(torch.tensor([w], dtype=torch.float16))
        m.b = nn.Parameter(torch.tensor([b], dtype=torch.float32))
        return m

    out = TaskArithmetic(scaling=0.375).merge(mixed(2048.0, 1.0), {"a": mixed(2050.0, 3.0), "b": mixed(2050.0, 3.0)},
                                              MergeContext())
    assert (out.w.dtype, out.b.dtype) == (torch.float16, torch.float32)
    assert out.w.item() == 2050.0 and out.b.item() == 2.5


def test_a_transposed_checkpoint_is_refused_though_its_entry_count_matches(models):
    """A (3, 2) tensor where the pretrained one is (2, 3) has the same number of entries: a
    flattening merge (TIES) would pair entries of different weights, so the shape is refused."""
    pre = nn.Linear(3, 2)
    transposed = nn.Linear(2, 3, bias=False)
    transposed.bias = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"tensor 'weight' has shape \(3, 2\), pretrained has \(2, 3\)"):
        check_same_keys(float_state(pre), float_state(transposed), "t")
    from methods.ties import TiesMerging

    for merge in (WeightAveraging(), TaskArithmetic(), TiesMerging()):
        with pytest.raises(ValueError, match=r"shape \(3, 2\)"):
            merge.merge(pre, {"t": transposed}, MergeContext())


def test_half_task_vectors_are_differences_in_float32():
    """4096 - 1 = 4095 needs 12 significant bits: in half it rounds to 4096, so a task vector of
    half weights is taken in float32 (as task arithmetic and TIES accumulate)."""
    pre, ft = nn.Linear(1, 1, bias=False).half(), nn.Linear(1, 1, bias=False).half()
    with torch.no_grad():
        pre.weight.fill_(1.0)
        ft.weight.fill_(4096.0)
    tau = task_vectors(pre, {"a": ft})["a"]["weight"]
    assert tau.dtype == torch.float32 and tau.item() == 4095.0


def test_half_task_arithmetic_is_rounded_to_half_once():
    """theta_0 = 1, theta_t = 4096 (half), lambda 0.001: 1 + 0.001 * 4095 = 5.095 in float32,
    5.09375 in half; a task vector rounded to half first (4096) gives 5.096 -> 5.09766."""
    pre, ft = nn.Linear(1, 1, bias=False).half(), nn.Linear(1, 1, bias=False).half()
    with torch.no_grad():
        pre.weight.fill_(1.0)
        ft.weight.fill_(4096.0)
    merged = TaskArithmetic(scaling=0.001).merge(pre, {"a": ft}, MergeContext())
    assert merged.weight.dtype == torch.float16
    assert merged.weight.item() == torch.tensor(1 + 0.001 * 4095, dtype=torch.float32).half().item() == 5.09375


def test_a_method_instance_is_one_setting_its_hyperparameters_cannot_be_reassigned():
    """A job key is taken from the instance's hyperparameters: reassigning one afterwards would merge
    with a setting its key does not name, so an instance refuses assignment and keeps its value."""
    from pydantic import ValidationError

    from methods.ties import TiesMerging

    for method, name, value in ((TaskArithmetic(scaling=0.5), "scaling", 0.9), (TiesMerging(k=30.0), "k", 50.0)):
        before = method.key_params()
        with pytest.raises(ValidationError, match="frozen"):
            setattr(method, name, value)
        assert method.key_params() == before


def test_an_import_path_to_something_not_a_merge_method_is_refused_by_name():
    """``module:Object`` naming a function or a class that is no MergeMethod is refused when
    resolved, with the name, instead of being taken for a method class a job would build."""
    from methods.base import resolve_method

    assert resolve_method("methods.task_arithmetic:TaskArithmetic") is TaskArithmetic
    for name in ("methods.base:float_state", "methods.base:MergeContext"):
        with pytest.raises(KeyError, match=f"'{name}' is not a MergeMethod subclass"):
            resolve_method(name)
