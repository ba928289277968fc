"""Model outputs: a dict with attribute access that drops None fields, like transformers' ModelOutput."""

from __future__ import annotations

from typing import Any


class ModelOutput(dict):
    """A dict with attribute access that drops None fields, like transformers' ModelOutput."""

    def __init__(self, **fields: Any):
        super().__init__({k: v for k, v in fields.items() if v is not None})

    def __getattr__(self, name: str) -> Any:
        if name == "cache":
            name = "past_key_values"
        if name in self:
            return self[name]
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__("past_key_values" if key == "cache" else key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())
