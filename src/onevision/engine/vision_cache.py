"""Projected vision features by content hash (sequence.MediaItem.hash), least recently used evicted first once
the bytes held pass the budget. An image re-sent in a later turn, or needed again after a preemption, is not
encoded again."""

from __future__ import annotations

import collections

import torch


class VisionCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self.entries: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self.bytes = 0
        self.queries = self.hits = 0

    def get(self, key: bytes) -> torch.Tensor | None:
        self.queries += 1
        features = self.entries.get(key)
        if features is not None:
            self.hits += 1
            self.entries.move_to_end(key)
        return features

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def put(self, key: bytes, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes or key in self.entries:
            return
        self.entries[key] = features
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


__all__ = ["VisionCache"]
