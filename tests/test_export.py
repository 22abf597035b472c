"""`harness export`: the merged encoder a row reports, written as a checkpoint that loads back
as a fine-tuned one and scores what the row reports; adaptive rows resume their saved
adaptation; WeMoE and stale rows are refused with a line saying why."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open

from harness.cli import main
from harness.config import validate_config
from harness.export import ExportError, export_merged
from harness.runner import run_sweep
from tests.conftest import TRAINED_TASKS, make_sweep_dict, tuned_ties_then_k_joins


def test_an_exported_merge_loads_back_as_a_checkpoint_and_scores_what_its_row_reports(trained_checkpoints, tmp_path):
    d = make_sweep_dict(trained_checkpoints, tmp_path)
    d["tasks"] = list(TRAINED_TASKS)
    d["references"] = False
    d["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.2, 0.5, 0.9]}},
                    {"name": "ties", "params": {"k": 50}, "grid": {"scaling": [0.6, 1.2]}}]
    cfg = validate_config(d)
    outcome = run_sweep(cfg, quiet=True)
    rows = {r.method: r for r in outcome.rows}
    for label in ("task_arithmetic", "ties"):
        dst = tmp_path / f"{label}.safetensors"
        done = export_merged(cfg, label, dst)
        assert done.result.metrics["acc/avg"] == rows[label].avg  # the row's chosen setting
        with safe_open(str(dst), "pt") as f:
            meta = f.metadata()
        assert meta["label"] == label and json.loads(meta["params"]) == done.result.params
        assert meta["job_key"] == done.result.key
        # The file as every task's "fine-tuned" checkpoint: the individual rows score the merge.
        again = make_sweep_dict(trained_checkpoints, tmp_path / f"load-{label}")
        again["tasks"] = list(TRAINED_TASKS)
        again["model"] = {**again["model"], "finetuned_pattern": None,
                          "finetuned": {t: str(dst) for t in TRAINED_TASKS}}
        again["references"] = {"pretrained": False, "individual": True}
        again["methods"] = []
        loaded = run_sweep(validate_config(again), quiet=True)
        individual = next(r for r in loaded.rows if r.method == "individual")
        assert individual.acc == pytest.approx(rows[label].acc, abs=1e-9)
    # The whole CLIP with the merged image tower, as the pretrained model: its zero-shot row
    # (heads from the unchanged text tower) scores what task arithmetic's row reports.
    whole = tmp_path / "ta-clip.safetensors"
    export_merged(cfg, "task_arithmetic", whole, full_clip=True)
    as_pretrained = make_sweep_dict(trained_checkpoints, tmp_path / "load-clip")
    as_pretrained["tasks"] = list(TRAINED_TASKS)
    as_pretrained["model"] = {**as_pretrained["model"], "pretrained": str(whole)}
    as_pretrained["references"] = {"pretrained": True, "individual": False}
    as_pretrained["methods"] = []
    zero_shot = next(r for r in run_sweep(validate_config(as_pretrained), quiet=True).rows if r.method == "pretrained")
    assert zero_shot.acc == pytest.approx(rows["task_arithmetic"].acc, abs=1e-9)
    # open_clip itself loads it as it is: every tensor of the file in the model it builds.
    from safetensors.torch import load_file

    from harness.models import open_clip_module

    model = open_clip_module().create_model("harness-micro-vit", pretrained=str(whole))
    saved, built = load_file(str(whole)), model.state_dict()
    assert set(saved) == set(built) and all(torch.equal(saved[k], built[k]) for k in saved)


def test_an_adaptive_row_is_exported_from_its_saved_adaptation(sweep_dict, adam_steps):
    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "adamerging", "params": {"steps": 3, "batch_size": 4}}]
    cfg = validate_config(sweep_dict)
    run_sweep(cfg, quiet=True)
    assert len(adam_steps) == 3
    adam_steps.clear()
    done = export_merged(cfg, "adamerging", cfg.resolved_output_dir() / "ada.safetensors")
    assert adam_steps == [] and not done.adapted_again


def test_wemoe_a_missing_row_and_a_stale_row_are_refused_in_one_line(sweep_dict, tmp_path):
    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "wemoe", "params": {"steps": 2, "batch_size": 4}},
                             {"name": "task_arithmetic", "grid": {"scaling": [0.3]}}]
    path = tmp_path / "sweep.yaml"
    import yaml

    path.write_text(yaml.safe_dump(sweep_dict))
    runner = CliRunner()
    before = runner.invoke(main, ["export", str(path), "--method", "task_arithmetic", "--out", str(tmp_path / "x.st")])
    assert before.exit_code == 2 and "run `harness sweep` first" in before.output
    run_sweep(validate_config(sweep_dict), quiet=True)
    refused = runner.invoke(main, ["export", str(path), "--method", "wemoe", "--out", str(tmp_path / "w.st")])
    assert refused.exit_code == 2 and "not a plain image encoder" in refused.output and "wemoe.safetensors" in refused.output
    assert not (tmp_path / "w.st").exists()
    ok = runner.invoke(main, ["export", str(path), "--method", "task_arithmetic", "--out", str(tmp_path / "ta.st")])
    assert ok.exit_code == 0 and "scaling=0.3" in ok.output and (tmp_path / "ta.st").is_file()
    # Other evaluation settings than the row was run with: its job is not the one the sweep would run now.
    stale = runner.invoke(main, ["export", str(path), "eval.max_samples=5",
                                 "--method", "task_arithmetic", "--out", str(tmp_path / "s.st")])
    assert stale.exit_code == 2 and "rerun the sweep" in stale.output
    with pytest.raises(ExportError, match="no row 'nope'"):
        export_merged(validate_config(sweep_dict), "nope", tmp_path / "n.st")


def test_wemoe_is_refused_before_its_lost_adaptation_runs_again(sweep_dict, tmp_path, adam_steps):
    """A WeMoE row whose work folder was cleaned up: export said no only after adapting the routers
    again from the start (every step, and a new work folder) to find routed MLPs."""
    import shutil

    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "wemoe", "params": {"steps": 3, "batch_size": 4}}]
    cfg = validate_config(sweep_dict)
    run_sweep(cfg, quiet=True)
    shutil.rmtree(cfg.resolved_output_dir() / "work")
    adam_steps.clear()
    with pytest.raises(ExportError, match="not a plain image encoder .*wemoe.safetensors"):
        export_merged(cfg, "wemoe", tmp_path / "w.safetensors")
    assert adam_steps == [] and not (cfg.resolved_output_dir() / "work").exists()
    assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize("out", ["", "new-folder/"])
def test_an_out_that_names_a_folder_is_refused_before_any_work(sweep_dict, tmp_path, monkeypatch, out):
    """`--out ""` ended in a traceback (renaming the written file onto "."), after the merge;
    `--out new-folder/` wrote a file called new-folder."""
    import yaml

    monkeypatch.chdir(tmp_path)
    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.3]}}]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_dict))
    run_sweep(validate_config(sweep_dict), quiet=True)
    r = CliRunner().invoke(main, ["export", str(path), "--method", "task_arithmetic", "--out", out])
    assert r.exit_code == 2 and r.output.startswith(f"error: --out {out!r}: names a folder, not the safetensors file"), r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out", "sweep.yaml"]


def test_a_renamed_row_is_exported_from_the_jobs_its_old_label_ran(sweep_dict, tmp_path):
    """A result file keeps the label its job first ran under; the table (and its jobs.json) counts
    it under the sweep's label now, and so does export (it said "no finished setting"). Renamed
    and not run since, the refusal says to run the sweep, which runs none of its jobs again."""
    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "task_arithmetic", "label": "before", "grid": {"scaling": [0.3, 0.6]}}]
    run_sweep(validate_config(sweep_dict), quiet=True)
    sweep_dict["methods"][0]["label"] = "after"
    cfg = validate_config(sweep_dict)
    # renamed and not run since: the last table has no row "after" yet; the refusal says what gives one
    with pytest.raises(ExportError, match=r"no row 'after' in the last results table \(rows: before\): run "
                                          r"`harness sweep` .*finished jobs are not run again.*then export"):
        export_merged(cfg, "after", tmp_path / "after.safetensors")
    again = run_sweep(cfg, quiet=True)
    assert again.executed == [] and [r.method for r in again.rows] == ["after"]
    done = export_merged(cfg, "after", tmp_path / "after.safetensors")
    assert done.result.metrics["acc/avg"] == again.rows[0].avg and done.result.label == "after"
    with safe_open(str(tmp_path / "after.safetensors"), "pt") as f:
        assert f.metadata()["label"] == "after"


def test_a_generalization_row_or_a_failed_row_is_refused_saying_why_not_rerun(sweep_dict, tmp_path):
    """"Rerun the sweep" would not give either a model to export: a generalization row is merged
    on the seen tasks only (the main row is what exports), and a row whose every setting failed
    fails again. Each refusal says which it is; a row whose jobs have not run still says rerun."""
    sweep_dict["references"] = False
    sweep_dict["generalization"] = {"unseen": [sweep_dict["tasks"][-1]]}
    sweep_dict["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.3]}},
                             {"name": "tests.failing_method:AlwaysFails", "label": "fails"}]
    cfg = validate_config(sweep_dict)
    run_sweep(cfg, quiet=True)
    with pytest.raises(ExportError) as gen:
        export_merged(cfg, "task_arithmetic (gen)", tmp_path / "g.safetensors")
    assert str(gen.value) == ("row 'task_arithmetic (gen)' is a generalization row, merged on the seen tasks only: "
                              "export exports the main table's rows (--method 'task_arithmetic')")
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep_dict))
    r = CliRunner().invoke(main, ["export", str(sweep_file), "--method", "task_arithmetic (gen)",
                                  "--out", str(tmp_path / "g.safetensors")])
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {gen.value}", r.output  # the command says the same
    with pytest.raises(ExportError) as failed:
        export_merged(cfg, "fails", tmp_path / "f.safetensors")
    assert re.fullmatch(r"row 'fails': every setting failed \(1; RuntimeError: deliberate failure; "
                        r".*/artifacts/\w+/traceback\.txt\): nothing to export until one finishes", str(failed.value))
    for result in (cfg.resolved_output_dir() / "results").glob("*.json"):
        if json.loads(result.read_text())["label"] == "task_arithmetic":
            result.unlink()  # its job's result gone: a rerun gives it back
    with pytest.raises(ExportError, match=r"row 'task_arithmetic': no finished setting in .*: rerun the sweep"):
        export_merged(cfg, "task_arithmetic", tmp_path / "t.safetensors")
    assert not list(tmp_path.glob("*.safetensors"))


def test_a_row_with_some_settings_failed_and_the_rest_not_run_says_rerun(sweep_dict, tmp_path):
    """"Every setting failed" only where every one did: a setting not yet run may still finish."""
    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "tests.failing_method:AlwaysFailsWithParam", "label": "fails",
                              "grid": {"strength": [0.1, 0.2]}}]
    cfg = validate_config(sweep_dict)
    run_sweep(cfg, quiet=True)
    tracebacks = sorted((cfg.resolved_output_dir() / "artifacts").glob("*/traceback.txt"))
    assert len(tracebacks) == 2
    tracebacks[0].unlink()  # that setting's job as if it had not run
    with pytest.raises(ExportError, match=r"row 'fails': no finished setting in .*: rerun the sweep"):
        export_merged(cfg, "fails", tmp_path / "f.safetensors")


def test_a_row_whose_chosen_settings_result_is_gone_is_refused_not_exported_at_another(sweep_dict, tmp_path):
    """The row reports its best setting on val; with that setting's result file gone, the best of
    the others is not the model the row reports: refused naming the file, not written at another."""
    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.1, 0.9]}}]
    cfg = validate_config(sweep_dict)
    outcome = run_sweep(cfg, quiet=True)
    chosen = next(r for r in outcome.results if r.params == {"scaling": float(outcome.rows[0].setting[8:])})
    gone = cfg.resolved_output_dir() / "results" / f"{chosen.key}.json"
    gone.unlink()
    with pytest.raises(ExportError) as refused:
        export_merged(cfg, "task_arithmetic", tmp_path / "t.safetensors")
    assert str(gone) in str(refused.value) and "rerun the sweep" in str(refused.value)
    assert not (tmp_path / "t.safetensors").exists()


def test_a_row_with_a_failed_setting_exports_its_finished_one(sweep_dict, tmp_path):
    """A failed setting keeps no result file (its traceback says why it failed): the row's
    finished setting is still the one it reports, and is exported."""
    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "tests.failing_method:FailsWithBrackets", "label": "half",
                              "grid": {"strength": [0.3, 0.9]}}]
    cfg = validate_config(sweep_dict)
    run_sweep(cfg, quiet=True)
    done = export_merged(cfg, "half", tmp_path / "h.safetensors")
    assert done.result.params == {"strength": 0.3} and (tmp_path / "h.safetensors").is_file()


def export_adamerging_again(sweep_dict, tmp_path, adam_steps):
    """``harness export`` of the sweep's AdaMerging row, checked to adapt again (both steps run)."""
    adam_steps.clear()
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_dict))
    out = CliRunner().invoke(main, ["export", str(path), "--method", "adamerging", "--out", str(tmp_path / "a.st")])
    assert out.exit_code == 0, out.output
    assert len(adam_steps) == 2
    return out


