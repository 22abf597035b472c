"""Importing task_vectors-style pickled checkpoints, only behind the trust flag."""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.convert import convert_pickled_checkpoint, infer_arch
from harness.errors import HarnessError
from harness.models import ImageClassifier, build_clip, load_state_dict


class ImageEncoder(nn.Module):
    """Shaped like task_vectors' ImageEncoder: the open_clip CLIP under ``model``, text removed."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.model = clip
        delattr(self.model, "transformer")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class ClassificationHead(nn.Linear):
    """Shaped like task_vectors' ClassificationHead: a Linear over normalised features."""

    def __init__(self, weights: torch.Tensor):
        super().__init__(weights.shape[1], weights.shape[0])
        self.normalize = True
        self.weight = nn.Parameter(weights.clone())
        self.bias = nn.Parameter(torch.zeros(weights.shape[0]))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return super().forward(inputs / inputs.norm(dim=-1, keepdim=True))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def micro_clip() -> nn.Module:
    torch.manual_seed(0)
    clip = build_clip("harness-micro-vit")
    with torch.no_grad():  # move away from the default init so a fresh model cannot pass by chance
        for p in clip.visual.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return clip


@pytest.fixture
def pickled_encoder(tmp_path: Path, micro_clip: nn.Module) -> tuple[Path, nn.Module]:
    path = tmp_path / "finetuned.pt"
    torch.save(ImageEncoder(micro_clip), path)
    return path, micro_clip.visual


def test_pickled_encoder_round_trip(tmp_path: Path, pickled_encoder, caplog) -> None:
    src, visual = pickled_encoder
    with caplog.at_level(logging.WARNING, logger="harness.convert"):
        out = convert_pickled_checkpoint(src, tmp_path / "enc.safetensors", trust_pickle=True)
    assert any("trust_pickle=True" in r.getMessage() for r in caplog.records)
    assert out == tmp_path / "enc.safetensors"

    sidecar = json.loads(Path(str(out) + ".json").read_text())
    assert sidecar["source_sha256"] == sha256(src)
    assert sidecar["source"] == str(src.resolve())
    assert sidecar["kind"] == "image_encoder" and sidecar["arch"] == "harness-micro-vit"
    assert sidecar["prefix"] == "model.visual." and sidecar["activation"] == "gelu"
    assert sidecar["source_format"] == "pickle"
    assert sidecar["source_bytes"] == src.stat().st_size
    expected = visual.state_dict()  # the recorded counts, from the encoder itself
    assert sidecar["tensors"] == len(expected) and sidecar["parameters"] == sum(v.numel() for v in expected.values())
    assert sidecar["dtypes"] == ["float32"]

    state = load_state_dict(out)
    assert set(state) == set(visual.state_dict())
    fresh = build_clip("harness-micro-vit").visual
    fresh.load_state_dict(state, strict=True)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fresh(images), visual(images))


def test_refused_without_flag(tmp_path: Path, pickled_encoder) -> None:
    src, _ = pickled_encoder
    dst = tmp_path / "enc.safetensors"
    with pytest.raises(HarnessError) as err:
        convert_pickled_checkpoint(src, dst)
    msg = str(err.value)
    assert str(src) in msg and "trust_pickle=True" in msg and "--trust-pickle" in msg
    assert "Unsupported global" in msg and "add_safe_globals" not in msg  # the global named, no allowlisting advice
    assert not dst.exists() and not Path(str(dst) + ".json").exists()


def test_task_vectors_classes_missing_here(tmp_path: Path, micro_clip: nn.Module, monkeypatch) -> None:
    """Real checkpoints name ``src.modeling.ImageEncoder``, which is not importable here."""
    fake = types.ModuleType("src.modeling")
    cls = type("ImageEncoder", (ImageEncoder,), {"__module__": "src.modeling", "__qualname__": "ImageEncoder"})
    fake.ImageEncoder = cls
    src = tmp_path / "zeroshot.pt"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "src", types.ModuleType("src"))
        m.setitem(sys.modules, "src.modeling", fake)
        torch.save(cls(micro_clip), src)
    assert "src.modeling" not in sys.modules
    out = convert_pickled_checkpoint(src, tmp_path, trust_pickle=True)
    assert out == tmp_path / "zeroshot.safetensors"
    sidecar = json.loads(Path(str(out) + ".json").read_text())
    assert sidecar["unresolved_classes"] == ["src.modeling.ImageEncoder"]
    state = load_state_dict(out)
    for k, v in micro_clip.visual.state_dict().items():
        assert torch.equal(state[k], v)


def test_plain_state_dicts_need_no_flag(tmp_path: Path, micro_clip: nn.Module) -> None:
    full = tmp_path / "clip_state.pt"
    torch.save(micro_clip.state_dict(), full)  # full CLIP keys: visual.* plus text tower
    out = convert_pickled_checkpoint(full, tmp_path / "a.safetensors")
    sidecar = json.loads(Path(str(out) + ".json").read_text())
    assert sidecar["source_format"] == "tensors" and sidecar["prefix"] == "visual."
    assert sidecar["arch"] == "harness-micro-vit" and sidecar["source_sha256"] == sha256(full)
    expected = micro_clip.visual.state_dict()
    state = load_state_dict(out)
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in expected)

    # a bare visual state in safetensors converts too (keys unchanged)
    out2 = convert_pickled_checkpoint(out, tmp_path / "b.safetensors", arch="harness-micro-vit")
    assert json.loads(Path(str(out2) + ".json").read_text())["prefix"] == ""
    assert all(torch.equal(load_state_dict(out2)[k], expected[k]) for k in expected)


