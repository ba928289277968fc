"""Shared pieces of the processing tests: loaded processors (ours and the transformers reference), test media,
PyAV video writing and comparison helpers. Import the fixtures into a test module to use them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
HUB_PROCESSOR = FIXTURES / "hub-processor"
MEDIA = FIXTURES / "media"
PHOTOS = ["cat.jpg", "coffee.jpg", "rocket.jpg", "camera_gray.png", "logo_rgba.png"]


def photo(name: str) -> Image.Image:
    with Image.open(MEDIA / name) as image:
        image.load()
        return image


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def write_video(path: Path, frames: int = 20, width: int = 96, height: int = 64, fps: int = 10,
                codec: str = "mpeg4") -> Path:
    """Encode a small moving-gradient video with PyAV (mpeg4 in .mp4 by default)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        yy, xx = np.mgrid[0:height, 0:width]
        for t in range(frames):
            rgb = np.stack([(xx * 3 + t * 11) % 256, (yy * 4 + t * 7) % 256, ((xx + yy) * 2 + t * 5) % 256], -1)
            frame = av.VideoFrame.from_ndarray(rgb.astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def reference_video_frames(path: Path, num_frames: int | None = None, fps: float | None = None) -> np.ndarray:
    """The reference's own PyAV reader with the reference's sampling function (what torchcodec would give)."""
    from transformers.video_utils import default_sample_indices_fn, load_video

    def sample(metadata, **kwargs):
        return default_sample_indices_fn(metadata, num_frames=num_frames, fps=fps)

    frames, _ = load_video(str(path), backend="pyav", sample_indices_fn=sample)
    return frames


def max_abs_diff(a, b) -> float:
    a = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    b = b if isinstance(b, torch.Tensor) else torch.as_tensor(np.asarray(b))
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def _plain(value):
    """Lists/tuples -> nested tuples so [(3, 4)] equals [[3, 4]]."""
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


def assert_same_outputs(ours, ref, tol: float = 1e-6) -> dict[str, float]:
    """Same keys in the same order, identical integer tensors/lists, float tensors within tol. Returns max |Δ|."""
    assert list(ours.keys()) == list(ref.keys()), f"keys {list(ours.keys())} vs reference {list(ref.keys())}"
    diffs = {}
    for key in ref.keys():
        got, want = ours[key], ref[key]
        if isinstance(want, torch.Tensor):
            assert isinstance(got, torch.Tensor), f"{key}: {type(got).__name__} instead of a tensor"
            assert got.dtype == want.dtype, f"{key}: dtype {got.dtype} vs reference {want.dtype}"
            diffs[key] = max_abs_diff(got, want)
            limit = tol if want.is_floating_point() else 0
            assert diffs[key] <= limit, f"{key}: max |diff| {diffs[key]} > {limit}"
        elif isinstance(want, list) and want and isinstance(want[0], (torch.Tensor, np.ndarray)):
            assert len(got) == len(want), key
            diffs[key] = max((max_abs_diff(g, w) for g, w in zip(got, want)), default=0.0)
            assert diffs[key] <= tol, f"{key}: max |diff| {diffs[key]}"
        else:
            assert _plain(got) == _plain(want), f"{key}: {got!r:.200} vs reference {want!r:.200}"
    return diffs


@pytest.fixture(scope="session")
def ref_processor():
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoProcessor.from_pretrained(str(HUB_PROCESSOR))


@pytest.fixture(scope="session")
def ref_pil_image_processor():
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil.from_pretrained(str(HUB_PROCESSOR))


@pytest.fixture(scope="session")
def processor():
    from onevision import AutoProcessor

    return AutoProcessor.from_pretrained(HUB_PROCESSOR)
