"""A sweep over real-dataset loaders (fake ImageFolder / idx trees) from a data_root."""

from __future__ import annotations

from harness.config import validate_config
from harness.runner import run_sweep
from tests.test_vision8 import folder_names, write_imagefolder


def two_task_sweep(micro_checkpoints, tmp_path, out: str, methods: list[dict]) -> dict:
    """A sweep over fake eurosat and dtd trees under ``tmp_path / "data"`` (written once)."""
    root = tmp_path / "data"
    if not root.exists():
        for name in ("eurosat", "dtd"):
            write_imagefolder(root, name, folder_names(name))
    return {
        "name": "v8", "output_dir": str(tmp_path / out), "cache_dir": str(tmp_path / "cache"),
        "data_root": str(root),
        "model": {"source": "files", "arch": "harness-micro-vit",
                  "pretrained": str(micro_checkpoints / "pretrained.safetensors"),
                  "finetuned": {"eurosat": str(micro_checkpoints / "toy_stripes.safetensors"),
                                "dtd": str(micro_checkpoints / "toy_colours.safetensors")}},
        "tasks": ["eurosat", "dtd"],
        "methods": methods,
        "eval": {"batch_size": 8},
    }


def test_sweep_reads_data_root(micro_checkpoints, tmp_path):
    out = run_sweep(validate_config(two_task_sweep(micro_checkpoints, tmp_path, "out", [{"name": "task_arithmetic"}])),
                    quiet=True)
    assert not out.failed, [r.error for r in out.failed]
    assert [r.method for r in out.rows] == ["pretrained", "individual", "task_arithmetic"]
    for row in out.rows:
        assert set(row.acc) == {"eurosat", "dtd"}
        assert all(0.0 <= a <= 100.0 for a in row.acc.values())