def test_a_row_run_with_checkpoint_every_0_adapts_again_and_says_why(sweep_dict, tmp_path, adam_steps):
    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "adamerging", "params": {"steps": 2, "batch_size": 4, "checkpoint_every": 0}}]
    run_sweep(validate_config(sweep_dict), quiet=True)
    out = export_adamerging_again(sweep_dict, tmp_path, adam_steps)
    assert "adapted again, from the start (its job ran with checkpoint_every: 0, which saves none" in out.output


def test_the_metadata_names_the_checkpoints_merged_not_the_unseen_ones(trained_checkpoints, tmp_path):
    d = make_sweep_dict(trained_checkpoints, tmp_path)
    d["tasks"] = list(TRAINED_TASKS)
    d["unseen"] = [TRAINED_TASKS[-1]]
    d["references"] = False
    d["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.3]}}]
    cfg = validate_config(d)
    row = run_sweep(cfg, quiet=True).rows[0]
    export_merged(cfg, "task_arithmetic", tmp_path / "ta.safetensors")
    with safe_open(str(tmp_path / "ta.safetensors"), "pt") as f:
        meta = f.metadata()
    assert sorted(json.loads(meta["finetuned_digests"])) == sorted(TRAINED_TASKS[:-1])
    assert row.val_avg != row.avg  # the two accuracies are told apart: each is its table row's
    assert (meta["val_acc_avg"], meta["test_acc_avg"]) == (f"{row.val_avg:.4f}", f"{row.avg:.4f}")
    assert all(isinstance(json.loads(meta[k]), dict) for k in ("params", "finetuned_digests"))


def test_a_whole_clip_of_a_generated_architecture_builds_from_the_file_alone(tmp_path, monkeypatch):
    """A generated ``hf-vit-...`` architecture (sizes no shipped config has) is known only where it
    was registered: the exported file carries its config, as `harness import`'s files do, so a
    fresh process builds it from the file alone (it said "unknown open_clip architecture")."""
    import open_clip.factory
    from safetensors.torch import load_file

    from harness.models import build_clip
    from tests.conftest import write_micro_checkpoints

    arch = "hf-vit-export-test"
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16,
                                              "patch_size": 8, "mlp_ratio": 2.0},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    ckpt = tmp_path / "ckpt"
    write_micro_checkpoints(ckpt, lambda p: 0.05)
    (ckpt / "model_configs").mkdir()
    (ckpt / "model_configs" / f"{arch}.json").write_text(json.dumps(config))  # beside model.pretrained
    known = dict(open_clip.factory._MODEL_CONFIGS)
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(known))
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIG_PATHS", list(open_clip.factory._MODEL_CONFIG_PATHS))
    d = make_sweep_dict(ckpt, tmp_path)
    d["model"]["arch"] = arch
    d["references"] = False
    d["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.3]}}]
    cfg = validate_config(d)
    run_sweep(cfg, quiet=True)
    whole = tmp_path / "shared" / "ta-clip.safetensors"
    export_merged(cfg, "task_arithmetic", whole, full_clip=True)
    open_clip.factory._MODEL_CONFIGS.clear()  # a fresh process: the generated name is unknown again
    open_clip.factory._MODEL_CONFIGS.update(known)
    model = build_clip(arch, str(whole))
    assert open_clip.factory._MODEL_CONFIGS[arch] == config
    saved, built = load_file(str(whole)), model.state_dict()
    assert set(saved) == set(built) and all(torch.equal(saved[k], built[k]) for k in saved)


def test_a_sweep_run_on_a_gpu_exported_without_one_says_to_override_the_device(sweep_dict, tmp_path, monkeypatch):
    """`device: cuda` on a machine without a GPU ended in "CUDA is not available", with no word of
    the device=cpu override that exports the same merge."""
    import yaml

    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.3]}}]
    run_sweep(validate_config(sweep_dict), quiet=True)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**sweep_dict, "device": "cuda"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["export", str(path), "--method", "task_arithmetic", "--out", str(tmp_path / "ta.st")]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1, refused.output
    assert "CUDA is not available" in refused.output and "override device=cpu" in refused.output
    assert not (tmp_path / "ta.st").exists()
    ok = CliRunner().invoke(main, args[:2] + ["device=cpu"] + args[2:])
    assert ok.exit_code == 0 and (tmp_path / "ta.st").is_file(), ok.output


