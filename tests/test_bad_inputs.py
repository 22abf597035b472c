"""Bad checkpoints and data: one line naming the file and tensor or field, exit 2, nothing written.

Together with tests/test_config_errors.py (bad sweep files) this is the bad-input corpus."""

from __future__ import annotations

import contextlib
import copy
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import harness
from harness.cli import main
from harness.models import build_clip, save_state_dict


def _write(tmp_path, d) -> str:
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    return str(f)


def _run_sweep(tmp_path, d):
    r = CliRunner().invoke(main, ["sweep", "-q", _write(tmp_path, d)])
    return r.exit_code, " ".join(r.stderr.split()), r.stdout


def _with_ckpt(d, task, path):
    d = copy.deepcopy(d)
    d["model"]["finetuned"] = {task: str(path)}
    return d


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/harness-evil-marker",))


def _encoder_state():
    torch.manual_seed(0)
    return build_clip("harness-micro-vit").visual.state_dict()


def case_truncated(tmp_path, micro):
    p = tmp_path / "trunc.safetensors"
    p.write_bytes((micro / "toy_stripes.safetensors").read_bytes()[:200])
    return p, ["trunc.safetensors", "not a readable safetensors file"]


def case_garbage(tmp_path, micro):
    p = tmp_path / "garbage.safetensors"
    p.write_bytes(b"\x00" * 64)
    return p, ["garbage.safetensors", "not a readable safetensors file"]


def case_other_arch(tmp_path, micro):
    p = tmp_path / "tiny.safetensors"
    save_state_dict(build_clip("harness-tiny-vit").visual.state_dict(), p)
    return p, ["tiny.safetensors: tensor 'class_embedding' has shape (128,), pretrained has (32,)"]


def case_missing_key(tmp_path, micro):
    state = _encoder_state()
    state.pop("proj")
    p = tmp_path / "nokey.safetensors"
    save_state_dict(state, p)
    return p, ["nokey.safetensors: tensor 'proj' of the pretrained image encoder is missing"]


def case_two_prefixed_encoders(tmp_path, micro):
    state = _encoder_state()
    p = tmp_path / "two.safetensors"
    save_state_dict({**{f"visual.{k}": v for k, v in state.items()},
                     **{f"model.visual.{k}": v.clone() for k, v in state.items()}}, p)
    return p, ["two.safetensors: holds several ViT image encoders (under 'model.visual.', 'visual.')"]


def case_truncated_pt(tmp_path, micro):
    p = tmp_path / "trunc.pt"
    torch.save(_encoder_state(), p)
    p.write_bytes(p.read_bytes()[:2000])
    return p, ["trunc.pt: not a readable checkpoint: truncated or corrupt"]


def case_empty_pt(tmp_path, micro):
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    return p, ["empty.pt: not a readable checkpoint: the file is empty"]


def case_image_as_checkpoint(tmp_path, micro):
    from PIL import Image

    p = tmp_path / "photo.pt"
    Image.new("RGB", (4, 4)).save(p, format="JPEG")
    return p, ["photo.pt: not a readable checkpoint: not a torch checkpoint"]


def case_extra_key(tmp_path, micro):
    state = _encoder_state()
    state["head.weight"] = torch.zeros(3, 3)
    p = tmp_path / "extra.safetensors"
    save_state_dict(state, p)
    return p, ["extra.safetensors: unexpected tensor 'head.weight'"]


def case_evil_pickle(tmp_path, micro):
    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps(Evil()))
    return p, ["evil.pt", "--trust-pickle"]


def case_pickled_module(tmp_path, micro):
    p = tmp_path / "module.pt"
    torch.save(build_clip("harness-micro-vit").visual, p)
    return p, ["module.pt", "--trust-pickle"]


def case_missing_file(tmp_path, micro):
    return tmp_path / "nope.safetensors", ["model.finetuned.toy_stripes: checkpoint does not exist", "nope.safetensors"]


def case_tensor_pt_wrong_shape(tmp_path, micro):
    state = _encoder_state()
    state["conv1.weight"] = torch.zeros(1, 3, 8, 8)
    p = tmp_path / "shape.pt"
    torch.save(state, p)
    return p, ["tensor 'conv1.weight' has shape (1, 3, 8, 8), pretrained has (32, 3, 8, 8)"]


def case_int8_weights(tmp_path, micro):
    """A quantized encoder was cast to float, silently, and merged as its integer codes."""
    state = _encoder_state()
    state["conv1.weight"] = (100 * state["conv1.weight"]).to(torch.int8)
    p = tmp_path / "int8.safetensors"
    save_state_dict(state, p)
    return p, [f"model.finetuned.toy_stripes: {p}: tensor 'conv1.weight' has dtype int8, not floating point"]


def case_int64_pt(tmp_path, micro):
    state = _encoder_state()
    state["proj"] = state["proj"].round().long()
    p = tmp_path / "int64.pt"
    torch.save(state, p)
    return p, [f"{p}: tensor 'proj' has dtype int64, not floating point"]


CASES = [case_int8_weights, case_int64_pt, case_truncated, case_garbage, case_other_arch, case_missing_key, case_two_prefixed_encoders, case_extra_key,
         case_evil_pickle, case_pickled_module, case_missing_file, case_tensor_pt_wrong_shape, case_truncated_pt,
         case_empty_pt, case_image_as_checkpoint]
DAMAGED = {case_truncated_pt, case_empty_pt, case_image_as_checkpoint}  # nothing pickled to trust: the message must not suggest it


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_checkpoint(case, sweep_dict, micro_checkpoints, tmp_path):
    import os

    marker = "/tmp/harness-evil-marker"
    if os.path.exists(marker):
        os.remove(marker)
    path, fragments = case(tmp_path, micro_checkpoints)
    d = _with_ckpt(sweep_dict, "toy_stripes", path)
    code, err, out = _run_sweep(tmp_path, d)
    assert code == 2, err + out
    for f in fragments:
        assert f in err, (f, err)
    assert err.startswith("error: ") and "Traceback" not in err
    if case in DAMAGED:
        assert "pickle" not in err and "trust" not in err, err
    assert not os.path.exists(marker)  # the pickle's payload never ran
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("layout", ["visual.", "model.visual.", "whole CLIP"])
def test_prefixed_safetensors_load_as_the_image_encoder(layout, sweep_dict, micro_checkpoints, tmp_path):
    """A fine-tuned encoder saved under a prefix, or inside a whole CLIP (what `harness import --full`
    writes for a CLIPModel folder), is that encoder: the prefix is stripped, the text tower ignored."""
    from harness.config import validate_config
    from harness.models import load_state_dict
    from harness.workspace import Workspace

    want = load_state_dict(micro_checkpoints / "toy_stripes.safetensors")
    if layout == "whole CLIP":
        clip = build_clip("harness-micro-vit")
        clip.visual.load_state_dict(want)
        state = clip.state_dict()
    else:
        state = {layout + k: v for k, v in want.items()}
    path = tmp_path / "prefixed.safetensors"
    save_state_dict(state, path)
    ws = Workspace(validate_config(_with_ckpt(sweep_dict, "toy_stripes", path)))
    ws.preflight()
    assert ws.sources["finetuned"]["toy_stripes"] != str(path)  # converted once, into the cache
    got = ws.finetuned_encoder("toy_stripes").state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_safetensors_without_their_suffix_are_read_as_safetensors(sweep_dict, micro_checkpoints, tmp_path):
    """What `harness convert SRC DST` writes to a DST without suffix: read by content, never unpickled."""
    from harness.config import validate_config
    from harness.models import load_state_dict, tensor_shapes
    from harness.workspace import Workspace

    want = load_state_dict(micro_checkpoints / "toy_stripes.safetensors")
    path = tmp_path / "finetuned"
    path.write_bytes((micro_checkpoints / "toy_stripes.safetensors").read_bytes())
    assert tensor_shapes(path) == {k: tuple(v.shape) for k, v in want.items()}
    ws = Workspace(validate_config(_with_ckpt(sweep_dict, "toy_stripes", path)))
    ws.preflight()
    got = ws.finetuned_encoder("toy_stripes").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_missing_pretrained(sweep_dict, tmp_path):
    d = copy.deepcopy(sweep_dict)
    d["model"]["pretrained"] = str(tmp_path / "missing" / "pre.safetensors")
    code, err, _ = _run_sweep(tmp_path, d)
    assert code == 2 and f"{tmp_path / 's.yaml'}: model.pretrained: weights file does not exist" in err, err


def test_image_encoder_as_pretrained_is_named(sweep_dict, micro_checkpoints, tmp_path):
    d = copy.deepcopy(sweep_dict)
    d["model"]["pretrained"] = str(micro_checkpoints / "toy_colours.safetensors")  # clip.visual alone
    code, err, _ = _run_sweep(tmp_path, d)
    assert code == 2, err
    assert "toy_colours.safetensors: not a whole CLIP state dict" in err and "CLIPModel folder" in err, err
    assert "size mismatch" not in err and not (tmp_path / "out").exists()


def _pickled_module(path):
    torch.save(build_clip("harness-micro-vit").visual, path)


