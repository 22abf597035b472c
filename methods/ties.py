"""TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint merge.

For task vectors tau_1..tau_T (theta_t - theta_0 over every floating-point tensor of the
image encoder):

1. Trim: per task, keep the entries whose magnitude is at least the n-th largest magnitude
   of that task over the *whole flattened model*, n = max(1, floor(P * k / 100)) for P
   entries. Tie rule: every entry equal to the threshold is kept (``|x| >= kth``), so a task
   may keep more than n entries; when the threshold is 0 every entry is kept (the zeros add
   nothing). ``trim_scope="tensor"`` (an option; mergekit trims this way) takes the
   threshold per task *and tensor* instead: each tensor keeps its own top k%, so a tensor
   whose task-vector entries are small everywhere is not trimmed away whole.
2. Elect: per entry, the sign of the mass, the sum of the trimmed values. An entry whose
   mass is exactly zero takes the model-wide majority sign (the sign of the sum of all
   elected signs); if that vote is tied too, the entry selects negative values. This is the
   rule of the widely used reference code.
3. Disjoint merge: per entry, the mean (or the sum) of the trimmed values that are non-zero
   and share the elected sign; zero when there are none.
4. theta = theta_0 + lambda * merged.

Sums over tasks are accumulated in task order (t = 1..T). Both implementations below do
so, which makes their results independent of how the model is split into chunks; a
``sum(dim=0)`` over a stacked matrix is not (its order depends on the matrix width), and a
last-bit difference in a near-zero mass can flip an elected sign.

Two implementations of the same function:

- :func:`ties_merge_dense` follows the common reference code literally: flatten all task
  vectors into a ``[T, P]`` matrix, ``kthvalue`` per row, masks over the whole matrix. Its
  ``[T, P]`` temporaries take about 6x the input size (12 GB peak for four ViT-B/32 image
  encoders). It is the oracle for tests and benchmarks. (The widely copied code computes
  ``kthvalue(P - int(P * k))``, which keeps one entry more than k% and fails at k = 100;
  here the count is exactly ``keep_count``.)
- :func:`ties_merge_streaming` gives the same result without any ``[T, P]`` matrix. Exact
  per-task thresholds, usually in a single pass: a stratified random sample brackets the
  threshold, the pass counts the magnitudes above the bracket and keeps the few inside it
  (about 1%), and a partition of those gives the exact value. When the sample misses, or
  the bracket holds too many entries to keep, histogram passes over the float bit
  patterns (non-negative float32 values order like their int32 bits) narrow the range.
  The sample changes the number of passes, never the result. Then one pass over chunks,
  one chunk of every task at a time, trims, elects and merges; zero-mass entries are
  merged with a provisional positive sign, remembered, and patched once the model-wide
  vote is known. Extra memory: the output plus a few chunk buffers. Inputs must be finite.
"""

from __future__ import annotations

import copy
import math
from typing import Literal, Mapping, Sequence

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from methods.base import MergeContext, MergeMethod, check_same_keys, float_state, register_method

MergeFunction = Literal["mean", "sum"]
TrimScope = Literal["model", "tensor"]

_MAX_BITS = 0x7FFFFFFF  # largest int32; as float32 bits, above +inf (NaN payloads)
_INF_BITS = 0x7F800000
_HIST_LOG2 = 16  # at most 2**16 histogram bins per pass
_COLLECT_CAP = 1 << 22  # most bracketed magnitudes a pass holds per task
_SAMPLE_Z = 6.0  # bracket half-width in standard deviations of a sample rank


def keep_count(numel: int, k: float) -> int:
    """How many entries the trim keeps (before ties): floor(numel * k / 100), at least 1."""
    if not 0 < k <= 100:
        raise ValueError(f"k must be in (0, 100], got {k}")
    return max(1, min(numel, int(numel * k / 100)))


def _check_inputs(task_vectors: Sequence[Mapping[str, Tensor]], merge_function: str,
                  trim_scope: str = "model") -> list[str]:
    if not task_vectors:
        raise ValueError("TIES needs at least one task vector")
    if merge_function not in ("mean", "sum"):
        raise ValueError(f"merge_function must be 'mean' or 'sum', got {merge_function!r}")
    if trim_scope not in ("model", "tensor"):
        raise ValueError(f"trim_scope must be 'model' or 'tensor', got {trim_scope!r}")
    first = {k: v for k, v in task_vectors[0].items()}
    for i, tv in enumerate(task_vectors[1:], start=1):
        check_same_keys(first, dict(tv), f"task vector {i}")
    keys = list(first)
    if sum(first[k].numel() for k in keys) == 0:
        raise ValueError("task vectors hold no entries")
    return keys