def test_an_out_that_is_one_of_the_sweeps_inputs_is_refused(tmp_path):
    """`--out` naming the pretrained file (or a fine-tuned one through a link, or a file in the
    cache) replaced that input with the merge, without a word."""
    import hashlib

    import yaml

    from tests.conftest import write_micro_checkpoints

    ckpt = write_micro_checkpoints(tmp_path / "ckpt", lambda p: 0.05)
    d = make_sweep_dict(ckpt, tmp_path)
    d["references"] = False
    d["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.3]}}]
    run_sweep(validate_config(d), quiet=True)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(d))
    (tmp_path / "link.safetensors").symlink_to(ckpt / "toy_colours.safetensors")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.iterdir()}
    for out, fragment in ((ckpt / "pretrained.safetensors", "is one of the sweep's input models"),
                          (tmp_path / "link.safetensors", "is one of the sweep's input models"),
                          (tmp_path / "cache" / "merged.safetensors", "lies in the sweep's cache folder")):
        r = CliRunner().invoke(main, ["export", str(path), "--method", "task_arithmetic", "--out", str(out)])
        assert r.exit_code == 2 and r.output.startswith(f"error: {out}: {fragment}"), r.output
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.iterdir()} == before
    assert not (tmp_path / "cache" / "merged.safetensors").exists()


