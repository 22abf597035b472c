"""Reading checkpoint files: what load_state_dict, tensor_shapes and file_digest return for files
written here by hand, checked against what was written; the digests and stamps that tell states
apart, and the architecture configs registered beside converted files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from harness.errors import HarnessError
from harness.models import load_state_dict


def test_a_checkpoint_holding_a_non_tensor_beside_its_tensors_is_refused(tmp_path: Path) -> None:
    """A dict of tensors with an epoch counter among them is no state dict: loading it into an
    encoder would fail later, far from the file; it is refused naming the file."""
    path = tmp_path / "mixed.pt"
    torch.save({"weight": torch.ones(2, 3), "epoch": 3}, path)
    with pytest.raises(HarnessError, match="expected a dict of tensors"):
        load_state_dict(path)


@pytest.mark.parametrize("held, found", [({"weight": torch.ones(2), "steps": [1, 2]}, "found list under 'steps'"),
                                         ([torch.ones(2)], "found a list")])
def test_a_checkpoint_that_is_no_dict_of_tensors_is_refused_naming_what_it_holds(tmp_path: Path, held,
                                                                                  found: str) -> None:
    """The refusal names the entry that is no tensor (or what the file holds instead of a dict),
    as ``harness convert`` does: the file alone leaves its owner searching a checkpoint's keys."""
    path = tmp_path / "odd.pt"
    torch.save(held, path)
    with pytest.raises(HarnessError) as err:
        load_state_dict(path)
    assert str(err.value) == f"{path}: expected a dict of tensors, {found}"


def test_a_module_prefix_on_some_keys_only_is_kept(tmp_path: Path) -> None:
    """Only a prefix every key carries is DistributedDataParallel's: a state dict whose one key
    happens to start with ``module.`` loads with its keys as saved."""
    saved = {"module.weight": torch.arange(6.0).reshape(2, 3), "bias": torch.zeros(2)}
    path = tmp_path / "partial.pt"
    torch.save(saved, path)
    got = load_state_dict(path)
    assert set(got) == {"module.weight", "bias"}
    assert all(torch.equal(got[k], saved[k]) for k in saved)