def test_a_finished_sweep_reports_without_its_data_and_models(micro_checkpoints, tmp_path):
    """An output folder copied away from the datasets and checkpoints (a laptop) still reports:
    commands that read results check neither; those that run or plan jobs still refuse."""
    import shutil

    import yaml
    from click.testing import CliRunner

    from harness.cli import _store, main

    root, models = tmp_path / "data", tmp_path / "models"
    write_imagefolder(root, "eurosat", folder_names("eurosat"))
    models.mkdir()
    for name in ("pretrained", "toy_stripes"):
        shutil.copy(micro_checkpoints / f"{name}.safetensors", models)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({
        "name": "v8", "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
        "data_root": str(root),
        "model": {"source": "files", "arch": "harness-micro-vit",
                  "pretrained": str(models / "pretrained.safetensors"),
                  "finetuned": {"eurosat": str(models / "toy_stripes.safetensors")}},
        "tasks": ["eurosat"], "methods": [], "eval": {"batch_size": 8}}))
    r = CliRunner().invoke(main, ["sweep", "-q", str(f)])
    assert r.exit_code == 0, r.output
    written = (tmp_path / "out" / "report" / "main.md").read_text()
    shutil.rmtree(root)
    shutil.rmtree(models)

    r = CliRunner().invoke(main, ["report", str(f), "--out", str(tmp_path / "again")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again" / "main.md").read_text() == written
    assert _store(str(f)) == (f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", str(tmp_path / "out" / "mlartifacts"))
    r = CliRunner().invoke(main, ["status", str(f)])
    assert "no SLURM submissions recorded" in r.stderr and "data_root" not in r.stderr, r.stderr
    r = CliRunner().invoke(main, ["validate", str(f)])
    assert r.exit_code == 2 and "model.pretrained: weights file does not exist" in r.stderr, r.stderr
    shutil.copytree(micro_checkpoints, models, dirs_exist_ok=True)
    for command in (["validate", str(f)], ["sweep", "--dry-run", str(f)]):
        r = CliRunner().invoke(main, command)
        assert r.exit_code == 2 and "data_root" in r.stderr and str(root) in r.stderr, r.stderr


def test_adaptation_on_disk_backed_tasks_reads_in_workers_with_the_same_result(micro_checkpoints, tmp_path, monkeypatch):
    """Test-time adaptation on the paper's datasets reads its streams in forked readers; the
    adapted model is the one an in-process read gives."""
    import harness.job as job

    readers: list[int] = []

    def counted(streams: int, real=job.stream_workers) -> int:
        readers.append(real(streams))
        return readers[-1]

    def sweep(out: str):
        methods = [{"name": "adamerging", "params": {"steps": 3, "batch_size": 4}}]
        return run_sweep(validate_config(two_task_sweep(micro_checkpoints, tmp_path, out, methods)), quiet=True)

    monkeypatch.setattr(job, "stream_workers", counted)
    with_readers = sweep("readers")
    assert readers and all(n >= 1 for n in readers), readers
    monkeypatch.setattr(job, "stream_workers", lambda streams: 0)
    in_process = sweep("in-process")
    assert not with_readers.failed and not in_process.failed
    adapted = [next(r for r in out.rows if r.method == "adamerging") for out in (with_readers, in_process)]
    assert adapted[0].acc == adapted[1].acc
    assert adapted[0].test_correct == adapted[1].test_correct and adapted[0].test_correct


def test_a_dataset_moved_to_another_folder_reuses_the_cached_results(micro_checkpoints, tmp_path):
    """Keys hold the files and labels, not the folder (top-level ``data_root`` or a task's own
    ``options.data_root``): the same data on node-local scratch runs nothing again."""
    import shutil

    d = two_task_sweep(micro_checkpoints, tmp_path, "out", [{"name": "task_arithmetic"}])
    first = run_sweep(validate_config(d), quiet=True)
    assert first.executed and not first.failed
    shutil.move(tmp_path / "data", tmp_path / "scratch")
    d["data_root"] = str(tmp_path / "nowhere")
    d["tasks"] = [{"name": t, "options": {"data_root": str(tmp_path / "scratch")}} for t in ("eurosat", "dtd")]
    again = run_sweep(validate_config(d), quiet=True)
    assert again.executed == [] and [r.acc for r in again.rows] == [r.acc for r in first.rows]


def test_a_factory_of_ones_own_keeps_its_data_folder_in_the_keys(micro_checkpoints, tmp_path):
    """Only the project's datasets' keys leave the folder out (their identity lists the files): a
    factory of one's own that takes ``data_root`` gets the sweep's top-level one as it would get
    ``options.data_root``, and either way another folder is other data to its keys."""
    from harness.plan import plan_jobs
    from harness.workspace import Workspace
    from tests.conftest import make_sweep_dict

    def keys(**where) -> set[str]:
        d = make_sweep_dict(micro_checkpoints, tmp_path)
        d.update(references=False, methods=[{"name": "weight_averaging"}], tasks=[
            {"name": "tests.own_tasks:from_folder", **({"options": where["options"]} if "options" in where else {})},
            "toy_stripes"])
        d["model"] = {**d["model"], "finetuned_pattern": None,
                      "finetuned": {"tests.own_tasks:from_folder": str(micro_checkpoints / "toy_colours.safetensors"),
                                    "toy_stripes": str(micro_checkpoints / "toy_stripes.safetensors")}}
        if "top" in where:
            d["data_root"] = where["top"]
        cfg = validate_config(d)
        ws = Workspace(cfg)
        return {s.key for s in plan_jobs(cfg, ws.identity, ws.task_identity())}

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert keys(top=str(a)) != keys(top=str(b))
    assert keys(options={"data_root": str(a)}) != keys(options={"data_root": str(b)})
    assert keys(top=str(a)) == keys(top=str(b), options={"data_root": str(a)})


def test_validate_bounds_an_adaptation_batch_by_a_real_dataset_before_any_model_is_built(
        micro_checkpoints, tmp_path, monkeypatch):
    """The fake EuroSAT tree holds 10 test images (10 classes, one each): validate and a dry run
    refuse an adaptation ``batch_size`` of 11 and take 10, with no encoder ever built (the split's
    length does not depend on the input size its images are resized to)."""
    import yaml
    from click.testing import CliRunner

    import harness.workspace
    from harness.cli import main

    def no_build(*args, **kwargs):
        raise AssertionError("validate built a model")

    monkeypatch.setattr(harness.workspace, "build_clip", no_build)
    for batch, refused in ((11, True), (10, False)):
        f = tmp_path / f"s{batch}.yaml"
        f.write_text(yaml.safe_dump(two_task_sweep(micro_checkpoints, tmp_path, "out", [
            {"name": "adamerging", "params": {"steps": 1, "batch_size": batch}}])))
        for command in (["validate", str(f)], ["sweep", "--dry-run", str(f)]):
            r = CliRunner().invoke(main, command)
            if refused:
                assert r.exit_code == 2, r.output
                assert "methods.0.params.batch_size" in r.stderr and "task 'eurosat' (10 images)" in r.stderr, r.stderr
            else:
                assert r.exit_code == 0, r.output + r.stderr
    assert not (tmp_path / "out").exists()