def test_an_out_that_is_a_record_of_the_output_folder_is_refused_and_a_new_file_beside_them_written(sweep_dict,
                                                                                                    tmp_path):
    """`--out OUTPUT_DIR/mlflow.db` (or a result file, the resolved config, a file in work/)
    replaced the sweep's own records with the merge, without a word; a file of its own in the
    folder (``exports/``) is no record and is written."""
    import hashlib

    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.3]}}]
    outcome = run_sweep(validate_config(sweep_dict), quiet=True)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_dict))
    out = Path(sweep_dict["output_dir"])
    records = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    key = outcome.results[0].key
    for dst, fragment in ((out / "mlflow.db", f"is the sweep's mlflow.db \\({out / 'mlflow.db'}\\)"),
                          (out / "resolved.yaml", "is the sweep's resolved.yaml"),
                          (out / "results" / f"{key}.json", f"lies in the sweep's records folder {out / 'results'},"),
                          (out / "work" / key / "merged.safetensors", "lies in the sweep's records folder")):
        r = CliRunner().invoke(main, ["export", str(path), "--method", "task_arithmetic", "--out", str(dst)])
        assert r.exit_code == 2 and re.match(f"error: {dst}: {fragment}", r.output), r.output
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()} == records
    r = CliRunner().invoke(main, ["export", str(path), "--method", "task_arithmetic",
                                  "--out", str(out / "exports" / "t.safetensors")])
    assert r.exit_code == 0 and (out / "exports" / "t.safetensors").is_file(), r.output


def test_an_out_inside_an_input_model_folder_is_refused(sweep_dict, tmp_path):
    """A Hugging Face CLIP given as a folder: a file written into it would be read as part of it."""
    from harness.export import _refuse_an_input

    folder = tmp_path / "hf-clip"
    folder.mkdir()
    sources = {"pretrained": str(folder), "finetuned": {}, "heads": {}}
    with pytest.raises(ExportError, match=f"is one of the sweep's input models \\({folder}\\)"):
        _refuse_an_input(folder / "merged.safetensors", validate_config(sweep_dict), sources)
    _refuse_an_input(tmp_path / "merged.safetensors", validate_config(sweep_dict), sources)  # beside it: fine


def test_an_out_that_is_a_hard_link_to_an_input_is_refused(sweep_dict, tmp_path):
    """A hard link is the input file under another name (no symlink to resolve): refused too."""
    import os

    from harness.export import _refuse_an_input

    given = tmp_path / "given.safetensors"
    given.write_bytes(b"model")
    os.link(given, tmp_path / "linked.safetensors")
    sources = {"pretrained": str(given), "finetuned": {}, "heads": {}}
    with pytest.raises(ExportError, match=f"is one of the sweep's input models \\({given}\\)"):
        _refuse_an_input(tmp_path / "linked.safetensors", validate_config(sweep_dict), sources)


