"""Thread settings: one thread for a small model's training, the job's cores for evaluation."""

from __future__ import annotations

import re

import pytest
import torch

from harness import runtime


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    runtime.configure_threads(before)
    torch.set_num_threads(before)


def _inside() -> int:
    with runtime.evaluation_threads():
        return torch.get_num_threads()


def test_small_model_trains_on_one_thread_and_evaluates_on_its_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.configure_threads("auto", n_params=1_000, cores=3) == 1
    assert torch.get_num_threads() == 1
    assert _inside() == 3
    assert torch.get_num_threads() == 1  # restored after evaluation


def test_large_model_explicit_threads_and_environment_are_left_alone(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.configure_threads("auto", n_params=runtime.SMALL_MODEL_PARAMS, cores=2) == 2
    assert _inside() == 2
    assert runtime.configure_threads(1, n_params=1_000, cores=4) == 1
    assert _inside() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.configure_threads("auto", n_params=1_000, cores=4) == 1
    assert _inside() == 1


def test_available_cores_counts_the_cpu_set_not_the_machine(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 5}, raising=False)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 64)
    assert runtime.available_cores() == 2


@pytest.mark.parametrize("value,want", [("3,1", 3), (" 2 ", 2), ("3, 2", 3), ("many", None), ("0", None)])
def test_omp_num_threads_in_the_openmp_list_form_is_read_not_a_crash(monkeypatch, value, want):
    """OpenMP allows a list, one count per nesting level (``OMP_NUM_THREADS=4,1``, set by some
    cluster modules): the outer level's count is the job's threads. A value that is no positive
    count is ignored (the automatic choice stands) instead of failing every job with a ValueError."""
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    got = runtime.configure_threads("auto", n_params=runtime.SMALL_MODEL_PARAMS, cores=2)
    assert got == (want if want is not None else 2)
    assert torch.get_num_threads() == got


def test_jobs_device_turns_tensorfloat32_off():
    """cuDNN allows TF32 convolutions by default (the patch embedding of a ViT on a GPU): the
    device jobs get is one where float32 means float32, as eval.precision fp32 in their key says."""
    import torch

    from harness.runtime import resolve_device

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert resolve_device("cpu") == torch.device("cpu")
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("cuda", [True, False])
def test_auto_device_is_the_gpu_where_there_is_one(monkeypatch, cuda):
    """``device: auto`` runs jobs on the GPU when one is visible, else on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert runtime.resolve_device("auto") == torch.device("cuda" if cuda else "cpu")


def test_a_gpu_asked_for_without_one_is_refused_by_name(monkeypatch):
    """``device: cuda:1`` without CUDA would fail every job at its first tensor: it is refused."""
    from harness.errors import HarnessError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HarnessError, match=r"device 'cuda:1' requested but CUDA is not available"):
        runtime.resolve_device("cuda:1")
    assert runtime.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("count, name, listed", [(1, "cuda:1", "1 CUDA GPU (cuda:0)"),
                                                   (2, "cuda:2", "2 CUDA GPUs (cuda:0..cuda:1)")])
def test_a_gpu_index_past_the_machines_gpus_is_refused_by_name(monkeypatch, count, name, listed):
    """``device: cuda:1`` on a one-GPU machine passed, and every job then failed at its first
    tensor (``CUDA error: invalid device ordinal``): it is refused, naming the GPUs there are."""
    from harness.errors import HarnessError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(HarnessError, match=rf"^device '{name}' requested but this machine has {re.escape(listed)}$"):
        runtime.resolve_device(name)
    assert runtime.resolve_device(f"cuda:{count - 1}") == torch.device(f"cuda:{count - 1}")
    assert runtime.resolve_device("cuda") == torch.device("cuda")


def test_mps_asked_for_without_it_is_refused_by_name(monkeypatch):
    """``device: mps`` where torch has no MPS failed each merge's first forward, blamed on the method."""
    from harness.errors import HarnessError

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(HarnessError, match=r"device 'mps' requested but MPS is not available"):
        runtime.resolve_device("mps")


def test_job_cores_are_the_share_given_and_none_without_one(monkeypatch):
    """A pool worker's share of the cores (3 here) bounds its disk readers; the driver, given no
    share, may use every core it runs on (None)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runtime.configure_threads("auto", n_params=1_000, cores=3)
    assert runtime.job_cores() == 3
    runtime.configure_threads("auto", n_params=1_000)
    assert runtime.job_cores() is None