def test_a_checkpoint_in_the_pre_zip_torch_format_has_its_shapes_read(tmp_path: Path) -> None:
    """torch.save before 1.6 wrote no zip archive, which torch cannot memory-map: its names and
    shapes are read by loading it."""
    from harness.models import tensor_shapes

    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2, 3), "b": torch.zeros(5)}, path, _use_new_zipfile_serialization=False)
    assert tensor_shapes(path) == {"w": (2, 3), "b": (5,)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_floating_point_weights_of_every_width_are_taken(tmp_path: Path, dtype: torch.dtype) -> None:
    """bfloat16 is floating point as torch says (``dtype.is_floating_point``): an encoder saved in
    it is no quantized checkpoint, whether read from the file's header or from its tensors."""
    from harness.models import refuse_integer_weights, save_state_dict, state_dtypes, tensor_dtypes

    assert dtype.is_floating_point
    state = {"w": torch.zeros(2, 3, dtype=dtype)}
    path = tmp_path / "enc.safetensors"
    save_state_dict(state, path)
    refuse_integer_weights(tensor_dtypes(path), path)
    refuse_integer_weights(state_dtypes(state), path)
    with pytest.raises(HarnessError, match="'q' has dtype int8, not floating point"):
        refuse_integer_weights(state_dtypes({**state, "q": torch.zeros(2, dtype=torch.int8)}), path)


def test_a_bool_tensor_is_refused_like_an_integer_one(tmp_path: Path) -> None:
    """A bool tensor is no float either: loaded into a float parameter it would be cast to 0/1
    silently, so it is refused from the file's header and from its tensors alike."""
    from harness.models import refuse_integer_weights, save_state_dict, state_dtypes, tensor_dtypes

    state = {"w": torch.zeros(2, 3), "mask": torch.ones(3, dtype=torch.bool)}
    path = tmp_path / "enc.safetensors"
    save_state_dict(state, path)
    for dtypes in (tensor_dtypes(path), state_dtypes(state)):
        with pytest.raises(HarnessError, match="'mask' has dtype bool, not floating point"):
            refuse_integer_weights(dtypes, path)


def test_a_file_header_names_dtypes_as_the_tensors_do(tmp_path: Path) -> None:
    """A safetensors header's dtype (``BF16``, ``F32``) is named as torch names the loaded tensor
    (``bfloat16``, ``float32``), like the integer ones, so that a file read from its header and the
    same weights read as tensors give one spelling."""
    from harness.models import save_state_dict, state_dtypes, tensor_dtypes

    state = {f"t{i}": torch.zeros(2, dtype=d) for i, d in enumerate(
        (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
         torch.int8, torch.uint8, torch.int64, torch.bool))}
    path = tmp_path / "mixed.safetensors"
    save_state_dict(state, path)
    assert tensor_dtypes(path) == state_dtypes(state) == {
        "t0": "float16", "t1": "bfloat16", "t2": "float32", "t3": "float64", "t4": "float8_e4m3fn",
        "t5": "float8_e5m2", "t6": "int8", "t7": "uint8", "t8": "int64", "t9": "bool"}


def test_pretrained_weights_with_a_tensor_the_architecture_lacks_are_refused(tmp_path: Path) -> None:
    """Every tensor of the file must land in the model: one the architecture has no place for
    means another model's weights, named by its key."""
    from harness.models import build_clip, save_state_dict

    state = dict(build_clip("harness-micro-vit").state_dict())
    state["visual.extra_token"] = torch.zeros(4)
    path = tmp_path / "pretrained.safetensors"
    save_state_dict(state, path)
    with pytest.raises(HarnessError, match=r"unexpected \['visual.extra_token'\]"):
        build_clip("harness-micro-vit", str(path))


def test_a_folder_given_as_a_checkpoint_is_called_a_folder(tmp_path: Path) -> None:
    """A folder stands where a file was meant (a Hugging Face folder, a wrong path): said as such,
    not as a file that does not exist."""
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(HarnessError, match="is a folder, not a checkpoint file"):
        load_state_dict(folder)
    with pytest.raises(HarnessError, match="checkpoint file does not exist"):
        load_state_dict(tmp_path / "absent.pt")


def test_safetensors_are_told_by_content_whatever_the_name(tmp_path: Path) -> None:
    """A safetensors file is an 8-byte little-endian header length, then that many bytes of JSON
    object, then the data: one holding no tensors ends where its header does. Eight bytes of a
    plausible length followed by anything but ``{`` is not one."""
    from safetensors.torch import save_file

    from harness.models import is_safetensors

    empty = tmp_path / "empty.bin"
    save_file({}, str(empty))
    assert int.from_bytes(empty.read_bytes()[:8], "little") == empty.stat().st_size - 8
    assert is_safetensors(empty)
    other = tmp_path / "other.bin"
    other.write_bytes((4).to_bytes(8, "little") + b"[1] ")
    assert not is_safetensors(other)
    longer = tmp_path / "longer.bin"
    longer.write_bytes((5).to_bytes(8, "little") + b"{}  ")
    assert not is_safetensors(longer)


def test_a_tar_archive_is_read_as_a_damaged_torch_file_not_as_a_foreign_one(tmp_path: Path) -> None:
    """torch 0.1 saved checkpoints as tar archives (``ustar`` at byte 257 of a POSIX tar header):
    one that does not load is called truncated or corrupt, not 'not a torch checkpoint'."""
    import io
    import tarfile

    path = tmp_path / "old.pt"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("pickle")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert path.read_bytes()[257:262] == b"ustar"
    with pytest.raises(HarnessError, match="truncated or corrupt"):
        load_state_dict(path)


def test_pretrained_weights_lacking_a_tensor_of_the_architecture_are_refused(tmp_path: Path) -> None:
    """A tensor the file does not hold would keep open_clip's random initialisation: refused, named."""
    from harness.models import build_clip, save_state_dict

    state = dict(build_clip("harness-micro-vit").state_dict())
    del state["visual.proj"]
    path = tmp_path / "pretrained.safetensors"
    save_state_dict(state, path)
    with pytest.raises(HarnessError, match=r"missing \['visual.proj'\]"):
        build_clip("harness-micro-vit", str(path))


def test_a_built_model_is_in_eval_mode_with_or_without_a_weights_file(tmp_path: Path) -> None:
    """Dropout and other training-only behaviour stay off in every model the harness scores."""
    from harness.models import build_clip, save_state_dict

    path = tmp_path / "pretrained.safetensors"
    save_state_dict(build_clip("harness-micro-vit").state_dict(), path)
    for model in (build_clip("harness-micro-vit"), build_clip("harness-micro-vit", str(path))):
        assert not any(m.training for m in model.modules())


def test_pretrained_weights_in_a_file_of_any_name_are_loaded_from_it(tmp_path: Path) -> None:
    """A weights file whose suffix names no weights format (``.ckpt``, none at all) is still a
    file: its own tensors are loaded, not looked up as an open_clip tag."""
    from harness.models import build_clip, save_state_dict

    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v
             for k, v in build_clip("harness-micro-vit").state_dict().items()}
    for name in ("pretrained.ckpt", "pretrained"):
        path = tmp_path / name
        save_state_dict(state, path)
        loaded = build_clip("harness-micro-vit", str(path)).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_a_file_rewritten_at_the_same_size_gets_the_digest_of_its_new_bytes(tmp_path: Path) -> None:
    import os

    from harness.models import file_digest

    path = tmp_path / "w.bin"
    path.write_bytes(b"first")
    assert file_digest(path) == hashlib.sha256(b"first").hexdigest()
    path.write_bytes(b"other")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert file_digest(path) == hashlib.sha256(b"other").hexdigest()