def test_a_row_of_an_edited_method_of_ones_own_is_refused_naming_its_file(sweep_dict, tmp_path, monkeypatch):
    """Editing one's method file after the sweep makes its row stale: the refusal names the file
    as what changed, and not checkpoints, data or settings, none of which did."""
    import sys

    monkeypatch.syspath_prepend(str(tmp_path))
    source = tmp_path / "edited_method.py"
    source.write_text("from methods.task_arithmetic import TaskArithmetic\n\n\nclass Mine(TaskArithmetic):\n"
                      "    \"\"\"Task arithmetic under another name.\"\"\"\n")
    sys.modules.pop("edited_method", None)
    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "edited_method:Mine", "label": "mine"}]
    run_sweep(validate_config(sweep_dict), quiet=True)
    source.write_text(source.read_text() + "# edited\n")
    sys.modules.pop("edited_method", None)  # as the next `harness export` process imports it
    changed = f"run before the code of its method \\({source}\\) changed \\(key now "
    with pytest.raises(ExportError, match=changed) as refused:
        export_merged(validate_config(sweep_dict), "mine", tmp_path / "mine.safetensors")
    assert "checkpoint" not in str(refused.value) and "settings" not in str(refused.value)
    assert not (tmp_path / "mine.safetensors").exists()


def test_a_tiny_embedded_sweeps_export_checks_out_with_its_tasks_given_size_tiny(tmp_path):
    """README: checking an export of a `model.suite.size: tiny` sweep in a `source: files` sweep
    needs each embedded task's `options: {size: tiny}`; without it the tasks are the full-size
    ones (1000 test images, not 100). With it, the export scores what its row reports."""
    from harness.workspace import Workspace

    suite = {"size": "tiny", "pretrain_steps": 40, "pretrain_pool": 512, "pretrain_batch_size": 64,
             "finetune_steps": 30, "preserve_pool": 64}  # sweeps/quick.yaml's, cached by its runs
    tasks = ["emb_mnist", "emb_fashion"]
    cfg = validate_config({"name": "tiny", "output_dir": str(tmp_path / "out"), "references": False,
                           "model": {"source": "embedded", "suite": suite}, "tasks": tasks,
                           "eval": {"max_samples": 64}, "methods": [{"name": "weight_averaging"}]})
    row = run_sweep(cfg, quiet=True).rows[0]
    export_merged(cfg, "weight_averaging", tmp_path / "clip.safetensors", full_clip=True)
    export_merged(cfg, "weight_averaging", tmp_path / "enc.safetensors")

    def check(options: dict) -> dict:
        return {"name": "check", "output_dir": str(tmp_path / f"check{len(options)}"), "eval": {"max_samples": 64},
                "model": {"source": "files", "arch": "harness-tiny-vit", "pretrained": str(tmp_path / "clip.safetensors"),
                          "finetuned": {t: str(tmp_path / "enc.safetensors") for t in tasks}},
                "tasks": [{"name": t, "options": options} for t in tasks],
                "references": {"pretrained": False, "individual": True}, "methods": []}

    assert len(Workspace(validate_config(check({}))).task("emb_mnist").dataset("test")) == 1000
    tiny = validate_config(check({"size": "tiny"}))
    assert len(Workspace(tiny).task("emb_mnist").dataset("test")) == 100
    assert run_sweep(tiny, quiet=True).rows[0].acc == pytest.approx(row.acc, abs=1e-9)
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert "To check an export of a sweep with `model.suite.size: tiny`" in readme
    assert "give each embedded task `options: {size: tiny}`" in readme


def test_a_tuned_rows_export_names_the_setting_its_row_shows(sweep_dict, tmp_path):
    """A tuned best with ``k`` at its default reuses the job run before ``k`` joined the space; the
    row shows ``k=20.0, scaling=0.6``, and so do the export's line and metadata (they gave the
    result file's ``scaling=0.6``)."""
    d = tuned_ties_then_k_joins(sweep_dict)
    cfg = validate_config(d)
    assert run_sweep(cfg, quiet=True).rows[0].setting == "scaling=0.6, k=20.0"
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d, sort_keys=False))
    r = CliRunner().invoke(main, ["export", str(f), "--method", "tt", "--out", str(tmp_path / "tt.safetensors")])
    assert r.exit_code == 0, r.output
    assert "tt (scaling=0.6, k=20.0)" in r.output, r.output
    with safe_open(str(tmp_path / "tt.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["params"]) == {"scaling": 0.6, "k": 20.0}


@pytest.mark.parametrize("damage", [lambda text: text[: len(text) // 2], lambda text: "", lambda text: '{"a": 1}',
                                    lambda text: "[[1, 2]]"])
def test_a_damaged_jobs_file_is_refused_in_one_line_naming_it(sweep_dict, tmp_path, damage):
    """report/jobs.json cut short (a writer killed mid-write) or edited: one line naming the
    file and what rewrites it, not a JSON traceback; the rerun it names makes export work again."""
    import yaml

    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.3]}}]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_dict))
    cfg = validate_config(sweep_dict)
    run_sweep(cfg, quiet=True)
    jobs = cfg.resolved_output_dir() / "report" / "jobs.json"
    jobs.write_text(damage(jobs.read_text()))
    runner = CliRunner()
    refused = runner.invoke(main, ["export", str(path), "--method", "task_arithmetic", "--out", str(tmp_path / "t.st")])
    assert refused.exit_code == 2 and refused.exception.__class__ is SystemExit
    assert refused.output == (f"error: {jobs}: damaged (not the list of jobs a sweep writes): rerun `harness sweep` "
                              "(its finished jobs are cached) to write it again\n")
    run_sweep(cfg, quiet=True)
    again = runner.invoke(main, ["export", str(path), "--method", "task_arithmetic", "--out", str(tmp_path / "t.st")])
    assert again.exit_code == 0 and (tmp_path / "t.st").is_file()


