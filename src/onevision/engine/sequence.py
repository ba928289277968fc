"""A request's state inside the engine: its tokens, media items, KV blocks and sampling state.

A request asking for n completions is one Sequence until its prompt is prefilled, then forks into n that share
the prompt's KV blocks (engine.py)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from onevision import geometry
from onevision.engine.params import SamplingParams
from onevision.generation.streaming import TextTracker

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class MediaItem:
    """One image or video of a prompt: its placeholder run and the tiles (frames) that produce its features."""

    kind: str  # "image" | "video"
    start: int  # first placeholder position in the prompt
    length: int  # placeholder tokens = rows of its features
    hash: bytes  # content hash of its tiles plus every setting that changes its features
    tiles: torch.Tensor  # (P, 3, H, W) processed pixels
    size: tuple[int, int] | None = None  # the image's (height, width), for anyres packing
    features: torch.Tensor | None = None  # (length, C) once encoded or found in the vision cache


def _digest(*parts: Any) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().contiguous().cpu()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(p).encode())
    return h.digest()


def media_items(model_config, inputs: dict[str, Any], ids: list[int]) -> list[MediaItem]:
    """Split one sample's processor outputs into media items in placeholder order; check the placeholder counts."""
    cfg = model_config
    side = cfg.vision_config.num_patches_per_side
    settings = (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.vision_aspect_ratio,
                cfg.image_grid_pinpoints)
    items: list[MediaItem] = []
    for kind, token in (("image", cfg.image_token_index), ("video", cfg.video_token_index)):
        positions = [i for i, t in enumerate(ids) if t == token]
        if kind == "image":
            pixels, sizes = inputs.get("pixel_values"), inputs.get("image_sizes")
            if pixels is None:
                entries = []
            else:
                sizes = torch.as_tensor(sizes).reshape(-1, 2).tolist()
                if pixels.dim() == 4:
                    pixels = pixels[None] if len(sizes) == 1 else None
                if pixels is None or pixels.shape[0] != len(sizes):
                    raise ValueError(f"pixel_values must be (images, patches, 3, H, W) with one row per image_sizes "
                                     f"row ({len(sizes)}); pass one sample as the processor returns it")
                # anyres for an image alone in its sample, as the model reads batch_num_images (a flat image
                # list to the processor gives [1, 1, ...]: every image anyres); without it, the reference's
                # rule too: every image anyres
                counts = inputs.get("batch_num_images")
                counts = [1] * len(sizes) if counts is None else torch.as_tensor(counts).reshape(-1).tolist()
                if sum(counts) != len(sizes):
                    raise ValueError(f"batch_num_images {counts} adds up to {sum(counts)} images, but image_sizes "
                                     f"has {len(sizes)} rows; pass the processor's outputs unchanged")
                entries = []
                for pv, size, multi in zip(pixels, sizes, [n > 1 for n in counts for _ in range(n)]):
                    patches = 1 if multi else geometry.num_anyres_patches(
                        tuple(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                    n = geometry.num_image_tokens(tuple(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size,
                                                  side, cfg.vision_aspect_ratio, multi, cfg.vision_feature_select_strategy)
                    tiles = pv[:patches]
                    entries.append((n, tiles, tuple(size), _digest("image", multi, tuple(size), tiles, settings)))
        else:
            videos = inputs.get("pixel_values_videos")
            entries = [] if videos is None else [
                (geometry.num_video_tokens(v.shape[0], side), v, None, _digest("video", v, settings)) for v in videos]
        needed = sum(e[0] for e in entries)
        if needed != len(positions):
            raise ValueError(f"the prompt holds {len(positions)} {kind} placeholder tokens but its {len(entries)} "
                             f"{kind}(s) need {needed}; build the inputs with the processor (it expands each <{kind}>)")
        at = 0
        for n, tiles, size, digest in entries:
            start = positions[at]
            if positions[at + n - 1] != start + n - 1:
                raise ValueError(f"the placeholders of {kind} {len(items)} are not contiguous; build the inputs "
                                 "with the processor")
            items.append(MediaItem(kind, start, n, digest, tiles, size))
            at += n
    return sorted(items, key=lambda m: m.start)


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    params: SamplingParams
    token_ids: list[int]  # prompt, then generated tokens
    prompt_len: int
    items: list[MediaItem]
    tracker: TextTracker
    generator: torch.Generator | None
    arrival: float = field(default_factory=time.monotonic)
    status: str = WAITING
    num_computed: int = 0  # tokens whose KV is in the pool
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # of the full blocks, in order
    registered: int = 0  # leading full blocks already offered to the prefix cache
    admitted: bool = False
    num_cached: int = 0  # prompt tokens found in the prefix cache at (first) admission
    first_token: float | None = None
    last_token: float | None = None
    delta: str = ""  # text released since the last output
    max_tokens: int = 0  # resolved limit (params.max_tokens or the rest of the context)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def item_spans(self) -> list[tuple[int, int, bytes]]:
        return [(m.start, m.length, m.hash) for m in self.items]


__all__ = ["FINISHED", "MediaItem", "RUNNING", "Sequence", "WAITING", "media_items"]
