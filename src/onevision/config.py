"""HF-compatible configs: dataclasses whose field names are the config.json keys.

Reads both the 4.45-era keys written by the llava-hf converter (`rope_theta`, `torch_dtype`) and the
transformers v5 keys (`rope_parameters`, `dtype`). Unknown keys are kept and written back. Defaults are
the reference's class defaults (transformers 5.24), so `LlavaOnevisionConfig()` describes the same model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

CONFIG_NAME = "config.json"

DEFAULT_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]


class _Config:
    """Shared dict/JSON plumbing. Subclasses are dataclasses; `extra` holds keys we do not model."""

    model_type: ClassVar[str] = ""
    _aliases: ClassVar[dict[str, str]] = {}  # attribute alias -> field name
    _legacy: ClassVar[tuple[str, ...]] = ()  # keys read by from_dict but not stored as fields

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any):
        data = {**data, **overrides}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "model_type"}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, _Config) else copy.deepcopy(value)
        for key, value in self.extra.items():
            if key not in self._legacy:
                out.setdefault(key, copy.deepcopy(value))
        out["model_type"] = self.model_type
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **kwargs: Any):
        from onevision.loading import resolve_files

        folder = resolve_files(path_or_repo_id, [CONFIG_NAME], **_hub_kwargs(kwargs))
        with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as f:
            data = json.load(f)
        if cls is not LlavaOnevisionConfig and data.get("model_type") == "llava_onevision":
            data = data["vision_config" if cls is SiglipVisionConfig else "text_config"]
        return cls.from_dict(data, **kwargs)

    def __getattr__(self, name: str) -> Any:  # aliases and kept unknown keys read like attributes
        if name in ("extra", "__dataclass_fields__") or name.startswith("__"):
            raise AttributeError(name)
        if name in self._aliases:
            return getattr(self, self._aliases[name])
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, self._aliases.get(name, name), value)


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    keys = ("revision", "cache_dir", "token", "local_files_only", "force_download")
    return {k: kwargs.pop(k) for k in keys if k in kwargs}


def _pop_dtype(extra: dict[str, Any], dtype: str | None) -> str | None:
    legacy = extra.get("torch_dtype")  # kept in `extra` (not written back) so 4.45-era configs read right
    return dtype if dtype is not None else legacy


@dataclass(eq=True)
class SiglipVisionConfig(_Config):
    """SigLIP vision tower. Class defaults are the reference's (base-patch16-224), like transformers."""

    model_type: ClassVar[str] = "siglip_vision_model"
    _legacy: ClassVar[tuple[str, ...]] = ("torch_dtype",)

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    vision_use_head: bool = True
    dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.dtype = _pop_dtype(self.extra, self.dtype)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


# The SigLIP-so400m tower with its last layer dropped, as LlavaOnevisionConfig builds it by default.
SO400M_DEFAULTS = dict(hidden_size=1152, intermediate_size=4304, patch_size=14, image_size=384,
                       num_hidden_layers=26, num_attention_heads=16, vision_use_head=False)


@dataclass(eq=True)
class Qwen2Config(_Config):
    """Qwen2 decoder. Class defaults are the reference's (note rope_theta 10000: always read the checkpoint's)."""

    model_type: ClassVar[str] = "qwen2"
    _legacy: ClassVar[tuple[str, ...]] = ("torch_dtype", "rope_theta", "rope_scaling")

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict[str, Any] | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: list[str] | None = None
    attention_dropout: float = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.dtype = _pop_dtype(self.extra, self.dtype)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_parameters is None:
            theta = self.extra.get("rope_theta", 10000.0)
            scaling = self.extra.get("rope_scaling") or {}
            self.rope_parameters = {**scaling, "rope_theta": float(theta),
                                    "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                                else "full_attention" for i in range(self.num_hidden_layers)]
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"text config: hidden_size {self.hidden_size}, num_attention_heads "
                             f"{self.num_attention_heads} and num_key_value_heads {self.num_key_value_heads} must divide evenly")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries, expected num_hidden_layers="
                             f"{self.num_hidden_layers}")

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    @property
    def head_dim(self) -> int:
        return int(self.extra.get("head_dim") or self.hidden_size // self.num_attention_heads)


_SUB = {"vision_config": SiglipVisionConfig, "text_config": Qwen2Config}


@dataclass(eq=True, init=False)
class LlavaOnevisionConfig(_Config):
    """Top-level config. Accepts the doc's positional form `LlavaOnevisionConfig(vision_config, text_config)`."""

    model_type: ClassVar[str] = "llava_onevision"
    _aliases: ClassVar[dict[str, str]] = {"image_token_id": "image_token_index", "video_token_id": "video_token_index"}
    _legacy: ClassVar[tuple[str, ...]] = ("torch_dtype",)

    vision_config: SiglipVisionConfig
    text_config: Qwen2Config
    image_token_index: int = 151646
    video_token_index: int = 151647
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "full"
    vision_feature_layer: int | list[int] = -1
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    image_grid_pinpoints: list[list[int]] | None = None
    vision_aspect_ratio: str = "anyres_max_9"
    architectures: list[str] | None = None
    dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __init__(self, vision_config: Any = None, text_config: Any = None, **kwargs: Any) -> None:
        extra = dict(kwargs.pop("extra", None) or {})
        for alias, name in self._aliases.items():
            if alias in kwargs:
                kwargs.setdefault(name, kwargs.pop(alias))
        names = {f.name for f in dataclasses.fields(self)} - {"extra", "vision_config", "text_config"}
        for f in dataclasses.fields(self):
            if f.name in names:
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                object.__setattr__(self, f.name, kwargs.pop(f.name, default))
        extra.update(kwargs)
        object.__setattr__(self, "extra", extra)
        self.vision_config = self._sub("vision_config", vision_config)
        self.text_config = self._sub("text_config", text_config)
        self.__post_init__()

    @staticmethod
    def _sub(name: str, value: Any) -> Any:
        cls = _SUB[name]
        if value is None:
            return cls(**SO400M_DEFAULTS) if cls is SiglipVisionConfig else cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if hasattr(value, "to_dict"):  # a transformers config object
            return cls.from_dict(value.to_dict())
        raise TypeError(f"{name} must be a {cls.__name__}, a dict or None, got {type(value).__name__}")

    def __post_init__(self) -> None:
        self.dtype = _pop_dtype(self.extra, self.dtype)
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = copy.deepcopy(DEFAULT_PINPOINTS)
        if not self.tie_word_embeddings and self.text_config.tie_word_embeddings:
            self.tie_word_embeddings = True
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', "
                             f"got {self.vision_feature_select_strategy!r}")
        if self.projector_hidden_act not in ("gelu", "gelu_pytorch_tanh", "silu", "relu"):
            raise ValueError(f"projector_hidden_act {self.projector_hidden_act!r} is not supported; "
                             "expected one of gelu, gelu_pytorch_tanh, silu, relu")

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any):
        data = {k: v for k, v in {**data, **overrides}.items() if k != "model_type"}
        return cls(data.pop("vision_config", None), data.pop("text_config", None), **data)
