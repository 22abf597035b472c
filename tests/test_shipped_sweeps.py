"""Every sweep under sweeps/ validates (the paper's cluster settings with env-var paths too)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main

SWEEPS = sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_validates(path, tmp_path):
    env = {"CKPT": str(tmp_path / "ckpt"), "DATA": str(tmp_path / "data"), "COLUMNS": "200"}
    r = CliRunner().invoke(main, ["validate", str(path)], env=env)
    assert r.exit_code == 0, r.output + r.stderr
    assert "valid" in r.stdout and "job plan:" in r.stdout


def test_paper_sweeps_cover_the_setting():
    from harness.config import read_yaml

    for name, arch in (("paper-vitb32", "ViT-B-32-quickgelu"), ("paper-vitl14", "ViT-L-14-quickgelu")):
        raw = read_yaml(Path(SWEEPS[0]).parent / f"{name}.yaml")
        assert raw["model"]["arch"] == arch and raw["executor"]["kind"] == "slurm"
        assert raw["tasks"] == ["sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
        assert {m["name"] for m in raw["methods"]} == {"weight_averaging", "task_arithmetic", "ties", "adamerging", "wemoe"}
        assert raw["robustness"]["tasks"] == ["cars", "eurosat", "resisc45", "gtsrb"]
    gen = read_yaml(Path(SWEEPS[0]).parent / "paper-vitb32-generalization.yaml")
    assert gen["unseen"] == ["mnist", "eurosat"]
