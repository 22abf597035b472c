"""TIES-merging: hand-computed cases, the streaming implementation against the dense
reference, exact thresholds, and the method end to end on a micro ViT."""

from __future__ import annotations

import copy
import re

import pydantic
import pytest
import torch

import methods.ties as ties
from methods.base import MergeContext, float_state, task_vectors
from methods.ties import TiesMerging, keep_count, ties_merge_dense, ties_merge_streaming, trim_thresholds

torch.set_num_threads(1)


def tv(**tensors) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}


# Streaming variants that exercise every selection path: sampled bracket, no sample
# (histograms from the full range), a tiny sample that usually misses; and chunk borders.
STREAMING = [
    dict(),
    dict(sample_size=0, chunk_size=64),
    dict(sample_size=3, chunk_size=37),
]
TINY = STREAMING + [dict(sample_size=2, chunk_size=1)]


def both(task_vecs, k, merge_function, trim_scope="model"):
    yield "dense", ties_merge_dense(task_vecs, k, merge_function, trim_scope)
    for options in TINY if sum(v.numel() for v in task_vecs[0].values()) < 100 else STREAMING:
        yield f"streaming{options}", ties_merge_streaming(task_vecs, k, merge_function, trim_scope=trim_scope,
                                                          **options)


def assert_close(result: dict, expected: dict, atol: float = 1e-6) -> None:
    assert result.keys() == expected.keys()
    for key in expected:
        assert result[key].shape == expected[key].shape, key
        assert torch.allclose(result[key], expected[key], rtol=0, atol=atol), (key, result[key], expected[key])


# ---------------------------------------------------------------------------------------
# Hand-computed cases.

# P = 7 entries over two tensors, k = 50 -> keep floor(3.5) = 3 per task.
HAND_TASKS = [
    # |.| sorted: 5 4 3 2 1 0 0 -> threshold 3 -> keeps 5, 3, -4
    tv(a=[[5, -1], [0, 3]], b=[-4, 2, 0]),
    # |.| sorted: 9 6 2 2 2 2 0 -> threshold 2, tied four times -> keeps six entries
    tv(a=[[-2, -6], [2, 2]], b=[2, -9, 0]),
    # all negative; |.| sorted: 8 7 3 2 1 1 1 -> threshold 3 -> keeps -3, -7, -8
    tv(a=[[-3, -1], [-7, -1]], b=[-1, -8, -2]),
]
# Trimmed (t1, t2, t3) per entry, mass, elected sign, kept values:
#   a00 ( 5, -2, -3) mass  0 -> model-wide vote decides (below: -1) -> -2, -3
#   a01 ( 0, -6,  0) mass -6 -> -6
#   a10 ( 0,  2, -7) mass -5 -> -7            (task 2 dropped by the election)
#   a11 ( 3,  2,  0) mass  5 -> 3, 2
#   b0  (-4,  2,  0) mass -2 -> -4            (task 2 dropped)
#   b1  ( 0, -9, -8) mass -17 -> -9, -8
#   b2  ( 0,  0,  0) -> nothing kept -> 0
# Vote: signs (0, -, -, +, -, -, 0) sum to -3 -> a00 elects negative.
HAND_MEAN = tv(a=[[-2.5, -6], [-7, 2.5]], b=[-4, -8.5, 0])
HAND_SUM = tv(a=[[-5, -6], [-7, 5]], b=[-4, -17, 0])


def test_keep_count():
    assert keep_count(7, 50) == 3
    assert keep_count(10, 20) == 2
    assert keep_count(10, 100) == 10
    assert keep_count(10, 0.01) == 1  # at least one entry
    for k in (0, -5, 100.5, 101):  # k is a percentage in (0, 100]
        with pytest.raises(ValueError, match=re.escape(f"k must be in (0, 100], got {k}")):
            keep_count(10, k)


def test_hand_thresholds():
    assert ties.trim_thresholds(HAND_TASKS, 50) == [3.0, 2.0, 3.0]
    assert ties.trim_thresholds(HAND_TASKS, 50, sample_size=0) == [3.0, 2.0, 3.0]


