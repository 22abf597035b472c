"""A write the disk or the folder refuses (full, over quota, read-only, file too large) ends a
command with one line naming the file, never a traceback, and keeps what finished."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from harness.errors import HarnessError, storage_problem

ROOT = Path(__file__).resolve().parents[1]


def _file_size_limit(limit: int):
    """preexec_fn: writes past ``limit`` bytes fail with EFBIG (SIGXFSZ ignored, as a full disk
    fails a write with ENOSPC instead of killing the writer)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_refused_writes_are_told_from_other_errors():
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/results/k.json")
    assert storage_problem(full) == "cannot write /out/results/k.json: No space left on device"
    copy = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/cache/store.db", None, "/out/.mlflow.db.1.tmp")
    assert storage_problem(copy) == "cannot write /out/.mlflow.db.1.tmp: Disk quota exceeded"  # the destination
    denied = OSError(errno.EACCES, os.strerror(errno.EACCES), "/shared/cache/heads")
    assert storage_problem(denied) == "cannot access /shared/cache/heads: Permission denied"
    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as inner:
            raise RuntimeError("(sqlite3.OperationalError) database or disk is full\n[SQL: INSERT ...]") from inner
    except RuntimeError as wrapped:
        assert storage_problem(wrapped, "sqlite:////out/mlflow.db") == (
            "cannot write sqlite:////out/mlflow.db: (sqlite3.OperationalError) database or disk is full")
    assert storage_problem(OSError(errno.ENOENT, "No such file or directory", "/x")) is None
    assert storage_problem(ValueError("bad value")) is None
    assert storage_problem(HarnessError("output_dir: cannot create it (No space left on device)")) is None


def test_a_refused_write_is_found_along_the_chain_python_keeps():
    """A file over the size limit is a refused write; an OSError without a file says only why; one
    raised while handling another (no ``from``) is found, and one hidden by ``from None`` is not; an
    SQLite refusal without a store named names the MLflow store."""
    big = OSError(errno.EFBIG, os.strerror(errno.EFBIG), "/out/model.safetensors")
    assert storage_problem(big) == "cannot write /out/model.safetensors: File too large"
    assert storage_problem(OSError(errno.ENOSPC, "No space left on device")) == "cannot write: No space left on device"

    def wrapped(hide: bool) -> RuntimeError:
        try:
            try:
                raise OSError(errno.EROFS, "Read-only file system", "/out/k.json")
            except OSError:
                if hide:
                    raise RuntimeError("saving failed") from None
                raise RuntimeError("saving failed")
        except RuntimeError as exc:
            return exc

    assert storage_problem(wrapped(hide=False)) == "cannot write /out/k.json: Read-only file system"
    assert storage_problem(wrapped(hide=True)) is None
    assert storage_problem(sqlite3.OperationalError("database or disk is full")) == (
        "cannot write the MLflow store: database or disk is full")


