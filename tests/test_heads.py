"""Zero-shot heads follow the protocol formula (checked against a direct computation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.models import ImageClassifier, build_clip, get_tokenizer, zeroshot_head


def test_zeroshot_head_matches_formula():
    torch.manual_seed(0)
    clip = build_clip("harness-micro-vit")
    tok = get_tokenizer("harness-micro-vit")
    templates = ["a photo of a {}.", "a drawing of a {}.", "{} again"]
    classes = ["cat", "dog", "red square"]
    prompts = [[t.format(c) for t in templates] for c in classes]
    head = zeroshot_head(clip, tok, prompts)
    assert head.shape == (3, clip.visual.output_dim)
    scale = clip.logit_scale.exp().item()
    with torch.no_grad():
        for i, c in enumerate(classes):
            embs = []
            for t in templates:  # one prompt at a time: independent of batching
                e = clip.encode_text(tok([t.format(c)]))[0]
                embs.append(e / e.norm())
            mean = torch.stack(embs).mean(0)
            expected = mean / mean.norm() * scale
            assert torch.allclose(head[i], expected, atol=1e-5)
    assert torch.allclose(head.norm(dim=-1), torch.full((3,), scale), atol=1e-4)


def test_classifier_logits_are_cosine_times_scale():
    torch.manual_seed(1)
    clip = build_clip("harness-micro-vit")
    head = F.normalize(torch.randn(4, clip.visual.output_dim), dim=-1) * 10
    x = torch.randn(5, 3, 16, 16)
    logits = ImageClassifier(clip.visual, head)(x)
    with torch.no_grad():
        feats = clip.visual(x)
    expected = F.normalize(feats, dim=-1) @ head.t()
    assert torch.allclose(logits, expected, atol=1e-5)


def test_a_half_precision_head_gives_float32_logits_of_its_values():
    """A head saved in float16 (a given head file) is applied as float32: the logits are the
    cosine with its values, not an error mixing dtypes."""
    torch.manual_seed(2)
    clip = build_clip("harness-micro-vit")
    head = (F.normalize(torch.randn(3, clip.visual.output_dim), dim=-1) * 10).half()
    x = torch.randn(2, 3, 16, 16)
    logits = ImageClassifier(clip.visual, head)(x)
    with torch.no_grad():
        expected = F.normalize(clip.visual(x), dim=-1) @ head.float().t()
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, expected, atol=1e-5)


def test_a_damaged_or_foreign_cached_head_is_built_again(sweep_dict):
    """The heads cache records the task and prompts a head was built for: another task's head
    (as many classes) copied onto a head's file, or an empty file, is built again from the
    prompts, never scored with (it was read as is, or failed every run naming the file)."""
    from harness.config import validate_config
    from harness.workspace import Workspace

    def fresh_head(task: str) -> torch.Tensor:
        return Workspace(validate_config(sweep_dict)).head(task)

    ws = Workspace(validate_config(sweep_dict))
    truth = {t: zeroshot_head(ws.clip, get_tokenizer("harness-micro-vit"), ws.task(t).prompts())
             for t in ("toy_stripes", "toy_colours")}
    assert all(torch.allclose(fresh_head(t), truth[t], atol=1e-5) for t in truth)
    files = {t: next((ws.cfg.resolved_cache_dir() / "heads").glob(f"{t}-*.safetensors")) for t in truth}
    assert truth["toy_stripes"].shape == truth["toy_colours"].shape
    assert not torch.allclose(truth["toy_stripes"], truth["toy_colours"], atol=1e-2)
    files["toy_stripes"].write_bytes(files["toy_colours"].read_bytes())
    assert torch.allclose(fresh_head("toy_stripes"), truth["toy_stripes"], atol=1e-5)
    files["toy_stripes"].write_bytes(b"")
    assert torch.allclose(fresh_head("toy_stripes"), truth["toy_stripes"], atol=1e-5)
    assert files["toy_stripes"].stat().st_size > 0


def test_a_head_cached_for_other_pretrained_weights_is_not_used(sweep_dict, tmp_path):
    """Zero-shot heads come from the pretrained text tower: a sweep on other pretrained weights of
    the same architecture (sharing the cache folder) builds its own heads, each the formula's
    for its model, never the first model's head read back."""
    from harness.config import validate_config
    from harness.models import save_state_dict
    from harness.workspace import Workspace

    torch.manual_seed(5)
    save_state_dict(build_clip("harness-micro-vit").state_dict(), tmp_path / "other.safetensors")
    other = {**sweep_dict, "model": {**sweep_dict["model"], "pretrained": str(tmp_path / "other.safetensors")}}
    heads = {}
    for name, d in (("first", sweep_dict), ("other", other)):
        ws = Workspace(validate_config(d))
        truth = zeroshot_head(ws.clip, get_tokenizer("harness-micro-vit"), ws.task("toy_stripes").prompts())
        heads[name] = ws.head("toy_stripes")
        assert torch.allclose(heads[name], truth, atol=1e-5), name
    assert not torch.allclose(heads["first"], heads["other"], atol=1e-2)