@pytest.mark.parametrize("merge_function, expected", [("mean", HAND_MEAN), ("sum", HAND_SUM)])
def test_hand_computed(merge_function, expected):
    for name, result in both(HAND_TASKS, 50, merge_function):
        assert_close(result, expected)


# Trim scope: one threshold per task over the whole model, or one per task and tensor.
# k = 50. Model scope, P = 6, keep 3: task 1 keeps 10, -8, 6 (threshold 6), task 2 keeps
# 2, -7, 3 (threshold 2); every entry of the small tensor b is trimmed. Tensor scope, keep 2 of
# a and 1 of b: task 1 keeps 10, -8 and 0.5, task 2 keeps -7, 3 and 0.4.
SCOPE_TASKS = [tv(a=[10, -8, 6, 4], b=[0.5, -0.3]), tv(a=[-1, 2, -7, 3], b=[-0.2, 0.4])]
#   model:  a00 10 | a01 (-8, 2) mass -6 -> -8 | a02 (6, -7) mass -1 -> -7 | a03 3 | b 0, 0
#   tensor: a00 10 | a01 -8 | a02 -7 | a03 3 | b0 0.5 | b1 0.4
SCOPE_EXPECTED = {"model": tv(a=[10, -8, -7, 3], b=[0, 0]), "tensor": tv(a=[10, -8, -7, 3], b=[0.5, 0.4])}


@pytest.mark.parametrize("trim_scope", ["model", "tensor"])
@pytest.mark.parametrize("merge_function", ["mean", "sum"])
def test_hand_computed_trim_scope(trim_scope, merge_function):
    for name, result in both(SCOPE_TASKS, 50, merge_function, trim_scope):
        assert_close(result, SCOPE_EXPECTED[trim_scope])


def test_tensor_scope_keeps_each_tensors_top_k():
    """Every tensor of every task keeps exactly its own top 30% (distinct magnitudes)."""
    g = torch.Generator().manual_seed(11)
    task = {"big": 100 * torch.randn(40, 10, generator=g), "small": 0.01 * torch.randn(20, generator=g)}
    for name, result in both([task], 30, "sum", "tensor"):
        for key, value in task.items():
            kept = result[key] != 0
            assert int(kept.sum()) == keep_count(value.numel(), 30), (name, key)
            assert torch.equal(result[key][kept], value[kept])
            assert value[kept].abs().min() > value[~kept].abs().max()


def test_zero_threshold_keeps_everything():
    # P = 6, k = 50 -> keep 3. Task 1 has two non-zero entries, so its third largest
    # magnitude is 0 and every entry passes |x| >= 0 (the zeros contribute nothing).
    tasks = [tv(w=[0, 3, 0, -1, 0, 0]), tv(w=[2, 4, 1, 5, 0, -3])]
    assert trim_thresholds(tasks, 50) == [0.0, 3.0]
    # trimmed task 2: [0, 4, 0, 5, 0, -3]; entry 3: (-1, 5) -> positive, task 1 dropped
    for name, result in both(tasks, 50, "mean"):
        assert_close(result, tv(w=[0, 3.5, 0, 5, 0, -3]))
    for name, result in both(tasks, 50, "sum"):
        assert_close(result, tv(w=[0, 7, 0, 5, 0, -3]))


def test_zero_mass_takes_majority_sign():
    # masses (0, 3): the vote is +1, so the zero-mass entry keeps the positive value
    tasks = [tv(w=[3, 1]), tv(w=[-3, 2])]
    for name, result in both(tasks, 100, "mean"):
        assert_close(result, tv(w=[3, 1.5]))
    for name, result in both(tasks, 100, "sum"):
        assert_close(result, tv(w=[3, 3]))


def test_tied_vote_selects_negative():
    # masses (0, 3, -5): the vote ties at 0 and the zero-mass entry selects negatives
    tasks = [tv(w=[3, 1, -5]), tv(w=[-3, 2, 0])]
    for name, result in both(tasks, 100, "mean"):
        assert_close(result, tv(w=[-3, 1.5, -5]))
    for name, result in both(tasks, 100, "sum"):
        assert_close(result, tv(w=[-3, 3, -5]))