def test_the_digest_of_a_state_follows_shapes_not_key_order() -> None:
    """The same bytes under another shape are another state; the same tensors listed in another
    order are the same state."""
    from harness.models import describe_state

    flat = torch.arange(6.0)
    assert describe_state({"w": flat}) == describe_state({"w": flat.clone()})
    assert describe_state({"w": flat, "b": torch.ones(2)}) == describe_state({"b": torch.ones(2), "w": flat})
    assert describe_state({"w": flat}) != describe_state({"w": flat.reshape(2, 3)})


def test_a_tensor_changed_without_its_sum_changing_is_told_changed() -> None:
    """An in-place write keeping the sum (its version counter moves) and a ``.data`` replaced by a
    same-sum tensor (its storage moves) change the stamp; an untouched tensor keeps it."""
    from harness.models import tensor_stamp

    p = torch.nn.Parameter(torch.arange(4.0))
    before = tensor_stamp(p)
    assert tensor_stamp(p) == before
    with torch.no_grad():
        p.copy_(p.flip(0))
    assert tensor_stamp(p) != before
    q = torch.nn.Parameter(torch.arange(4.0))
    before = tensor_stamp(q)
    q.data = q.data.flip(0).clone()
    assert q._version == 0 and tensor_stamp(q) != before


def test_registering_an_architecture_again_is_a_no_op_and_a_stale_kept_config_is_replaced(tmp_path: Path) -> None:
    """The same config under the same name registers once (resolving a sweep's checkpoints twice);
    another config under a taken name is refused; a ``<name>.json`` left in the folder with other
    content is rewritten with the config registered, so the file and open_clip agree."""
    import json

    from harness.models import open_clip_module, register_model_config

    cfg = json.loads((Path(__file__).parents[1] / "harness" / "model_configs" / "harness-micro-vit.json").read_text())
    register_model_config("test-again-vit", cfg, "first")
    register_model_config("test-again-vit", cfg, "second")
    with pytest.raises(HarnessError, match="already exists with another config"):
        register_model_config("test-again-vit", {**cfg, "embed_dim": cfg["embed_dim"] * 2}, "third")
    folder = tmp_path / "model_configs"
    folder.mkdir()
    (folder / "test-kept-vit.json").write_text(json.dumps({**cfg, "embed_dim": cfg["embed_dim"] * 2}))
    register_model_config("test-kept-vit", cfg, "origin", config_dir=folder)
    assert json.loads((folder / "test-kept-vit.json").read_text()) == cfg
    assert open_clip_module().get_model_config("test-kept-vit") == cfg


def test_an_unseen_task_without_a_checkpoint_has_no_fine_tuned_source(sweep_dict) -> None:
    """An unseen task's checkpoint is optional (it gets no individual row): when the pattern names
    no file for it, the sweep's sources and identities hold the merged tasks' checkpoints only."""
    from harness.config import validate_config
    from harness.workspace import Workspace

    d = {**sweep_dict, "tasks": [*sweep_dict["tasks"], "toy_checks"], "unseen": ["toy_checks"]}
    ws = Workspace(validate_config(d))
    assert sorted(ws.sources["finetuned"]) == ["toy_colours", "toy_stripes"]
    assert sorted(ws.identity["finetuned"]) == ["toy_colours", "toy_stripes"]