def test_wrong_arch_is_refused(tmp_path: Path, pickled_encoder) -> None:
    src, _ = pickled_encoder
    with pytest.raises(HarnessError, match="does not match 'harness-tiny-vit'"):
        convert_pickled_checkpoint(src, tmp_path / "x.safetensors", trust_pickle=True, arch="harness-tiny-vit")


def test_quickgelu_encoder_is_not_mistaken_for_gelu(tmp_path: Path) -> None:
    """OpenAI-initialised models use QuickGELU; same shapes, different function."""
    import open_clip

    from harness.models import open_clip_module

    open_clip_module()
    clip = open_clip.create_model("harness-micro-vit", force_quick_gelu=True)
    src = tmp_path / "quick.pt"
    torch.save(ImageEncoder(clip), src)
    with pytest.raises(HarnessError, match="uses quick_gelu but 'harness-micro-vit' uses gelu"):
        convert_pickled_checkpoint(src, tmp_path / "q.safetensors", trust_pickle=True, arch="harness-micro-vit")
    with pytest.raises(HarnessError, match="no known open_clip architecture"):
        convert_pickled_checkpoint(src, tmp_path / "q.safetensors", trust_pickle=True)


def test_infer_arch_for_the_papers_models() -> None:
    """ViT-B/32 and ViT-L/14 shapes (on the meta device: no memory) map to the right configs."""
    import open_clip

    for arch, heads in (("ViT-B-32", 12), ("ViT-L-14", 16)):
        with torch.device("meta"):
            visual = open_clip.create_model(arch, device="meta").visual
        state = visual.state_dict()
        assert infer_arch(state, "gelu", heads) == arch
        assert infer_arch(state, "quick_gelu", heads) == f"{arch}-quickgelu"
        with pytest.raises(HarnessError, match="pass arch"):
            infer_arch(state)  # a bare state dict cannot tell GELU from QuickGELU


def test_pickled_head(tmp_path: Path, micro_clip: nn.Module) -> None:
    weights = F.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(2)), dim=-1) * 100.0
    head = ClassificationHead(weights)
    src = tmp_path / "head_MNIST.pt"
    torch.save(head, src)
    with pytest.raises(HarnessError, match="trust_pickle"):
        convert_pickled_checkpoint(src, tmp_path / "h.safetensors")
    out = convert_pickled_checkpoint(src, tmp_path / "h.safetensors", trust_pickle=True)
    state = load_state_dict(out)
    assert set(state) == {"head"} and torch.equal(state["head"], weights)
    sidecar = json.loads(Path(str(out) + ".json").read_text())
    assert sidecar["kind"] == "head" and sidecar["source_sha256"] == sha256(src)
    assert sidecar["head"] == {"classes": 5, "dim": 32, "normalize": True, "bias": "zero"}
    # the converted head reproduces the pickled classifier's logits
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = head(micro_clip.visual(images))
        got = ImageClassifier(micro_clip.visual, state["head"])(images)
    assert torch.allclose(got, expected, atol=1e-5)


class _ShellPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _OpenPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


class _Holder:
    """A plain object (no nn.Module) holding an encoder, as some training scripts pickle one, and
    an attribute named like a module's method."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.state_dict = {"step": 3}


class _SlottedHolder:
    __slots__ = ("model", "state_dict")

    def __init__(self, model: nn.Module):
        self.model = model
        self.state_dict = {"step": 3}


@pytest.mark.parametrize("holder", [_Holder, _SlottedHolder])
def test_an_encoder_inside_a_plain_object_of_a_missing_class_converts(tmp_path: Path, micro_clip: nn.Module,
                                                                       monkeypatch, holder: type) -> None:
    """A pickled plain object (its attributes a dict, or with ``__slots__`` a (dict, slots) pair)
    whose class is not importable here: its stand-in holds the modules among those attributes as
    submodules, so the encoder inside is found and converted (not an AttributeError raised), and
    no other attribute stands in for a module's method."""
    fake = types.ModuleType("src.holders")
    cls = type(holder.__name__, (holder,), {"__module__": "src.holders", "__qualname__": holder.__name__,
                                            "__slots__": ()})
    setattr(fake, holder.__name__, cls)
    src = tmp_path / "holder.pt"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "src", types.ModuleType("src"))
        m.setitem(sys.modules, "src.holders", fake)
        torch.save(cls(micro_clip.visual), src)
    out = convert_pickled_checkpoint(src, tmp_path / "enc.safetensors", trust_pickle=True)
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["unresolved_classes"] == [f"src.holders.{holder.__name__}"]
    assert sidecar["prefix"] == "model." and sidecar["arch"] == "harness-micro-vit"
    state, want = load_state_dict(out), micro_clip.visual.state_dict()
    assert set(state) == set(want) and all(torch.equal(state[k], v) for k, v in want.items())


