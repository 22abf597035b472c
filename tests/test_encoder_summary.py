"""The image encoder's summary (shapes, size, parameter count) is kept per (arch, weights):
a driver checks checkpoints without building the model, and still catches what building would."""

from __future__ import annotations

import pytest
import torch

from harness.config import validate_config
from harness.errors import HarnessError
from harness.models import build_clip, load_state_dict, save_state_dict
from harness.workspace import Workspace
from tests.conftest import make_sweep_dict, run_fresh


def no_model(*args, **kwargs):
    raise AssertionError("the model was built")


def test_summary_is_built_once_then_read(micro_checkpoints, tmp_path, monkeypatch):
    cfg = validate_config(make_sweep_dict(micro_checkpoints, tmp_path))
    first = Workspace(cfg)
    first.preflight()
    visual = first.clip.visual
    assert first.encoder_params == sum(p.numel() for p in visual.parameters())
    assert first._encoder_shapes == {k: tuple(v.shape) for k, v in visual.state_dict().items()}
    assert first.encoder_summary["image_size"] == list(visual.image_size)

    monkeypatch.setattr("harness.workspace.build_clip", no_model)
    second = Workspace(cfg)
    second.preflight()  # checkpoint headers and heads, from the summary alone
    assert second.encoder_params == first.encoder_params
    assert second._encoder_shapes == first._encoder_shapes


def test_new_weights_are_checked_by_building(micro_checkpoints, tmp_path, monkeypatch):
    """Weights that never loaded have no summary: the driver builds the model and refuses them."""
    cfg = validate_config(make_sweep_dict(micro_checkpoints, tmp_path))
    Workspace(cfg).preflight()
    bad = build_clip("harness-tiny-vit").state_dict()  # another architecture's weights
    save_state_dict(bad, tmp_path / "other.safetensors")
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["model"]["pretrained"] = str(tmp_path / "other.safetensors")
    with pytest.raises(HarnessError, match="weights do not match architecture 'harness-micro-vit'"):
        Workspace(validate_config(d)).preflight()


def test_cached_summary_still_rejects_a_wrong_checkpoint(micro_checkpoints, tmp_path, monkeypatch):
    cfg = validate_config(make_sweep_dict(micro_checkpoints, tmp_path))
    Workspace(cfg).preflight()
    wrong = load_state_dict(micro_checkpoints / "toy_stripes.safetensors")
    wrong["conv1.weight"] = torch.zeros(3)
    save_state_dict(wrong, tmp_path / "wrong.safetensors")
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["model"].pop("finetuned_pattern")
    d["model"]["finetuned"] = {"toy_stripes": str(tmp_path / "wrong.safetensors"),
                               "toy_colours": str(micro_checkpoints / "toy_colours.safetensors")}
    monkeypatch.setattr("harness.workspace.build_clip", no_model)
    with pytest.raises(HarnessError, match=r"wrong.safetensors: tensor 'conv1.weight' has shape \(3,\)"):
        Workspace(validate_config(d)).preflight()


def test_an_unreadable_summary_is_rebuilt(micro_checkpoints, tmp_path, monkeypatch):
    cfg = validate_config(make_sweep_dict(micro_checkpoints, tmp_path))
    ws = Workspace(cfg)
    params = ws.encoder_params
    (path,) = (cfg.resolved_cache_dir() / "encoders").glob("*.json")
    path.write_text('{"shapes": {}}')
    assert Workspace(cfg).encoder_params == params
    # rebuilt whole on disk too: the next driver reads it without building the model
    monkeypatch.setattr("harness.workspace.build_clip", no_model)
    assert Workspace(cfg).encoder_params == params


def test_weights_named_by_a_tag_are_built_every_time(micro_checkpoints, tmp_path, monkeypatch):
    """An open_clip tag's cached file can vanish: the driver keeps checking it by building."""
    import open_clip.pretrained

    weights = tmp_path / "tagged.safetensors"
    weights.write_bytes((micro_checkpoints / "pretrained.safetensors").read_bytes())
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "harness-micro-vit", {"local": {"file": str(weights)}})
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["model"]["pretrained"] = "local"
    cfg = validate_config(d)
    Workspace(cfg).preflight()
    assert not (cfg.resolved_cache_dir() / "encoders").exists()
    weights.unlink()
    with pytest.raises(HarnessError, match="pretrained weights 'local' for 'harness-micro-vit' are not in the local cache"):
        Workspace(cfg).preflight()


