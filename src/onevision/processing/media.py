"""Loading images and videos from paths, URLs, base64 strings and bytes, with clear errors and a pixel limit.

Images from files are opened the way the reference's loader does (EXIF orientation applied, converted to RGB;
an alpha channel in a *file* is dropped, as torchvision's decode_image(RGB) does). In-memory PIL images keep
their mode: the image processors composite transparency on white themselves.
Videos are decoded with PyAV; frames are picked with the reference's indices (`sample_indices`).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.request
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from onevision.processing import ProcessingError

# Largest image (height * width) we decode from a file; raise it with ONEVISION_MAX_IMAGE_PIXELS or max_pixels=...
MAX_IMAGE_PIXELS = int(os.environ.get("ONEVISION_MAX_IMAGE_PIXELS", 89_478_485))
URL_TIMEOUT_S = 20.0
MAX_DOWNLOAD_BYTES = 512 * 1024 * 1024
_BASE64 = re.compile(r"[A-Za-z0-9+/\s]{16,}={0,2}\s*")


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def fetch_url(url: str, timeout: float = URL_TIMEOUT_S) -> bytes:
    """GET `url` (bounded size); any failure becomes a ProcessingError naming the URL."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http/https checked by caller)
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except Exception as e:  # network errors come in many types
        raise ProcessingError(f"could not download {url!r}: {e}") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ProcessingError(f"{url!r} is larger than {MAX_DOWNLOAD_BYTES} bytes")
    return data


def _decode_base64(source: str) -> bytes:
    if source.startswith("data:"):
        source = source.split(",", 1)[-1]
    try:
        return base64.b64decode(source.encode(), validate=False)
    except (binascii.Error, ValueError) as e:
        raise ProcessingError(f"not an existing file, an http(s) URL or valid base64 data: {source[:60]!r} ({e})"
                              ) from None


def image_bytes(source: str | bytes | os.PathLike) -> bytes | str:
    """Raw bytes for a URL / base64 / data URI, or the path itself for a local file."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    source = os.fspath(source)
    if _is_url(source):
        return fetch_url(source)
    if os.path.isfile(source):
        return source
    if source.startswith("data:") or _BASE64.fullmatch(source):
        return _decode_base64(source)
    raise ProcessingError(f"image not found: {source!r} is not an existing file, an http(s) URL or base64 data")


def load_image(source: Any, max_pixels: int | None = None) -> Any:
    """PIL image (RGB, upright) from a path/URL/base64/bytes; PIL images, arrays and tensors pass through."""
    if isinstance(source, Image.Image) or hasattr(source, "shape"):
        return source
    if not isinstance(source, (str, bytes, bytearray, os.PathLike)):
        raise ProcessingError(f"an image must be a PIL image, an array/tensor, a path, a URL or base64 data; "
                              f"got {type(source).__name__}")
    data = image_bytes(source)
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    where = data if isinstance(data, str) else "the image data"
    try:
        image = Image.open(data if isinstance(data, str) else io.BytesIO(data))
        width, height = image.size
        if limit and width * height > limit:
            raise ProcessingError(
                f"{where} is {width}x{height} = {width * height} pixels, more than the limit of {limit} "
                "(decompression-bomb guard); pass max_pixels=... or set ONEVISION_MAX_IMAGE_PIXELS to allow it")
        image.load()
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except ProcessingError:
        raise
    except Image.DecompressionBombError as e:
        raise ProcessingError(f"{where} is too large to decode safely: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # unidentified, truncated or corrupt data
        raise ProcessingError(f"could not decode {where} as an image ({type(e).__name__}: {e})") from None


def sample_indices(total_frames: int, num_frames: int | None = None, fps: float | None = None,
                   video_fps: float | None = None) -> np.ndarray:
    """The reference's frame indices: `arange(n) * total // n`; with fps, n = max(1, int(total / video_fps * fps))."""
    if num_frames is not None and fps is not None:
        raise ProcessingError("num_frames and fps are mutually exclusive; pass only one")
    if num_frames is None and fps is not None:
        if not video_fps:
            raise ProcessingError(f"fps={fps} needs the video's frame rate, which is unknown for frames passed as "
                                  "arrays; pass num_frames=... instead, or a video file")
        num_frames = max(1, int(total_frames / video_fps * fps))
    if num_frames is None:
        return np.arange(total_frames, dtype=int)
    if num_frames <= 0:
        raise ProcessingError(f"num_frames must be positive, got {num_frames}")
    if num_frames > total_frames:
        raise ProcessingError(f"asked for {num_frames} frames but the video has only {total_frames}; "
                              "use a smaller num_frames or fps")
    return np.arange(num_frames, dtype=int) * total_frames // num_frames