def _jpeg(path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(path, format="JPEG")


@pytest.mark.parametrize("field,name,make,fragment", [
    ("model.finetuned.toy_stripes", "module.pt", _pickled_module,
     "refused to load: not a plain tensor checkpoint (WeightsUnpickler error: Unsupported global"),
    ("model.finetuned.toy_stripes", "photo.jpg", _jpeg, "not a readable checkpoint: not a torch checkpoint"),
    ("model.finetuned.toy_stripes", "folder", lambda p: p.mkdir(), "a folder that is not a Hugging Face CLIP folder"),
    ("model.pretrained", "encoder.pt", lambda p: torch.save(build_clip("harness-micro-vit").visual.state_dict(), p),
     "not a whole CLIP state dict"),
    ("model.pretrained", "visual.safetensors", lambda p: save_state_dict(
        {f"visual.{k}": v for k, v in build_clip("harness-micro-vit").visual.state_dict().items()}, p),
     "not a whole CLIP state dict"),
    ("model.heads.toy_stripes", "head.pt", lambda p: torch.save(torch.nn.Linear(32, 3), p),
     "refused to load: not a plain tensor checkpoint"),
], ids=["pickled-module", "image", "folder", "encoder-as-pretrained", "visual-tower-as-pretrained", "pickled-head"])
def test_validate_names_the_model_files_a_sweep_refuses(field, name, make, fragment, sweep_dict, tmp_path):
    """validate (and --dry-run) read each model file as the run would, without unpickling or
    building a model: what the sweep refuses when it starts loading is named with its field."""
    path = tmp_path / name
    make(path)
    d = copy.deepcopy(sweep_dict)
    target, _, key = field.partition(".")[2].partition(".")
    if key:
        d["model"][target] = {key: str(path)}
    else:
        d["model"][target] = str(path)
    f = _write(tmp_path, d)
    for args in (["validate", f], ["sweep", f, "--dry-run"]):
        r = CliRunner().invoke(main, args)
        err = " ".join(r.stderr.split())
        assert r.exit_code == 2 and err.startswith(f"error: {f}: {field}: ") and fragment in err, err
        assert "valid" not in r.stdout and not (tmp_path / "out").exists()


def _missing_tensor(state):
    return {k: v for k, v in state.items() if k != "ln_post.bias"}


def _missing_class_embedding(state):
    """The tensor that marks where an image encoder lies in a file: without it, validate took the
    file for no encoder and left it to the run."""
    return {k: v for k, v in state.items() if k != "class_embedding"}


def _extra_tensor(state):
    return {**state, "head.weight": torch.zeros(3, 32)}


def _int8_tensor(state):
    return {**state, "ln_post.weight": state["ln_post.weight"].to(torch.int8)}


@pytest.mark.parametrize("layout", ["encoder.safetensors", "clip.safetensors", "encoder.pt"])
@pytest.mark.parametrize("edit,fragment", [
    (_missing_tensor, "tensor 'ln_post.bias' of the pretrained image encoder is missing"),
    (_missing_class_embedding, "tensor 'class_embedding' of the pretrained image encoder is missing"),
    (_extra_tensor, "unexpected tensor 'head.weight' (not an image encoder of harness-micro-vit)"),
    (_int8_tensor, "tensor 'ln_post.weight' has dtype int8, not floating point"),
], ids=["missing", "missing-class-embedding", "extra", "int8"])
def test_validate_names_a_fine_tuned_checkpoint_the_preflight_refuses(edit, fragment, layout, sweep_dict, tmp_path):
    """A fine-tuned checkpoint missing a tensor of the encoder, holding one more, or holding an
    integer tensor passed validate and the dry run, and was refused only by the run's preflight:
    read from the same header (a whole CLIP's image tower too), it is named with its field."""
    state = edit(_encoder_state())
    path = tmp_path / layout
    if layout.startswith("clip"):
        state = {**{f"visual.{k}": v for k, v in state.items()}, "logit_scale": torch.tensor(1.0)}
    if layout.endswith(".pt"):
        torch.save(state, path)
    else:
        save_state_dict(state, path)
    f = _write(tmp_path, _with_ckpt(sweep_dict, "toy_stripes", path))
    for args in (["validate", f], ["sweep", f, "--dry-run"]):
        r = CliRunner().invoke(main, args)
        err = " ".join(r.stderr.split())
        assert r.exit_code == 2 and err.startswith(f"error: {f}: model.finetuned.toy_stripes: {path}: ") \
            and fragment in err, err
        assert not (tmp_path / "out").exists()


def test_validate_names_every_model_file_at_fault_together(sweep_dict, micro_checkpoints, tmp_path):
    """A truncated checkpoint, a checkpoint of another width and a pickled head, each with its own
    field: one run names the three, a line each, in the order the checks read them (contents,
    then shapes)."""
    d = copy.deepcopy(sweep_dict)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes((micro_checkpoints / "toy_stripes.safetensors").read_bytes()[:200])
    wide = tmp_path / "wide.safetensors"
    save_state_dict(build_clip("harness-tiny-vit").visual.state_dict(), wide)
    head = tmp_path / "head.pt"
    torch.save(torch.nn.Linear(32, 3), head)
    d["model"]["finetuned"] = {"toy_stripes": str(trunc), "toy_colours": str(wide)}
    d["model"]["heads"] = {"toy_stripes": str(head)}
    f = _write(tmp_path, d)
    r = CliRunner().invoke(main, ["validate", f])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 3, r.stderr
    assert lines[0].startswith(f"error: {f}: model.finetuned.toy_stripes: {trunc}: not a readable safetensors file"), lines
    assert lines[1].startswith(f"{f}: model.heads.toy_stripes: {head}: refused to load"), lines
    assert lines[2] == (f"{f}: model.finetuned.toy_colours: {wide}: tensor 'class_embedding' has shape (128,), "
                        "pretrained has (32,) (model.pretrained pretrained.safetensors: another architecture or width?)")


def test_pretrained_weights_without_a_text_tower_are_not_also_blamed_on_the_architecture(sweep_dict, tmp_path):
    """Pretrained weights holding the image tower alone lack every text tensor model.arch has:
    the one fault is the weights', told once, not again as an architecture that does not fit."""
    path = tmp_path / "visual.safetensors"
    save_state_dict({f"visual.{k}": v for k, v in build_clip("harness-micro-vit").visual.state_dict().items()}, path)
    d = copy.deepcopy(sweep_dict)
    d["model"]["pretrained"] = str(path)
    r = CliRunner().invoke(main, ["validate", _write(tmp_path, d)])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {tmp_path / 's.yaml'}: model.pretrained: {path}: not a whole CLIP"), lines


def test_two_checkpoints_of_other_widths_are_each_named(sweep_dict, tmp_path):
    """Two fine-tuned checkpoints off the pretrained shapes in different tensors (so the pretrained
    weights are not the odd ones out): a line each, not the first alone."""
    wide = tmp_path / "wide.safetensors"
    save_state_dict(build_clip("harness-tiny-vit").visual.state_dict(), wide)
    patch = tmp_path / "patch.safetensors"
    state = _encoder_state()
    state["conv1.weight"] = torch.zeros(32, 3, 4, 4)
    save_state_dict(state, patch)
    d = copy.deepcopy(sweep_dict)
    d["model"]["finetuned"] = {"toy_stripes": str(wide), "toy_colours": str(patch)}
    f = _write(tmp_path, d)
    r = CliRunner().invoke(main, ["validate", f])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines() == [
        f"error: {f}: model.finetuned.toy_stripes: {wide}: tensor 'class_embedding' has shape (128,), pretrained "
        "has (32,) (model.pretrained pretrained.safetensors: another architecture or width?)",
        f"{f}: model.finetuned.toy_colours: {patch}: tensor 'conv1.weight' has shape (32, 3, 4, 4), "
        "pretrained has (32, 3, 8, 8) (model.pretrained pretrained.safetensors: another architecture or width?)"]


def test_missing_pretrained_tag_is_reported_once(caplog, tmp_path):
    """open_clip logs a missing tag through the root logger; the harness's own error says it once."""
    import logging

    from harness.errors import HarnessError

    with caplog.at_level(logging.DEBUG):
        with pytest.raises(HarnessError, match="pretrained weights 'openai'"):
            build_clip("harness-micro-vit", "openai", cache_dir=str(tmp_path))
        assert logging.getLogger().level == logging.DEBUG  # the level is given back
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def _head(tmp_path, shape):
    head = tmp_path / "head.safetensors"
    save_state_dict({"weight": torch.randn(*shape)}, head)
    return head


def _heads_sweep(sweep_dict, path, state) -> dict:
    """The sweep with ``state`` saved at ``path`` (a tensor-only ``.pt`` or safetensors) as the
    head of toy_colours."""
    if str(path).endswith(".pt"):
        torch.save(state, path)
    else:
        save_state_dict(state, path)
    d = copy.deepcopy(sweep_dict)
    d["model"]["heads"] = {"toy_colours": str(path)}
    return d


@pytest.mark.parametrize("shape,fragment", [
    ((4, 64), "tensor 'weight' has shape (4, 64): 64 features, but the image encoder of harness-micro-vit outputs 32"),
    ((4, 32, 1), "tensor 'weight' has shape (4, 32, 1); a head is [classes, dim]"),
    ((7, 32), "task 'toy_colours': head has 7 classes but the dataset has 4"),
], ids=["features", "3-d", "classes"])
def test_stored_head_is_checked_before_any_job(shape, fragment, sweep_dict, tmp_path):
    head = _head(tmp_path, shape)
    d = copy.deepcopy(sweep_dict)
    d["model"]["heads"] = {"toy_colours": str(head)}
    code, err, _ = _run_sweep(tmp_path, d)
    assert code == 2 and err.startswith(f"error: model.heads.toy_colours: {head}: {fragment}"), err
    assert not (tmp_path / "out").exists()


def test_a_stored_head_is_checked_against_the_projected_features_not_the_width(sweep_dict, tmp_path):
    """harness-small-vit is 256 wide and projects to 128 features, as its forward pass shows: a
    head over 128 features is taken, one over the width (256) is refused naming both numbers."""
    from harness.config import validate_config
    from harness.errors import HarnessError
    from harness.workspace import Workspace

    clip = build_clip("harness-small-vit")
    with torch.no_grad():
        features = clip.visual(torch.zeros(1, 3, 32, 32)).shape[-1]
    assert features == 128 and clip.visual.proj.shape == (256, 128)
    save_state_dict(clip.state_dict(), tmp_path / "pretrained.safetensors")
    for task in sweep_dict["tasks"]:
        save_state_dict(clip.visual.state_dict(), tmp_path / f"{task}.safetensors")
    d = copy.deepcopy(sweep_dict)
    d["model"] = {"source": "files", "arch": "harness-small-vit", "pretrained": str(tmp_path / "pretrained.safetensors"),
                  "finetuned_pattern": str(tmp_path / "{task}.safetensors")}
    for width, ok in ((features, True), (256, False)):
        head = tmp_path / f"head{width}.safetensors"
        save_state_dict({"weight": torch.randn(4, width)}, head)
        ws = Workspace(validate_config(dict(d, model={**d["model"], "heads": {"toy_colours": str(head)}})))
        if ok:
            assert ws.head("toy_colours").shape == (4, features)
        else:
            with pytest.raises(HarnessError, match="256 features, but the image encoder of harness-small-vit outputs 128"):
                ws.head("toy_colours")


def test_a_stored_head_of_integers_is_refused(sweep_dict, tmp_path):
    """A head is float weights over the features; an integer tensor of the right shape (a
    quantized or label file) is refused naming its dtype, not cast to float and scored."""
    head = tmp_path / "head.safetensors"
    save_state_dict({"weight": torch.ones(4, 32, dtype=torch.int64)}, head)
    d = copy.deepcopy(sweep_dict)
    d["model"]["heads"] = {"toy_colours": str(head)}
    code, err, _ = _run_sweep(tmp_path, d)
    assert code == 2 and err == (f"error: model.heads.toy_colours: {head}: tensor 'weight' has dtype torch.int64, "
                                 "not floating point"), err
    assert not (tmp_path / "out").exists()


def test_stored_head_with_a_nonzero_bias_is_refused(sweep_dict, tmp_path):
    """Logits are normalised features times the head, no bias: a linear probe's head file (weight
    and a non-zero bias, as a tensor-only .pt) would be scored without its bias, every prediction
    silently another model's. It is refused before any job; a zero bias (task_vectors' heads) runs."""
    torch.manual_seed(0)
    weight = torch.randn(4, 32)
    head = tmp_path / "probe.pt"
    torch.save({"weight": weight, "bias": torch.tensor([0.0, 0.5, 0.0, -1.0])}, head)
    d = copy.deepcopy(sweep_dict)
    d["model"]["heads"] = {"toy_colours": str(head)}
    code, err, _ = _run_sweep(tmp_path, d)
    assert code == 2 and err.startswith(f"error: model.heads.toy_colours: {head}: tensor 'bias' is not zero"), err
    assert not (tmp_path / "out").exists()

    from harness.config import validate_config
    from harness.workspace import Workspace

    zero = tmp_path / "zero.pt"
    torch.save({"weight": weight, "bias": torch.zeros(4)}, zero)
    d["model"]["heads"] = {"toy_colours": str(zero)}
    assert torch.equal(Workspace(validate_config(d)).head("toy_colours"), weight)


def test_half_precision_heads_score_as_their_float32_values(sweep_dict, tmp_path):
    """A fp16 `model.heads` file (published heads often are): AdaMerging's jobs failed with
    "expected m1 and m2 to have the same dtype"; the head is its values in float32, so results
    equal those of the same values saved in float32."""
    from harness.config import validate_config
    from harness.runner import run_sweep

    torch.manual_seed(0)
    half = torch.randn(4, 32).half()
    results = {}
    for dtype in (torch.float16, torch.float32):
        head = tmp_path / f"head-{dtype}.safetensors"
        save_state_dict({"weight": half.to(dtype)}, head)
        d = copy.deepcopy(sweep_dict)
        d["output_dir"] = str(tmp_path / f"out-{dtype}")
        d["model"]["heads"] = {"toy_colours": str(head)}
        d["references"] = False
        d["methods"] = [{"name": "adamerging", "params": {"steps": 2, "batch_size": 4}}]
        outcome = run_sweep(validate_config(d), quiet=True)
        assert not outcome.failed, [r.error for r in outcome.failed]
        results[dtype] = [r.metrics for r in outcome.results]
    assert results[torch.float16] == results[torch.float32]


def test_head_class_count_mismatch(sweep_dict, tmp_path):
    head = tmp_path / "head.safetensors"
    save_state_dict({"weight": torch.randn(7, 32)}, head)
    d = copy.deepcopy(sweep_dict)
    d["model"]["heads"] = {"toy_colours": str(head)}
    code, err, _ = _run_sweep(tmp_path, d)
    assert code == 2 and "task 'toy_colours': head has 7 classes but the dataset has 4" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,state,fragment", [
    ("classes.safetensors", {"weight": torch.ones(7, 32)}, "task 'toy_colours': head has 7 classes but the dataset has 4"),
    ("flat.safetensors", {"weight": torch.ones(4, 32, 1)}, "tensor 'weight' has shape (4, 32, 1); a head is [classes, dim]"),
    ("ints.safetensors", {"weight": torch.ones(4, 32, dtype=torch.int64)},
     "tensor 'weight' has dtype torch.int64, not floating point"),
    ("probe.pt", {"weight": torch.ones(4, 32), "bias": torch.ones(4)}, "tensor 'bias' is not zero"),
], ids=["classes", "3-d", "integers", "bias"])
def test_validate_names_a_head_file_the_sweep_would_refuse(name, state, fragment, sweep_dict, tmp_path):
    """``valid`` was said of a ``model.heads`` file the sweep then refuses before any job (another
    class count, not [classes, dim], integers, a non-zero bias): validate and the dry run load
    the head as the run does and name the sweep file, the field and the head file."""
    head = tmp_path / name
    d = _heads_sweep(sweep_dict, head, state)
    f = _write(tmp_path, d)
    for args in (["validate", f], ["sweep", f, "--dry-run"]):
        r = CliRunner().invoke(main, args)
        err = " ".join(r.stderr.split())
        assert r.exit_code == 2 and err.startswith(f"error: {f}: model.heads.toy_colours: {head}: {fragment}"), err
        assert "valid" not in r.stdout and not (tmp_path / "out").exists()
    save_state_dict({"weight": torch.ones(4, 32)}, head.with_suffix(".safetensors"))
    d["model"]["heads"] = {"toy_colours": str(head.with_suffix(".safetensors"))}
    r = CliRunner().invoke(main, ["validate", _write(tmp_path, d)])
    assert r.exit_code == 0 and "valid" in r.stdout, r.output


