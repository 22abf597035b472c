"""open_clip is imported without ``transformers`` and gets it back for Hugging Face text towers.

Each check runs in a fresh interpreter: what is imported is process state."""

from __future__ import annotations

import importlib.util
import json

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