# ---------------------------------------------------------------------------------------
# k = 100 against task arithmetic.


def random_tasks(num_tasks, shapes, generator, quantized=False):
    out = []
    for _ in range(num_tasks):
        sd = {}
        for i, shape in enumerate(shapes):
            if quantized:  # many exact ties, zeros and zero masses
                sd[f"p{i}"] = torch.randint(-3, 4, shape, generator=generator).float()
            else:
                sd[f"p{i}"] = torch.randn(shape, generator=generator) * (0.01 * (i + 1))
        out.append(sd)
    return out


def test_k100_sum_is_task_arithmetic_minus_minority():
    """k = 100 keeps every entry, so with s = sign(sum_t tau_t) the disjoint sum is
    sum_t tau_t - sum_t tau_t [sign(tau_t) = -s]: task arithmetic's sum of task vectors
    without the contributions of minority sign. Where no task disagrees it is exactly
    the task-arithmetic sum, and where all are non-zero and agree the mean is sum / T."""
    g = torch.Generator().manual_seed(1)
    tasks = random_tasks(4, [(30, 20), (17,)], g)
    for key in tasks[0]:
        stack = torch.stack([t[key] for t in tasks])
        total = stack.sum(0)
        s = torch.sign(total)
        minority = (stack * (torch.sign(stack) == -s)).sum(0)
        agree = (torch.sign(stack) == s).all(0)
        assert 0 < int(agree.sum()) < agree.numel()  # both kinds of entries are present
        for name, result in both(tasks, 100, "sum"):
            assert torch.allclose(result[key], total - minority, atol=1e-6), name
            assert torch.allclose(result[key][agree], total[agree], atol=1e-6), name
        for name, result in both(tasks, 100, "mean"):
            assert torch.allclose(result[key][agree], total[agree] / 4, atol=1e-6), name
    flat = torch.cat([tasks[0][key].reshape(-1) for key in tasks[0]])
    assert trim_thresholds(tasks[:1], 100) == [flat.abs().min().item()]


# ---------------------------------------------------------------------------------------
# Streaming == dense.


@pytest.mark.parametrize(
    "num_tasks, shapes, quantized",
    [
        (1, [(10,)], False),
        (3, [(5,), (4, 3)], False),
        (8, [(40, 7), (33,), (1, 1), (16, 16)], False),
        (5, [(50, 20), (9,)], True),
        (4, [(3, 4, 5), (2,)], True),
    ],
)
def test_streaming_matches_dense(num_tasks, shapes, quantized):
    g = torch.Generator().manual_seed(num_tasks * 31 + len(shapes))
    tasks = random_tasks(num_tasks, shapes, g, quantized)
    for k in [0.5, 5, 20, 50, 99.9, 100]:
        for merge_function, trim_scope in [("mean", "model"), ("sum", "model"), ("mean", "tensor"), ("sum", "tensor")]:
            dense = ties_merge_dense(tasks, k, merge_function, trim_scope)
            for options in STREAMING:
                fast = ties_merge_streaming(tasks, k, merge_function, trim_scope=trim_scope, **options)
                diff = max(float((dense[key] - fast[key]).abs().max()) for key in dense)
                assert diff <= 1e-6, (k, merge_function, trim_scope, options, diff)


def test_streaming_from_finetuned_states_matches_dense():
    g = torch.Generator().manual_seed(7)
    base = {"w": torch.randn(20, 10, generator=g), "b": torch.randn(10, generator=g)}
    finetuned = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    taus = [{k: ft[k] - base[k] for k in base} for ft in finetuned]
    for merge_function in ["mean", "sum"]:
        dense = ties_merge_dense(taus, 20, merge_function)
        fast = ties_merge_streaming(finetuned, 20, merge_function, base=base, chunk_size=7)
        assert_close(fast, dense)
    # half-precision states: differences are formed in float32
    half_base = {k: v.half() for k, v in base.items()}
    half_ft = [{k: v.half() for k, v in ft.items()} for ft in finetuned]
    half_taus = [{k: ft[k].float() - half_base[k].float() for k in base} for ft in half_ft]
    assert_close(ties_merge_streaming(half_ft, 20, base=half_base), ties_merge_dense(half_taus, 20))


