"""onevision: a small, fast, pure PyTorch LLaVA-OneVision with the transformers API.

Names are imported lazily so `import onevision` stays cheap (no torch import until a model or
processor class is touched).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # transformers' Auto idioms
    "AutoConfig": "onevision.auto",
    "AutoTokenizer": "onevision.auto",
    "AutoImageProcessor": "onevision.auto",
    "AutoModelForImageTextToText": "onevision.auto",
    "pipeline": "onevision.pipelines",
    "ImageTextToTextPipeline": "onevision.pipelines",
    # configs
    "LlavaOnevisionConfig": "onevision.config",
    "SiglipVisionConfig": "onevision.config",
    "Qwen2Config": "onevision.config",
    # models
    "LlavaOnevisionModel": "onevision.models.llava_onevision",
    "LlavaOnevisionForConditionalGeneration": "onevision.models.llava_onevision",
    "BitsAndBytesConfig": "onevision.quantization",
    "TorchAoConfig": "onevision.quantization",
    # processing
    "AutoProcessor": "onevision.processing.processor",
    "LlavaOnevisionProcessor": "onevision.processing.processor",
    "LlavaOnevisionImageProcessor": "onevision.processing.image",
    "LlavaOnevisionImageProcessorPil": "onevision.processing.image",
    "LlavaOnevisionVideoProcessor": "onevision.processing.video",
    "Qwen2TokenizerFast": "onevision.processing.tokenizer",
    # generation
    "GenerationConfig": "onevision.generation.config",
    "TextIteratorStreamer": "onevision.generation.streaming",
    "TextStreamer": "onevision.generation.streaming",
    # the engine
    "LLM": "onevision.engine.llm",
    "SamplingParams": "onevision.engine.params",
    "RequestOutput": "onevision.engine.params",
    "Engine": "onevision.engine.engine",
    "EngineConfig": "onevision.engine.engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'onevision' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
