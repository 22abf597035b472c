"""Shared fixtures: one thread (tiny models), a micro open_clip model with checkpoints on disk."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
# Console widths as in a plain run: pytest-xdist workers inherit COLUMNS=80, and rich would wrap
# the tables and paths the tests read at 80 columns.
os.environ.pop("COLUMNS", None)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TOY_TASKS = ["toy_stripes", "toy_colours"]


def process_running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may be slow to reap orphans); reads /proc."""
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def stop_process_group(proc) -> None:
    """Stop a server started with ``start_new_session`` and its own workers: SIGTERM, then
    SIGKILL after 10 s."""
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def free_port() -> int:
    """A local TCP port nothing listens on (the OS's pick, released at once)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def refused_tracking_port(monkeypatch) -> int:
    """A port nothing listens on, with MLflow's client retrying a refused connection only twice,
    4 s then 8 s apart (by default seven times, about four minutes): a check made without its
    retries answers well within them."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "4")
    return free_port()


def read_only_under(monkeypatch, folder) -> None:
    """``os.open`` of anything under ``folder`` fails as on a read-only filesystem (EROFS)."""
    import errno

    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(folder)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)


@pytest.fixture(scope="session")
def micro_checkpoints(tmp_path_factory):
    """A micro CLIP (pretrained file) and per-task 'fine-tuned' encoders (random perturbations)."""
    return write_micro_checkpoints(tmp_path_factory.mktemp("ckpt"), lambda p: 0.05)


def write_micro_checkpoints(root, noise_scale, tasks=TOY_TASKS):
    """pretrained.safetensors (a micro CLIP) and <task>.safetensors encoders with noise of
    ``noise_scale(param)`` standard deviation added to every weight, for ``tasks``."""
    from harness.models import build_clip, save_state_dict

    torch.manual_seed(0)
    clip = build_clip("harness-micro-vit")
    save_state_dict(clip.state_dict(), root / "pretrained.safetensors")
    for i, task in enumerate(tasks):
        enc = copy.deepcopy(clip.visual)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(noise_scale(p) * torch.randn(p.shape, generator=g))
        save_state_dict(enc.state_dict(), root / f"{task}.safetensors")
    return root


def run_fresh(code: str, timeout: int = 300) -> str:
    """stdout of ``code`` run in a new interpreter (what a process imports is process state)."""
    import subprocess
    import sys
    import textwrap

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def make_sweep_dict(checkpoints, root) -> dict:
    """A minimal valid sweep over the toy tasks with file checkpoints."""
    return {
        "name": "toy",
        "output_dir": str(root / "out"),
        "cache_dir": str(root / "cache"),
        "model": {
            "source": "files",
            "arch": "harness-micro-vit",
            "pretrained": str(checkpoints / "pretrained.safetensors"),
            "finetuned_pattern": str(checkpoints / "{task}.safetensors"),
        },
        "tasks": list(TOY_TASKS),
        "methods": [
            {"name": "weight_averaging"},
            {"name": "task_arithmetic", "grid": {"scaling": [0.2, 0.6]}},
        ],
    }


@pytest.fixture
def sweep_dict(micro_checkpoints, tmp_path):
    return make_sweep_dict(micro_checkpoints, tmp_path)


@pytest.fixture(scope="session")
def trained_checkpoints(tmp_path_factory):
    """Micro CLIP encoders really fine-tuned on three toy tasks: merges have a landscape."""
    from harness.finetune import finetune_encoder
    from harness.models import build_clip, get_tokenizer, save_state_dict, zeroshot_head
    from tasks.synthetic import make_toy_task

    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    clip = build_clip("harness-micro-vit")
    save_state_dict(clip.state_dict(), root / "pretrained.safetensors")
    tok = get_tokenizer("harness-micro-vit")
    for task_name in TRAINED_TASKS:
        task = make_toy_task(task_name)
        head = zeroshot_head(clip, tok, task.prompts())
        enc = finetune_encoder(clip.visual, head, task.dataset("train"), steps=80, lr=3e-3, batch_size=32,
                               warmup=5, seed=0)
        save_state_dict(enc.state_dict(), root / f"{task_name}.safetensors")
    return root


TRAINED_TASKS = ["toy_stripes", "toy_colours", "toy_checks"]


def perturbed_micro_encoders(tasks, scale: float = 0.05, seed: int = 0):
    """(pretrained micro image encoder, {task: a copy with N(0, scale^2) added to every weight})."""
    torch.manual_seed(seed)
    from harness.models import build_clip

    pre = build_clip("harness-micro-vit").visual.eval()
    finetuned = {}
    for t in tasks:
        m = copy.deepcopy(pre)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(scale * torch.randn_like(p))
        finetuned[t] = m
    return pre, finetuned


@pytest.fixture
def adam_steps(monkeypatch) -> list[int]:
    """One entry per Adam step taken in this process during the test: whether a job adapted."""
    steps: list[int] = []
    real_step = torch.optim.Adam.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counted)
    return steps


def tuned_ties_then_k_joins(sweep_dict: dict) -> dict:
    """A sweep whose TIES row ``tt`` was tuned over ``scaling`` alone (that sweep run), then given
    ``k`` at its default in the space: its best is the job run before ``k`` joined."""
    from harness.config import validate_config
    from harness.runner import run_sweep

    tune = {"n_trials": 1, "n_parallel": 1, "sampler": "grid",
            "space": {"scaling": {"type": "categorical", "choices": [0.6]}}}
    d = dict(sweep_dict, references=False, methods=[{"name": "ties", "label": "tt", "tune": tune}])
    run_sweep(validate_config(d), quiet=True)
    tune["space"]["k"] = {"type": "categorical", "choices": [20.0]}  # ties' default: the same job
    return d


def pixelate_split_unreadable(monkeypatch) -> None:
    """Reading any task's pixelate split fails (an unreadable cached split), other splits read as
    they are: a robustness study that fails on one corruption."""
    from harness.workspace import Workspace

    corrupted = Workspace.corrupted

    def unreadable(self, task, corruption):
        if corruption == "pixelate":
            raise OSError("corrupted split unreadable")
        return corrupted(self, task, corruption)

    monkeypatch.setattr(Workspace, "corrupted", unreadable)
