"""The vision stage: media items are encoded a few tower layers per engine step, so the streams already
decoding keep flowing while a large image or a video is read (one SigLIP tile costs about as much as 30 prompt
tokens of the 0.5B language model, per layer). Identical items waiting at once are encoded once; results go to
the vision cache and to every waiting item with that hash."""

from __future__ import annotations

import collections

import torch

from onevision.engine.sequence import MediaItem
from onevision.engine.vision_cache import VisionCache

MAX_TILES_PER_PASS = 16  # tiles encoded together (activation memory grows with it)


def layer_cost_in_tokens(config) -> float:
    """FLOPs of one tower layer over one tile, in units of one language-model token's FLOPs."""
    v, t = config.vision_config, config.text_config
    n = v.num_patches_per_side ** 2
    tile_layer = n * 2 * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size) + 4 * n * n * v.hidden_size
    kv = t.num_key_value_heads * t.head_dim
    lm_token = 2 * t.num_hidden_layers * (2 * t.hidden_size ** 2 + 2 * t.hidden_size * kv +
                                          3 * t.hidden_size * t.intermediate_size)
    return tile_layer / lm_token


class VisionEncoder:
    def __init__(self, model, cache: VisionCache, dtype: torch.dtype):
        self.model, self.cache, self.dtype = model, cache, dtype
        self.queue: collections.OrderedDict[bytes, list[MediaItem]] = collections.OrderedDict()
        self.job: tuple[list[list[MediaItem]], object] | None = None  # (item groups, tower pass)
        self.cost = layer_cost_in_tokens(model.config)
        self.encoded_tiles = 0

    @property
    def busy(self) -> bool:
        return bool(self.queue) or self.job is not None

    @staticmethod
    def ready(item: MediaItem) -> bool:
        return item.features is not None  # an item keeps its features for its request's lifetime

    def request(self, items: list[MediaItem]) -> None:
        """Look each item up in the vision cache once; queue the misses (an item already queued gets a twin)."""
        for item in items:
            if item.features is None:
                item.features = self.cache.get(item.hash)
            if item.features is None:
                self.queue.setdefault(item.hash, []).append(item)

    def forget(self, items: list[MediaItem]) -> None:
        """An aborted request's items leave the queue (a pass already running finishes)."""
        for item in items:
            group = self.queue.get(item.hash)
            if group is not None and item in group:
                group.remove(item)
                if not group:
                    del self.queue[item.hash]

    @torch.inference_mode()
    def step(self, token_budget: float | None) -> None:
        """Advance the encoding by about `token_budget` prompt tokens' worth of work (None: finish it all)."""
        while self.busy:
            if self.job is None:
                self._start()
            groups, state = self.job
            tiles = state.x.shape[0]
            layers = None if token_budget is None else max(1, int(token_budget / (self.cost * tiles)))
            try:
                if not self.model.model.vision_tower.advance(state, layers):
                    return
                self._finish(groups, state)
            except BaseException:  # an error or Ctrl-C inside the pass: its items start again from their pixels
                self.job = None
                for group in reversed(groups):
                    if group[0].features is None:
                        self.queue[group[0].hash] = group
                        self.queue.move_to_end(group[0].hash, last=False)
                raise
            if token_budget is not None:
                return

    def _start(self) -> None:
        groups, tiles = [], 0
        while self.queue:
            key, group = next(iter(self.queue.items()))
            n = group[0].tiles.shape[0]
            if groups and tiles + n > MAX_TILES_PER_PASS:
                break
            del self.queue[key]
            groups.append(group)
            tiles += n
        pixels = torch.cat([g[0].tiles for g in groups]).to(self.model.device, self.dtype)
        self.job = (groups, self.model.model.encode_tiles(pixels))
        self.encoded_tiles += pixels.shape[0]

    def _finish(self, groups: list[list[MediaItem]], state) -> None:
        self.job = None
        model = self.model.model
        projected = model.finish_tiles(state).split([g[0].tiles.shape[0] for g in groups])
        for group, feats in zip(groups, projected):
            first = group[0]
            packed = model.pack_image(feats, first.size) if first.kind == "image" else model.pack_video(feats)
            if packed.shape[0] != first.length:
                raise ValueError(f"{first.kind} features have {packed.shape[0]} rows for {first.length} placeholders")
            packed = packed.to(self.dtype)
            self.cache.put(first.hash, packed)
            for item in group:
                item.features = packed


__all__ = ["VisionEncoder", "layer_cost_in_tokens"]