@pytest.mark.parametrize("payload", [_ShellPayload, _OpenPayload])
def test_malicious_pickle_never_runs(tmp_path: Path, payload) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2, 2), "payload": payload(marker)}, src)
    assert not marker.exists()

    with pytest.raises(HarnessError, match=r"evil\.pt.*trust_pickle=True"):
        convert_pickled_checkpoint(src, tmp_path / "out.safetensors")
    assert not marker.exists()
    with pytest.raises(HarnessError, match="refused to load"):
        load_state_dict(src)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()

    # the payload is live: an unguarded load does run it (which is why the guard exists)
    torch.load(src, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_pickle_is_reported_as_damaged_not_as_code(tmp_path: Path, pickled_encoder, damage: str) -> None:
    """Trusting a damaged file would not make it readable: the message says what it is, with or without trust."""
    src, _ = pickled_encoder
    bad = tmp_path / "bad.pt"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2] if damage == "truncated" else b"")
    want = "truncated or corrupt" if damage == "truncated" else "the file is empty"
    for trust in (False, True):
        with pytest.raises(HarnessError) as err:
            convert_pickled_checkpoint(bad, tmp_path / "out.safetensors", trust_pickle=trust)
        msg = str(err.value)
        assert msg.startswith(f"{bad}: not a readable checkpoint: {want}") and "trust" not in msg, msg
    with pytest.raises(HarnessError, match=f"not a readable checkpoint: {want}"):
        load_state_dict(bad)


def test_a_torchscript_archive_is_named_as_one_and_converts_with_trust(tmp_path: Path, micro_clip: nn.Module) -> None:
    """OpenAI's released CLIP .pt files are TorchScript archives, which torch.load refuses
    weights-only: they were reported "truncated or corrupt", trusted or not (a user would download
    them again); they are code to trust, and their image tower converts with the flag."""
    src = tmp_path / "ViT-micro.pt"
    torch.jit.script(micro_clip.eval()).save(str(src))
    with warnings.catch_warnings(record=True) as said:  # not torch's "dispatching to torch.jit.load": it does not
        warnings.simplefilter("always")
        with pytest.raises(HarnessError, match="refused to load: not a plain tensor checkpoint \\(a TorchScript archive") as err:
            load_state_dict(src)
        assert "corrupt" not in str(err.value)
        with pytest.raises(HarnessError, match="TorchScript archive.*--trust-pickle"):
            convert_pickled_checkpoint(src, tmp_path / "out.safetensors")
    assert not [w for w in said if "TorchScript" in str(w.message)], [str(w.message) for w in said]
    out = convert_pickled_checkpoint(src, tmp_path / "out.safetensors", trust_pickle=True)
    got, want = load_state_dict(out), micro_clip.visual.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    side = json.loads(Path(f"{out}.json").read_text())
    assert (side["arch"], side["activation"], side["heads"]) == ("harness-micro-vit", "gelu", 2)


def test_converted_file_without_suffix_is_read_as_safetensors(tmp_path: Path, pickled_encoder) -> None:
    """`harness convert SRC DST --trust-pickle` with DST lacking a suffix: its output is recognised by content."""
    from click.testing import CliRunner

    from harness.cli import main
    from harness.models import is_safetensors

    src, visual = pickled_encoder
    dst = tmp_path / "encoder"
    r = CliRunner().invoke(main, ["convert", str(src), str(dst), "--trust-pickle"])
    assert r.exit_code == 0, r.output
    assert is_safetensors(dst) and not is_safetensors(src)
    state = load_state_dict(dst)
    assert set(state) == set(visual.state_dict())
    assert all(torch.equal(state[k], v) for k, v in visual.state_dict().items())
    again = convert_pickled_checkpoint(dst, tmp_path / "again.safetensors")  # no trust needed: no pickle inside
    assert json.loads(Path(f"{again}.json").read_text())["source_format"] == "safetensors"


def test_unknown_architecture_names_the_flag(tmp_path: Path) -> None:
    from click.testing import CliRunner

    import open_clip

    from harness.cli import main
    from harness.models import open_clip_module

    open_clip_module()
    src = tmp_path / "quick.pt"
    torch.save(ImageEncoder(open_clip.create_model("harness-micro-vit", force_quick_gelu=True)), src)
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "q.safetensors"), "--trust-pickle"])
    assert r.exit_code == 2 and r.output.startswith(f"error: {src}: no known open_clip architecture"), r.output
    assert " ".join(r.output.split()).endswith("name it with --arch (in Python: pass arch=...)"), r.output


def test_misspelt_arch_names_the_closest(tmp_path: Path) -> None:
    """``--arch`` with a typo names the architecture meant."""
    from harness.models import build_clip, save_state_dict

    src = tmp_path / "enc.safetensors"
    save_state_dict(build_clip("harness-micro-vit").visual.state_dict(), src)
    with pytest.raises(HarnessError, match="unknown open_clip architecture 'harness-micro-vt'; did you mean "
                                           "'harness-micro-vit'?"):
        convert_pickled_checkpoint(src, tmp_path / "out.safetensors", arch="harness-micro-vt")