_PAUSING = '''
import os, sys, time
from pathlib import Path

import methods.tta as tta
from harness.cache import atomic_path
from harness.cli import main

pause = Path(os.environ["PAUSE_DIR"]) if os.environ.get("PAUSE_DIR") else None


def write_pausing(path, data):
    """The first checkpoint write stops with its temporary file written, until the test says go."""
    global pause
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        if pause is not None:
            (pause / "ready").touch()
            deadline = time.monotonic() + 120
            while not (pause / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            pause = None


tta.atomic_write_bytes = write_pausing
main(sys.argv[1:])
'''


def _start(tmp_path, name, args, pause=None):
    import os
    import subprocess
    import sys

    script = tmp_path / "pausing_cli.py"
    script.write_text(_PAUSING)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PAUSE_DIR": str(pause or "")}
    with open(tmp_path / f"{name}.err", "w") as err:  # the child keeps its own copy
        return subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.DEVNULL, stderr=err)


def _wait_for(condition, what: str, timeout: float = 180) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("first", ["export", "sweep"])
def test_an_export_adapting_again_waits_for_another_process_adapting_that_job(first, sweep_dict, tmp_path):
    """Two processes adapting one job in its ``work/<key>/`` at once (two exports of a row whose
    adaptation is gone, or an export while the sweep's job adapts): the second deleted the first's
    checkpoint being written as a killed run's leftover, and the first crashed (FileNotFoundError),
    failing the sweep's job. The first is paused with its checkpoint's temporary file written
    until the second either waits or is done; both then end well, with the model an
    uninterrupted adaptation gives."""
    import shutil

    from safetensors.torch import load_file

    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "adamerging", "params": {"steps": 3, "batch_size": 4, "checkpoint_every": 1}}]
    cfg = validate_config(sweep_dict)
    run_sweep(cfg, quiet=True)
    truth = export_merged(cfg, "adamerging", tmp_path / "truth.safetensors")
    out = cfg.resolved_output_dir()
    shutil.rmtree(out / "work" / truth.result.key)
    result = out / "results" / f"{truth.result.key}.json"
    kept = result.read_bytes()
    if first == "sweep":
        result.unlink()  # the sweep runs the job again
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_dict))
    export = ["export", str(path), "--method", "adamerging", "--out"]
    pause = tmp_path / "pause"
    pause.mkdir()
    a = _start(tmp_path, "a", [*export, str(tmp_path / "a.safetensors")] if first == "export" else ["sweep", str(path)],
               pause)
    _wait_for(lambda: (pause / "ready").exists() or a.poll() is not None, "the first process's checkpoint write")
    assert a.poll() is None, (tmp_path / "a.err").read_text()
    result.write_bytes(kept)  # the row the export reads
    b = _start(tmp_path, "b", [*export, str(tmp_path / "b.safetensors")])
    _wait_for(lambda: b.poll() is not None or "waiting for another process" in (tmp_path / "b.err").read_text(),
              "the second process to end or wait")
    (pause / "go").touch()
    assert a.wait(timeout=300) == 0, (tmp_path / "a.err").read_text()
    assert b.wait(timeout=300) == 0, (tmp_path / "b.err").read_text()
    assert "waiting for another process" in (tmp_path / "b.err").read_text()
    want = load_file(str(tmp_path / "truth.safetensors"))
    for name in ("a", "b") if first == "export" else ("b",):
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    if first == "sweep":
        assert json.loads(result.read_text())["status"] == "ok"


def test_export_command_names_the_row_setting_and_scores_it_wrote(trained_checkpoints, tmp_path):
    """The line `harness export` prints names the setting chosen on val and the row's val and test
    averages, from the job's own result file; --full-clip writes the text tower too."""
    d = make_sweep_dict(trained_checkpoints, tmp_path)
    d["tasks"] = list(TRAINED_TASKS)
    d["references"] = False
    d["methods"] = [{"name": "task_arithmetic", "label": "ta", "grid": {"scaling": [0.2, 0.9]}}]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(d))
    outcome = run_sweep(validate_config(d), quiet=True)
    row = next(r for r in outcome.rows if r.method == "ta")
    results = [json.loads(p.read_text()) for p in (tmp_path / "out" / "results").glob("*.json")]
    best_val = max(r["metrics"]["val/acc/avg"] for r in results if r["label"] == "ta")
    for out, full in (("ta.safetensors", []), ("ta-clip.safetensors", ["--full-clip"])):
        r = CliRunner().invoke(main, ["export", str(path), "--method", "ta", "--out", str(tmp_path / out), *full])
        assert r.exit_code == 0, r.output
        line = " ".join(r.stdout.split())
        key = re.fullmatch(r".*\(job (\w+)\)", line).group(1)
        saved = json.loads((tmp_path / "out" / "results" / f"{key}.json").read_text())
        val, test = saved["metrics"]["val/acc/avg"], saved["metrics"]["acc/avg"]
        assert val == best_val and test == pytest.approx(row.avg) and f"{val:.1f}" != f"{test:.1f}"
        assert line == (f"wrote {tmp_path / out}: ta (scaling={saved['params']['scaling']}), val {val:.1f}, "
                        f"test {test:.1f} (job {key})")
        with safe_open(str(tmp_path / out), "pt") as f:
            text_tower = [k for k in f.keys() if k.startswith("token_embedding")]
        assert bool(text_tower) == bool(full)


