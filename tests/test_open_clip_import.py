"""open_clip is imported without ``transformers`` and gets it back for Hugging Face text towers.

Each check runs in a fresh interpreter: what is imported is process state."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from tests.conftest import run_fresh

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed (pip install -e '.[hf]')")


def test_building_a_model_does_not_import_transformers():
    out = run_fresh("""
        import sys
        from harness.models import build_clip, get_tokenizer
        clip = build_clip("harness-micro-vit")
        get_tokenizer("harness-micro-vit")
        print("transformers" in sys.modules, sys.modules.get("transformers", 0) is None)
    """)
    assert out.split() == ["False", "False"]


def test_architecture_names_are_read_from_the_config_folders_without_importing_open_clip():
    """A sweep's ``arch`` is checked against open_clip's configs and the project's own, read as
    files (no open_clip import), and the names are the ones open_clip lists once imported."""
    out = run_fresh("""
        import json, sys
        from harness.models import available_models, config_arch_names
        names = config_arch_names()
        print(json.dumps(["open_clip" in sys.modules, "harness-micro-vit" in names, "ViT-B-32" in names,
                          names == sorted(available_models())]))
    """)
    assert json.loads(out) == [False, True, True, True]


@needs_transformers
def test_transformers_stays_importable_after_open_clip():
    out = run_fresh("""
        from harness.models import open_clip_module
        open_clip_module()
        import transformers
        print(transformers.__name__, hasattr(transformers, "BertConfig"))
    """)
    assert out.split() == ["transformers", "True"]


@needs_transformers
def test_hf_text_tower_builds_after_open_clip_was_imported_without_transformers(tmp_path):
    """A model whose text tower is a (local, tiny) Hugging Face BERT: build_clip reloads the adapter."""
    from transformers import BertConfig, BertModel

    bert = tmp_path / "tiny-bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16)).save_pretrained(bert)
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert),
                        "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler"}}
    (tmp_path / "tiny-hf-text-clip.json").write_text(json.dumps(cfg))
    out = run_fresh(f"""
        import sys, torch
        from harness.models import build_clip, open_clip_module
        open_clip = open_clip_module()
        assert "transformers" not in sys.modules
        open_clip.add_model_config({str(tmp_path / "tiny-hf-text-clip.json")!r})
        clip = build_clip("tiny-hf-text-clip")
        text = clip.encode_text(torch.randint(1, 64, (3, 8)))
        image = clip.encode_image(torch.randn(2, 3, 16, 16))
        print(type(clip.text).__name__, tuple(text.shape), tuple(image.shape), bool(torch.isfinite(text).all()))
    """)
    assert out.split() == ["HFTextEncoder", "(3,", "32)", "(2,", "32)", "True"]


def test_a_missing_tag_fails_without_contacting_a_hub(tmp_path):
    """HF_HUB_OFFLINE unset and huggingface_hub imported first (as open_clip does): a tag missing
    from the cache is refused at once, without requests to the hub (here a closed local port,
    which a hub client retries with backoff for about a minute, logging each retry)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import os, time
        os.environ.pop("HF_HUB_OFFLINE", None)
        os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
        from harness.errors import HarnessError
        from harness.models import build_clip, open_clip_module
        open_clip_module()
        t0 = time.perf_counter()
        try:
            build_clip("ViT-B-32", "openai", cache_dir={str(tmp_path)!r})
        except HarnessError as exc:
            print("refused:", "not in the local cache" in str(exc))
        import huggingface_hub.constants as hub
        print("offline after:", hub.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"))
        print("seconds:", time.perf_counter() - t0)
    """)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["refused: True", "offline after: False None"], proc.stdout + proc.stderr  # restored
    assert "Retrying" not in proc.stderr and "127.0.0.1:9" not in proc.stderr, proc.stderr
    assert float(lines[2].split()[1]) < 20, proc.stdout