def load_video(source: str | bytes | os.PathLike, num_frames: int | None = None,
               fps: float | None = None) -> tuple[np.ndarray, dict]:
    """Decode a video with PyAV -> (frames uint8 (T, H, W, 3), metadata {total_num_frames, fps, frames_indices}).

    If the container overstates its frame count, the frames that do decode are returned (fewer than asked)."""
    import av

    if isinstance(source, (bytes, bytearray)):
        data = io.BytesIO(bytes(source))
    else:
        source = os.fspath(source)
        if _is_url(source):
            data = io.BytesIO(fetch_url(source))
        elif os.path.isfile(source):
            data = source
        else:
            raise ProcessingError(f"video not found: {source!r} is not an existing file or an http(s) URL")
    where = data if isinstance(data, str) else "the video data"
    try:
        with av.open(data) as container:
            if not container.streams.video:
                raise ProcessingError(f"{where} has no video stream")
            stream = container.streams.video[0]
            video_fps = float(stream.average_rate) if stream.average_rate else None
            total = int(stream.frames)
            if total <= 0:  # container doesn't store a frame count: count by decoding
                total = sum(1 for _ in container.decode(video=0))
                container.seek(0)
            if total <= 0:
                raise ProcessingError(f"{where} has no frames")
            indices = sample_indices(total, num_frames, fps, video_fps)
            frames = read_frames(container, indices.tolist(), video_fps)
    except ProcessingError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise ProcessingError(f"could not decode {where} as a video ({type(e).__name__}: {e})") from None
    if not frames:
        raise ProcessingError(f"{where} decoded to zero frames")
    return np.stack(frames), {"total_num_frames": total, "fps": video_fps, "frames_indices": indices.tolist()}


SEEK_GAP = 64  # frames: a sampled frame further ahead than this is reached by seeking, not by decoding the gap


def read_frames(container, indices: list[int], video_fps: float | None, *, size: tuple[int, int] | None = None,
                should_stop=None) -> list[np.ndarray]:
    """The frames at `indices` (presentation order, sorted) of the container's first video stream as RGB arrays,
    in one pass: the decoder runs forward and, when the next wanted frame is more than SEEK_GAP frames ahead and
    the stream has timestamps, seeks to the keyframe before it instead of decoding the gap. After a seek a frame's
    index comes from its timestamp (exact for constant-frame-rate video). `size` (width, height) scales frames
    while converting them; `should_stop()` is asked after every decoded frame and ends the work early (it raises
    ProcessingError)."""
    stream = container.streams.video[0]
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        return []
    base = stream.start_time or 0
    tb = float(stream.time_base) if stream.time_base else None
    can_seek = bool(video_fps and tb)
    picked: dict[int, np.ndarray] = {}
    position = 0  # index of the next frame the decoder yields while counting sequentially
    counting = True
    target = 0  # position in `wanted`
    decoder = container.decode(stream)
    while target < len(wanted):
        goal = wanted[target]
        if can_seek and goal - position > SEEK_GAP:
            container.seek(base + int(goal / video_fps / tb), stream=stream, backward=True, any_frame=False)
            decoder, counting = container.decode(stream), False
            position = goal  # (a lower bound is all the gap check needs)
        frame = next(decoder, None)
        if frame is None:
            break
        if should_stop is not None and should_stop():
            raise ProcessingError("video decoding was stopped")
        if counting:
            index, position = position, position + 1
        elif frame.pts is None:
            raise ProcessingError("the video has frames without timestamps after seeking")
        else:
            index = round((frame.pts - base) * tb * video_fps)
            position = max(position, index + 1)
        if index < goal:
            continue
        array = frame.to_ndarray(format="rgb24", width=size[0], height=size[1], interpolation="AREA") if size \
            else frame.to_ndarray(format="rgb24")
        while target < len(wanted) and wanted[target] <= index:  # a missing frame: the next one stands in
            picked[wanted[target]] = array
            target += 1
    return [picked[i] for i in wanted if i in picked]


__all__ = ["MAX_IMAGE_PIXELS", "ProcessingError", "fetch_url", "load_image", "load_video", "read_frames",
           "sample_indices"]