def test_validate_leaves_the_head_of_a_task_made_at_the_encoders_input_size_to_the_run(sweep_dict, tmp_path):
    """A task whose factory must be given the encoder's input size cannot be made before the
    encoder is built, so neither can its head's class count be checked: validate and the dry run
    say ``valid`` for a sound head file (the run's preflight checks it) instead of refusing it."""
    unsized = "tests.own_tasks:sized_without_default"
    head = tmp_path / "head.safetensors"
    d = _heads_sweep(sweep_dict, head, {"weight": torch.ones(4, 32)})
    d["tasks"] = [*d["tasks"], unsized]
    d["model"]["finetuned"] = {unsized: d["model"]["finetuned_pattern"].format(task="toy_colours")}
    d["model"]["heads"] = {unsized: str(head)}
    f = _write(tmp_path, d)
    r = CliRunner().invoke(main, ["validate", f])
    assert r.exit_code == 0 and r.stdout.rstrip().endswith("valid"), r.output
    r = CliRunner().invoke(main, ["sweep", f, "--dry-run"])
    assert r.exit_code == 0 and "job plan:" in r.stdout, r.output


def test_empty_split(sweep_dict, tmp_path):
    d = copy.deepcopy(sweep_dict)
    d["tasks"] = [{"name": "toy_stripes", "options": {"n_val": 0}}, "toy_colours"]
    code, err, _ = _run_sweep(tmp_path, d)
    assert code == 2 and "task 'toy_stripes': split 'val' is empty" in err


def test_bad_task_option(sweep_dict, tmp_path):
    d = copy.deepcopy(sweep_dict)
    d["tasks"] = [{"name": "toy_stripes", "options": {"colour": 3}}, "toy_colours"]
    code, err, _ = _run_sweep(tmp_path, d)
    assert code == 2 and "bad options for task 'toy_stripes'" in err


def test_bad_task_option_names_the_file_the_field_and_the_options(sweep_dict, tmp_path):
    """As every sweep-file error does: ``tasks: bad options ...`` named neither the file nor the entry."""
    d = copy.deepcopy(sweep_dict)
    d["tasks"] = ["toy_colours", {"name": "toy_stripes", "options": {"colour": 3}}]
    code, err, _ = _run_sweep(tmp_path, d)
    assert code == 2, err
    assert err.startswith(f"error: {tmp_path / 's.yaml'}: tasks.1.options: bad options for task 'toy_stripes': "), err
    assert err.endswith("unexpected keyword argument 'colour' (got {'colour': 3})"), err