def test_a_refused_atomic_write_names_the_file_it_was_writing(tmp_path):
    """A refused write() carries no file name; the error names the file being written, and no
    temporary file is left beside it."""
    target = tmp_path / "results" / "k.json"
    code = textwrap.dedent(f"""
        import errno, sys
        from harness.cache import atomic_write_bytes
        try:
            atomic_write_bytes({str(target)!r}, b"x" * 4096)
        except OSError as exc:
            print(exc.errno == errno.EFBIG, exc.filename)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), preexec_fn=_file_size_limit(1024))
    assert out.stdout.split() == ["True", str(target)], out.stderr
    assert list(target.parent.iterdir()) == []


def test_a_sweep_on_a_full_disk_ends_in_one_line_and_resumes(sweep_dict, tmp_path):
    """The empty MLflow store the cache keeps (about 1 MB) cannot be written under a 64 KiB file
    size limit: one line naming it, exit code 1, the jobs' results (a few hundred bytes each)
    kept; the rerun with room logs and reports without running them again."""
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(dict(sweep_dict, methods=["weight_averaging"])))
    cli = [str(Path(sys.executable).parent / "harness"), "sweep", "-q", str(f)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    first = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                           preexec_fn=_file_size_limit(64 * 1024))
    lines = first.stderr.strip().splitlines()
    assert first.returncode == 1, first.stderr
    assert "Traceback" not in first.stderr, first.stderr
    assert lines[-1].startswith("error: cannot write "), first.stderr
    template = Path(sweep_dict["cache_dir"]) / "mlflow" / "empty-store-"  # the first file past the limit
    assert lines[-1].startswith(f"error: cannot write {template}"), lines[-1]
    assert any(why in lines[-1] for why in ("File too large", "disk I/O error", "database or disk is full"))
    assert lines[-1].endswith("finished jobs are saved: free space (or fix the folder's permissions) "
                              "and rerun the same command")
    results = Path(sweep_dict["output_dir"]) / "results"
    kept = {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")}
    kinds = sorted(json.loads((results / name).read_text())["kind"] for name in kept)
    assert kinds == ["individual", "individual", "pretrained"]  # run before MLflow is first written
    second = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    now = {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")}
    assert len(now) == 4 and {k: now[k] for k in kept} == kept  # the merge ran, the references not again
    assert "weight_averaging" in (Path(sweep_dict["output_dir"]) / "report" / "main.csv").read_text()


def test_an_adaptation_checkpoint_the_disk_refuses_names_its_file_and_keeps_the_last(tmp_path):
    """A job whose checkpoint cannot be written fails with the file and the reason (torch.save
    into a file says only ``unexpected pos``), and the checkpoint saved before stays whole."""
    path = tmp_path / "work" / "wemoe-tta.pt"
    code = textwrap.dedent(f"""
        import errno, resource, torch
        from methods.tta import _save_checkpoint
        w = torch.nn.Parameter(torch.zeros(4096))
        opt = torch.optim.Adam([w])
        _save_checkpoint({str(path)!r}, {{"w": w}}, 2, opt, [1.0, 0.5])
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        with torch.no_grad():
            w.add_(1.0)
        try:
            _save_checkpoint({str(path)!r}, {{"w": w}}, 4, opt, [1.0, 0.5, 0.4, 0.3])
        except OSError as exc:
            print(exc.errno == errno.EFBIG, exc.filename)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), preexec_fn=lambda: signal.signal(
                             signal.SIGXFSZ, signal.SIG_IGN))
    assert out.stdout.split() == ["True", str(path)], out.stderr[-2000:]
    import torch

    kept = torch.load(path, weights_only=True)
    assert kept["step"] == 2 and float(kept["params"]["w"].abs().sum()) == 0.0
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_model_file_the_disk_refuses_is_an_os_error_naming_it(tmp_path):
    """safetensors reports a refused write in its own words, naming no file, and leaves its
    partial temporary file behind; the save is an OSError naming the file, and nothing is left."""
    path = tmp_path / "models" / "m.safetensors"
    code = textwrap.dedent(f"""
        import errno, torch
        from harness.models import save_state_dict
        try:
            save_state_dict({{"w": torch.zeros(16384)}}, {str(path)!r})
        except OSError as exc:
            print(exc.errno == errno.EFBIG, exc.filename)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), preexec_fn=_file_size_limit(4096))
    assert out.stdout.split() == ["True", str(path)], out.stderr[-2000:]
    assert list(path.parent.iterdir()) == []


def test_a_model_save_interrupted_midway_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C in the middle of a safetensors write: neither a half model file nor its temporary
    is left (an earlier file of that name is kept whole)."""
    import pytest
    import safetensors.torch
    import torch

    from harness.models import load_state_dict, save_state_dict

    path = tmp_path / "models" / "m.safetensors"
    save_state_dict({"w": torch.ones(4)}, path)

    def cut(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", cut)
    with pytest.raises(KeyboardInterrupt):
        save_state_dict({"w": torch.zeros(4)}, path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert torch.equal(load_state_dict(path)["w"], torch.ones(4))


def test_a_model_save_into_a_read_only_folder_names_the_model_file(tmp_path, monkeypatch):
    """A cache folder the model cannot be written into (read-only, no permission): the error names
    the model file, as one of a full disk does, not the hidden temporary file it never created."""
    import pytest
    import torch

    from harness.models import save_state_dict
    from tests.conftest import read_only_under

    folder = tmp_path / "cache" / "checkpoints"
    folder.mkdir(parents=True)
    read_only_under(monkeypatch, folder)
    with pytest.raises(OSError) as info:
        save_state_dict({"w": torch.ones(4)}, folder / "m.safetensors")
    assert (info.value.errno, info.value.filename) == (errno.EROFS, str(folder / "m.safetensors"))
    assert list(folder.iterdir()) == []
