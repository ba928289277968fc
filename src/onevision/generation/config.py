"""GenerationConfig: the generation settings onevision honours (generation_config.json), with the reference's
defaults. Plain data: models carry one, generate() and the server merge requests over it."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

GENERATION_CONFIG = "generation_config.json"


@dataclass
class GenerationConfig:
    """The generation settings onevision honours; defaults are the reference's."""

    max_length: int | None = None  # unset: 20 new tokens (the reference's default max_length counts from the prompt)
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    use_cache: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        """What a model without generation_config.json generates with: the text config's special ids."""
        text = config.text_config
        return cls(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id)

    @classmethod
    def from_model_folder(cls, folder: str, config: Any) -> GenerationConfig:
        if os.path.isfile(os.path.join(folder, GENERATION_CONFIG)):
            return cls.from_pretrained(folder)
        return cls.from_model_config(config)

    @classmethod
    def from_pretrained(cls, folder: str) -> GenerationConfig:
        with open(os.path.join(folder, GENERATION_CONFIG), encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self, keep_extra: bool = True) -> dict[str, Any]:
        """The settings that differ from the defaults (bos/eos always), plus the unknown keys read from a file."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        default = GenerationConfig()
        out = {k: v for k, v in out.items() if v != getattr(default, k) or k in ("bos_token_id", "eos_token_id")}
        if not keep_extra:
            return {k: v for k, v in out.items() if v is not None}
        return {**self.extra, **out}

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, GENERATION_CONFIG), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    def updated(self, **kwargs: Any) -> GenerationConfig:
        names = {f.name for f in dataclasses.fields(self)} - {"extra"}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"generate() got unsupported argument(s) {unknown}. Supported: {sorted(names)}, "
                            "plus generation_config, tokenizer, streamer, seed, generator and the model inputs.")
        return dataclasses.replace(self, **kwargs, extra=dict(self.extra))

    def validate(self) -> None:
        if self.num_beams != 1:
            raise ValueError(f"num_beams={self.num_beams}: beam search is not supported; use num_beams=1 "
                             "(greedy or sampling)")
        for name in ("max_new_tokens", "max_length", "min_new_tokens", "num_return_sequences"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        checks = [
            (self.max_new_tokens is None or self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (self.num_return_sequences >= 1, "num_return_sequences must be >= 1"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (not self.do_sample or self.temperature >= 1e-5, "temperature must be >= 1e-5 when do_sample=True "
                                                           "(smaller ones overflow; use do_sample=False for greedy)"),
            (self.top_k is None or self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.min_p is None or 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {self._values_of(message)}")
        if not self.do_sample:
            if self.num_return_sequences > 1:
                raise ValueError(f"num_return_sequences={self.num_return_sequences} needs do_sample=True: greedy "
                                 "decoding would return the same sequence each time")
            ignored = {k: getattr(self, k) for k, d in (("temperature", 1.0), ("top_p", 1.0), ("min_p", None))
                       if getattr(self, k) != d}
            if ignored:
                warnings.warn(f"do_sample=False: the sampling settings {ignored} have no effect; pass do_sample=True "
                              "to sample", UserWarning, stacklevel=4)

    def _values_of(self, message: str) -> str:
        name = message.split()[0]
        return f"{name}={getattr(self, name)!r}"

    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


__all__ = ["GENERATION_CONFIG", "GenerationConfig"]