def _ordered_sum(rows: Tensor) -> Tensor:
    """Sum over dim 0 in row order (deterministic, chunking-independent rounding)."""
    out = rows[0].clone()
    for row in rows[1:]:
        out.add_(row)
    return out


# ---------------------------------------------------------------------------------------
# The dense reference.


def ties_merge_dense(
    task_vectors: Sequence[Mapping[str, Tensor]], k: float = 20.0, merge_function: MergeFunction = "mean",
    trim_scope: TrimScope = "model",
) -> dict[str, Tensor]:
    """TIES over a flattened ``[T, P]`` matrix, written like the common reference code.

    Returns the merged task vector (float32, same keys and shapes), without lambda.
    Memory: several ``[T, P]`` float temporaries; use :func:`ties_merge_streaming` for
    real models.
    """
    keys = _check_inputs(task_vectors, merge_function, trim_scope)
    shapes = [task_vectors[0][key].shape for key in keys]
    flat = torch.stack([torch.cat([tv[key].reshape(-1).float() for key in keys]) for tv in task_vectors])
    num_entries = flat.shape[1]
    if trim_scope == "model":
        n_keep = keep_count(num_entries, k)
        kth_values, _ = flat.abs().kthvalue(num_entries - n_keep + 1, dim=1, keepdim=True)
    else:
        kth_values = torch.zeros_like(flat)
        start = 0
        for shape in shapes:
            stop = start + shape.numel()
            if stop > start:
                n = stop - start
                kth_values[:, start:stop] = flat[:, start:stop].abs().kthvalue(n - keep_count(n, k) + 1, dim=1,
                                                                              keepdim=True).values
            start = stop
    trimmed = flat * (flat.abs() >= kth_values)

    signs = torch.sign(_ordered_sum(trimmed))
    majority = torch.sign(signs.sum(dtype=torch.float64)).float()
    signs[signs == 0] = majority

    agree = torch.where(signs.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    merged = _ordered_sum(selected)
    if merge_function == "mean":
        merged = merged / (selected != 0).sum(dim=0).clamp(min=1)

    out: dict[str, Tensor] = {}
    offset = 0
    for key, shape in zip(keys, shapes):
        n = shape.numel()
        out[key] = merged[offset : offset + n].reshape(shape).clone()
        offset += n
    return out


# ---------------------------------------------------------------------------------------
# The streaming implementation.


class _Source:
    """Flat views of the task vectors, formed chunk by chunk when given fine-tuned states."""

    def __init__(self, states: Sequence[Mapping[str, Tensor]], base: Mapping[str, Tensor] | None, keys: list[str]):
        self.keys = keys
        self.states = [{key: sd[key].reshape(-1) for key in keys} for sd in states]
        self.base = None if base is None else {key: base[key].reshape(-1) for key in keys}
        self.numel = {key: self.states[0][key].numel() for key in keys}

    def only(self, key: str) -> "_Source":
        """The same task vectors restricted to one tensor (for per-tensor thresholds)."""
        part = copy.copy(self)
        part.keys, part.numel = [key], {key: self.numel[key]}
        return part

    def fill(self, out: Tensor, t: int, key: str, start: int, stop: int) -> Tensor:
        """Write tau_t[key][start:stop] (float32) into ``out``."""
        src = self.states[t][key][start:stop]
        if self.base is None:
            return out.copy_(src)
        ref = self.base[key][start:stop]
        if src.dtype == torch.float32 and ref.dtype == torch.float32:
            return torch.sub(src, ref, out=out)
        return out.copy_(src).sub_(ref)

    def gather(self, t: int, key: str, index: Tensor) -> Tensor:
        vals = self.states[t][key][index].float()
        if self.base is not None:
            vals = vals - self.base[key][index].float()
        return vals


def _float_from_bits(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def _bits_of(value: Tensor) -> int:
    return int(value.reshape(1).float().view(torch.int32).item())


def _sample_brackets(
    src: _Source, n_keep: int, total: int, sample_size: int, generator: torch.Generator
) -> list[tuple[int, int] | None]:
    """Per task, a bit-pattern interval that holds the threshold with high probability.

    Stratified uniform sample (proportional per tensor); the interval spans the sample
    order statistics ``_SAMPLE_Z`` binomial standard deviations around the target rank.
    A miss only costs extra passes. None where there is no sample.
    """
    num_tasks = len(src.states)
    if sample_size <= 0:
        return [None] * num_tasks
    samples: list[list[Tensor]] = [[] for _ in range(num_tasks)]
    for key in src.keys:
        n = src.numel[key]
        m = n if total <= sample_size else round(sample_size * n / total)
        if m == 0 or n == 0:
            continue
        # sorted: near-sequential reads instead of random ones over the whole state dict
        index = torch.arange(n) if m == n else torch.randint(n, (m,), generator=generator).sort().values
        for t in range(num_tasks):
            samples[t].append(src.gather(t, key, index).abs_())
    rank = total - n_keep + 1  # ascending rank of the threshold among all magnitudes
    brackets: list[tuple[int, int] | None] = []
    for parts in samples:
        sample = torch.cat(parts) if parts else torch.empty(0)
        m = sample.numel()
        if m == 0:
            brackets.append(None)
            continue
        p = rank / total
        slack = _SAMPLE_Z * math.sqrt(m * p * (1 - p)) + 2
        lo_rank = math.floor(m * (rank - 1) / total - slack)
        hi_rank = math.ceil(m * rank / total + slack)
        lo = 0 if lo_rank < 1 else _bits_of(torch.kthvalue(sample, lo_rank).values)
        hi = _MAX_BITS if hi_rank > m else _bits_of(torch.kthvalue(sample, hi_rank).values)
        brackets.append((lo, hi))
    return brackets


def trim_thresholds(
    task_vectors: Sequence[Mapping[str, Tensor]],
    k: float = 20.0,
    *,
    base: Mapping[str, Tensor] | None = None,
    sample_size: int = 1 << 17,
    chunk_size: int = 1 << 20,
    seed: int = 0,
) -> list[float]:
    """Exact per-task trim thresholds: the ``keep_count(P, k)``-th largest magnitude.

    Equal to ``kthvalue(P - n + 1)`` of the flattened magnitudes, computed without
    flattening: memory is one chunk plus the bracketed candidates per task. With ``base``,
    ``task_vectors`` are fine-tuned states and tau = state - base. ``sample_size`` only
    affects speed (0: no sample, exact histogram passes from the start).
    """
    keys = _check_inputs(task_vectors, "mean")
    if base is not None:
        check_same_keys(dict(task_vectors[0]), dict(base), "base")
    src = _Source(task_vectors, base, keys)
    return [_float_from_bits(b) for b in _threshold_bits(src, k, sample_size, chunk_size, seed)]


def _np_float(bits: int) -> np.float32:
    return np.array([min(bits, _INF_BITS)], dtype=np.int32).view(np.float32)[0]


class _Collect:
    """A pass that counts magnitudes >= lo and keeps those in [lo, hi] (bits)."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi
        self.lo_f, self.hi_f = _np_float(lo), _np_float(hi)
        self.at_least_lo = 0
        self.inside = 0
        self.values: list[np.ndarray] | None = [] if lo < hi else None  # lo == hi: count only
        self.overflow = False

    def update(self, x: np.ndarray, ge: np.ndarray, le: np.ndarray) -> None:
        if self.overflow:
            return
        np.greater_equal(x, self.lo_f, out=ge)
        self.at_least_lo += int(np.count_nonzero(ge))
        np.less_equal(x, self.hi_f, out=le)
        np.logical_and(ge, le, out=ge)
        if self.values is None:
            self.inside += int(np.count_nonzero(ge))
            return
        picked = np.compress(ge, x)
        self.inside += picked.size
        self.values.append(picked)
        if self.inside > _COLLECT_CAP:  # too many to hold: narrow down with histograms
            self.overflow, self.values = True, None

    def resolve(self, n_keep: int) -> tuple[int | None, "_Collect | _Histogram"]:
        """(threshold bits, None) when found, else (None, the next pass)."""
        if self.overflow:
            return None, _Histogram(self.lo, self.hi)
        above = self.at_least_lo - self.inside
        if above >= n_keep:
            return None, _Histogram(self.hi + 1, _MAX_BITS)
        if self.at_least_lo < n_keep:
            return None, _Histogram(0, self.lo - 1)
        if self.values is None:  # lo == hi
            return self.lo, self
        values = np.concatenate(self.values)
        pos = values.size - (n_keep - above)  # ascending position of the threshold
        return int(np.partition(values, pos)[pos : pos + 1].view(np.int32)[0]), self


class _Histogram:
    """A pass that histograms the bit patterns in [lo, hi] in at most 2**16 bins."""

    def __init__(self, lo: int, hi: int):
        self.lo = lo
        self.shift = max(0, (hi - lo).bit_length() - _HIST_LOG2)
        self.nbins = ((hi - lo) >> self.shift) + 1
        self.hist = torch.zeros(self.nbins + 2, dtype=torch.int64)

    def update(self, bits: Tensor, code: Tensor) -> None:
        # bin 0: below lo; bins 1..nbins: (bits - lo) >> shift; bin nbins + 1: above
        if self.shift == 0:
            torch.sub(bits, self.lo - 1, out=code)
        else:
            torch.sub(bits, self.lo, out=code).bitwise_right_shift_(self.shift).add_(1)
        code.clamp_(0, self.nbins + 1)
        self.hist.add_(torch.bincount(code, minlength=self.nbins + 2))

    def resolve(self, n_keep: int) -> tuple[int | None, "_Collect | _Histogram"]:
        above = int(self.hist[-1])
        inside = self.hist[1:-1]
        if above >= n_keep:
            return None, _Histogram(self.lo + (self.nbins << self.shift), _MAX_BITS)
        if above + int(inside.sum()) < n_keep:
            return None, _Histogram(0, self.lo - 1)
        from_top = inside.flip(0).cumsum(0) + above
        j = int(torch.searchsorted(from_top, torch.tensor([n_keep]))[0])
        bin_lo = self.lo + ((self.nbins - 1 - j) << self.shift)
        if self.shift == 0:
            return bin_lo, self
        bin_hi = bin_lo + (1 << self.shift) - 1
        count = int(inside.flip(0)[j])
        return None, (_Collect(bin_lo, bin_hi) if count <= _COLLECT_CAP else _Histogram(bin_lo, bin_hi))


def _threshold_bits(src: _Source, k: float, sample_size: int, chunk_size: int, seed: int) -> list[int]:
    """Per task, the float32 bits of the exact trim threshold (see the module docstring)."""
    num_tasks = len(src.states)
    total = sum(src.numel.values())
    n_keep = keep_count(total, k)
    generator = torch.Generator().manual_seed(seed)
    brackets = _sample_brackets(src, n_keep, total, sample_size, generator)
    passes: list[_Collect | _Histogram] = [
        _Histogram(0, _MAX_BITS) if b is None else _Collect(*b) for b in brackets
    ]
    result: list[int | None] = [None] * num_tasks

    chunk = max(1, min(chunk_size, max(src.numel.values())))
    magnitude = torch.empty(chunk, dtype=torch.float32)
    codes = torch.empty(chunk, dtype=torch.int32)
    ge_buf, le_buf = np.empty(chunk, dtype=bool), np.empty(chunk, dtype=bool)
    for _ in range(8):
        active = [t for t in range(num_tasks) if result[t] is None]
        if not active:
            break
        for key in src.keys:
            n = src.numel[key]
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                mag = magnitude[: stop - start]
                for t in active:
                    src.fill(mag, t, key, start, stop).abs_()
                    step = passes[t]
                    if isinstance(step, _Collect):
                        step.update(mag.numpy(), ge_buf[: stop - start], le_buf[: stop - start])
                    else:
                        step.update(mag.view(torch.int32), codes[: stop - start])
        for t in active:
            result[t], passes[t] = passes[t].resolve(n_keep)
    if any(r is None for r in result):
        raise RuntimeError("threshold selection did not converge (non-finite task vector entries?)")
    return [int(r) for r in result]  # type: ignore[arg-type]


def ties_merge_streaming(
    task_vectors: Sequence[Mapping[str, Tensor]],
    k: float = 20.0,
    merge_function: MergeFunction = "mean",
    *,
    trim_scope: TrimScope = "model",
    base: Mapping[str, Tensor] | None = None,
    chunk_size: int = 1 << 17,
    sample_size: int = 1 << 17,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Same result as :func:`ties_merge_dense`, one chunk of every task at a time.

    With ``base``, ``task_vectors`` are fine-tuned states and tau = state - base is formed
    per chunk, so no task vector is ever materialised. Extra memory: the float32 output,
    ``T * chunk_size`` floats, and during threshold selection the sample plus the bracketed
    candidates (about 1% of one task vector per task). ``sample_size`` and ``seed`` only
    affect speed. Tensors are read through flat views (contiguous ones are not copied).
    """
    keys = _check_inputs(task_vectors, merge_function, trim_scope)
    if base is not None:
        check_same_keys(dict(task_vectors[0]), dict(base), "base")
    src = _Source(task_vectors, base, keys)
    num_tasks = len(task_vectors)
    pass_chunk = max(chunk_size, 1 << 20)
    if trim_scope == "model":
        whole = _threshold_bits(src, k, sample_size, pass_chunk, seed)
        thr_bits = {key: whole for key in keys}
    else:
        thr_bits = {key: _threshold_bits(src.only(key), k, sample_size, pass_chunk, seed)
                    for key in keys if src.numel[key]}
    # hardshrink keeps |x| > lambd; with lambd the float just below the threshold that is
    # |x| >= threshold. A zero threshold keeps everything.
    lambdas = {key: [None if b == 0 else _float_from_bits(b - 1) for b in bits] for key, bits in thr_bits.items()}

    def trim(row: Tensor, t: int, key: str) -> Tensor:
        lambd = lambdas[key][t]
        return row if lambd is None else torch.hardshrink(row, lambd, out=row)

    chunk = max(1, min(chunk_size, max(src.numel.values())))
    buffer = torch.empty(num_tasks * chunk, dtype=torch.float32)
    one = torch.ones(1)
    out: dict[str, Tensor] = {}
    vote = 0.0  # sum of the elected signs over the whole model
    zero_mass: list[tuple[str, Tensor, Tensor]] = []  # entries whose sign the vote decides
    for key in keys:
        n = src.numel[key]
        merged_flat = torch.empty(n, dtype=torch.float32)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            stack = buffer[: num_tasks * (stop - start)].view(num_tasks, stop - start)
            for t in range(num_tasks):
                trim(src.fill(stack[t], t, key, start, stop), t, key)
            mass = _ordered_sum(stack)
            vote += float(torch.sign(mass).sum())  # exact: integers below 2**24
            # +1 where the mass is +0 (provisional, the vote may flip it); a mass of -0.0
            # only arises when every trimmed value is zero, so its sign does not matter
            sign = torch.copysign(one, mass)
            stack.mul_(sign).relu_()  # |value| where it agrees with the sign, else 0
            total = merged_flat[start:stop]
            total.copy_(stack[0])
            for row in stack[1:]:
                total.add_(row)
            mass_np, total_np = mass.numpy(), total.numpy()
            ambiguous = (mass_np == 0) & (total_np > 0)
            if merge_function == "mean":
                total.div_(stack.sign_().sum(dim=0).clamp_(min=1))
            total.mul_(sign)
            if ambiguous.any():
                index = torch.from_numpy(np.flatnonzero(ambiguous)) + start
                rows = torch.stack([trim(src.gather(t, key, index), t, key) for t in range(num_tasks)])
                rows.neg_().relu_()
                alt = _ordered_sum(rows)
                if merge_function == "mean":
                    alt.div_(rows.sign_().sum(dim=0).clamp_(min=1))
                zero_mass.append((key, index, alt.neg_()))
        out[key] = merged_flat
    if vote <= 0:  # zero masses take the majority sign; a tied vote selects negatives
        for key, index, alt in zero_mass:
            out[key][index] = alt
    return {key: out[key].view(task_vectors[0][key].shape) for key in keys}


@register_method("ties")
class TiesMerging(MergeMethod):
    """Trims each task vector to its top-k% magnitudes, elects signs, merges disjointly."""

    seeded = False  # deterministic: draws nothing

    k: float = Field(20.0, gt=0.0, le=100.0, description="percent of entries kept per task vector")
    scaling: float = Field(1.0, ge=0.0, le=10.0, description="lambda, the merged-vector scale")
    merge_function: MergeFunction = Field("mean", description="disjoint mean or disjoint sum")
    trim_scope: TrimScope = Field("model", description="trim threshold over the whole model (the paper) or "
                                                       "per tensor (mergekit)")

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        base = float_state(pretrained)
        states = []
        for task, model in finetuned.items():
            sd = float_state(model)
            check_same_keys(base, sd, task)
            states.append(sd)
        merged = ties_merge_streaming(states, self.k, self.merge_function, trim_scope=self.trim_scope,
                                      base=base, seed=ctx.seed)
        for key, value in merged.items():
            value.mul_(self.scaling).add_(base[key].float())
        return _module_from_state(pretrained, merged)


def _module_from_state(template: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """Like ``with_state``, but the copy adopts the given tensors instead of copying into
    fresh ones: one model's worth less peak memory, which matters next to T+1 encoders."""
    memo: dict[int, object] = {}
    for name, param in template.named_parameters(remove_duplicate=False):
        if name in state and id(param) not in memo:
            value = state[name].to(param.dtype).reshape(param.shape)
            memo[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad)
    for name, buf in template.named_buffers(remove_duplicate=False):
        if name in state and id(buf) not in memo:
            memo[id(buf)] = state[name].to(buf.dtype).reshape(buf.shape)
    model = copy.deepcopy(template, memo)
    missing = [k for k in state if k not in model.state_dict()]
    if missing:
        raise ValueError(f"merged state has tensors the model lacks: {missing[:3]}")
    return model
