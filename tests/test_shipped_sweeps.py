"""Every sweep under sweeps/ validates (the paper's cluster settings with env-var paths too)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main

SWEEP_DIR = Path(__file__).resolve().parents[1] / "sweeps"
SWEEPS = sorted(SWEEP_DIR.glob("*.yaml"))


def _touch_model_files(path: Path, ckpt: Path) -> list[Path]:
    """The checkpoint files a paper sweep names under $CKPT, as one-tensor safetensors files laid
    out as a whole CLIP (the pretrained weights) and an image encoder (validation reads their
    headers; loading real weights is other tests' business)."""
    import torch

    from harness.models import save_state_dict
    from harness.sweep_file import read_yaml

    d = read_yaml(path)
    model, tasks = d.get("model", {}), [t if isinstance(t, str) else t["name"] for t in d["tasks"]]
    paths = [model.get("pretrained")] + [model["finetuned_pattern"].replace("{task}", t) for t in tasks
                                         if model.get("finetuned_pattern")]
    made = []
    for i, p in enumerate(paths):
        if p and "${CKPT}" in p:
            f = Path(p.replace("${CKPT}", str(ckpt)))
            f.parent.mkdir(parents=True, exist_ok=True)
            # the pretrained stand-in: both towers' keys, as a whole CLIP has (one tensor each)
            tensors = ({"visual.class_embedding": torch.zeros(4), "text_projection": torch.zeros(4, 4)} if i == 0
                       else {"class_embedding": torch.zeros(4)})
            save_state_dict(tensors, f)
            made.append(f)
    return made


@pytest.fixture(scope="module")
def eight_datasets(tmp_path_factory) -> Path:
    """A data_root holding the eight datasets as tiny ImageFolder trees (validate finds each and
    counts their splits): two test images a class, so that the paper sweeps' adaptation batches of
    16 fit the ten-class test splits, as they fit the real ones."""
    from tasks.vision8 import SPECS
    from tests.test_vision8 import write_imagefolder

    root = tmp_path_factory.mktemp("data")
    for name in SPECS:
        write_imagefolder(root, name, n_test=2)
    return root


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_validates(path, tmp_path, monkeypatch, eight_datasets):
    # The paper sweeps ask for a GPU cluster's partition and nodes: validated as off a cluster,
    # not against whatever SLURM this machine may run (tests/test_slurm.py checks that part).
    monkeypatch.setattr("harness.executors.slurm_settings.cluster_partitions", lambda: None)
    # The stand-ins hold one tensor, not the architecture's: its fit is tests/test_bad_inputs.py's part.
    monkeypatch.setattr("harness.models.meta_clip_shapes",
                        lambda arch, near=(): {"visual.class_embedding": (4,), "text_projection": (4, 4)})
    env = {"CKPT": str(tmp_path / "ckpt"), "DATA": str(eight_datasets), "COLUMNS": "200"}
    made = _touch_model_files(path, tmp_path / "ckpt")
    r = CliRunner().invoke(main, ["validate", str(path)], env=env)
    assert r.exit_code == 0, r.output + r.stderr
    assert "valid" in r.stdout and "job plan:" in r.stdout
    if "${DATA}" in path.read_text():  # without its data folder the same sweep is refused, naming it
        missing = dict(env, DATA=str(tmp_path / "data"))
        r = CliRunner().invoke(main, ["validate", str(path)], env=missing)
        assert r.exit_code == 2 and f"{path}: data_root: data folder of task 'sun397' does not exist" in r.stderr, \
            r.stderr
        (tmp_path / "data").mkdir()  # and with a folder that holds no dataset
        r = CliRunner().invoke(main, ["validate", str(path)], env=missing)
        assert r.exit_code == 2 and f"{path}: data_root: task 'sun397': no data under {tmp_path / 'data'}" in \
            " ".join(r.stderr.split()), r.stderr
    if made:  # without its checkpoints the same sweep is refused, naming the file and field
        made[0].unlink()
        r = CliRunner().invoke(main, ["validate", str(path)], env=env)
        assert r.exit_code == 2 and f"{path}: model.pretrained: weights file does not exist" in r.stderr, \
            r.stderr


def test_paper_sweeps_cover_the_setting():
    from harness.sweep_file import read_yaml

    for name, arch in (("paper-vitb32", "ViT-B-32-quickgelu"), ("paper-vitl14", "ViT-L-14-quickgelu")):
        raw = read_yaml(SWEEP_DIR / f"{name}.yaml")
        assert raw["model"]["arch"] == arch and raw["executor"]["kind"] == "slurm"
        assert raw["tasks"] == ["sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
        assert {m["name"] for m in raw["methods"]} == {"weight_averaging", "task_arithmetic", "ties", "adamerging", "wemoe"}
        assert raw["robustness"]["tasks"] == ["cars", "eurosat", "resisc45", "gtsrb"]
    gen = read_yaml(SWEEP_DIR / "paper-vitb32-generalization.yaml")
    assert gen["unseen"] == ["mnist", "eurosat"]


def test_small_sweep_is_the_main_sweep_on_a_wider_image_tower():
    """The width study changes one thing: the image tower's width (the text tower and every
    method of the main sweep stay as they are)."""
    import json

    from harness.models import CONFIG_DIR, build_clip
    from harness.sweep_file import read_yaml

    tiny = json.loads((CONFIG_DIR / "harness-tiny-vit.json").read_text())
    small = json.loads((CONFIG_DIR / "harness-small-vit.json").read_text())
    assert small["vision_cfg"] == {**tiny["vision_cfg"], "width": 2 * tiny["vision_cfg"]["width"]}
    assert small["text_cfg"] == tiny["text_cfg"]
    n_small = sum(p.numel() for p in build_clip("harness-small-vit").visual.parameters())
    n_tiny = sum(p.numel() for p in build_clip("harness-tiny-vit").visual.parameters())
    assert n_small == 3_246_592 and 3.8 < n_small / n_tiny < 4.0

    main_sweep, wide = read_yaml(SWEEP_DIR / "wemoe.yaml"), read_yaml(SWEEP_DIR / "embedded-small.yaml")
    assert wide["model"]["suite"] == {"arch": "harness-small-vit"} and main_sweep["model"]["suite"] == {}
    assert wide["tasks"] == main_sweep["tasks"] and wide["references"] == main_sweep["references"]
    assert all(m in wide["methods"] for m in main_sweep["methods"])


@pytest.mark.parametrize("file, suite", [("embedded-preserve20.yaml", {"preserve_weight": 20.0}),
                                         ("embedded-pretrain2000.yaml", {"pretrain_steps": 2000})])
def test_regime_sweep_is_the_main_sweep_with_one_suite_option_changed(file, suite):
    """The regime studies (more feature preservation, longer pretraining) change one suite option
    and only widen the scaling grids, so every setting the main sweep could select stays selectable."""
    from harness.sweep_file import read_yaml
    from tasks.embedded.pipeline import SuiteOptions

    main_sweep, regime = read_yaml(SWEEP_DIR / "wemoe.yaml"), read_yaml(SWEEP_DIR / file)
    assert SuiteOptions().preserve_weight == 5.0 and SuiteOptions().pretrain_steps == 500
    assert main_sweep["model"]["suite"] == {} and regime["model"]["suite"] == suite
    assert regime["tasks"] == main_sweep["tasks"] and regime["references"] == main_sweep["references"]

    def by_label(sweep):
        return {m.get("label", m["name"]): m for m in sweep["methods"]}

    ours, theirs = by_label(regime), by_label(main_sweep)
    assert set(ours) == set(theirs) | {"ties_tensor"}
    for label, method in theirs.items():
        assert ours[label].get("params") == method.get("params"), label
        assert set(method.get("grid", {}).get("scaling", [])) <= set(ours[label].get("grid", {}).get("scaling", []))
    assert ours["ties_tensor"]["params"] == {**theirs["ties"]["params"], "trim_scope": "tensor"}
    assert max(ours["ties"]["grid"]["scaling"]) >= 3.0 and max(ours["task_arithmetic"]["grid"]["scaling"]) > 1.0


def test_confident_sweep_is_the_main_sweep_on_five_of_its_tasks():
    """Same model and encoders on a subset of the main tasks; the adaptive methods start, and the
    bound is built, at one task-arithmetic lambda from the grid; the paper's 0.3 kept beside."""
    from harness.sweep_file import read_yaml

    main_sweep, conf = read_yaml(SWEEP_DIR / "wemoe.yaml"), read_yaml(SWEEP_DIR / "embedded-confident.yaml")
    assert conf["model"] == main_sweep["model"]
    assert conf["tasks"] == [t for t in main_sweep["tasks"] if t in conf["tasks"]] and len(conf["tasks"]) == 5
    assert set(main_sweep["tasks"]) - set(conf["tasks"]) == {"emb_vehicles", "emb_housenum", "emb_mnist"}
    by_label = {m.get("label", m["name"]): m for m in conf["methods"]}
    start = conf["references"]["routing_bound_lambda"]
    assert start in by_label["task_arithmetic"]["grid"]["scaling"] and start != 0.3
    for label in ("adamerging_task", "adamerging_layer", "wemoe"):
        assert by_label[label]["params"]["init_lambda"] == start, label
    assert by_label["wemoe_lambda03"]["params"] == {**by_label["wemoe"]["params"], "init_lambda": 0.3}
    assert by_label["wemoe"]["params"]["routing"] == "raw" and "task_id_weight" not in by_label["wemoe"]["params"]
    assert by_label["wemoe_batch"]["params"] == {**by_label["wemoe"]["params"], "batch_reduce": True}


def test_wide_sweep_is_the_grid_part_of_the_small_sweep_at_width_384():
    """The second width step changes the image tower's width again (3x the tiny model's) and keeps
    the width-256 study's reference rows and grid methods, grids only widened."""
    import json

    from harness.models import CONFIG_DIR, build_clip
    from harness.sweep_file import read_yaml

    tiny = json.loads((CONFIG_DIR / "harness-tiny-vit.json").read_text())
    wide_cfg = json.loads((CONFIG_DIR / "harness-wide-vit.json").read_text())
    assert wide_cfg["vision_cfg"] == {**tiny["vision_cfg"], "width": 3 * tiny["vision_cfg"]["width"]}
    assert wide_cfg["text_cfg"] == tiny["text_cfg"] and wide_cfg["embed_dim"] == tiny["embed_dim"]
    assert sum(p.numel() for p in build_clip("harness-wide-vit").visual.parameters()) == 7_229_184

    small, wide = read_yaml(SWEEP_DIR / "embedded-small.yaml"), read_yaml(SWEEP_DIR / "embedded-wide.yaml")
    assert wide["model"]["suite"] == {"arch": "harness-wide-vit"}
    assert wide["tasks"] == small["tasks"] and wide["references"] == small["references"]
    theirs = {m.get("label", m["name"]): m for m in small["methods"] if "grid" in m or m["name"] == "weight_averaging"}
    ours = {m.get("label", m["name"]): m for m in wide["methods"]}
    assert set(ours) == set(theirs) == {"weight_averaging", "task_arithmetic", "ties", "ties_tensor"}
    for label, method in theirs.items():
        assert ours[label].get("params") == method.get("params"), label
        assert set(method.get("grid", {}).get("scaling", [])) <= set(ours[label].get("grid", {}).get("scaling", []))


def test_partition_expands_environment_variables(monkeypatch):
    """sbatch reads ``#SBATCH --partition=${SLURM_PARTITION:-gpu}`` literally, so the shipped
    sweeps' partition must reach it expanded."""
    from harness.config import load_config

    path = SWEEP_DIR / "paper-vitb32.yaml"
    monkeypatch.setenv("CKPT", "/nonexistent")
    monkeypatch.setenv("DATA", "/nonexistent")
    monkeypatch.delenv("SLURM_PARTITION", raising=False)
    assert load_config(path).executor.partition == "gpu"
    monkeypatch.setenv("SLURM_PARTITION", "a100")
    assert load_config(path).executor.partition == "a100"