BUILT_IN_TASK_OPTIONS = [  # (task, option, value, the line's field and message)
    ("toy_colours", "n_val", "abc", ".options.n_val: bad option for task 'toy_colours': Input should be a valid "
                                    "integer"),
    ("toy_colours", "n_val", -3, ".options.n_val: bad option for task 'toy_colours': Input should be greater than or "
                                 "equal to 0"),
    ("toy_colours", "n_val", 0, ": task 'toy_colours': split 'val' is empty"),
    ("toy_colours", "n_classes", 0, ".options.n_classes: bad option for task 'toy_colours': Input should be greater "
                                    "than or equal to 1"),
    ("toy_colours", "colour", 3, ".options: bad options for task 'toy_colours': make_toy_task() got an unexpected "
                                 "keyword argument 'colour'"),
    ("emb_signs", "size", 3, ".options.size: bad option for task 'emb_signs': Input should be 'full' or 'tiny'"),
    ("emb_signs", "size", "huge", ".options.size: bad option for task 'emb_signs': Input should be 'full' or 'tiny'"),
    ("emb_signs", "sise", "tiny", ".options: bad options for task 'emb_signs': emb_signs() got an unexpected keyword "
                                  "argument 'sise'"),
    ("dtd", "val_fraction", "abc", ".options.val_fraction: bad option for task 'dtd': Input should be a valid number"),
    ("dtd", "val_fraction", 2, ".options.val_fraction: bad option for task 'dtd': Input should be less than 1"),
    ("dtd", "val_cap", 0, ".options.val_cap: bad option for task 'dtd': Input should be greater than or equal to 1"),
    ("dtd", "val_fracton", 0.5, ".options: bad options for task 'dtd': dtd() got an unexpected keyword argument "
                                "'val_fracton'"),
]


@pytest.mark.parametrize("command", [["validate"], ["sweep", "--dry-run"]])
@pytest.mark.parametrize("task, option, value, fragment", BUILT_IN_TASK_OPTIONS,
                         ids=[f"{t}-{o}-{v}" for t, o, v, _ in BUILT_IN_TASK_OPTIONS])
def test_validate_refuses_a_bad_option_of_a_built_in_task_as_the_sweep_does(command, task, option, value, fragment,
                                                                            sweep_dict, tmp_path):
    """``validate`` made only the tasks of one's own: a toy task with ``n_val: abc``, an embedded
    one of ``size: huge`` or a dataset's ``val_fraction: 2`` (blamed on its data folder) was
    ``valid``, then refused by the sweep. Each option is now checked against its factory's
    annotated type and bounds (the toy tasks made, as in moments they are), one line naming the
    file, the entry's option and the value."""
    from tests.test_vision8 import write_imagefolder

    d = copy.deepcopy(sweep_dict)
    options = {option: value}
    if task == "dtd":
        write_imagefolder(tmp_path / "data", "dtd")
        options = {"data_root": str(tmp_path / "data"), **options}  # as the file holds them: keys sorted
    if task != "toy_colours":  # a files sweep has no fine-tuned model of it: evaluated unseen
        d["unseen"] = [task]
    d["tasks"] = [t if t != "toy_colours" or task != "toy_colours" else {"name": t, "options": options}
                  for t in d["tasks"]] + ([{"name": task, "options": options}] if task != "toy_colours" else [])
    index = next(i for i, t in enumerate(d["tasks"]) if isinstance(t, dict))
    f = _write(tmp_path, d)
    for args in (command, ["sweep", "-q"]):  # validate (or the dry run) and the sweep: the same line
        r = CliRunner().invoke(main, [*args, f])
        err = " ".join(r.stderr.split())
        assert r.exit_code == 2, (args, r.output)
        assert err.startswith(f"error: {f}: tasks.{index}{fragment}"), (args, err)
        assert err.endswith(f"(got {value!r})" if "bad option for" in fragment else f"(got {options!r})"), (args, err)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_data_root_missing_for_real_dataset(sweep_dict, tmp_path):
    d = copy.deepcopy(sweep_dict)
    d["tasks"] = ["eurosat", "toy_colours"]
    d["data_root"] = str(tmp_path / "no-data")
    d["model"]["finetuned"] = {"eurosat": str(tmp_path / "x.safetensors")}
    save_state_dict(_encoder_state(), tmp_path / "x.safetensors")
    code, err, _ = _run_sweep(tmp_path, d)
    assert code == 2 and "no-data" in err, err


@contextlib.contextmanager
def python_running(code: str, ready: str) -> Iterator[None]:
    """``code`` run by another Python process, which prints ``ready`` once it is where the test
    needs it, until the block ends, when that process is killed (and its locks go with it)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == ready
        yield
    finally:
        proc.kill()
        proc.wait()


def sweep_lock_held_elsewhere(out: Path) -> contextlib.AbstractContextManager[None]:
    """``out``'s sweep lock held by another process (a running sweep) until the block ends."""
    return python_running("import sys, time\nfrom filelock import FileLock\n"
                          f"lock = FileLock({str(out / '.sweep.lock')!r})\nlock.acquire()\n"
                          "print('held', flush=True)\ntime.sleep(60)", "held")


def test_a_sweep_whose_tracking_server_is_unreachable_leaves_no_new_folder(sweep_dict, tmp_path):
    """The server is contacted after the lock is taken: a wrong address stops the sweep before
    any job, so the folder it made for the lock goes too."""
    from tests.conftest import free_port

    port = free_port()
    out = tmp_path / "new" / "out"
    d = dict(copy.deepcopy(sweep_dict), output_dir=str(out), tracking_uri=f"http://127.0.0.1:{port}")
    r = CliRunner().invoke(main, ["sweep", "-q", _write(tmp_path, d)])
    assert r.exit_code == 2 and f"tracking_uri 'http://127.0.0.1:{port}': MLflow cannot be reached" in r.stderr, r.output
    assert not (tmp_path / "new").exists()


def test_second_sweep_into_a_busy_output_folder_is_refused_before_preparing_models(sweep_dict, tmp_path,
                                                                                  monkeypatch):
    """The folder in use (its lock held by a running sweep): the second sweep stops at once, as the
    README has it, not after building or converting the models (minutes for a first embedded suite)."""
    from harness.workspace import Workspace

    out = tmp_path / "out"
    out.mkdir()
    prepared = []
    monkeypatch.setattr(Workspace, "identity", property(lambda self: prepared.append(1) or {}))
    with sweep_lock_held_elsewhere(out):
        code, err, _ = _run_sweep(tmp_path, dict(copy.deepcopy(sweep_dict), output_dir=str(out)))
    assert prepared == []
    assert code == 2 and f"{out}: another sweep is running into this output folder" in err, err


def sweep_preparing_elsewhere(sweep_file: Path) -> contextlib.AbstractContextManager[None]:
    """A first ``harness sweep sweep_file`` in another process, inside its model preparation
    (held there) until the block ends."""
    return python_running("import sys, time\nfrom harness.cli import main\nfrom harness.workspace import Workspace\n"
                          "def preparing(self):\n    print('preparing', flush=True)\n    time.sleep(60)\n"
                          "Workspace.identity = property(preparing)\n"
                          f"main(['sweep', '-q', {str(sweep_file)!r}])", "preparing")


def test_second_sweep_into_a_new_output_folder_in_use_is_refused_at_once(sweep_dict, tmp_path, monkeypatch):
    """A first sweep into a folder that did not exist made (and locked) it only after preparing its
    models: a second sweep into it meanwhile prepared too, instead of being refused at once."""
    import time

    from harness.workspace import Workspace

    out = tmp_path / "new" / "out"
    d = dict(copy.deepcopy(sweep_dict), output_dir=str(out))
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump(d))
    prepared = []
    monkeypatch.setattr(Workspace, "identity", property(lambda self: prepared.append(1) or {}))
    with sweep_preparing_elsewhere(first):
        start = time.monotonic()
        code, err, _ = _run_sweep(tmp_path, d)
        took = time.monotonic() - start
    assert prepared == []
    assert code == 2 and f"{out}: another sweep is running into this output folder" in err, err
    assert took < 10, took


def test_a_sweep_losing_the_race_for_a_new_folder_leaves_the_winners_lock(sweep_dict, tmp_path, monkeypatch):
    """Two sweeps into a folder that did not exist both make it, and the other one locks it first:
    this one stops, and removes neither the other's lock file nor the folder (deleting the file
    would let a third sweep lock a new file in the folder in use)."""
    import harness.runner as runner

    out = tmp_path / "new" / "out"
    make = runner._make_output_dir
    with contextlib.ExitStack() as elsewhere:
        def made_then_locked_elsewhere(path: Path) -> list[Path]:
            made = make(path)
            elsewhere.enter_context(sweep_lock_held_elsewhere(path))
            return made

        monkeypatch.setattr(runner, "_make_output_dir", made_then_locked_elsewhere)
        code, err, _ = _run_sweep(tmp_path, dict(copy.deepcopy(sweep_dict), output_dir=str(out)))
        assert code == 2 and f"{out}: another sweep is running into this output folder" in err, err
        assert [p.name for p in out.iterdir()] == [".sweep.lock"]


