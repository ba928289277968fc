"""Configs: field names and defaults of the reference, both key eras, unknown keys kept, positional form.

Run: .venv/bin/python -m pytest tests/test_config.py -q
"""

from __future__ import annotations

import json

import pytest
import transformers

from onevision import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig


def _common(ours: dict, ref: dict) -> dict:
    return {k: ref[k] for k in ours if k in ref}


def test_defaults_equal_reference_defaults():
    ref = transformers.LlavaOnevisionConfig().to_dict()
    ours = LlavaOnevisionConfig().to_dict()
    for key in ("image_token_index", "video_token_index", "projector_hidden_act", "vision_feature_select_strategy",
                "vision_feature_layer", "multimodal_projector_bias", "tie_word_embeddings", "image_grid_pinpoints",
                "vision_aspect_ratio"):
        assert ours[key] == ref[key], key
    for sub in ("vision_config", "text_config"):
        common = {k: v for k, v in ours[sub].items() if k in ref[sub] and k != "dtype"}
        assert common == {k: ref[sub][k] for k in common}, sub
        assert len(common) >= 11
    assert SiglipVisionConfig().to_dict() | {"dtype": None} == SiglipVisionConfig().to_dict()
    ref_siglip = transformers.SiglipVisionConfig().to_dict()
    assert {k: v for k, v in SiglipVisionConfig().to_dict().items() if k in ref_siglip and k != "dtype"} == \
        {k: ref_siglip[k] for k in SiglipVisionConfig().to_dict() if k in ref_siglip and k != "dtype"}


def test_positional_form_of_the_doc_and_aliases():
    cfg = LlavaOnevisionConfig(SiglipVisionConfig(hidden_size=64, num_attention_heads=4), Qwen2Config(hidden_size=128))
    assert cfg.vision_config.hidden_size == 64 and cfg.text_config.hidden_size == 128
    assert cfg.image_token_id == 151646
    cfg2 = LlavaOnevisionConfig(vision_config={"hidden_size": 48, "num_attention_heads": 4}, image_token_id=5)
    assert cfg2.image_token_index == 5 and cfg2.vision_config.hidden_size == 48
    assert LlavaOnevisionConfig(text_config=Qwen2Config(tie_word_embeddings=True)).tie_word_embeddings


def test_legacy_keys_and_unknown_keys_round_trip(tmp_path):
    data = {"model_type": "llava_onevision", "torch_dtype": "float16", "use_image_newline_parameter": True,
            "text_config": {"model_type": "qwen2", "rope_theta": 1000000.0, "hidden_size": 896,
                            "num_attention_heads": 14, "num_key_value_heads": 2, "num_hidden_layers": 24,
                            "torch_dtype": "bfloat16", "some_future_key": [1, 2]},
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "num_attention_heads": 16,
                              "image_size": 384, "patch_size": 14}}
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = LlavaOnevisionConfig.from_pretrained(tmp_path)
    assert cfg.dtype == "float16" and cfg.text_config.dtype == "bfloat16"
    assert cfg.text_config.rope_theta == 1e6 and cfg.text_config.head_dim == 64
    assert cfg.use_image_newline_parameter is True and cfg.text_config.some_future_key == [1, 2]
    cfg.save_pretrained(tmp_path / "out")
    again = json.loads((tmp_path / "out" / "config.json").read_text())
    assert again["text_config"]["rope_parameters"] == {"rope_theta": 1e6, "rope_type": "default"}
    assert again["use_image_newline_parameter"] is True and again["text_config"]["some_future_key"] == [1, 2]
    ref = transformers.LlavaOnevisionConfig.from_pretrained(tmp_path / "out")
    assert ref.text_config.rope_parameters["rope_theta"] == 1e6 and ref.text_config.hidden_size == 896
    assert LlavaOnevisionConfig.from_dict(cfg.to_dict()) == cfg
    assert Qwen2Config.from_pretrained(tmp_path).hidden_size == 896


def test_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be"):
        LlavaOnevisionConfig(vision_feature_select_strategy="cls")
    with pytest.raises(ValueError, match="not divisible"):
        SiglipVisionConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(TypeError, match="vision_config must be"):
        LlavaOnevisionConfig(vision_config=3)


def test_model_from_config_like_the_doc():
    """The doc builds a random model from a config: every parameter initialised, outputs finite."""
    import torch

    from onevision import LlavaOnevisionForConditionalGeneration

    cfg = LlavaOnevisionConfig(
        SiglipVisionConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, image_size=28, patch_size=14,
                           intermediate_size=40, vision_use_head=False),
        Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                    intermediate_size=40, vocab_size=100), image_token_index=98, video_token_index=99,
        image_grid_pinpoints=[[28, 28]])
    model = LlavaOnevisionForConditionalGeneration(cfg)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ids = torch.tensor([[1, 2] + [98] * 10 + [3]])  # base 2x2 + grid 2x2 + 2 newlines
    out = model(input_ids=ids, pixel_values=torch.randn(1, 2, 3, 28, 28), image_sizes=torch.tensor([[28, 28]]))
    assert torch.isfinite(out.logits).all()