def kth_largest(task: dict, k: float) -> float:
    flat = torch.cat([v.reshape(-1).float() for v in task.values()]).abs()
    return flat.kthvalue(flat.numel() - keep_count(flat.numel(), k) + 1).values.item()


@pytest.mark.parametrize("cap", [None, 4])
def test_thresholds_exact(monkeypatch, cap):
    """Thresholds equal kthvalue exactly on every path, including histogram rounds that
    narrow the range when too many candidates fall in a bracket (forced by a tiny cap)."""
    if cap is not None:
        monkeypatch.setattr(ties, "_COLLECT_CAP", cap)
    g = torch.Generator().manual_seed(3)
    cases = [
        random_tasks(3, [(64, 9), (5,)], g),
        random_tasks(2, [(30, 30)], g, quantized=True),
        [{"w": torch.full((50,), 0.25)}],  # all tied
        [{"w": torch.tensor([0.0] * 40 + [1e-30, 3e30])}],  # zeros and extreme magnitudes
    ]
    for tasks in cases:
        for k in [1, 20, 50, 100] if cap is None else [20, 100]:
            expected = [kth_largest(t, k) for t in tasks]
            for options in STREAMING:
                assert trim_thresholds(tasks, k, **options) == expected, (k, options)


@pytest.mark.parametrize("cap", [None, 2])
@pytest.mark.parametrize("bracket", [(0.0, 1e-6), (0.5, 1e3)])
def test_thresholds_exact_when_the_sample_bracket_misses(monkeypatch, cap, bracket):
    """A bracket that misses the threshold (too low, too high; with or without too many
    candidates to hold) only costs extra passes: the result stays exact."""
    g = torch.Generator().manual_seed(11)
    tasks = []
    for _ in range(2):
        x = 0.3 * torch.randn(600, generator=g)
        x[torch.rand(600, generator=g) < 0.3] = 0.0
        tasks.append({"w": x})
    bits = [ties._bits_of(torch.tensor(v)) for v in bracket]
    monkeypatch.setattr(ties, "_sample_brackets", lambda *args: [tuple(bits)] * len(tasks))
    if cap is not None:
        monkeypatch.setattr(ties, "_COLLECT_CAP", cap)
    expected = [kth_largest(t, 20) for t in tasks]
    assert all(not bracket[0] <= e <= bracket[1] for e in expected)
    assert trim_thresholds(tasks, 20) == expected


@pytest.mark.parametrize("bracket", [(1.0, 7.5), (1.0, 8.0), (8.0, 9.5), (8.5, 9.5), (7.9, 8.1)])
def test_thresholds_exact_when_the_bracket_edge_sits_at_the_threshold(monkeypatch, bracket):
    """|w| = 1..10, k = 30 -> keep 3 -> the threshold is 8 (by hand). Brackets whose edge
    falls just below, on, or just above 8: exactly n_keep entries above the bracket, or
    exactly n_keep at or above its low edge, must still resolve to 8."""
    tasks = [{"w": torch.arange(1.0, 11.0)}, {"w": -torch.arange(10.0, 0.0, -1.0)}]
    bits = [ties._bits_of(torch.tensor(v)) for v in bracket]
    monkeypatch.setattr(ties, "_sample_brackets", lambda *args: [tuple(bits)] * len(tasks))
    assert trim_thresholds(tasks, 30) == [8.0, 8.0]


def test_zero_mass_entries_of_finetuned_states_take_the_vote():
    """With ``base``, the zero-mass entries patched after the vote are re-read from the
    fine-tuned states: tau must again be state - base there. Taus (3, 1, -5, -2) and
    (-3, 2, 0, -1), k = 100: masses (0, 3, -5, -3), vote -1, so entry 0 keeps -3 (by hand)."""
    base = tv(w=[1.5, -2.0, 0.25, 4.0])
    taus = [tv(w=[3, 1, -5, -2]), tv(w=[-3, 2, 0, -1])]
    finetuned = [{"w": base["w"] + tau["w"]} for tau in taus]
    for merge_function, expected in [("mean", tv(w=[-3, 1.5, -5, -1.5])), ("sum", tv(w=[-3, 3, -5, -3]))]:
        for options in TINY:
            result = ties_merge_streaming(finetuned, 100, merge_function, base=base, **options)
            assert_close(result, expected)