def test_a_sweep_stopped_before_running_leaves_no_new_folder(sweep_dict, tmp_path, monkeypatch):
    """The folder is made before preparing, to hold the lock: a sweep stopped in preparation (a bad
    checkpoint, Ctrl-C) removes it, and the parents it made, as it wrote nothing there."""
    from harness.workspace import Workspace

    def interrupted(self):
        assert (out / ".sweep.lock").exists()  # made and locked already
        raise KeyboardInterrupt

    out = tmp_path / "new" / "out"
    monkeypatch.setattr(Workspace, "identity", property(interrupted))
    r = CliRunner().invoke(main, ["sweep", "-q", _write(tmp_path, dict(copy.deepcopy(sweep_dict), output_dir=str(out)))])
    assert r.exit_code != 0 and isinstance(r.exception, (KeyboardInterrupt, SystemExit)), r.output
    assert not (tmp_path / "new").exists()


def test_second_sweep_into_a_busy_output_folder_is_refused(sweep_dict, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with sweep_lock_held_elsewhere(out):
        d = copy.deepcopy(sweep_dict)
        d["output_dir"] = str(out)
        code, err, _ = _run_sweep(tmp_path, d)
        assert code == 2 and f"{out}: another sweep is running into this output folder" in err, err
        assert not (out / "results").exists() or not any((out / "results").iterdir())
    code, err, _ = _run_sweep(tmp_path, d)  # the holder is gone (killed): the lock went with it
    assert code == 0, err


def test_an_output_dir_that_is_a_file_is_bad_input(sweep_dict, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    for out, problem in ((taken, "is a file, not a folder"), (taken / "sub", f"{taken} is a file, not a folder")):
        d = dict(sweep_dict, output_dir=str(out))
        for command in ("validate", "sweep"):
            r = CliRunner().invoke(main, [command, _write(tmp_path, d)])
            err = " ".join(r.stderr.split())
            assert r.exit_code == 2, err + r.stdout
            assert err == f"error: {tmp_path / 's.yaml'}: output_dir: {problem} (got {str(out)!r})", err
            assert "valid" not in r.stdout
    assert taken.read_text() == "not a folder"


def test_a_cache_folder_that_is_a_file_is_bad_input(sweep_dict, tmp_path, monkeypatch):
    """cache_dir or $HARNESS_CACHE at (or under) a file: one line naming the field, before any
    cache write (it was a NotADirectoryError traceback from the first one)."""
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    d = {k: v for k, v in sweep_dict.items() if k != "cache_dir"}
    monkeypatch.setenv("HARNESS_CACHE", str(taken / "sub"))
    for command in (["validate", _write(tmp_path, d)], ["sweep", _write(tmp_path, d)], ["prepare"]):
        r = CliRunner().invoke(main, command)
        err = " ".join(r.stderr.split())
        file = command[1] if len(command) > 1 else "<defaults>"
        assert r.exit_code == 2, err + r.stdout
        assert err == (f"error: {file}: cache_dir ($HARNESS_CACHE): {taken} is a file, not a folder "
                       f"(got {str(taken / 'sub')!r})"), err
    r = CliRunner().invoke(main, ["validate", _write(tmp_path, dict(d, cache_dir=str(taken)))])
    assert r.exit_code == 2
    assert " ".join(r.stderr.split()) == f"error: {tmp_path / 's.yaml'}: cache_dir: is a file, not a folder (got {str(taken)!r})"
    assert taken.read_text() == "not a folder"


def test_a_read_only_output_folder_is_one_line(sweep_dict, tmp_path, monkeypatch):
    """EROFS or EACCES on the lock file: the folder named, no traceback, nothing run."""
    from tests.conftest import read_only_under

    out = tmp_path / "out"
    out.mkdir()
    read_only_under(monkeypatch, out)
    code, err, _ = _run_sweep(tmp_path, dict(sweep_dict, output_dir=str(out)))
    assert code == 2, err
    assert err == f"error: output_dir: cannot write into it (Read-only file system) (got {str(out)!r})", err
    assert list(out.iterdir()) == []


def _validate_loading_no_tensor(tmp_path, d, monkeypatch) -> str:
    """`harness validate` on ``d`` with every way of loading tensors or building the model
    refused; its error (exit code 2), on one line."""
    def no_load(*a, **k):
        raise AssertionError("validate loaded tensors")

    import importlib

    import harness.models

    # Every module that binds load_state_dict by name is imported first and patched there too:
    # one imported for the first time under the patch would keep no_load after this test, and
    # fail every later test of the session that loads a checkpoint through it.
    for name in ("harness.checkpoints", "harness.convert", "harness.hf_convert", "harness.workspace",
                 "methods.wemoe", "tasks.embedded.pipeline"):
        module = importlib.import_module(name)
        if getattr(module, "load_state_dict", None) is harness.models.load_state_dict:
            monkeypatch.setattr(module, "load_state_dict", no_load)
    monkeypatch.setattr("harness.models.load_state_dict", no_load)
    monkeypatch.setattr("safetensors.torch.load_file", no_load)
    monkeypatch.setattr("harness.workspace.build_clip", no_load)
    r = CliRunner().invoke(main, ["validate", _write(tmp_path, d)])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2, err + r.stdout
    return err


def test_validate_names_a_checkpoint_of_another_width_from_headers_alone(sweep_dict, micro_checkpoints, tmp_path,
                                                                       monkeypatch):
    """`validate` compares every fine-tuned checkpoint's tensor shapes with the pretrained encoder's
    (micro ViT: width 32; tiny ViT: 128) reading safetensors headers, loading no tensor."""
    import shutil

    folder = tmp_path / "ckpts"
    folder.mkdir()
    shutil.copy(micro_checkpoints / "toy_stripes.safetensors", folder / "toy_stripes.safetensors")
    save_state_dict(build_clip("harness-tiny-vit").visual.state_dict(), folder / "toy_colours.safetensors")
    d = copy.deepcopy(sweep_dict)
    d["model"]["finetuned_pattern"] = str(folder / "{task}.safetensors")
    err = _validate_loading_no_tensor(tmp_path, d, monkeypatch)
    assert (f"error: {tmp_path / 's.yaml'}: model.finetuned_pattern: checkpoint of task 'toy_colours' "
            f"({folder / 'toy_colours.safetensors'}): tensor 'class_embedding' has shape (128,), pretrained has "
            "(32,) (model.pretrained pretrained.safetensors: another architecture or width?)") in err, err


def test_validate_names_the_field_of_a_checkpoint_given_per_task(sweep_dict, micro_checkpoints, tmp_path):
    path = tmp_path / "tiny.safetensors"
    clip = build_clip("harness-tiny-vit")
    save_state_dict({f"model.visual.{k}": v for k, v in clip.visual.state_dict().items()}, path)  # under a prefix
    r = CliRunner().invoke(main, ["validate", _write(tmp_path, _with_ckpt(sweep_dict, "toy_stripes", path))])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2 and (f"s.yaml: model.finetuned.toy_stripes: {path}: tensor 'class_embedding' has shape "
                                 "(128,), pretrained has (32,)") in err, err


def test_the_runs_preflight_names_the_field_of_a_pt_checkpoint(sweep_dict, micro_checkpoints, tmp_path):
    """A sweep run as a library (no sweep file, so no file checks before it) is checked by the
    run's preflight against the built model: it names a ``.pt`` checkpoint's sweep field too."""
    from harness.config import validate_config
    from harness.errors import HarnessError
    from harness.runner import run_sweep

    state = _encoder_state()
    state["conv1.weight"] = torch.zeros(1, 3, 8, 8)
    p = tmp_path / "shape.pt"
    torch.save(state, p)
    with pytest.raises(HarnessError) as exc:
        run_sweep(validate_config(_with_ckpt(sweep_dict, "toy_stripes", p)), console=None)
    assert str(exc.value).startswith(f"model.finetuned.toy_stripes: {p}: tensor 'conv1.weight' has shape "
                                     "(1, 3, 8, 8), pretrained has (32, 3, 8, 8)"), exc.value


def test_a_cuda_device_without_cuda_is_one_error_naming_the_field_before_any_job(sweep_dict, tmp_path, monkeypatch):
    """``device: cuda`` on a machine without CUDA, jobs run here (local pool of two): one line
    naming the field and value before any job, not one failed line per job."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    d = copy.deepcopy(sweep_dict)
    d["device"] = "cuda"
    d["executor"] = {"kind": "local", "workers": 2}
    code, err, out = _run_sweep(tmp_path, d)
    assert code == 2, err + out
    assert err.startswith(f"error: {tmp_path / 's.yaml'}: device: CUDA is not available on this machine, where "
                          "the jobs run (executor: local); use auto or cpu (got 'cuda')"), err
    assert "failed" not in out and not list(Path(d["output_dir"]).glob("results/*.json"))


def test_validate_names_a_cuda_device_without_cuda_where_the_jobs_run_here(sweep_dict, tmp_path, monkeypatch):
    """validate and the dry run said ``valid`` for ``device: cuda`` the sweep then refuses; a
    SLURM sweep, whose jobs resolve the device on their node, is still valid here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    f = _write(tmp_path, {**sweep_dict, "device": "cuda"})
    for args in (["validate", f], ["sweep", f, "--dry-run"]):
        r = CliRunner().invoke(main, args)
        err = " ".join(r.stderr.split())
        assert r.exit_code == 2 and err == (f"error: {f}: device: CUDA is not available on this machine, where the "
                                            "jobs run (executor: local); use auto or cpu (got 'cuda')"), err
    r = CliRunner().invoke(main, ["validate", f, "executor.kind=slurm"])
    assert r.exit_code == 0 and "valid" in r.stdout, r.output


def test_a_cuda_device_without_cuda_is_refused_before_the_embedded_suite_is_built(tmp_path, monkeypatch):
    """``device: cuda`` on a machine without CUDA, the embedded suite not built yet: the sweep
    trained the whole suite (minutes: 3.5 for sweeps/quick.yaml on 2 cores) and only then refused
    the device, which validate refuses at once."""
    from tasks.embedded import pipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real = pipeline.prepare_suite

    def no_training(*args, train=True, **kwargs):
        assert not train, "the embedded suite was built for a sweep whose device is missing"
        return real(*args, train=train, **kwargs)

    monkeypatch.setattr(pipeline, "prepare_suite", no_training)
    d = {"name": "e", "device": "cuda", "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "out"),
         "model": {"source": "embedded", "suite": {"size": "tiny"}}, "tasks": ["emb_mnist", "emb_fashion"],
         "methods": [{"name": "task_arithmetic"}]}
    code, err, out = _run_sweep(tmp_path, d)
    assert code == 2 and err == (f"error: {tmp_path / 's.yaml'}: device: CUDA is not available on this machine, where "
                                 "the jobs run (executor: local); use auto or cpu (got 'cuda')"), err + out
    assert not (tmp_path / "out").exists()


def test_a_finished_sweep_reruns_from_its_cache_on_a_machine_without_its_device(sweep_dict, tmp_path, monkeypatch):
    """A sweep run on a GPU machine, rerun where there is none: every job is cached, none needs
    the device, so its table is printed as before (the device is checked before models are built,
    and these are built)."""
    code, err, out = _run_sweep(tmp_path, sweep_dict)
    assert code == 0, err + out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err, out = _run_sweep(tmp_path, {**sweep_dict, "device": "cuda"})
    assert code == 0 and "task_arithmetic" in out, err + out


def test_a_gpu_index_the_machine_lacks_is_one_error_naming_the_field_before_any_job(sweep_dict, tmp_path, monkeypatch):
    """``device: cuda:1`` on a one-GPU machine was valid for validate, the dry run and the sweep,
    whose every job then failed at its first tensor; it is refused before any job, naming the GPU
    there is. A SLURM sweep resolves it on its node (other GPUs): still valid here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    f = _write(tmp_path, {**sweep_dict, "device": "cuda:1"})
    want = (f"error: {f}: device: this machine has 1 CUDA GPU (cuda:0), where the jobs run (executor: local); "
            "use auto, cpu or cuda (got 'cuda:1')")
    for args in (["validate", f], ["sweep", f, "--dry-run"], ["sweep", "-q", f]):
        r = CliRunner().invoke(main, args)
        err = " ".join(r.stderr.split())
        assert r.exit_code == 2 and err == want, (args, err)
    assert not list(Path(sweep_dict["output_dir"]).glob("results/*.json"))
    r = CliRunner().invoke(main, ["validate", f, "executor.kind=slurm"])
    assert r.exit_code == 0 and "valid" in r.stdout, r.output
    r = CliRunner().invoke(main, ["validate", f, "device=cuda:0"])
    assert r.exit_code == 0 and "valid" in r.stdout, r.output


def test_an_mps_device_without_mps_is_one_error_naming_the_field(sweep_dict, tmp_path, monkeypatch):
    """``device: mps`` on a machine without it failed each job, its merge blamed for the device."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    code, err, out = _run_sweep(tmp_path, {**sweep_dict, "device": "mps"})
    assert code == 2, err + out
    assert err.startswith(f"error: {tmp_path / 's.yaml'}: device: MPS is not available on this machine, where "
                          "the jobs run (executor: local); use auto or cpu (got 'mps')"), err


def test_validate_names_pretrained_weights_every_checkpoint_differs_from(sweep_dict, tmp_path):
    """Two fine-tuned micro encoders (width 32) against a tiny CLIP's weights (width 128): the
    pretrained weights are the odd ones out, not the first checkpoint."""
    d = copy.deepcopy(sweep_dict)
    d["model"]["pretrained"] = str(tmp_path / "tiny-clip.safetensors")
    save_state_dict(build_clip("harness-tiny-vit").state_dict(), tmp_path / "tiny-clip.safetensors")
    r = CliRunner().invoke(main, ["validate", _write(tmp_path, d)])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2 and (f"s.yaml: model.pretrained: {tmp_path / 'tiny-clip.safetensors'}: tensor "
                                 "'class_embedding' of its image encoder has shape (128,), every fine-tuned "
                                 "checkpoint has (32,)") in err, err


def _sweep_with_a_copied_pretrained_checkpoint(tmp_path: Path) -> tuple[dict, str]:
    """A task-arithmetic sweep whose toy_colours checkpoint holds the pretrained encoder (toy_stripes'
    really changed), and the warning its jobs must give, naming the field and the file."""
    import shutil

    from tests.conftest import make_sweep_dict, write_micro_checkpoints

    ckpt = write_micro_checkpoints(tmp_path / "ckpt", lambda p: 0.05)
    same = write_micro_checkpoints(tmp_path / "same", lambda p: 0.0, tasks=["toy_colours"])
    shutil.copy(same / "toy_colours.safetensors", ckpt / "toy_colours.safetensors")
    d = make_sweep_dict(ckpt, tmp_path)
    d["methods"] = [{"name": "task_arithmetic", "params": {"scaling": 0.5}}]
    d["eval"] = {"max_samples": 16}
    warning = (f"model.finetuned_pattern (task 'toy_colours'): {ckpt / 'toy_colours.safetensors'}: the fine-tuned "
               "encoder of 'toy_colours' equals the pretrained one (a zero task vector): is it the pretrained weights?")
    return d, warning


def test_a_fine_tuned_checkpoint_equal_to_the_pretrained_encoder_is_warned_about(tmp_path):
    """A fine-tuned file that holds the pretrained encoder (a copied file, a wrong path) merges as a
    zero task vector: its individual and merge jobs say so, naming the field and file; the other
    task's checkpoint, really changed, raises nothing."""
    from harness.config import validate_config
    from harness.runner import run_sweep

    d, want = _sweep_with_a_copied_pretrained_checkpoint(tmp_path)
    run = run_sweep(validate_config(d), console=None)
    by_title = {r.title: r.warnings for r in run.results}
    assert by_title["task_arithmetic"] == [want]
    assert by_title["individual/toy_colours"] == [want]
    assert by_title["individual/toy_stripes"] == []


def test_a_quiet_sweep_still_prints_the_zero_task_vector_warning(tmp_path):
    """``-q`` silences progress, not a warning that the merge used a likely wrong checkpoint."""
    d, warning = _sweep_with_a_copied_pretrained_checkpoint(tmp_path)
    code, err, _ = _run_sweep(tmp_path, d)
    assert code == 0, err
    assert err.count(f"warning individual/toy_colours: {warning}") == 1, err
    assert err.count(f"warning task_arithmetic(scaling=0.5): {warning}") == 1, err
    assert "done " not in err, err


def test_two_tasks_with_the_same_fine_tuned_checkpoint_are_warned_about(tmp_path):
    """A copy-pasted path (both tasks given one task's checkpoint) merged one task vector twice
    and scored it as the other task's, silently: each job using both says so once, naming both
    fields and files; a sweep whose checkpoints differ warns of nothing."""
    import shutil

    from harness.config import validate_config
    from harness.runner import run_sweep
    from tests.conftest import make_sweep_dict, write_micro_checkpoints

    ckpt = write_micro_checkpoints(tmp_path / "ckpt", lambda p: 0.05)
    d = make_sweep_dict(ckpt, tmp_path)
    d["methods"] = [{"name": "task_arithmetic", "params": {"scaling": 0.5}}]
    d["eval"] = {"max_samples": 16}
    assert all(r.warnings == [] for r in run_sweep(validate_config(d), console=None).results)

    shutil.copy(ckpt / "toy_stripes.safetensors", ckpt / "copy.safetensors")
    d["model"]["finetuned"] = {"toy_colours": str(ckpt / "copy.safetensors")}
    d["output_dir"] = str(tmp_path / "out2")
    run = run_sweep(validate_config(d), console=None)
    stripes = f"model.finetuned_pattern (task 'toy_stripes'): {ckpt / 'toy_stripes.safetensors'}"
    colours = f"model.finetuned.toy_colours: {ckpt / 'copy.safetensors'}"
    by_title = {r.title: r.warnings for r in run.results}
    assert by_title["task_arithmetic"] == [f"{stripes}: the fine-tuned encoder of 'toy_stripes' is the same "
                                           f"checkpoint as that of 'toy_colours' ({colours}): is one of them "
                                           "another task's?"]
    assert by_title["individual/toy_colours"] == [f"{colours}: the fine-tuned encoder of 'toy_colours' is the same "
                                                  f"checkpoint as that of 'toy_stripes' ({stripes}): is one of them "
                                                  "another task's?"]


def test_validate_names_an_architecture_of_another_width_than_the_pretrained_weights(sweep_dict, tmp_path,
                                                                                    monkeypatch):
    """micro-ViT weights (width 32) and checkpoints, with model.arch naming the tiny ViT (width 128):
    `validate` blames model.arch from the weights' header and open_clip's model built on the meta
    device, loading no tensor; the weights and checkpoints agree with each other."""
    d = copy.deepcopy(sweep_dict)
    d["model"]["arch"] = "harness-tiny-vit"
    err = _validate_loading_no_tensor(tmp_path, d, monkeypatch)
    assert (f"error: {tmp_path / 's.yaml'}: model.arch: architecture 'harness-tiny-vit' has tensor "
            "'visual.class_embedding' of shape (128,), model.pretrained pretrained.safetensors has (32,) "
            "(weights of another architecture or width?) (got 'harness-tiny-vit')") in err, err


def test_validate_names_an_architecture_of_another_depth_than_the_pretrained_weights(sweep_dict, tmp_path):
    """The micro ViT with one more vision block (same widths): no shape differs, the weights lack
    the block's tensors."""
    import json
    import shutil

    micro = json.loads((Path(harness.__file__).parent / "model_configs" / "harness-micro-vit.json").read_text())
    micro["vision_cfg"]["layers"] += 1
    (tmp_path / "w" / "model_configs").mkdir(parents=True)
    (tmp_path / "w" / "model_configs" / "harness-micro-vit-deeper.json").write_text(json.dumps(micro))
    d = copy.deepcopy(sweep_dict)
    d["model"]["pretrained"] = str(shutil.copy(d["model"]["pretrained"], tmp_path / "w" / "pretrained.safetensors"))
    d["model"]["arch"] = "harness-micro-vit-deeper"
    r = CliRunner().invoke(main, ["validate", _write(tmp_path, d)])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2, err + r.stdout
    assert ("model.arch: architecture 'harness-micro-vit-deeper' does not fit the pretrained weights: 12 of its "
            "tensors are not in model.pretrained pretrained.safetensors (first 'visual.transformer.resblocks.2.ln_1.weight') "
            "(weights of another architecture or depth?)") in err, err


def test_validate_accepts_the_architecture_of_its_weights(sweep_dict, tmp_path):
    r = CliRunner().invoke(main, ["validate", _write(tmp_path, sweep_dict)])
    assert r.exit_code == 0, r.stderr + r.stdout


def _as_pt(d, tmp_path, tasks=()):
    """``d`` with its pretrained weights, and the fine-tuned checkpoints of ``tasks``, saved as
    weights-only ``.pt`` files (the same tensors)."""
    from harness.models import load_state_dict

    d = copy.deepcopy(d)
    (tmp_path / "pt").mkdir(exist_ok=True)
    torch.save(load_state_dict(d["model"]["pretrained"]), tmp_path / "pt" / "pretrained.pt")
    d["model"]["pretrained"] = str(tmp_path / "pt" / "pretrained.pt")
    for t in tasks:
        torch.save(load_state_dict(d["model"]["finetuned_pattern"].format(task=t)), tmp_path / "pt" / f"{t}.pt")
        d["model"].setdefault("finetuned", {})[t] = str(tmp_path / "pt" / f"{t}.pt")
    return d


def test_validate_names_an_architecture_of_another_width_than_pt_pretrained_weights(sweep_dict, tmp_path):
    """micro-ViT weights saved as a ``.pt`` under model.arch harness-tiny-vit: the sweep would fail
    building the model; `validate` names model.arch as it does for safetensors weights."""
    d = _as_pt(sweep_dict, tmp_path)
    d["model"]["arch"] = "harness-tiny-vit"
    r = CliRunner().invoke(main, ["validate", _write(tmp_path, d)])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2, err + r.stdout
    assert (f"error: {tmp_path / 's.yaml'}: model.arch: architecture 'harness-tiny-vit' has tensor "
            "'visual.class_embedding' of shape (128,), model.pretrained pretrained.pt has (32,) "
            "(weights of another architecture or width?) (got 'harness-tiny-vit')") in err, err


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_validate_names_a_checkpoint_of_another_width_than_pt_pretrained_weights(sweep_dict, tmp_path, suffix):
    """A tiny-ViT encoder (width 128) as one task's checkpoint beside micro-ViT (width 32) weights
    saved as a ``.pt``: named with its field by `validate`, not by the sweep's preflight."""
    d = _as_pt(sweep_dict, tmp_path)
    enc = build_clip("harness-tiny-vit").visual.state_dict()
    path = tmp_path / f"tiny{suffix}"
    torch.save(enc, path) if suffix == ".pt" else save_state_dict(enc, path)
    d["model"]["finetuned"] = {"toy_stripes": str(path)}
    r = CliRunner().invoke(main, ["validate", _write(tmp_path, d)])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2, err + r.stdout
    assert (f"model.finetuned.toy_stripes: {path}: tensor 'class_embedding' has shape (128,), pretrained has (32,) "
            "(model.pretrained pretrained.pt: another architecture or width?)") in err, err


def test_validate_names_a_pt_checkpoint_of_another_width_than_safetensors_weights(sweep_dict, tmp_path):
    d = copy.deepcopy(sweep_dict)
    torch.save(build_clip("harness-tiny-vit").visual.state_dict(), tmp_path / "tiny.pt")
    d["model"]["finetuned"] = {"toy_colours": str(tmp_path / "tiny.pt")}
    r = CliRunner().invoke(main, ["validate", _write(tmp_path, d)])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2, err + r.stdout
    assert (f"model.finetuned.toy_colours: {tmp_path / 'tiny.pt'}: tensor 'class_embedding' has shape (128,), "
            "pretrained has (32,) (model.pretrained pretrained.safetensors: another architecture or width?)") in err, err


def test_validate_accepts_pt_weights_and_checkpoints_of_its_architecture(sweep_dict, tmp_path):
    d = _as_pt(sweep_dict, tmp_path, tasks=["toy_stripes"])
    r = CliRunner().invoke(main, ["validate", _write(tmp_path, d)])
    assert r.exit_code == 0, r.stderr + r.stdout


def test_the_architecture_check_allocates_no_parameter_and_keeps_the_hub_offline(monkeypatch):
    """`validate` (and every sweep's driver) builds model.arch only for its tensor names and shapes:
    no parameter is ever made in memory (open_clip's create_model(device="meta") alone builds the
    model on the CPU, a ViT-bigG's 10 GB, then moves it), and a Hugging Face text tower's config
    is looked up offline, its weights not at all, as nothing else in a sweep reaches for a hub."""
    import os

    from torch import nn

    import harness.models
    from harness.models import meta_clip_shapes, open_clip_module

    devices, calls = set(), []
    register = nn.Module.register_parameter

    def spy(self, name, param):
        if param is not None:
            devices.add(param.device.type)
        return register(self, name, param)

    real = open_clip_module().create_model

    def create_model(*args, **kwargs):
        calls.append((os.environ.get("HF_HUB_OFFLINE"), kwargs.get("pretrained_text", True)))
        return real(*args, **kwargs)

    monkeypatch.setattr(nn.Module, "register_parameter", spy)
    monkeypatch.setattr(harness.models.open_clip_module(), "create_model", create_model)
    shapes = meta_clip_shapes("harness-tiny-vit")
    assert shapes["visual.class_embedding"] == (128,)
    assert devices == {"meta"}, devices
    assert calls == [("1", False)], calls


def test_loading_a_fine_tuned_encoder_with_integer_weights_refuses_it(sweep_dict, tmp_path):
    """What loads the encoders without the run's preflight (export, a job in a worker) cast an
    int8 tensor into the float encoder, silently."""
    from harness.config import validate_config
    from harness.errors import HarnessError
    from harness.workspace import Workspace

    state = _encoder_state()
    state["ln_post.weight"] = state["ln_post.weight"].to(torch.int8)
    p = tmp_path / "int8.safetensors"
    save_state_dict(state, p)
    ws = Workspace(validate_config(_with_ckpt(sweep_dict, "toy_stripes", p)))
    with pytest.raises(HarnessError) as err:
        ws.finetuned_encoder("toy_stripes")
    assert str(err.value).startswith(f"model.finetuned.toy_stripes: {p}: tensor 'ln_post.weight' has dtype int8, "
                                     "not floating point")


def test_a_head_that_is_another_tasks_is_warned_about(sweep_dict, tmp_path):
    """A `model.heads` file that is another task's head with as many classes passed every check and
    scored the task with the wrong classifier, silently. A head imported from `head_<Dataset>.pt`
    of another sweep task, or two tasks given heads of one content, now warn in each job using
    them (a warning, not a refusal: the sweep runs); distinct heads named for their tasks warn of nothing."""
    import shutil

    from harness.config import validate_config
    from harness.convert import convert_pickled_checkpoint
    from harness.runner import run_sweep

    torch.manual_seed(0)
    for task in ("toy_stripes", "toy_colours"):  # task_vectors' layout: a Linear with a zero bias
        torch.save({"weight": torch.randn(4, 32), "bias": torch.zeros(4)}, tmp_path / f"head_{task}.pt")
    heads = tmp_path / "heads"
    mine = {t: convert_pickled_checkpoint(tmp_path / f"head_{t}.pt", heads / f"{t}.safetensors")
            for t in ("toy_stripes", "toy_colours")}
    d = copy.deepcopy(sweep_dict)
    d["methods"] = [{"name": "task_arithmetic", "params": {"scaling": 0.5}}]
    d["eval"] = {"max_samples": 16}
    d["model"]["heads"] = {t: str(p) for t, p in mine.items()}
    assert all(r.warnings == [] for r in run_sweep(validate_config(d), console=None).results)

    wrong = convert_pickled_checkpoint(tmp_path / "head_toy_colours.pt", heads / "for_stripes.safetensors")
    shutil.copy(heads / "toy_colours.safetensors", heads / "copy.safetensors")
    d["model"]["heads"] = {"toy_stripes": str(wrong), "toy_colours": str(heads / "copy.safetensors")}
    d["output_dir"] = str(tmp_path / "out2")
    run = run_sweep(validate_config(d), console=None)
    named = (f"model.heads.toy_stripes: {wrong}: the head given for 'toy_stripes' was imported from "
             f"{tmp_path / 'head_toy_colours.pt'}, named for the dataset of task 'toy_colours': is it the head of 'toy_colours'?")
    same = (f"model.heads.toy_stripes: {wrong}: the head given for 'toy_stripes' has the same content as that of "
            f"'toy_colours' (model.heads.toy_colours: {heads / 'copy.safetensors'}): is one of them another task's?")
    by_title = {r.title: r.warnings for r in run.results}
    assert by_title["task_arithmetic"] == [named, same]
    assert by_title["individual/toy_stripes"] == [named, same]
    assert by_title["individual/toy_colours"] == [
        f"model.heads.toy_colours: {heads / 'copy.safetensors'}: the head given for 'toy_colours' has the same content "
        f"as that of 'toy_stripes' (model.heads.toy_stripes: {wrong}): is one of them another task's?"]
    from harness.workspace import Workspace

    plain = heads / "head_toy_colours.safetensors"  # no sidecar: its own name says whose it is
    save_state_dict({"weight": torch.randn(4, 32)}, plain)
    d["model"]["heads"] = {"toy_stripes": str(plain)}
    assert Workspace(validate_config(d)).input_warnings(["toy_stripes"]) == [
        f"model.heads.toy_stripes: {plain}: the head given for 'toy_stripes' is named for the dataset of task "
        "'toy_colours': is it the head of 'toy_colours'?"]


def test_a_fine_tuned_encoder_that_changed_only_some_tensors_is_not_warned_about(tmp_path):
    """Fine-tuning with frozen norms and biases changes only the weight matrices: every tensor must
    equal the pretrained one for the zero-task-vector warning, not one of them."""
    from harness.config import validate_config
    from harness.workspace import Workspace
    from tests.conftest import make_sweep_dict, write_micro_checkpoints

    ckpt = write_micro_checkpoints(tmp_path / "ckpt", lambda p: 0.05 if p.ndim == 2 else 0.0)
    ws = Workspace(validate_config(make_sweep_dict(ckpt, tmp_path)))
    assert ws.input_warnings(["toy_stripes", "toy_colours"]) == []


def test_a_damaged_fine_tuned_file_is_named_by_a_workspace_that_builds_nothing(sweep_dict, micro_checkpoints,
                                                                             tmp_path):
    """A truncated safetensors file is read as it is, so its damage is named, also by a workspace
    that converts nothing (a dry run's), never taken for a conversion not made yet."""
    from harness.config import validate_config
    from harness.errors import HarnessError
    from harness.workspace import Workspace

    path = tmp_path / "cut.safetensors"
    path.write_bytes((micro_checkpoints / "toy_stripes.safetensors").read_bytes()[:200])
    cfg = validate_config(_with_ckpt(sweep_dict, "toy_stripes", path))
    for build in (True, False):
        with pytest.raises(HarnessError, match=f"{path}: not a readable safetensors file") as err:
            Workspace(cfg, build=build).preflight()
        assert type(err.value) is HarnessError


def test_an_image_encoder_as_pretrained_is_named_by_the_workspace(sweep_dict, micro_checkpoints):
    """Used as a library (no CLI check first), safetensors without a ``visual.`` tower given as
    the pretrained model are refused as no whole CLIP, not loaded into one as mismatched weights."""
    from harness.config import validate_config
    from harness.errors import HarnessError
    from harness.workspace import Workspace

    d = copy.deepcopy(sweep_dict)
    d["model"]["pretrained"] = str(micro_checkpoints / "toy_colours.safetensors")
    with pytest.raises(HarnessError, match="toy_colours.safetensors: not a whole CLIP state dict"):
        Workspace(validate_config(d)).clip


@pytest.mark.parametrize("name, key", [("bias-first.pt", "weight"), ("bias-first.safetensors", "head")])
def test_a_stored_heads_tensor_is_found_by_its_name_not_its_place(name, key, sweep_dict, tmp_path):
    """A head file listing its zero bias before the ``[classes, dim]`` tensor (a dict built in
    that order, or safetensors, which lists names sorted) is read as its ``weight`` (or ``head``)."""
    from harness.config import validate_config
    from harness.workspace import Workspace

    torch.manual_seed(0)
    weight = torch.randn(4, 32)
    d = _heads_sweep(sweep_dict, tmp_path / name, {"bias": torch.zeros(4), key: weight})
    assert torch.equal(Workspace(validate_config(d)).head("toy_colours"), weight)


@pytest.mark.parametrize("order", ["weight-first", "bias-first"])
def test_a_linear_probe_saved_under_its_modules_name_is_refused_for_its_bias(order, sweep_dict, tmp_path):
    """A head saved as a module's state dict (``classification_head.weight`` and ``.bias``) was
    read as its first tensor: weight first, its non-zero bias was dropped without a word and every
    prediction scored as another model's; bias first, the error blamed a 1-d 'head'. Its bias is
    now found beside its weight and refused as a plain ``bias`` is; a zero one runs."""
    from harness.config import validate_config
    from harness.workspace import Workspace

    torch.manual_seed(0)
    weight, bias = torch.randn(4, 32), torch.tensor([0.0, 0.5, 0.0, -1.0])
    state = {"classification_head.weight": weight, "classification_head.bias": bias}
    if order == "bias-first":
        state = dict(reversed(state.items()))
    d = _heads_sweep(sweep_dict, tmp_path / "probe.pt", state)
    code, err, _ = _run_sweep(tmp_path, d)
    assert code == 2 and err.startswith(f"error: model.heads.toy_colours: {tmp_path / 'probe.pt'}: tensor "
                                        "'classification_head.bias' is not zero"), err
    assert not (tmp_path / "out").exists()
    d = _heads_sweep(sweep_dict, tmp_path / "zero.pt", {**state, "classification_head.bias": torch.zeros(4)})
    assert torch.equal(Workspace(validate_config(d)).head("toy_colours"), weight)


def test_a_head_file_of_several_tensors_none_named_as_a_head_is_refused_naming_them(sweep_dict, tmp_path):
    """Two [classes, dim] tensors and neither named ``weight``, ``head`` or one ``<prefix>.weight``:
    reading the first would score with whichever the file lists first."""
    d = _heads_sweep(sweep_dict, tmp_path / "two.pt", {"a.weight": torch.randn(4, 32), "b.weight": torch.randn(4, 32)})
    code, err, _ = _run_sweep(tmp_path, d)
    assert code == 2 and err == (f"error: model.heads.toy_colours: {tmp_path / 'two.pt'}: holds 'a.weight', "
                                 "'b.weight', none of them the head: give its [classes, dim] tensor as 'weight' (or "
                                 "'head', or as the one '<prefix>.weight')"), err


def test_a_converted_checkpoint_is_named_as_given_and_as_converted(sweep_dict, micro_checkpoints, tmp_path):
    """A checkpoint read from a conversion in the cache (here a ``.pt`` whole-CLIP tower under
    ``visual.``) is named by its field, the file given and the converted file read in its place."""
    from harness.config import validate_config
    from harness.models import load_state_dict
    from harness.workspace import Workspace

    pre = load_state_dict(micro_checkpoints / "pretrained.safetensors")
    given = tmp_path / "tower.pt"
    torch.save({k: v for k, v in pre.items() if k.startswith("visual.")}, given)
    ws = Workspace(validate_config(_with_ckpt(sweep_dict, "toy_stripes", given)))
    read = Path(ws.sources["finetuned"]["toy_stripes"])
    assert read.parent == Path(sweep_dict["cache_dir"]) / "checkpoints"
    assert ws.input_warnings(["toy_stripes"]) == [
        f"model.finetuned.toy_stripes: {given} (converted to {read}): the fine-tuned encoder of 'toy_stripes' "
        "equals the pretrained one (a zero task vector): is it the pretrained weights?"]


@pytest.mark.parametrize("name, prefix", [("model.safetensors", "vision_model."), ("encoder.pt", "")])
def test_a_hugging_face_weights_file_without_its_folder_says_to_name_the_folder(name, prefix, sweep_dict,
                                                                                micro_checkpoints, tmp_path):
    """A transformers vision tower's weights file, copied out of its folder (no config.json beside
    it): the error said only that conv1.weight is missing; it now says what the file holds and
    what to name instead."""
    from harness.models import load_state_dict
    from tests.test_hf_convert import to_hf

    enc = load_state_dict(micro_checkpoints / "toy_colours.safetensors")
    path = tmp_path / name
    state = to_hf(enc, prefix)
    if name.endswith(".pt"):
        torch.save(state, path)
    else:
        save_state_dict(state, path)
    for command in ("validate", "sweep"):
        r = CliRunner().invoke(main, [command, _write(tmp_path, _with_ckpt(sweep_dict, "toy_colours", path))])
        err = " ".join(r.stderr.split())
        assert r.exit_code == 2 and (f"model.finetuned.toy_colours: {path}: tensor 'conv1.weight' of the pretrained "
                                     "image encoder is missing (keys do not match harness-micro-vit's image encoder); "
                                     "it holds Hugging Face transformers tensors (patch_embedding.weight): name the "
                                     "folder that holds it with its config.json, which is converted") in err, err
