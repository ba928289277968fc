"""transformers' Auto idioms for the one model family onevision implements: each Auto class loads the
LLaVA-OneVision class transformers' Auto class would pick for a llava_onevision checkpoint."""

from __future__ import annotations

import os
from typing import Any


def _auto(target: str, attribute: str):
    class Auto:
        __doc__ = f"`{attribute}.from_pretrained(path_or_repo_id, ...)`, as transformers' Auto class."

        def __init__(self, *args: Any, **kwargs: Any):
            raise OSError(f"{type(self).__name__} is not meant to be instantiated; use "
                          f"{type(self).__name__}.from_pretrained(path_or_repo_id)")

        @classmethod
        def from_pretrained(cls, path_or_repo_id: str | os.PathLike, *args: Any, **kwargs: Any):
            import importlib

            module, name = target.rsplit(".", 1)
            return getattr(importlib.import_module(module), name).from_pretrained(path_or_repo_id, *args, **kwargs)

    Auto.__name__ = Auto.__qualname__ = attribute
    return Auto


AutoConfig = _auto("onevision.config.LlavaOnevisionConfig", "AutoConfig")
AutoTokenizer = _auto("onevision.processing.tokenizer.Qwen2TokenizerFast", "AutoTokenizer")
AutoImageProcessor = _auto("onevision.processing.image.LlavaOnevisionImageProcessor", "AutoImageProcessor")
AutoModelForImageTextToText = _auto("onevision.models.llava_onevision.LlavaOnevisionForConditionalGeneration",
                                    "AutoModelForImageTextToText")