def test_a_row_whose_saved_adaptation_is_gone_adapts_again_and_names_the_folder(sweep_dict, tmp_path, adam_steps):
    """The adaptation a job saved, deleted since: export adapts again, naming the job's work folder
    it found empty."""
    import shutil

    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "adamerging", "params": {"steps": 2, "batch_size": 4}}]
    cfg = validate_config(sweep_dict)
    run_sweep(cfg, quiet=True)
    results = [json.loads(p.read_text()) for p in (cfg.resolved_output_dir() / "results").glob("*.json")]
    (key,) = [r["key"] for r in results if r["label"] == "adamerging"]
    shutil.rmtree(cfg.resolved_output_dir() / "work" / key)
    out = export_adamerging_again(sweep_dict, tmp_path, adam_steps)
    assert out.stdout.splitlines()[0] == (f"adamerging: adapted again, from the start (none saved in work/{key}/; "
                                          "same data and seed)")


def test_the_metadata_holds_the_format_arch_and_the_sha256_of_each_checkpoint_merged(sweep_dict, tmp_path):
    """Each digest is the first 16 hex digits of its file's sha256, computed here from the bytes;
    the format names what the file holds: an image encoder, or with --full-clip a whole CLIP."""
    import hashlib

    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.3]}}]
    cfg = validate_config(sweep_dict)
    run_sweep(cfg, quiet=True)
    files = {"pretrained": Path(sweep_dict["model"]["pretrained"]),
             **{t: Path(sweep_dict["model"]["finetuned_pattern"].format(task=t)) for t in sweep_dict["tasks"]}}
    sha = {k: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for k, p in files.items()}
    for name, full, fmt in (("enc", False, "harness.merged-image-encoder/1"), ("clip", True, "harness.merged-clip/1")):
        export_merged(cfg, "task_arithmetic", tmp_path / f"{name}.safetensors", full_clip=full)
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            meta = f.metadata()
        assert (meta["format"], meta["arch"], meta["method"]) == (fmt, "harness-micro-vit", "task_arithmetic")
        assert meta["pretrained_digest"] == sha["pretrained"]
        assert json.loads(meta["finetuned_digests"]) == {t: sha[t] for t in sweep_dict["tasks"]}


def test_an_out_that_is_a_head_file_or_a_checkpoint_as_given_before_conversion_is_refused(sweep_dict, tmp_path):
    """A fine-tuned checkpoint given as a whole CLIP is read through its converted copy in the
    cache, and a head file is no model the merge reads: either named as --out would still be
    replaced by the export."""
    import hashlib

    from harness.models import load_state_dict, save_state_dict
    from harness.workspace import Workspace

    task = sweep_dict["tasks"][0]
    whole = tmp_path / "given" / f"{task}-clip.safetensors"
    encoder = load_state_dict(sweep_dict["model"]["finetuned_pattern"].format(task=task))
    pretrained = load_state_dict(sweep_dict["model"]["pretrained"])
    save_state_dict({**pretrained, **{f"visual.{k}": v for k, v in encoder.items()}}, whole)
    sweep_dict["model"]["finetuned"] = {task: str(whole)}
    head = tmp_path / "given" / "head.safetensors"
    save_state_dict({"weight": Workspace(validate_config(sweep_dict)).head(task)}, head)
    sweep_dict["model"]["heads"] = {task: str(head)}
    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.3]}}]
    cfg = validate_config(sweep_dict)
    run_sweep(cfg, quiet=True)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (whole, head)}
    for out in (whole, head):
        with pytest.raises(ExportError, match="is one of the sweep's input models"):
            export_merged(cfg, "task_arithmetic", out)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (whole, head)} == before


def test_a_merged_model_with_tensors_the_architecture_has_not_is_refused_naming_one(tmp_path):
    """A plugin method's model of another structure than the pretrained encoder is no checkpoint
    that loads back as a fine-tuned one; one of the same structure is written as it is."""
    import copy

    from harness.export import _plain_encoder_state
    from harness.models import build_clip

    pretrained = build_clip("harness-micro-vit").visual
    same = copy.deepcopy(pretrained)
    state = _plain_encoder_state(same, pretrained, "m", tmp_path)
    assert set(state) == set(pretrained.state_dict())
    assert all(torch.equal(state[k], v) for k, v in pretrained.state_dict().items())
    routed = copy.deepcopy(pretrained)
    routed.register_parameter("router", torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(ExportError, match=r"not a plain image encoder \(1 tensors the architecture has not, e\.g\. router\)"):
        _plain_encoder_state(routed, pretrained, "m", tmp_path)


def test_a_merged_model_with_a_tensor_of_another_shape_is_refused(tmp_path):
    """Every tensor name the architecture has, one of another shape: no checkpoint that loads back."""
    import copy

    from harness.export import _plain_encoder_state
    from harness.models import build_clip

    pretrained = build_clip("harness-micro-vit").visual
    wider = copy.deepcopy(pretrained)
    wider.class_embedding = torch.nn.Parameter(torch.zeros(wider.class_embedding.numel() + 1))
    assert set(wider.state_dict()) == set(pretrained.state_dict())
    n = pretrained.class_embedding.numel()
    with pytest.raises(ExportError, match=rf"not a plain image encoder \(class_embedding of shape \[{n + 1}\], "
                                          rf"the architecture's \[{n}\]\)"):
        _plain_encoder_state(wider, pretrained, "m", tmp_path)
    fewer = copy.deepcopy(pretrained)
    del fewer.class_embedding
    with pytest.raises(ExportError, match=r"\(1 of the architecture's tensors missing, e\.g\. class_embedding\)"):
        _plain_encoder_state(fewer, pretrained, "m", tmp_path)


def test_an_out_named_as_a_torch_pickle_checkpoint_is_refused_before_any_work(sweep_dict, tmp_path):
    """`--out merged.pt` wrote safetensors bytes under a name that torch.load (and open_clip, which
    reads a non-.safetensors file with torch.load) cannot read back."""
    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.3]}}]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_dict))
    run_sweep(validate_config(sweep_dict), quiet=True)
    for name in ("merged.pt", "merged.PTH", "merged.bin", "merged.ckpt"):
        dst = tmp_path / name
        r = CliRunner().invoke(main, ["export", str(path), "--method", "task_arithmetic", "--out", str(dst)])
        assert r.exit_code == 2 and r.output.startswith(f"error: --out {str(dst)!r}: "), r.output
        assert "safetensors" in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not dst.exists()
        with pytest.raises(ExportError, match=re.escape(name)):
            export_merged(validate_config(sweep_dict), "task_arithmetic", dst)
        assert not dst.exists()
    ok = CliRunner().invoke(main, ["export", str(path), "--method", "task_arithmetic",
                                   "--out", str(tmp_path / "merged.safetensors")])
    assert ok.exit_code == 0, ok.output
    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as f:
        assert f.metadata()["label"] == "task_arithmetic"


