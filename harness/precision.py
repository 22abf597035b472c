"""``eval.precision``: the dtype forward passes of evaluation and test-time adaptation run in.

Reduced precision is ``torch.autocast`` around a forward pass and nothing else: model weights,
merged states, heads, adapted parameters (AdaMerging's coefficients, WeMoE's routers) and the
adaptation loss stay float32. Heads are applied in float32 (:class:`harness.models.ImageClassifier`),
so logits, and the argmax that scores an image, are float32 whatever the encoder ran in.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

#: ``eval.precision`` -> the autocast dtype (None: no autocast, float32 as before the field).
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device | str) -> ContextManager:
    """The context a forward pass at ``precision`` runs in on ``device`` (fp32: none)."""
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


_CHECKED: dict[tuple[str, str], str | None] = {}


class PrecisionError(RuntimeError):
    """``eval.precision`` asks for a dtype autocast cannot run on the job's device."""


def precision_problem(precision: str, device: torch.device | str) -> str | None:
    """Why autocast at ``precision`` does not run on ``device`` (a Linear, a GELU and a LayerNorm
    under it must compute in that dtype), or None where it does. Probed once per process and device."""
    dtype = DTYPES[precision]
    if dtype is None:
        return None
    device = torch.device(device)
    key = (precision, str(device))
    if key not in _CHECKED:
        _CHECKED[key] = _probe(dtype, device)
    return _CHECKED[key]


def check_precision(precision: str, device: torch.device | str) -> None:
    """Raise :class:`PrecisionError` when autocast at ``precision`` does not run on ``device``,
    so a job never runs in float32 silently while its key says otherwise."""
    problem = precision_problem(precision, device)
    if problem is not None:
        raise PrecisionError(f"eval.precision: {precision} does not run on {device} with torch {torch.__version__} "
                             f"({problem}); use eval.precision: fp32 (or bf16) on this device")


def _probe(dtype: torch.dtype, device: torch.device) -> str | None:
    import warnings

    try:
        linear = torch.nn.Linear(8, 8).to(device)
        x = torch.randn(2, 8, device=device)
        with warnings.catch_warnings(), torch.autocast(device_type=device.type, dtype=dtype):
            warnings.simplefilter("ignore")  # an unsupported dtype: autocast warns and disables itself
            y = torch.nn.functional.layer_norm(torch.nn.functional.gelu(linear(x)), (8,))
            out = linear(y)
    except Exception as exc:  # an autocast dtype the backend refuses
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    if out.dtype != dtype:
        return f"autocast computes in {out.dtype}, not {dtype}"
    return None