def test_driver_with_workers_never_imports_open_clip(micro_checkpoints, tmp_path):
    """Once the summary and heads are cached, a sweep whose jobs run in workers leaves open_clip
    (and the model) to them: the driver's process never imports it."""
    import json

    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["executor"] = {"kind": "local", "workers": 2}
    Workspace(validate_config(d)).preflight()  # what an earlier sweep leaves in the cache
    out = run_fresh("import json, sys\n"
                    "from harness.config import validate_config\n"
                    "from harness.runner import run_sweep\n"
                    f"out = run_sweep(validate_config(json.loads({json.dumps(json.dumps(d))})), quiet=True)\n"
                    "print(len(out.executed), all(r.status == 'ok' for r in out.results), 'open_clip' in sys.modules)\n",
                    timeout=600)
    executed, ok, imported = out.split()
    assert int(executed) >= 4 and ok == "True"
    assert imported == "False"


def test_the_sweep_commands_checks_leave_open_clip_alone_once_the_weights_were_built(micro_checkpoints, tmp_path):
    """`harness sweep`, `tune`, `collect` and `validate` check model.arch against the pretrained
    weights (tests/test_bad_inputs.py); once those weights were built with that architecture (the
    summary a driver reads says so), the checks a driver runs before its workers start leave
    open_clip unimported, as the rest of the driver does. New weights are still checked."""
    import yaml

    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["executor"] = {"kind": "local", "workers": 2}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    code = ("import sys\n"
            "from harness.cli import _load\n"
            f"_load({str(tmp_path / 's.yaml')!r}, (), does='submit')\n"
            "print('open_clip' in sys.modules)\n")
    assert run_fresh(code).split() == ["True"]  # never built: checked against open_clip's model
    Workspace(validate_config(d)).preflight()  # what an earlier sweep leaves in the cache
    assert run_fresh(code).split() == ["False"]
    d["model"]["arch"] = "harness-tiny-vit"  # not the weights' architecture: never built with them
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(AssertionError, match="model.arch: architecture 'harness-tiny-vit' has tensor"):
        run_fresh(code)


def test_a_summary_kept_for_other_weights_does_not_pass_weights_that_never_loaded(micro_checkpoints, tmp_path):
    """The summary is kept per weights file: one built with the sweep's weights does not stand for
    another file of the same architecture's name, whose weights must load before any summary
    (the heads may all be files, so nothing else would build the model before the jobs)."""
    cfg = validate_config(make_sweep_dict(micro_checkpoints, tmp_path))
    assert Workspace(cfg).encoder_params > 0
    save_state_dict(build_clip("harness-tiny-vit").state_dict(), tmp_path / "other.safetensors")
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    d["model"]["pretrained"] = str(tmp_path / "other.safetensors")
    with pytest.raises(HarnessError, match="weights do not match architecture 'harness-micro-vit'"):
        Workspace(validate_config(d)).encoder_summary


def test_validate_looks_up_an_open_clip_tag_offline_as_the_run_does(micro_checkpoints, tmp_path, monkeypatch):
    """``validate`` called weights named by an open_clip tag valid without looking for them: a tag
    of another architecture, or one not in the local cache, was found only when the sweep ran. It
    now makes the run's offline lookup (no weights read, no model built)."""
    import open_clip.pretrained
    import yaml
    from click.testing import CliRunner

    from harness.cli import main

    weights = tmp_path / "tagged.safetensors"
    weights.write_bytes((micro_checkpoints / "pretrained.safetensors").read_bytes())
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "harness-micro-vit",
                        {"local": {"file": str(weights)}, "hub": {"hf_hub": "org/micro/"}})
    d = make_sweep_dict(micro_checkpoints, tmp_path)
    f = tmp_path / "s.yaml"

    def validate(tag: str) -> tuple[int, str]:
        f.write_text(yaml.safe_dump({**d, "model": {**d["model"], "pretrained": tag}}))
        r = CliRunner().invoke(main, ["validate", str(f)])
        return r.exit_code, " ".join(r.output.split())

    assert validate("local")[0] == 0
    code, out = validate("lcoal")
    assert code == 2 and out.startswith(f"error: {f}: model.pretrained: not an open_clip tag of architecture "
                                        "'harness-micro-vit'; did you mean 'local'? (its tags: local, hub)"), out
    cache = tmp_path / "cache" / "open_clip"
    code, out = validate("hub")
    assert code == 2 and out.startswith(f"error: {f}: model.pretrained: pretrained weights 'hub' for "
                                        f"'harness-micro-vit' are not in the local cache ({cache})"), out
    snapshot = cache / "models--org--micro" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(weights.read_bytes())
    (cache / "models--org--micro" / "refs").mkdir()
    (cache / "models--org--micro" / "refs" / "main").write_text("0" * 40)
    assert validate("hub")[0] == 0  # found in the Hugging Face cache layout, offline
    weights.unlink()
    code, out = validate("local")
    assert code == 2 and "pretrained weights 'local' for 'harness-micro-vit' are not in the local cache" in out, out