def test_a_cached_head_recording_other_prompts_or_another_task_is_not_read(tmp_path):
    """A head file copied into place that was built for other prompts of the same task (or for
    another task) is built again: it would score with the wrong class texts."""
    from harness.models import save_state_dict
    from harness.workspace import cached_head

    path = tmp_path / "heads" / "t-key.safetensors"
    head = torch.randn(3, 8)
    save_state_dict({"weight": head}, path, metadata={"task": "t", "prompts": "a"})
    assert torch.equal(cached_head(path, {"task": "t", "prompts": "a"}, 3), head)
    assert cached_head(path, {"task": "t", "prompts": "b"}, 3) is None
    assert cached_head(path, {"task": "u", "prompts": "a"}, 3) is None
    assert cached_head(path, {"task": "t", "prompts": "a"}, 4) is None


def test_a_head_cached_before_heads_recorded_their_task_is_read_as_it_is(tmp_path):
    """A head file holding no record of its task and prompts (written before the record was kept)
    is read as the tensor it holds; one recording another task is not."""
    from harness.models import save_state_dict
    from harness.workspace import cached_head

    head = torch.arange(12.0).reshape(3, 4)
    built_for = {"task": "toy_colours", "prompts": "abc"}
    path = tmp_path / "old.safetensors"
    save_state_dict({"weight": head}, path)
    assert torch.equal(cached_head(path, built_for, 3), head)
    save_state_dict({"weight": head}, path, metadata={"task": "toy_stripes", "prompts": "abc"})
    assert cached_head(path, built_for, 3) is None


def test_the_head_files_given_for_the_sweeps_tasks_are_in_its_identity_by_their_sha256(sweep_dict, tmp_path):
    """A head file edited since a run must not reuse its results: the identity holds each given
    head's sha256 (first 16 hex digits, computed here from the bytes), for the sweep's tasks only
    (a head given for a task the sweep does not run changes none of its keys)."""
    import hashlib

    from harness.config import validate_config
    from harness.models import save_state_dict
    from harness.workspace import Workspace

    task = sweep_dict["tasks"][0]
    path = tmp_path / "head.safetensors"
    save_state_dict({"weight": Workspace(validate_config(sweep_dict)).head(task)}, path)
    sweep_dict["model"]["heads"] = {task: str(path), "toy_checks": str(path)}
    identity = Workspace(validate_config(sweep_dict)).identity
    assert identity["heads"] == {task: hashlib.sha256(path.read_bytes()).hexdigest()[:16]}


def test_building_a_zero_shot_head_shows_its_classes_progress_unless_quiet(sweep_dict, capsys):
    """A ViT-B/32 text tower on a CPU encodes SUN397's 794 prompts for minutes: the driver shows
    a bar over the head's classes (lines in a log), the last at all of them; a quiet workspace
    (a worker's) prints nothing. The head is the formula's either way."""
    from harness.config import validate_config
    from harness.workspace import Workspace

    ws = Workspace(validate_config(sweep_dict), progress=True)
    classes = len(ws.task("toy_stripes").prompts())
    head = ws.head("toy_stripes")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("zero-shot head toy_stripes:")]
    assert lines and lines[-1].startswith(f"zero-shot head toy_stripes: {classes}/{classes} ")
    truth = zeroshot_head(ws.clip, get_tokenizer("harness-micro-vit"), ws.task("toy_stripes").prompts())
    assert torch.allclose(head, truth, atol=1e-5)

    Workspace(validate_config(sweep_dict)).head("toy_colours")  # not cached yet: built here
    assert "zero-shot head" not in capsys.readouterr().out