def test_an_encoder_converted_for_an_architecture_of_another_size_is_not_called_the_same_tensors(tmp_path: Path) -> None:
    """A checkpoint recorded as converted for another architecture whose image tower has another
    width (pretrained weights from an open_clip tag, whose shapes no header gives): `validate`
    refuses it naming both architectures and their sizes, not as "the same tensors" computing
    differently, which holds only for towers of one size (GELU against QuickGELU)."""
    import yaml
    from click.testing import CliRunner

    from harness.cli import main
    from harness.convert import FORMAT
    from harness.models import save_state_dict
    from tests.conftest import TOY_TASKS, make_sweep_dict

    state = build_clip("harness-micro-vit").visual.state_dict()
    assert state["conv1.weight"].shape[0] == 32  # the micro tower's width; ViT-B-32's is 768
    for task in TOY_TASKS:  # recorded as `harness convert` records it (another tool's "arch" does not count)
        save_state_dict(state, tmp_path / f"{task}.safetensors", metadata={"format": FORMAT, "arch": "harness-micro-vit"})
    d = make_sweep_dict(tmp_path, tmp_path)
    d["model"].update(arch="ViT-B-32", pretrained="laion2b_s34b_b79k")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["validate", str(sweep)])
    assert r.exit_code == 2, r.output
    line = " ".join(r.output.split())
    assert line.startswith(
        f"error: {sweep}: model.finetuned_pattern: {tmp_path / TOY_TASKS[0]}.safetensors was converted for "
        "architecture 'harness-micro-vit' (image tower width 32, 2 layers, patch 8), but model.arch 'ViT-B-32' is "
        "width 768, 12 layers, patch 32: a checkpoint of another architecture"), r.output
    assert "same tensors" not in line


def test_a_sweep_refuses_encoders_converted_for_another_activation(tmp_path: Path, monkeypatch) -> None:
    """QuickGELU encoders (converted for a QuickGELU architecture, as recorded in their sidecars)
    have the GELU model's tensors exactly: the shape checks pass, and the sweep used to score them
    silently with GELU. `validate` names the file, both architectures and what differs."""
    import open_clip
    import open_clip.factory
    import yaml
    from click.testing import CliRunner

    from harness.cli import main
    from harness.models import open_clip_module, save_state_dict
    from tests.conftest import TOY_TASKS, make_sweep_dict

    open_clip_module()
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))
    config = json.loads((Path(__file__).parents[1] / "harness/model_configs/harness-micro-vit.json").read_text())
    (tmp_path / "model_configs").mkdir()
    (tmp_path / "model_configs/micro-quick.json").write_text(json.dumps({**config, "quick_gelu": True}))
    torch.manual_seed(0)
    quick = open_clip.create_model("harness-micro-vit", force_quick_gelu=True)
    src = tmp_path / "finetuned.pt"
    torch.save(ImageEncoder(quick), src)
    for task in TOY_TASKS:
        convert_pickled_checkpoint(src, tmp_path / f"{task}.safetensors", trust_pickle=True, arch="micro-quick")
    save_state_dict(build_clip("harness-micro-vit").state_dict(), tmp_path / "pretrained.safetensors")

    gelu = build_clip("harness-micro-vit").visual.eval()  # what the sweep built: the same tensors, GELU
    gelu.load_state_dict(load_state_dict(tmp_path / f"{TOY_TASKS[0]}.safetensors"))
    images = torch.randn(2, 3, 16, 16)
    assert not torch.allclose(gelu(images), quick.visual.eval()(images), atol=1e-4)

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(make_sweep_dict(tmp_path, tmp_path)))
    r = CliRunner().invoke(main, ["validate", str(sweep)])
    assert r.exit_code == 2, r.output
    assert " ".join(r.output.split()).startswith(
        f"error: {sweep}: model.finetuned_pattern: {tmp_path / TOY_TASKS[0]}.safetensors was converted for "
        "architecture 'micro-quick' (QuickGELU, 2 attention heads), but model.arch 'harness-micro-vit' is GELU, "
        "2 attention heads"), r.output
    lines = r.stderr.strip().splitlines()  # every task's file, a line each
    assert len(lines) == len(TOY_TASKS) and all(f"{tmp_path / t}.safetensors was converted for architecture "
                                                  "'micro-quick'" in line for t, line in zip(TOY_TASKS, lines)), lines
    r = CliRunner().invoke(main, ["validate", str(sweep), "model.arch=micro-quick"])
    assert r.exit_code == 0 and r.output.rstrip().endswith("valid"), r.output


