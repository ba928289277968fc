"""Video processing as the reference's LlavaOnevisionVideoProcessor (SPEC §4): every frame resized to exactly
384x384 (bicubic, antialiased, on uint8; no aspect ratio, no padding) and normalized like the image base patch.

Videos: a path/URL (decoded with PyAV), a (T, H, W, C) / (T, C, H, W) array or tensor, or a list of frames;
several videos as a list (or nested per-sample lists). Frames are sampled only when `do_sample_frames` (set by
num_frames / fps), with the reference's indices.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from onevision.processing import BatchFeature, ConfigFile, ProcessingError, merged_options
from onevision.processing.image import (CLIP_MEAN, CLIP_STD, LlavaOnevisionImageProcessor, channels_first,
                                        tile_size)
from onevision.processing.media import load_image, load_video, sample_indices

_CONFIG_KEYS = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "do_sample_frames", "image_mean",
                "image_std", "resample", "rescale_factor", "size", "num_frames", "fps")


def _is_frame(x) -> bool:
    return isinstance(x, Image.Image) or (hasattr(x, "ndim") and x.ndim == 3)


def _is_video(x) -> bool:
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and all(_is_frame(f) for f in x)
    return hasattr(x, "ndim") and x.ndim == 4


def split_videos(videos) -> list:
    """One video, a list of videos or nested per-sample lists -> flat list of videos (sources or frame stacks)."""
    if isinstance(videos, (str, bytes, os.PathLike)) or _is_video(videos):
        return [videos]
    try:  # [[["f1.jpg", "f2.jpg"], ...]]: videos given as lists of frame paths/URLs (as chat templates pass them)
        if isinstance(videos[0][0], (list, tuple)) and isinstance(videos[0][0][0], str):
            return [list(frames) for group in videos for frames in group]
    except (IndexError, TypeError, KeyError):
        pass
    if hasattr(videos, "ndim") and videos.ndim == 5:
        return list(videos)
    if _is_frame(videos):
        return [[videos]]
    if not isinstance(videos, (list, tuple)):
        raise ProcessingError(f"a video must be a path/URL, a 4-D array/tensor or a list of frames; "
                              f"got {type(videos).__name__}")
    flat = []
    for item in videos:
        if isinstance(item, (str, bytes, os.PathLike)) or _is_video(item):
            flat.append(item)
        elif isinstance(item, (list, tuple)):
            flat.extend(split_videos(item) if item else [])
        else:
            raise ProcessingError(f"unsupported video item of type {type(item).__name__}")
    return flat


class LlavaOnevisionVideoProcessor(ConfigFile):
    """pixel_values_videos: per video (T, 3, 384, 384) float32; stacked to (N, T, 3, 384, 384) for "pt"."""

    model_input_names = ["pixel_values_videos"]
    config_files = ("video_preprocessor_config.json", "video_processor/preprocessor_config.json",
                    "video_processor/video_preprocessor_config.json")
    processor_config_key = "video_processor"
    shared_files = ("preprocessor_config.json",)  # old layouts share the image processor's values
    config_keys = _CONFIG_KEYS
    type_name = "LlavaOnevisionVideoProcessor"

    def __init__(self, do_convert_rgb: bool = True, do_normalize: bool = True, do_rescale: bool = True,
                 do_resize: bool = True, do_sample_frames: bool = False, image_mean=None, image_std=None,
                 resample: int = 3, rescale_factor: float = 1 / 255, size: dict | None = None,
                 num_frames: int | None = None, fps: float | None = None, **unused):
        self.do_convert_rgb, self.do_normalize, self.do_rescale = do_convert_rgb, do_normalize, do_rescale
        self.do_resize, self.do_sample_frames = do_resize, do_sample_frames
        self.image_mean = list(CLIP_MEAN if image_mean is None else image_mean)
        self.image_std = list(CLIP_STD if image_std is None else image_std)
        self.resample, self.rescale_factor = resample, rescale_factor
        self.size = dict(size or {"height": 384, "width": 384})
        self.num_frames, self.fps = num_frames, fps
        self._frames = LlavaOnevisionImageProcessor(resample=resample)  # shares the exact resize/normalize ops

    def __call__(self, videos, **kwargs) -> BatchFeature:
        return self.preprocess(videos, **kwargs)

    def preprocess(self, videos, return_tensors: str | None = None, **overrides) -> BatchFeature:
        cfg = merged_options(self, _CONFIG_KEYS, overrides, {"device", "video_metadata", "return_metadata",
                                                             "input_data_format", "data_format"}, "video")
        sample = bool(cfg["do_sample_frames"])
        if sample and cfg["num_frames"] is not None and cfg["fps"] is not None:
            raise ProcessingError("num_frames and fps are mutually exclusive; pass only one")
        tile = tile_size(cfg["size"])
        out = []
        for video in split_videos(videos):
            frames = self._frames_of(video, cfg if sample else None, overrides.get("input_data_format"))  # (T,C,H,W)
            if frames.shape[0] == 0:
                raise ProcessingError("a video has zero frames")
            if cfg["do_convert_rgb"]:
                frames = self._to_rgb(frames)
            if cfg["do_resize"]:
                frames = self._resize(frames, tile)
            out.append(self._frames._normalize_stack(frames, cfg))
        return BatchFeature({"pixel_values_videos": out}, tensor_type=return_tensors)

    @staticmethod
    def _stack(frames: list) -> np.ndarray:
        if len({np.shape(f) for f in frames}) > 1:
            shapes = sorted({np.shape(f) for f in frames})
            raise ProcessingError(f"all frames of a video must have the same shape, got {shapes}")
        return np.stack(frames)

    @staticmethod
    def _frames_of(video, cfg: dict | None, data_format: str | None = None) -> torch.Tensor:
        """Decode/convert one video to a (T, C, H, W) tensor, sampling frames when cfg is given."""
        if isinstance(video, (str, bytes, os.PathLike)):
            frames, _ = load_video(video, cfg and cfg["num_frames"], cfg and cfg["fps"])
        elif isinstance(video, (list, tuple)) and all(isinstance(f, str) for f in video):
            if cfg is not None:
                raise ProcessingError("frames given as image paths/URLs can't be sampled; drop num_frames/fps")
            frames = LlavaOnevisionVideoProcessor._stack([np.asarray(load_image(f)) for f in video])
        elif isinstance(video, (list, tuple)):
            frames = LlavaOnevisionVideoProcessor._stack([np.asarray(f) if isinstance(f, Image.Image) else
                               (f.cpu().numpy() if isinstance(f, torch.Tensor) else f) for f in video])
        else:
            frames = video
        if cfg is not None and not isinstance(video, (str, bytes, os.PathLike)):
            frames = frames[sample_indices(len(frames), cfg["num_frames"], cfg["fps"], None)]
        tensor = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
        if tensor.ndim == 3:  # frames of a gray (T, H, W) video
            tensor = tensor[:, None]
        if tensor.ndim != 4:
            raise ProcessingError(f"a video must have 4 dimensions (T, H, W, C), got shape {tuple(tensor.shape)}")
        if not channels_first(tuple(tensor.shape[1:]), data_format):
            tensor = tensor.permute(0, 3, 1, 2)
        return tensor.cpu().contiguous()

    @staticmethod
    def _to_rgb(frames: torch.Tensor) -> torch.Tensor:
        """Gray -> 3 channels; RGBA blended on white only if some alpha < 255 (stays float, like the reference)."""
        if frames.shape[1] == 1:
            return frames.expand(-1, 3, -1, -1).contiguous()
        if frames.shape[1] == 4:
            if not (frames[:, 3] < 255).any():
                return frames[:, :3].contiguous()
            alpha = frames[:, 3:4] / 255.0
            return (1 - alpha) * 255 + alpha * frames[:, :3]
        return frames

    def _resize(self, frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self._frames._resize(frames, size)


__all__ = ["LlavaOnevisionVideoProcessor", "split_videos"]
