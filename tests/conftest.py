"""Shared fixtures: tiny LLaVA-OneVision checkpoints built with transformers' own classes and save_pretrained.

The reference (transformers) is the oracle: every checkpoint here is made by it, and tests load the same
folder into both implementations. Weights are re-drawn with std 0.1 (norm weights 1 ± 0.1) so that outputs are
varied enough for parity tests to fail when something is off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
HUB_PROCESSOR = FIXTURES / "hub-processor"

TILE = 56  # tiny tower: 56 px images, 14 px patches -> 4x4 = 16 tokens per patch
PINPOINTS = [[TILE * a, TILE * b] for a in range(1, 7) for b in range(1, 7)]


def tiny_config_dict(*, tied: bool = False, feature_layer=-1, vocab_size: int = 152000, layers: int = 2,
                     strategy: str = "full") -> dict:
    return dict(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48,
                           num_hidden_layers=3, num_attention_heads=4, image_size=TILE, patch_size=14,
                           vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=tied,
                         bos_token_id=151643, eos_token_id=151645),
        image_token_index=151646, video_token_index=151647, vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy, image_grid_pinpoints=PINPOINTS, tie_word_embeddings=tied,
    )


def randomize_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)


def build_reference(folder: Path, *, seed: int = 0, layout: str = "v5", max_shard_size: str | None = None,
                    **config_kwargs) -> Path:
    """Save a random tiny reference model to `folder`; layout "hub" rewrites it like the llava-hf repos."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**tiny_config_dict(**config_kwargs)))
    randomize_(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    if layout == "hub":
        to_hub_layout(folder)
    return folder


def to_hub_layout(folder: Path) -> None:
    """Rewrite a transformers v5 save into the llava-hf hub layout: vision_tower.vision_model.*,
    language_model.lm_head.* (untied), and 4.45-era config keys (rope_theta, torch_dtype)."""
    from safetensors.torch import load_file, save_file

    files = sorted(folder.glob("*.safetensors"))
    for file in files:
        tensors = load_file(file)
        renamed = {}
        for k, v in tensors.items():
            if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
                k = "vision_tower.vision_model." + k[len("vision_tower."):]
            elif k.startswith("lm_head."):
                k = "language_model." + k
            renamed[k] = v
        save_file(renamed, file, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {
            ("vision_tower.vision_model." + k[13:] if k.startswith("vision_tower.") else
             "language_model." + k if k.startswith("lm_head.") else k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    text = cfg["text_config"]
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]
    text.pop("layer_types", None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def add_tiny_processor(folder: Path) -> Path:
    """Copy the real hub processor files next to a tiny checkpoint, resized to its 56 px tower: image and
    video size 56, the checkpoint's pinpoints, 16 tokens per patch. transformers' AutoProcessor loads it."""
    for f in HUB_PROCESSOR.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre.update(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    video = json.loads((folder / "video_preprocessor_config.json").read_text())
    video.update(size={"height": TILE, "width": TILE})
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    proc = json.loads((folder / "processor_config.json").read_text())
    proc.update(num_image_tokens=(TILE // 14) ** 2)
    (folder / "processor_config.json").write_text(json.dumps(proc, indent=2))
    return folder


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """Untied tiny checkpoint in the hub layout, with processor files sized for its 56 px tower."""
    return add_tiny_processor(build_reference(tmp_path_factory.mktemp("tiny") / "ckpt", layout="hub"))


@pytest.fixture(scope="session")
def reference_model(tiny_ckpt):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def our_model(tiny_ckpt):
    from onevision import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32)


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def real_05b_config_dict() -> dict:
    """llava-onevision-qwen2-0.5b-ov-hf shapes (SPEC §1): SigLIP-so400m minus one layer, Qwen2-0.5B, tied."""
    return dict(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                           vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=152000, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151645),
        image_token_index=151646, video_token_index=151647, tie_word_embeddings=True,
    )


def build_reference_05b(folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Random weights at the real 0.5B shapes, saved by transformers in the hub layout with the real processor."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(**real_05b_config_dict())
    model = LlavaOnevisionForConditionalGeneration(config).to(dtype)
    model.save_pretrained(folder)
    del model
    to_hub_layout(folder)
    for f in HUB_PROCESSOR.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder
