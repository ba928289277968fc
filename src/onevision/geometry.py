"""Pure integer geometry of LLaVA-OneVision: grid choice, resize targets, unpadding and token counts.

Shared by the processor (how many placeholder tokens to insert) and the model (how to pack features),
so the two can never disagree. Sizes are (height, width) everywhere. Rounding follows the reference
exactly (transformers 5.24, SPEC §3.3-3.10): truncating `int()` in grid selection, `round(x, 7)` before
`int()` in unpadding, float floor division for the anyres_max downscale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Size = tuple[int, int]  # (height, width)


def select_best_resolution(size: Size, pinpoints: Sequence[Sequence[int]]) -> Size:
    """The pinpoint (h, w) that keeps most of the original pixels, then wastes least (first wins ties)."""
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive (height, width), got {(height, width)}")
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(h), int(w)), effective, wasted
    if best is None:
        raise ValueError(f"no grid pinpoint fits image size {(height, width)}; pinpoints: {list(pinpoints)}")
    return best


def anyres_grid(size: Size, pinpoints: Sequence[Sequence[int]], tile: int) -> Size:
    """(rows, cols) of whole `tile`-pixel tiles in the best resolution (floor, as the model packs them)."""
    h, w = select_best_resolution(size, pinpoints)
    return h // tile, w // tile


def num_anyres_patches(size: Size, pinpoints: Sequence[Sequence[int]], tile: int) -> int:
    """Patches the processor makes for a single image: one base image + the tiles (partial edge tiles count)."""
    h, w = select_best_resolution(size, pinpoints)
    return 1 + math.ceil(h / tile) * math.ceil(w / tile)


def resize_for_patching(size: Size, target: Size) -> Size:
    """Aspect-preserving (h, w) that fits `size` into `target` (the reference's ceil rule, SPEC §3.4)."""
    height, width = size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def padding_for_patching(size: Size, target: Size) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding from `size` to `target`; the odd pixel goes right/bottom."""
    pad_x, rem_x = divmod(target[1] - size[1], 2)
    pad_y, rem_y = divmod(target[0] - size[0], 2)
    return pad_x, pad_x + rem_x, pad_y, pad_y + rem_y


def unpad_slice(size: Size, grid: Size) -> tuple[slice, slice]:
    """Rows and columns of a (grid_h, grid_w) feature map that cover the image content (not the padding)."""
    height, width = size
    grid_h, grid_w = grid
    if width / height > grid_w / grid_h:
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return slice(pad, grid_h - pad), slice(0, grid_w)
    new_w = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_w) // 2
    return slice(0, grid_h), slice(pad, grid_w - pad)


def max_patches_of(vision_aspect_ratio: str) -> int:
    """9 for "anyres_max_9"."""
    prefix = "anyres_max_"
    if not vision_aspect_ratio.startswith(prefix) or not vision_aspect_ratio[len(prefix):].isdigit():
        raise ValueError(f"vision_aspect_ratio must look like 'anyres_max_N', got {vision_aspect_ratio!r}")
    return int(vision_aspect_ratio[len(prefix):])


def downscaled_grid(grid: Size, patches_per_side: int, max_patches: int) -> Size | None:
    """Target (h, w) of the bilinear downscale when the unpadded grid exceeds max_patches by > 1.1, else None."""
    h, w = grid
    ratio = math.sqrt(h * w / (max_patches * patches_per_side**2))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio)
    return None


def packed_grid(size: Size, pinpoints: Sequence[Sequence[int]], tile: int, patches_per_side: int,
                max_patches: int) -> Size:
    """Final (h, w) of the anyres feature grid of a single image after unpadding and downscaling."""
    rows, cols = anyres_grid(size, pinpoints, tile)
    rs, cs = unpad_slice(size, (rows * patches_per_side, cols * patches_per_side))
    grid = (rs.stop - rs.start, cs.stop - cs.start)
    return downscaled_grid(grid, patches_per_side, max_patches) or grid


def num_image_tokens(size: Size, pinpoints: Sequence[Sequence[int]], tile: int = 384, side: int = 27,
                     vision_aspect_ratio: str = "anyres_max_9", multi_image: bool = False,
                     strategy: str = "full") -> int:
    """Placeholder tokens for one image: base + grid + one newline per grid row (730 for a multi-image member).

    `tile` is the processed patch size in pixels (384), `side` the vision tower's patches per side (27).
    """
    base = side * side - (1 if strategy == "default" else 0)
    if multi_image:
        return base + 1
    h, w = packed_grid(size, pinpoints, tile, side, max_patches_of(vision_aspect_ratio))
    return base + h * w + h


def pooled_side(side: int = 27) -> int:
    """Side of a video frame's feature grid after 2x bilinear pooling: ceil(27 / 2) = 14."""
    return math.ceil(side / 2)


def num_video_tokens(num_frames: int, side: int = 27) -> int:
    """Placeholder tokens for one video: 196 per frame + one newline."""
    return num_frames * pooled_side(side) ** 2 + 1
