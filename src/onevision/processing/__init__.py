"""Everything between a conversation and the model's input tensors (tokenizer, chat template, image/video).

Shared here: `ProcessingError` (bad user input; a server maps it to HTTP 400) and `BatchFeature`, the dict the
processors return (`.to(device, dtype)` casts floating tensors only, like transformers' BatchFeature).
"""

from __future__ import annotations

import json
import os
from collections import UserDict
from pathlib import Path
from typing import Any

import numpy as np
import torch


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when the file is absent (optional config files)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class ProcessingError(ValueError):
    """The input can't be processed (wrong count of placeholders, unreadable media, unsupported content...)."""


class ConfigFile:
    """Settings I/O shared by the image and video processors: `config_keys` in one JSON file, found where
    transformers looks (the class's own files, then its section of processor_config.json, then `shared_files`:
    an older layout's file of another processor, of which only `config_keys` are read)."""

    config_files: tuple[str, ...] = ()  # the first is what save_pretrained writes
    processor_config_key = ""  # e.g. "image_processor"
    shared_files: tuple[str, ...] = ()
    config_keys: tuple[str, ...] = ()
    type_name = ""  # the reference's class name, written as `<kind>_processor_type`

    @classmethod
    def from_dict(cls, config: dict, **overrides):
        return cls(**{**config, **overrides})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides):
        folder = Path(path)
        for name in cls.config_files:
            if (folder / name).is_file():
                return cls.from_dict(read_json(folder / name), **overrides)
        section = read_json(folder / "processor_config.json").get(cls.processor_config_key)
        if section is not None:
            return cls.from_dict(section, **overrides)
        for name in cls.shared_files:
            if (folder / name).is_file():
                config = read_json(folder / name)
                return cls.from_dict({k: v for k, v in config.items() if k in cls.config_keys}, **overrides)
        looked = [*cls.config_files, f"processor_config.json ({cls.processor_config_key!r})", *cls.shared_files]
        raise FileNotFoundError(f"no {cls.processor_config_key.replace('_', ' ')} settings in {folder}: expected one "
                                f"of {looked}. Pass the model folder (or hub repo id) that holds the processor files.")

    def to_dict(self) -> dict:
        kind = self.processor_config_key
        return {**{k: getattr(self, k) for k in self.config_keys}, f"{kind}_type": self.type_name}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        (Path(save_directory) / self.config_files[0]).write_text(text)


def merged_options(processor: Any, keys: tuple[str, ...], overrides: dict[str, Any], accepted: set[str],
                   kind: str) -> dict[str, Any]:
    """The processor's settings with the call's non-None overrides; unknown options are an error."""
    unknown = set(overrides) - set(keys) - accepted
    if unknown:
        raise ProcessingError(f"unknown {kind} processing option(s) {sorted(unknown)}; known: {list(keys)}")
    return {k: overrides[k] if overrides.get(k) is not None else getattr(processor, k) for k in keys}


def _to_tensor(key: str, value: Any, kind: str | None) -> Any:
    """Convert one output value to "pt"/"np" (None: leave as is)."""
    if kind is None:
        return value
    if kind not in ("pt", "np"):
        raise ProcessingError(f"return_tensors must be 'pt', 'np' or None, got {kind!r}")
    if kind == "pt":
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, np.ndarray):
            return torch.from_numpy(value)
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], (torch.Tensor, np.ndarray)):
            items = [torch.as_tensor(v) for v in value]
            if len(items) == 1:
                return items[0].unsqueeze(0)
            if len({tuple(v.shape) for v in items}) > 1:
                shapes = sorted({tuple(v.shape) for v in items})
                raise ProcessingError(
                    f"cannot stack {key!r} into one tensor: items have different shapes {shapes}; "
                    "use the same number of frames for every video (num_frames=...) or return_tensors=None")
            return torch.stack(items)
        try:
            tensor = torch.tensor(value)
            # token ids and masks of empty texts are still integers (torch.tensor([[]]) would be float)
            return tensor.long() if tensor.numel() == 0 and key in _INTEGER_KEYS else tensor
        except (ValueError, TypeError) as e:
            raise ProcessingError(f"cannot make a tensor of {key!r} (ragged lists need padding=True): {e}") from None
    if isinstance(value, torch.Tensor):
        return value.numpy()
    try:
        return np.array([np.asarray(v) for v in value] if isinstance(value, (list, tuple)) else value)
    except ValueError as e:
        raise ProcessingError(f"cannot make an array of {key!r} (ragged lists need padding=True): {e}") from None


_INTEGER_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "assistant_masks",
                 "special_tokens_mask", "length", "offset_mapping")


class BatchFeature(UserDict):
    """Model inputs by name; attribute access (`inputs.input_ids`) and `.to(device, dtype)` like transformers."""

    def __init__(self, data: dict | None = None, tensor_type: str | None = None):
        super().__init__(data or {})
        self.convert_to_tensors(tensor_type)

    def convert_to_tensors(self, tensor_type: str | None = None) -> BatchFeature:
        for key in list(self.data):
            self.data[key] = _to_tensor(key, self.data[key], tensor_type)
        return self

    def keys(self):
        return self.data.keys()

    def values(self):
        return self.data.values()

    def items(self):
        return self.data.items()

    def __getattr__(self, name: str) -> Any:
        if name == "data" or name.startswith("__"):
            raise AttributeError(name)
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getstate__(self):
        return {"data": self.data}

    def __setstate__(self, state):
        self.data = state["data"]

    def to(self, *args, **kwargs) -> BatchFeature:
        """`.to(device)`, `.to(dtype)` or `.to(device, dtype)`: floating tensors get the dtype, all get the device."""
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        out = {}
        for key, value in self.data.items():
            if isinstance(value, torch.Tensor):
                if dtype is not None and torch.is_floating_point(value):
                    value = value.to(device=device, dtype=dtype)
                elif device is not None:
                    value = value.to(device=device)
            out[key] = value
        self.data = out
        return self


__all__ = ["BatchFeature", "ProcessingError"]