def test_another_tools_arch_metadata_is_not_taken_for_a_recorded_conversion(tmp_path: Path, micro_clip: nn.Module) -> None:
    """Safetensors from another tool may name an architecture of their own in their header: it was
    taken for the one `harness import` records, so a micro encoder labelled "ViT-B-32" failed to
    convert against ViT-B-32 and a sweep was told the file "was converted for architecture
    'ViT-B-32'". Only what the harness wrote counts; the shapes decide the rest."""
    import yaml
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from harness.cli import main
    from harness.models import save_state_dict
    from tests.conftest import TOY_TASKS, make_sweep_dict

    want = micro_clip.visual.state_dict()
    for task in TOY_TASKS:
        save_file({k: v.contiguous() for k, v in want.items()}, str(tmp_path / f"{task}.safetensors"),
                  metadata={"format": "pt", "arch": "ViT-B-32"})
    save_state_dict(micro_clip.state_dict(), tmp_path / "pretrained.safetensors")
    out = convert_pickled_checkpoint(tmp_path / f"{TOY_TASKS[0]}.safetensors", tmp_path / "conv" / "enc.safetensors")
    got = load_state_dict(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads(Path(f"{out}.json").read_text())["arch"] == "harness-micro-vit"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(make_sweep_dict(tmp_path, tmp_path)))
    r = CliRunner().invoke(main, ["validate", str(sweep)])
    assert r.exit_code == 0 and r.output.rstrip().endswith("valid"), r.output


def test_an_open_clip_training_checkpoint_of_a_multi_gpu_run_is_a_pretrained_model(tmp_path: Path, micro_clip: nn.Module) -> None:
    """open_clip's training saves a DistributedDataParallel model: every key under 'module.', beside
    the epoch and optimizer state. open_clip loads it; as model.pretrained it was refused as "not a
    whole CLIP state dict". The prefix is stripped as open_clip's loader strips it."""
    import yaml
    from click.testing import CliRunner

    from harness.cli import main
    from harness.config import validate_config
    from harness.workspace import Workspace
    from tests.conftest import TOY_TASKS, make_sweep_dict

    want = micro_clip.state_dict()
    pretrained = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in want.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}}, pretrained)
    for task in TOY_TASKS:
        torch.save({"state_dict": {f"module.visual.{k}": v for k, v in micro_clip.visual.state_dict().items()}},
                   tmp_path / f"{task}.pt")
    d = make_sweep_dict(tmp_path, tmp_path)
    d["model"] = {**d["model"], "pretrained": str(pretrained), "finetuned_pattern": str(tmp_path / "{task}.pt")}
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["validate", str(sweep)])
    assert r.exit_code == 0 and r.output.rstrip().endswith("valid"), r.output
    got = Workspace(validate_config(d)).clip.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_an_encoder_with_integer_weights_is_refused_naming_file_and_tensor(tmp_path: Path, micro_clip: nn.Module) -> None:
    """A quantized (int8) encoder converted as it was, and every sweep then cast it to float."""
    state = dict(micro_clip.visual.state_dict())
    state["conv1.weight"] = (100 * state["conv1.weight"]).to(torch.int8)
    src = tmp_path / "int8.pt"
    torch.save(state, src)
    with pytest.raises(HarnessError) as err:
        convert_pickled_checkpoint(src, tmp_path / "out.safetensors")
    assert str(err.value).startswith(f"{src}: tensor 'conv1.weight' has dtype int8, not floating point")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_folder_of_pickles_imported_without_the_flag_names_the_import_flag_and_writes_nothing(
        tmp_path: Path, pickled_encoder) -> None:
    """``harness import`` of a task_vectors tree refuses its pickles, says how to import them
    (not only how to convert one file), and leaves no empty output folders behind."""
    import shutil

    from click.testing import CliRunner

    from harness.cli import main

    src, _ = pickled_encoder
    tree = tmp_path / "tree"
    (tree / "SUN397").mkdir(parents=True)
    shutil.copy(src, tree / "SUN397" / "finetuned.pt")
    r = CliRunner().invoke(main, ["import", str(tree), str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert "`harness import SRC DST --trust-pickle`" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_a_mixed_folder_with_pickles_or_a_damaged_file_is_refused_before_anything_is_written(
        tmp_path: Path, pickled_encoder, micro_clip: nn.Module) -> None:
    """A tree of a plain tensor file, task_vectors pickles and a damaged file: the plain file was
    converted and written, then the import stopped at the first pickle (or the damaged file),
    the rest unconverted. Every file its conversion would refuse is now named first, nothing
    written; with --trust-pickle and the damaged file gone, every file converts."""
    import shutil

    from click.testing import CliRunner

    from harness.cli import main

    src, _ = pickled_encoder
    tree, out = tmp_path / "tree", tmp_path / "out"
    for task in ("SUN397", "Cars"):
        (tree / task).mkdir(parents=True)
        shutil.copy(src, tree / task / "finetuned.pt")
    torch.save({f"visual.{k}": v for k, v in micro_clip.visual.state_dict().items()}, tree / "a_plain.pt")
    (tree / "b_broken.pt").write_bytes(b"")
    r = CliRunner().invoke(main, ["import", str(tree), str(out)])
    assert r.exit_code == 2, r.output
    err = " ".join(r.stderr.split())
    assert err == (f"error: {tree / 'b_broken.pt'}: not a readable checkpoint: the file is empty; "
                   f"{tree / 'Cars' / 'finetuned.pt'}, {tree / 'SUN397' / 'finetuned.pt'}: pickled Python objects "
                   "(task_vectors checkpoints are whole pickled modules), not loaded: unpickling runs any code a file "
                   "contains; if you trust where they come from, import with `harness import SRC DST --trust-pickle`; "
                   "nothing was written"), err
    assert not out.exists()
    (tree / "b_broken.pt").unlink()
    r = CliRunner().invoke(main, ["import", str(tree), str(out), "--trust-pickle"])
    assert r.exit_code == 0, r.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors")) == [
        "Cars/finetuned.safetensors", "SUN397/finetuned.safetensors", "a_plain.safetensors"]


def test_a_file_converted_onto_itself_is_refused_and_kept(tmp_path: Path, micro_clip: nn.Module) -> None:
    """Writing over the source while reading it would lose the only copy; another existing
    destination is refused, kept byte for byte, and replaced with the conversion given overwrite."""
    from harness.models import save_state_dict

    want = micro_clip.visual.state_dict()
    src = tmp_path / "enc.safetensors"
    save_state_dict(want, src)
    before = src.read_bytes()
    with pytest.raises(HarnessError, match="destination is the source file itself"):
        convert_pickled_checkpoint(src, src)
    with pytest.raises(HarnessError, match="destination is the source file itself"):
        convert_pickled_checkpoint(src, tmp_path)  # the folder: <stem>.safetensors is the source again
    assert src.read_bytes() == before and not Path(f"{src}.json").exists()
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"an older conversion")
    with pytest.raises(HarnessError, match=f"{dst}: exists and holds a file that is no safetensors checkpoint; "
                                           "not replaced"):
        convert_pickled_checkpoint(src, dst)
    assert dst.read_bytes() == b"an older conversion"
    convert_pickled_checkpoint(src, dst, overwrite=True)
    got = load_state_dict(dst)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_an_existing_conversion_is_kept_only_when_it_holds_the_same_tensors_and_metadata(tmp_path: Path) -> None:
    """Rerunning a conversion keeps its file, reported kept only when nothing is written (its
    sidecar is written where it has none or another); a file differing in one tensor's values,
    dtype (the same bytes) or names, or in its metadata, is another checkpoint, refused and kept; a
    folder in the way is named as one."""
    from harness.convert import FORMAT, write_checkpoint
    from harness.models import header_metadata

    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    meta = {"format": FORMAT, "kind": "image_encoder", "arch": "a", "source_sha256": "0" * 64}
    out, kept = tmp_path / "c.safetensors", []
    side = Path(f"{out}.json")
    write_checkpoint(state, out, meta, {"run": 1})
    side.unlink()
    write_checkpoint({"w": state["w"].clone()}, out, dict(meta), {"run": 2}, kept=kept.append)
    assert kept == [] and json.loads(side.read_text()) == {"run": 2}
    write_checkpoint(state, out, meta, {"run": 2}, kept=kept.append)
    assert kept == [out] and json.loads(side.read_text()) == {"run": 2}
    write_checkpoint(state, out, meta, {"run": 3}, kept=kept.append)
    assert kept == [out] and json.loads(side.read_text()) == {"run": 3}
    before = out.read_bytes()
    for other, other_meta in [({"w": state["w"] + 1}, meta), ({"w": state["w"].view(torch.int32)}, meta),
                              ({"v": state["w"]}, meta), (state, dict(meta, arch="b"))]:
        with pytest.raises(HarnessError, match=f"{out}: exists and holds another checkpoint"):
            write_checkpoint(other, out, other_meta, {"run": 4}, kept=kept.append)
    assert out.read_bytes() == before and kept == [out] and json.loads(side.read_text()) == {"run": 3}
    write_checkpoint(state, out, dict(meta, arch="b"), {"run": 5}, overwrite=True)
    assert header_metadata(out)["arch"] == "b" and json.loads(side.read_text()) == {"run": 5}
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(HarnessError, match="d.safetensors: is a folder, not a checkpoint file to write"):
        write_checkpoint(state, tmp_path / "d.safetensors", meta, {"run": 6})


