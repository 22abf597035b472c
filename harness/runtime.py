"""The one place that decides the device and the number of CPU threads."""

from __future__ import annotations

import os
import signal
from contextlib import AbstractContextManager, contextmanager
from typing import Iterator, NamedTuple

import torch

# Below this many parameters, one OpenMP thread is much faster on CPU (measured: small
# matmuls run 30-100x slower with 2 threads than with 1 on a 2-core machine).
SMALL_MODEL_PARAMS = 20_000_000


def resolve_device(name: str = "auto") -> torch.device:
    """The device jobs run on. TensorFloat-32 is turned off for matmuls and convolutions (cuDNN
    allows it by default): ``eval.precision: fp32`` is then float32 on a GPU too, as on the CPU,
    and reduced precision is asked for by ``eval.precision``, which job keys hold, not by the card."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from harness.errors import HarnessError

    problem = missing_device(name)
    if problem is not None:
        raise HarnessError(f"device {name!r} requested but {problem.why}")
    return torch.device(name)


class MissingDevice(NamedTuple):
    """Why this machine lacks a device, and the ``device`` values that do run on it (a refusal
    suggests them without reading its own wording back)."""

    why: str
    use: str


def missing_device(name: str) -> MissingDevice | None:
    """Why this machine lacks ``device`` ``name`` (``cuda``, ``cuda:N``, ``mps``), or None: no
    CUDA or MPS, or a GPU index past its last GPU (``cuda:1`` on a one-GPU machine, which would
    fail every job at its first tensor)."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            return MissingDevice("CUDA is not available on this machine", "auto or cpu")
        index, count = torch.device(name).index, torch.cuda.device_count()
        if index is not None and index >= count:
            gpus = "cuda:0" + (f"..cuda:{count - 1}" if count > 1 else "")
            return MissingDevice(f"this machine has {count} CUDA GPU{'s' if count != 1 else ''} ({gpus})",
                                 "auto, cpu or cuda")
    if name == "mps" and not torch.backends.mps.is_available():  # else a merge is blamed for it
        return MissingDevice("MPS is not available on this machine", "auto or cpu")
    return None


_EVAL_THREADS: int | None = None
_JOB_CORES: int | None = None


def available_cores() -> int:
    """The cores this process may run on (a SLURM or container CPU set, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(threads: int | str = "auto", n_params: int | None = None, cores: int | None = None) -> int:
    """Set torch's intra-op threads: 1 for small models on CPU, else ``cores`` (default: all
    this process may use). Evaluation, in batches of hundreds, uses ``cores`` even for a small
    model (:func:`evaluation_threads`) unless ``threads`` or ``OMP_NUM_THREADS`` say otherwise."""
    global _EVAL_THREADS, _JOB_CORES
    _JOB_CORES = max(1, cores) if cores else None
    cores = max(1, cores or available_cores())
    _EVAL_THREADS = None
    if threads == "auto":
        if (omp := omp_threads()) is not None:
            n = omp
        elif n_params is not None and n_params < SMALL_MODEL_PARAMS:
            n, _EVAL_THREADS = 1, cores
        else:
            n = cores
    else:
        n = int(threads)
    torch.set_num_threads(max(1, n))
    return n


def job_cores() -> int | None:
    """The cores the job was given (a local pool worker's share, SLURM's ``cpus_per_task``) by the
    last :func:`configure_threads`, or None where it may use all this process may run on (the
    driver): readers of a disk-backed split are counted from it, so a pool's workers do not each
    start one per core of the machine."""
    return _JOB_CORES


def omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` as a thread count: its first entry (OpenMP allows a list, one count per
    nesting level: ``4,1``), None when unset or not a positive count (the automatic choice stands)."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block (left as they are for None), the
    caller's count restored after."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluation_threads() -> AbstractContextManager[None]:
    """Large-batch evaluation with the cores a small model's single training thread leaves idle
    (measured: 8 tasks' val and test splits of the embedded suite, 8.1 s on 1 thread, 4.0 s on 2)."""
    return torch_threads(_EVAL_THREADS)


def start_forked_helper(worker_id: int | None = None) -> None:
    """Run first in a process a job forks to read or build its data (a DataLoader's
    ``worker_init_fn``, a pool's initializer): one thread (one such process per core), and SLURM's
    time-limit warning ignored. SLURM sends that warning (SIGUSR2) to every process of the job, and
    a forked process has inherited the job's handler, which would checkpoint and requeue the job
    once more from each helper; the default action would kill the helper. The job itself handles it."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
