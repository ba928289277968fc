"""anyres_max_9 image processing, numerically identical to the reference's two backends (SPEC §3).

* `LlavaOnevisionImageProcessor` = the default (torchvision) backend on CPU: uint8 CHW tensors resized with
  `F.interpolate(bicubic, antialias=True)` directly on uint8, fused normalize `(x - 255*mean) / (255*std)`.
* `LlavaOnevisionImageProcessorPil` = the PIL backend: PIL BICUBIC resizes on uint8, then float64 rescale
  -> float32 and `(x - mean) / std` in float32.

Per image: a sample with exactly one image is "patched" (base image resized to 384x384 + row-major 384 tiles of
the image resized into its best grid resolution and zero padded, odd pixel right/bottom); a sample with several
images gives one patch each (padded to square with colour int(255*mean), then resized).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from onevision.config import DEFAULT_PINPOINTS
from onevision.geometry import padding_for_patching, resize_for_patching, select_best_resolution
from onevision.processing import BatchFeature, ConfigFile, ProcessingError, merged_options
from onevision.processing.media import load_image

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_CONFIG_KEYS = ("do_convert_rgb", "do_normalize", "do_pad", "do_rescale", "do_resize", "image_grid_pinpoints",
                "image_mean", "image_std", "resample", "rescale_factor", "size")


def composite_on_white_pil(image: Image.Image) -> np.ndarray:
    """PIL image -> HWC uint8 RGB; transparency (alpha band or `transparency` info) composited on white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


def tile_size(size: dict) -> tuple[int, int]:
    """(h, w) of a processed patch or video frame from a `size` setting ({"height", "width"} or {"shortest_edge"})."""
    if "height" in size:
        return int(size["height"]), int(size["width"])
    return int(size["shortest_edge"]), int(size["shortest_edge"])


def channels_first(shape: tuple[int, ...], data_format: str | None = None) -> bool:
    """The reference's rule for a 3-D image: channels first if dim 0 is 1/3/4 (even when the last one is too),
    unless `data_format` ("channels_first" / "channels_last") says where they are."""
    if data_format is not None:
        if data_format not in ("channels_first", "channels_last"):
            raise ProcessingError(f"input_data_format must be 'channels_first' or 'channels_last', got {data_format!r}")
        return data_format == "channels_first"
    if shape[0] in (1, 3, 4):
        return True
    if shape[-1] in (1, 3, 4):
        return False
    raise ProcessingError(f"cannot tell where the channels are in an image of shape {tuple(shape)}; "
                          "expected (C, H, W) or (H, W, C) with C in 1, 3, 4")


def split_batch(images: Any) -> tuple[list[Any], list[int]]:
    """Nested [[a, b], [c], []] -> ([a, b, c], [2, 1]); flat [a, b] -> ([a, b], [1, 1]); single a -> ([a], [1])."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ProcessingError("got an empty list of images")
        if isinstance(images[0], (list, tuple)):
            if not all(isinstance(x, (list, tuple)) for x in images):
                raise ProcessingError("mixed nested and flat image lists; pass [[images of sample 1], ...]")
            groups = [list(x) for x in images if len(x)]
            return [img for group in groups for img in group], [len(g) for g in groups]
        return list(images), [1] * len(images)
    if hasattr(images, "ndim") and images.ndim == 4:  # a stacked batch of images
        return list(images), [1] * len(images)
    return [images], [1]


class _ImageProcessorBase(ConfigFile):
    """The anyres algorithm (settings I/O from ConfigFile); subclasses provide the backend's pixel operations."""

    backend = ""
    config_files = ("preprocessor_config.json",)
    processor_config_key = "image_processor"
    config_keys = _CONFIG_KEYS
    type_name = "LlavaOnevisionImageProcessor"
    model_input_names = ["pixel_values", "image_sizes", "batch_num_images"]

    def __init__(self, do_convert_rgb: bool = True, do_normalize: bool = True, do_pad: bool = True,
                 do_rescale: bool = True, do_resize: bool = True, image_grid_pinpoints=None, image_mean=None,
                 image_std=None, resample: int = 3, rescale_factor: float = 1 / 255, size: dict | None = None,
                 **unused):
        self.do_convert_rgb, self.do_normalize, self.do_pad = do_convert_rgb, do_normalize, do_pad
        self.do_rescale, self.do_resize = do_rescale, do_resize
        self.image_grid_pinpoints = [list(p) for p in (image_grid_pinpoints or DEFAULT_PINPOINTS)]
        self.image_mean = list(CLIP_MEAN if image_mean is None else image_mean)
        self.image_std = list(CLIP_STD if image_std is None else image_std)
        self.resample, self.rescale_factor = resample, rescale_factor
        self.size = dict(size or {"height": 384, "width": 384})
        if int(resample) != 3:
            raise ProcessingError(f"only bicubic resampling (3) is implemented, got resample={resample}")

    @property
    def tile(self) -> tuple[int, int]:
        """(h, w) of a processed patch (384, 384)."""
        return tile_size(self.size)

    # ---------------------------------------------------------------- the algorithm
    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def preprocess(self, images, return_tensors: str | None = None, **overrides) -> BatchFeature:
        """images (one, flat list or nested per-sample lists) -> pixel_values, image_sizes, batch_num_images."""
        cfg = merged_options(self, _CONFIG_KEYS, overrides, {"max_pixels", "device", "disable_grouping",
                                                             "input_data_format", "data_format"}, "image")
        flat, batch_num_images = split_batch(images)
        need_patching = [n == 1 for n in batch_num_images for _ in range(n)]
        tile = tile_size(cfg["size"])
        background = tuple(int(m * 255) for m in cfg["image_mean"])
        pixel_values, image_sizes = [], []
        for image, patched in zip(flat, need_patching, strict=True):
            image = load_image(image, overrides.get("max_pixels"))
            image = self._to_chw(image, cfg["do_convert_rgb"], overrides.get("input_data_format"))
            height, width = image.shape[-2:]
            if height == 0 or width == 0:
                raise ProcessingError(f"image has an empty side: {height}x{width}")
            if patched:
                patches = self._anyres_patches(image, cfg["image_grid_pinpoints"], tile)
            else:
                patches = [self._pad_to_square(image, background)]
            if cfg["do_resize"]:
                patches = [self._resize(p, tile) for p in patches]
            pixel_values.append(self._normalize_stack(patches, cfg))
            image_sizes.append((int(height), int(width)))
        if cfg["do_pad"]:
            most = max(len(p) for p in pixel_values)
            pixel_values = [self._pad_patches(p, most) for p in pixel_values]
        return BatchFeature({"pixel_values": pixel_values, "image_sizes": image_sizes,
                             "batch_num_images": batch_num_images}, tensor_type=return_tensors)

    def _anyres_patches(self, image, pinpoints, tile: tuple[int, int]) -> list:
        """[base resized to tile] + row-major tiles of the image fitted into its best grid resolution."""
        size = tuple(int(s) for s in image.shape[-2:])
        target = select_best_resolution(size, pinpoints)
        fitted = self._resize(image, resize_for_patching(size, target))
        padded = self._pad(fitted, padding_for_patching(tuple(fitted.shape[-2:]), target))  # (C, th, tw)
        step = tile[0]
        tiles = [padded[:, i:i + step, j:j + step]
                 for i in range(0, target[0], step) for j in range(0, target[1], step)]
        return [self._resize(image, tile)] + tiles

    # ---------------------------------------------------------------- backend operations
    def _to_chw(self, image, do_convert_rgb: bool, data_format: str | None = None):
        raise NotImplementedError

    def _resize(self, image, size: tuple[int, int]):
        raise NotImplementedError

    def _pad(self, image, padding: tuple[int, int, int, int]):
        raise NotImplementedError

    def _pad_to_square(self, image, color: tuple[int, ...]):
        raise NotImplementedError

    def _normalize_stack(self, patches: list, cfg: dict):
        raise NotImplementedError

    def _pad_patches(self, stack, count: int):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.to_dict())})"


class LlavaOnevisionImageProcessor(_ImageProcessorBase):
    """Default processor: the reference's torchvision backend on CPU, in plain torch."""

    backend = "torchvision"

    def _to_chw(self, image, do_convert_rgb: bool, data_format: str | None = None) -> torch.Tensor:  # (C, H, W)
        if isinstance(image, Image.Image):
            array = composite_on_white_pil(image) if do_convert_rgb else np.array(image)
            tensor = torch.from_numpy(np.ascontiguousarray(array))
            tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
            return tensor.contiguous()
        tensor = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
        if not isinstance(tensor, torch.Tensor):
            raise ProcessingError(f"unsupported image type {type(image).__name__}")
        if tensor.ndim == 2:
            tensor = tensor[None]
        elif tensor.ndim != 3:
            raise ProcessingError(f"an image array must have 2 or 3 dimensions, got shape {tuple(tensor.shape)}")
        elif not channels_first(tuple(tensor.shape), data_format):
            tensor = tensor.permute(2, 0, 1)
        if do_convert_rgb:
            if tensor.shape[0] == 1:
                tensor = tensor.expand(3, -1, -1)
            elif tensor.shape[0] == 4:
                tensor = self._composite(tensor)
        return tensor.cpu().contiguous()

    @staticmethod
    def _composite(rgba: torch.Tensor) -> torch.Tensor:
        """(4, H, W) -> (3, H, W) on white, with torchvision's to_dtype scaling (float math, truncating back)."""
        if rgba.is_floating_point() and (rgba.min() < 0 or rgba.max() > 1):
            raise ProcessingError("a 4-channel float image must have values in [0, 1]")
        x = rgba.movedim(0, -1)
        dtype = x.dtype
        if not x.is_floating_point():
            x = x.to(torch.float32).mul_(1.0 / 255)
        x = x[..., :3] * x[..., 3:] + (1 - x[..., 3:])
        if dtype == torch.uint8:
            x = x.mul(255 + 1.0 - 1e-3).to(torch.uint8)
        else:
            x = x.to(dtype)
        return x.movedim(-1, 0)

    def _resize(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        *lead, channels, height, width = image.shape  # (..., C, H, W)
        if (height, width) == tuple(size):
            return image
        batch = image.reshape(-1, channels, height, width)
        dtype = image.dtype
        cast = dtype not in (torch.uint8, torch.float32, torch.float64)
        if cast:
            batch = batch.to(torch.float32)
        out = F.interpolate(batch, size=list(size), mode="bicubic", align_corners=False, antialias=True)
        if cast:  # torchvision's rule: round back only for these integer types, then cast
            if dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
                out = out.round_()
            out = out.to(dtype)
        return out.reshape(*lead, channels, *size)

    def _pad(self, image: torch.Tensor, padding: tuple[int, int, int, int]) -> torch.Tensor:
        return F.pad(image, padding, value=0) if any(padding) else image

    def _pad_to_square(self, image: torch.Tensor, color: tuple[int, ...]) -> torch.Tensor:
        channels, height, width = image.shape
        if height == width:
            return image
        if len(color) != channels:
            raise ProcessingError(f"background colour {color} does not match {channels} channels")
        side = max(height, width)
        out = torch.tensor(color, dtype=image.dtype).view(-1, 1, 1).repeat(1, side, side)
        top, left = (side - height) // 2, (side - width) // 2
        out[:, top:top + height, left:left + width] = image
        return out

    def _normalize_stack(self, patches: list[torch.Tensor] | torch.Tensor, cfg: dict) -> torch.Tensor:  # (N, 3, h, w)
        stack = patches if isinstance(patches, torch.Tensor) else torch.stack(patches)
        if cfg["do_normalize"]:
            mean = torch.tensor(cfg["image_mean"])
            std = torch.tensor(cfg["image_std"])
            if cfg["do_rescale"]:
                mean, std = mean * (1.0 / cfg["rescale_factor"]), std * (1.0 / cfg["rescale_factor"])
            return stack.to(torch.float32).sub(mean.view(-1, 1, 1)).div(std.view(-1, 1, 1))
        if cfg["do_rescale"]:
            return stack * cfg["rescale_factor"]
        return stack

    def _pad_patches(self, stack: torch.Tensor, count: int) -> torch.Tensor:
        return F.pad(stack, (0, 0, 0, 0, 0, 0, 0, count - stack.shape[0])) if count > len(stack) else stack


class LlavaOnevisionImageProcessorPil(_ImageProcessorBase):
    """The reference's PIL backend: PIL resizes on uint8, numpy float64 rescale, float32 normalize."""

    backend = "pil"

    def _to_chw(self, image, do_convert_rgb: bool, data_format: str | None = None) -> np.ndarray:  # (C, H, W)
        if isinstance(image, Image.Image):
            array = composite_on_white_pil(image) if do_convert_rgb else np.array(image)
            return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if not isinstance(image, np.ndarray):
            raise ProcessingError(f"unsupported image type {type(image).__name__}")
        if image.ndim == 2:
            image = image[None]
        elif image.ndim != 3:
            raise ProcessingError(f"an image array must have 2 or 3 dimensions, got shape {image.shape}")
        elif not channels_first(image.shape, data_format):
            image = np.moveaxis(image, -1, 0)
        if do_convert_rgb:
            if image.shape[0] == 1:
                image = np.repeat(image, 3, axis=0)
            elif image.shape[0] == 4:
                image = self._composite(image)
        return image

    @staticmethod
    def _composite(rgba: np.ndarray) -> np.ndarray:
        """(4, H, W) -> (3, H, W) on white, float64 blend, rounded back for integer images."""
        is_int = np.issubdtype(rgba.dtype, np.integer)
        if not is_int and (rgba.min() < 0 or rgba.max() > 1):
            raise ProcessingError("a 4-channel float image must have values in [0, 1]")
        x = np.moveaxis(rgba, 0, -1)
        white = 255 if is_int else 1.0
        alpha = x[..., 3:4] / white
        blended = alpha * x[..., :3] + (1 - alpha) * white
        blended = np.round(blended).astype(rgba.dtype) if is_int else blended.astype(rgba.dtype)
        return np.moveaxis(blended, -1, 0)

    def _resize(self, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        hwc = np.moveaxis(image, 0, -1)
        hwc = hwc[..., 0] if hwc.shape[-1] == 1 else hwc
        rescaled = False
        if hwc.dtype != np.uint8:
            if np.allclose(hwc, hwc.astype(int)):
                if hwc.min() < 0 or hwc.max() > 255:
                    raise ProcessingError("image values must be in [0, 255] (or [0, 1] for floats) to resize")
            elif hwc.min() >= 0 and hwc.max() <= 1:
                hwc, rescaled = (hwc.astype(np.float64) * 255).astype(np.float32), True
            else:
                raise ProcessingError("float image values must be in [0, 1] or whole numbers in [0, 255]")
        pil = Image.fromarray(hwc.astype(np.uint8))
        out = np.array(pil.resize((size[1], size[0]), resample=Image.Resampling.BICUBIC))
        out = out[..., None] if out.ndim == 2 else out
        out = np.moveaxis(out, -1, 0)
        return (out.astype(np.float64) * (1 / 255)).astype(np.float32) if rescaled else out

    def _pad(self, image: np.ndarray, padding: tuple[int, int, int, int]) -> np.ndarray:
        left, right, top, bottom = padding
        return np.pad(image, ((0, 0), (top, bottom), (left, right)), mode="constant", constant_values=0)

    def _pad_to_square(self, image: np.ndarray, color: tuple[int, ...]) -> np.ndarray:
        channels, height, width = image.shape
        if height == width:
            return image
        side = max(height, width)
        out = np.zeros((channels, side, side), dtype=image.dtype)
        for c, value in enumerate(color):
            out[c] = value
        if width > height:
            start = (side - height) // 2
            out[:, start:start + height, :] = image
        else:
            start = (side - width) // 2
            out[:, :, start:start + width] = image
        return out

    def _normalize_stack(self, patches: list[np.ndarray], cfg: dict) -> np.ndarray:  # -> (N, 3, h, w)
        out = []
        for patch in patches:
            if cfg["do_rescale"]:
                patch = (patch.astype(np.float64) * cfg["rescale_factor"]).astype(np.float32)
            if cfg["do_normalize"]:
                patch = patch if np.issubdtype(patch.dtype, np.floating) else patch.astype(np.float32)
                mean = np.array(cfg["image_mean"], dtype=patch.dtype).reshape(-1, 1, 1)
                std = np.array(cfg["image_std"], dtype=patch.dtype).reshape(-1, 1, 1)
                patch = (patch - mean) / std
            out.append(patch)
        return np.array(out)

    def _pad_patches(self, stack: np.ndarray, count: int) -> np.ndarray:
        return np.pad(stack, ((0, count - len(stack)), (0, 0), (0, 0), (0, 0))) if count > len(stack) else stack


__all__ = ["DEFAULT_PINPOINTS", "LlavaOnevisionImageProcessor", "LlavaOnevisionImageProcessorPil", "split_batch"]