def test_a_head_bias_of_any_sign_is_kept_and_called_nonzero(tmp_path: Path) -> None:
    """A linear probe's bias is part of its logits: one with only negative entries is kept as
    'bias' (which a sweep then refuses), not dropped as if it were task_vectors' zero bias."""
    weight = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    bias = torch.tensor([-0.5, -1.0, -0.25])
    src = tmp_path / "probe.pt"
    torch.save({"weight": weight, "bias": bias}, src)
    out = convert_pickled_checkpoint(src, tmp_path / "h.safetensors")
    state = load_state_dict(out)
    assert set(state) == {"head", "bias"}
    assert torch.equal(state["head"], weight) and torch.equal(state["bias"], bias)
    assert json.loads(Path(f"{out}.json").read_text())["head"] == {"classes": 3, "dim": 8, "normalize": None,
                                                                   "bias": "nonzero"}


def test_another_networks_conv1_beside_the_encoder_is_not_taken_for_a_second_encoder(
        tmp_path: Path, micro_clip: nn.Module) -> None:
    """Only a 'conv1.weight' with a 'class_embedding' beside it starts a ViT; a CNN's stem in the
    same file (here under 'aux.') is left out, and the ViT converts alone."""
    want = micro_clip.visual.state_dict()
    src = tmp_path / "two_nets.pt"
    torch.save({**{f"visual.{k}": v for k, v in want.items()}, "aux.conv1.weight": torch.randn(4, 3, 3, 3)}, src)
    out = convert_pickled_checkpoint(src, tmp_path / "enc.safetensors")
    got = load_state_dict(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads(Path(f"{out}.json").read_text())["prefix"] == "visual."


@pytest.fixture
def four_head_micro(monkeypatch) -> str:
    """An architecture with harness-micro-vit's tensors, shapes and activation, split into 4
    attention heads instead of 2: it computes other features from the same file."""
    import open_clip.factory

    from harness.models import open_clip_module, register_model_config

    open_clip_module()
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIG_PATHS", list(open_clip.factory._MODEL_CONFIG_PATHS))
    cfg = json.loads((Path(__file__).parents[1] / "harness/model_configs/harness-micro-vit.json").read_text())
    cfg["vision_cfg"] = {**cfg["vision_cfg"], "head_width": 8}
    register_model_config("micro-four-heads", cfg, "test")
    return "micro-four-heads"


def test_the_head_count_picks_among_towers_of_one_shape(four_head_micro: str, micro_clip: nn.Module) -> None:
    state = micro_clip.visual.state_dict()
    four = build_clip(four_head_micro).visual.eval()
    four.load_state_dict(state)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert not torch.allclose(four(images), micro_clip.visual.eval()(images), atol=1e-4)
    assert infer_arch(state, "gelu", 2) == "harness-micro-vit"
    assert infer_arch(state, "gelu", 4) == four_head_micro


def test_an_encoder_converted_for_an_architecture_with_other_heads_is_refused(
        tmp_path: Path, pickled_encoder, four_head_micro: str) -> None:
    src, _ = pickled_encoder
    dst = tmp_path / "x.safetensors"
    with pytest.raises(HarnessError, match=f"has 2 attention heads but '{four_head_micro}' has 4"):
        convert_pickled_checkpoint(src, dst, trust_pickle=True, arch=four_head_micro)
    assert not dst.exists()


def test_an_encoder_state_with_a_non_tensor_entry_is_refused_naming_it(tmp_path: Path, micro_clip: nn.Module) -> None:
    """An epoch counter among the tensors (not under 'state_dict') makes it no state dict."""
    src = tmp_path / "mixed.pt"
    torch.save({**{f"visual.{k}": v for k, v in micro_clip.visual.state_dict().items()}, "epoch": 3}, src)
    dst = tmp_path / "enc.safetensors"
    with pytest.raises(HarnessError) as err:
        convert_pickled_checkpoint(src, dst)
    assert str(err.value) == f"{src}: expected a dict of tensors, found int under 'epoch'"
    assert not dst.exists()


class _TwoTowers(nn.Module):
    """A pickled module whose first tower (4 heads, QuickGELU) is not the image encoder under ``model``."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        from open_clip.transformer import QuickGELU, Transformer

        self.text_model = Transformer(width=32, layers=1, heads=4, act_layer=QuickGELU)
        self.model = clip


def test_activation_and_heads_are_read_from_the_image_tower_only(tmp_path: Path, micro_clip: nn.Module) -> None:
    src = tmp_path / "two_towers.pt"
    torch.save(_TwoTowers(micro_clip), src)
    out = convert_pickled_checkpoint(src, tmp_path / "enc.safetensors", trust_pickle=True)
    side = json.loads(Path(f"{out}.json").read_text())
    assert (side["arch"], side["activation"], side["heads"], side["prefix"]) == ("harness-micro-vit", "gelu", 2, "model.visual.")
    got, want = load_state_dict(out), micro_clip.visual.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_state_that_is_neither_an_encoder_nor_a_linear_head_is_refused(tmp_path: Path) -> None:
    """A convolution's 'weight' and zero 'bias' are no [classes, dim] head: refused, not written as one."""
    src = tmp_path / "conv.pt"
    torch.save({"weight": torch.randn(4, 3, 3, 3), "bias": torch.zeros(4)}, src)
    dst = tmp_path / "h.safetensors"
    with pytest.raises(HarnessError, match="neither a ViT image encoder .* nor a linear head"):
        convert_pickled_checkpoint(src, dst)
    assert not dst.exists()


@pytest.mark.parametrize("change, named", [
    ("extra", "unexpected ['extra_norm.weight']"),
    ("reshaped", "shape mismatches ['proj (32, 16) vs (32, 32)']"),
    ("missing", "missing ['ln_post.bias']"),
])
def test_an_encoder_one_tensor_off_its_architecture_is_refused_naming_it(
        tmp_path: Path, micro_clip: nn.Module, change: str, named: str) -> None:
    """A tensor too many, of another shape, or lacking would be written as it is and fail (or be
    ignored) only when a sweep loads it."""
    state = dict(micro_clip.visual.state_dict())
    if change == "extra":
        state["extra_norm.weight"] = torch.ones(32)
    elif change == "reshaped":
        state["proj"] = torch.randn(32, 16)
    else:
        del state["ln_post.bias"]
    src = tmp_path / "enc.pt"
    torch.save({f"visual.{k}": v for k, v in state.items()}, src)
    dst = tmp_path / "enc.safetensors"
    with pytest.raises(HarnessError, match="image encoder does not match 'harness-micro-vit'") as err:
        convert_pickled_checkpoint(src, dst, arch="harness-micro-vit")
    assert named in str(err.value)
    assert not dst.exists()


def test_a_converted_file_records_its_architecture_and_size(tmp_path: Path, pickled_encoder) -> None:
    """The header keeps the architecture for a file copied without its sidecar; the sidecar
    counts what was written."""
    from harness.convert import recorded_arch

    src, visual = pickled_encoder
    out = convert_pickled_checkpoint(src, tmp_path / "enc.safetensors", trust_pickle=True)
    want = visual.state_dict()
    side = json.loads(Path(f"{out}.json").read_text())
    assert (side["tensors"], side["parameters"]) == (len(want), sum(v.numel() for v in want.values()))
    Path(f"{out}.json").unlink()
    assert recorded_arch(out) == "harness-micro-vit"


@pytest.mark.parametrize("held", ["another source's conversion", "no conversion", "no safetensors"])
def test_a_trusted_pickle_is_not_unpickled_when_the_destination_holds_something_else(tmp_path: Path, held: str) -> None:
    """An existing destination that is no conversion of this source (its header's source_sha256)
    is refused before the source is read: unpickling a trusted file runs its code, to no end here."""
    from harness.convert import FORMAT
    from harness.models import save_state_dict

    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2, 2), "payload": _OpenPayload(marker)}, src)
    dst = tmp_path / "out.safetensors"
    if held == "no safetensors":
        dst.write_bytes(b"an older conversion")
    else:
        meta = {"format": FORMAT, "kind": "head", "arch": ""}
        if held == "another source's conversion":
            meta["source_sha256"] = "0" * 64
        save_state_dict({"head": torch.ones(2, 2)}, dst, metadata=meta)
    before = dst.read_bytes()
    what = "a file that is no safetensors checkpoint" if held == "no safetensors" else "another checkpoint"
    with pytest.raises(HarnessError, match=f"{dst}: exists and holds {what}; not replaced"):
        convert_pickled_checkpoint(src, dst, trust_pickle=True)
    assert not marker.exists() and dst.read_bytes() == before
    # the source is read, its payload run, once the destination may be replaced
    with pytest.raises(HarnessError, match="expected a dict of tensors"):
        convert_pickled_checkpoint(src, dst, trust_pickle=True, overwrite=True)
    assert marker.exists()


