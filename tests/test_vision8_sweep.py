"""A sweep over real-dataset loaders (fake ImageFolder / idx trees) from a data_root."""

from __future__ import annotations

from harness.config import validate_config
from harness.runner import run_sweep
from tests.test_vision8 import folder_names, write_imagefolder


def test_sweep_reads_data_root(micro_checkpoints, tmp_path):
    root = tmp_path / "data"
    for name in ("eurosat", "dtd"):
        write_imagefolder(root, name, folder_names(name))
    d = {
        "name": "v8",
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "data_root": str(root),
        "model": {"source": "files", "arch": "harness-micro-vit",
                  "pretrained": str(micro_checkpoints / "pretrained.safetensors"),
                  "finetuned": {"eurosat": str(micro_checkpoints / "toy_stripes.safetensors"),
                                "dtd": str(micro_checkpoints / "toy_colours.safetensors")}},
        "tasks": ["eurosat", "dtd"],
        "methods": [{"name": "task_arithmetic"}],
        "eval": {"batch_size": 8},
    }
    out = run_sweep(validate_config(d), quiet=True)
    assert not out.failed, [r.error for r in out.failed]
    assert [r.method for r in out.rows] == ["pretrained", "individual", "task_arithmetic"]
    for row in out.rows:
        assert set(row.acc) == {"eurosat", "dtd"}
        assert all(0.0 <= a <= 100.0 for a in row.acc.values())
