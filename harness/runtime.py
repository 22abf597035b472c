"""The one place that decides the device and the number of CPU threads."""

from __future__ import annotations

import os

import torch

# Below this many parameters, one OpenMP thread is much faster on CPU (measured: small
# matmuls run 30-100x slower with 2 threads than with 1 on a 2-core machine).
SMALL_MODEL_PARAMS = 20_000_000


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from harness.errors import HarnessError

        raise HarnessError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def configure_threads(threads: int | str = "auto", n_params: int | None = None) -> int:
    """Set torch's intra-op threads: 1 for small models on CPU, else the machine's cores."""
    if threads == "auto":
        if os.environ.get("OMP_NUM_THREADS"):
            n = int(os.environ["OMP_NUM_THREADS"])
        elif n_params is not None and n_params < SMALL_MODEL_PARAMS:
            n = 1
        else:
            n = os.cpu_count() or 1
    else:
        n = int(threads)
    torch.set_num_threads(max(1, n))
    return n