def test_a_state_holding_two_encoders_is_refused_naming_both(tmp_path: Path, micro_clip: nn.Module) -> None:
    """Two ViTs in one file (here under 'a.' and 'b.') leave no way to tell which one was
    fine-tuned: the conversion is refused, not made silently from whichever sorts first."""
    want = micro_clip.visual.state_dict()
    src = tmp_path / "two_encoders.pt"
    torch.save({**{f"a.{k}": v for k, v in want.items()}, **{f"b.{k}": v + 1 for k, v in want.items()}}, src)
    with pytest.raises(HarnessError, match=r"several ViT image encoders \(under 'a\.', 'b\.'\)"):
        convert_pickled_checkpoint(src, tmp_path / "enc.safetensors")
    assert not (tmp_path / "enc.safetensors").exists()


def test_a_destination_ending_in_a_slash_is_a_folder_for_the_converted_file(tmp_path: Path,
                                                                            micro_clip: nn.Module) -> None:
    """``out/`` names a folder even before it exists: the file goes in it under the source's
    stem, not to a file called ``out``."""
    want = micro_clip.visual.state_dict()
    src = tmp_path / "finetuned.pt"
    torch.save(want, src)
    out = convert_pickled_checkpoint(src, f"{tmp_path / 'new'}/")
    assert out == tmp_path / "new" / "finetuned.safetensors" and out.is_file()
    got = load_state_dict(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_pickle_named_as_the_pretrained_model_says_converting_it_is_not_enough(tmp_path: Path, pickled_encoder,
                                                                                   sweep_dict) -> None:
    """task_vectors' zeroshot.pt named as ``model.pretrained`` was told to be converted with
    --trust-pickle, whose output (an image encoder) the next run refuses in turn: the first error
    now says what the pretrained model must be."""
    import yaml
    from click.testing import CliRunner

    from harness.cli import main

    src, _ = pickled_encoder
    d = dict(sweep_dict, model={**sweep_dict["model"], "pretrained": str(src)})
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["validate", str(f)])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2 and err.startswith(f"error: {f}: model.pretrained: {src}: refused to load: not a plain "
                                               "tensor checkpoint"), err
    assert err.endswith("(and serve as the pretrained model only if they hold a whole CLIP, whose text tower builds "
                        "the zero-shot heads: a task_vectors zeroshot.pt holds the image encoder alone; give open_clip's "
                        "weights, a tag such as openai, or a Hugging Face CLIPModel folder)"), err