def test_a_full_clip_out_not_ending_in_safetensors_is_refused_and_one_that_does_loads_in_open_clip(sweep_dict,
                                                                                                   tmp_path):
    """open_clip's loader reads a checkpoint as safetensors only when its name ends in `.safetensors`
    (case-sensitive) and opens any other with torch.load: a whole CLIP written as `clip.st` did not load."""
    from safetensors.torch import load_file

    from harness.models import open_clip_module

    sweep_dict["references"] = False
    sweep_dict["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.3]}}]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_dict))
    run_sweep(validate_config(sweep_dict), quiet=True)
    for name in ("clip.st", "clip", "clip.SAFETENSORS"):
        dst = tmp_path / name
        r = CliRunner().invoke(main, ["export", str(path), "--method", "task_arithmetic", "--out", str(dst),
                                      "--full-clip"])
        assert r.exit_code == 2 and r.output.startswith(f"error: --out {str(dst)!r}: "), r.output
        assert "open_clip" in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not dst.exists()
        with pytest.raises(ExportError, match=re.escape(repr(str(dst)))):
            export_merged(validate_config(sweep_dict), "task_arithmetic", dst, full_clip=True)
        assert not dst.exists()
    encoder = CliRunner().invoke(main, ["export", str(path), "--method", "task_arithmetic",
                                        "--out", str(tmp_path / "encoder.st")])
    assert encoder.exit_code == 0, encoder.output  # an image encoder is read by content, as model.finetuned
    whole = tmp_path / "clip.safetensors"
    ok = CliRunner().invoke(main, ["export", str(path), "--method", "task_arithmetic", "--out", str(whole),
                                   "--full-clip"])
    assert ok.exit_code == 0, ok.output
    model = open_clip_module().create_model("harness-micro-vit", pretrained=str(whole))
    saved, built = load_file(str(whole)), model.state_dict()
    assert set(saved) == set(built) and all(torch.equal(saved[k], built[k]) for k in saved)


def _stale_sweep(tmp_path) -> tuple[dict, Path]:
    """A task arithmetic row run on checkpoints of its own (rewritten by the tests), and its sweep file."""
    from tests.conftest import write_micro_checkpoints

    (tmp_path / "ckpt").mkdir()
    d = make_sweep_dict(write_micro_checkpoints(tmp_path / "ckpt", lambda p: 0.05), tmp_path)
    d["references"] = False
    d["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.3]}}]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(d))
    run_sweep(validate_config(d), quiet=True)
    return d, path


def _export_line(path: Path, *args: str) -> str:
    r = CliRunner().invoke(main, ["export", str(path), *args, "--method", "task_arithmetic",
                                  "--out", str(path.parent / "ta.safetensors")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    return " ".join(r.output.split())


def test_a_stale_rows_refusal_names_the_input_that_changed(tmp_path):
    """A result records a digest of each part of its key: the refusal names the one that differs
    now (the eval settings given; a task's fine-tuned checkpoint rewritten), not a list of what may."""
    from tests.conftest import write_micro_checkpoints

    _, path = _stale_sweep(tmp_path)
    line = _export_line(path, "eval.max_samples=5")
    assert "was run before the evaluation settings (eval) changed (key now " in line, line
    assert "fine-tuned" not in line and "other checkpoints" not in line
    write_micro_checkpoints(tmp_path / "ckpt", lambda p: 0.07, tasks=["toy_colours"])  # toy_colours' file only
    line = _export_line(path)
    assert "was run before the fine-tuned checkpoint of toy_colours changed (key now " in line, line
    assert "toy_stripes" not in line and "eval" not in line
    assert not (tmp_path / "ta.safetensors").exists()


def test_a_stale_row_whose_result_recorded_no_inputs_is_refused_saying_what_may_differ(tmp_path):
    """A result written before its key's inputs were recorded still exports while current, and
    when stale is refused as before, naming what may differ."""
    _, path = _stale_sweep(tmp_path)
    for f in (tmp_path / "out" / "results").glob("*.json"):
        data = json.loads(f.read_text())
        assert data.pop("inputs")
        f.write_text(json.dumps(data))
    ok = CliRunner().invoke(main, ["export", str(path), "--method", "task_arithmetic",
                                   "--out", str(tmp_path / "old.safetensors")])
    assert ok.exit_code == 0 and (tmp_path / "old.safetensors").is_file(), ok.output
    line = _export_line(path, "eval.max_samples=5")
    assert "was run with other checkpoints, data or settings than the sweep's now" in line, line