def test_input_validation():
    with pytest.raises(ValueError, match="^TIES needs at least one task vector$"):
        ties_merge_streaming([], 20)
    for bad_base in [tv(v=[1.0]), tv(w=[1.0], v=[1.0])]:
        with pytest.raises(ValueError, match="base"):
            ties_merge_streaming([tv(w=[1.0])], 20, base=bad_base)
        with pytest.raises(ValueError, match="base"):
            trim_thresholds([tv(w=[1.0])], 20, base=bad_base)
    for merge in (ties_merge_dense, ties_merge_streaming):
        with pytest.raises(ValueError, match="no entries"):
            merge([{"w": torch.zeros(0)}, {"w": torch.zeros(0)}], 20)
    with pytest.raises(ValueError, match="trim_scope"):
        ties_merge_dense([tv(w=[1.0])], 20, trim_scope="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trim_scope"):
        ties_merge_streaming([tv(w=[1.0])], 20, trim_scope="layer")  # type: ignore[arg-type]
    for merge in (ties_merge_dense, ties_merge_streaming):
        with pytest.raises(ValueError, match=re.escape("'task vector 1' does not match the pretrained model: "
                                                       "missing ['w'], unexpected ['v']")):
            merge([tv(w=[1.0]), tv(v=[1.0])], 20)
        with pytest.raises(ValueError, match=re.escape("'task vector 1': tensor 'w' has shape (1,), "
                                                       "pretrained has (2,)")):
            merge([tv(w=[1.0, 2.0]), tv(w=[1.0])], 20)
        with pytest.raises(ValueError, match="merge_function must be 'mean' or 'sum', got 'max'"):
            merge([tv(w=[1.0])], 20, "max")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# The method.


def test_hyperparameters():
    method = TiesMerging()
    assert (method.k, method.scaling, method.merge_function, method.trim_scope) == (20.0, 1.0, "mean", "model")
    assert TiesMerging.registered_name == "ties"  # type: ignore[attr-defined]
    for bad in [dict(k=0), dict(k=101), dict(scaling=-0.1), dict(scaling=10.5), dict(merge_function="max"),
                dict(trim_scope="layer")]:
        (field,) = bad
        with pytest.raises(pydantic.ValidationError, match=rf"(?m)^1 validation error for TiesMerging\n{field}\n"):
            TiesMerging(**bad)
    assert TiesMerging(k=100, merge_function="sum").k == 100


@pytest.mark.parametrize("merge_function, trim_scope", [("mean", "model"), ("sum", "model"), ("mean", "tensor")])
def test_method_end_to_end(merge_function, trim_scope):
    from harness.models import build_clip

    torch.manual_seed(0)
    pretrained = build_clip("harness-micro-vit").visual.eval()
    before = {k: v.clone() for k, v in float_state(pretrained).items()}
    g = torch.Generator().manual_seed(5)
    finetuned = {}
    for task in ["a", "b", "c"]:
        model = copy.deepcopy(pretrained)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        finetuned[task] = model

    method = TiesMerging(k=30, scaling=0.6, merge_function=merge_function, trim_scope=trim_scope)
    merged = method.merge(pretrained, finetuned, MergeContext())

    reference = ties_merge_dense(list(task_vectors(pretrained, finetuned).values()), 30, merge_function, trim_scope)
    state = float_state(merged)
    assert state.keys() == before.keys()
    for key, value in state.items():
        expected = before[key] + 0.6 * reference[key]
        assert torch.allclose(value, expected, rtol=0, atol=1e-6), key
    for key, value in float_state(pretrained).items():  # the inputs are untouched
        assert torch.equal(value, before[key]), key
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(merged.parameters(), pretrained.parameters()))
    with torch.no_grad():
        out = merged(torch.randn(2, 3, 16, 16))
    assert out.shape == pretrained(torch.randn(2, 3, 16, 16)).shape


def test_method_merges_float_buffers_and_keeps_the_template_otherwise():
    """One task at k = 100 is task arithmetic: theta_0 + lambda * tau for every float tensor,
    buffers included (by hand below); integer buffers and ``requires_grad`` are the template's."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([1.0, -1.0]), requires_grad=False)
            self.b = torch.nn.Parameter(torch.tensor([0.5]))
            self.register_buffer("scale", torch.tensor([1.0, 2.0]))
            self.register_buffer("count", torch.tensor(3))

    pretrained, finetuned = Tiny(), Tiny()
    with torch.no_grad():
        finetuned.w.copy_(torch.tensor([3.0, -5.0]))
        finetuned.b.copy_(torch.tensor([1.5]))
        finetuned.scale.copy_(torch.tensor([3.0, 0.0]))
        finetuned.count.fill_(7)
    merged = TiesMerging(k=100, scaling=0.5).merge(pretrained, {"t": finetuned}, MergeContext())
    assert torch.equal(merged.w, torch.tensor([2.0, -3.0])) and not merged.w.requires_grad
    assert torch.equal(merged.b, torch.tensor([1.0])) and merged.b.requires_grad
    assert torch.equal(merged.scale, torch.tensor([2.0, 1.0]))
    assert int(merged.count) == 3


def test_zero_mass_entries_select_among_trimmed_values_only():
    """The zero-mass entries patched after the vote are re-read from the inputs: the trim must
    apply there too. P = 4, k = 50 -> keep 2 per task; thresholds 3, 3, 6 (by hand). Entry 0 is
    (3, -3, -1): trimmed (3, -3, 0), mass 0; masses (0, -10, -12, 0) vote -2, so entry 0 keeps
    -3 alone, not the trimmed-away -1 of task 3 (which would give a mean of -2, a sum of -4)."""
    taus = [tv(w=[3, -1, -5, 0]), tv(w=[-3, -4, 2, 0]), tv(w=[-1, -6, -7, 0])]
    assert trim_thresholds(taus, 50) == [3.0, 3.0, 6.0]
    expected = {"mean": tv(w=[-3, -5, -6, 0]), "sum": tv(w=[-3, -10, -12, 0])}
    for merge_function in ("mean", "sum"):
        for name, result in both(taus, 50, merge_function):
            assert_close(result, expected[merge_function])
        base = tv(w=[0.5, -2.0, 1.0, 4.0])
        finetuned = [{"w": base["w"] + tau["w"]} for tau in taus]
        for options in TINY:
            assert_close(ties_merge_streaming(finetuned, 50, merge_function, base=base, **options),
                         expected[merge_function])


def test_method_on_a_half_model_returns_half_tensors_rounded_once():
    """The merge is computed in float32 and the result takes the template's dtypes: one task at
    k = 100, lambda = 0.75, tau = (2, 2): 2048 + 1.5 = 2049.5 rounds to 2050 and 1 + 1.5 = 2.5
    is exact in half precision; the parameter and the float buffer stay float16."""

    class Half(torch.nn.Module):
        def __init__(self, w, s):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float16))
            self.register_buffer("s", torch.tensor(s, dtype=torch.float16))

    merged = TiesMerging(k=100, scaling=0.75).merge(Half([2048.0, 1.0], [1.0]), {"t": Half([2050.0, 3.0], [3.0])},
                                                   MergeContext())
    assert merged.w.dtype == merged.s.dtype == torch.float16
    assert merged.w.tolist() == [2050.0, 2.5] and merged.s.tolist() == [2.5]


def test_hyperparameter_ranges_hold_k_100_and_both_edges_of_lambda():
    """k is a percentage in (0, 100] (k = 100 keeps everything); lambda, as task arithmetic's,
    is any scale in [0, 10]: both edges of lambda and k = 100 are settings a sweep may give."""
    rows = {r["name"]: r["range"] for r in TiesMerging.hyperparameters()}
    assert (rows["k"], rows["scaling"]) == ("(0.0, 100.0]", "[0.0, 10.0]")
    for scaling in (0.0, 2.5, 10.0):
        assert TiesMerging(k=100.0, scaling=scaling).scaling == scaling
