"""The server's one way to turn a client's media URL into an image or video frames, with limits everywhere.

    data:image/png;base64,...   always (size checked before decoding the base64)
    http(s)://...               only with --allow-remote-media; SSRF-safe, deadline and concurrency capped (fetch.py)
    file:///abs/path            only under --allowed-local-media-path (symlinks resolved before the check)

Decoding, cheapest refusal first: the bytes are identified (`image_url` takes the formats in IMAGE_FORMATS only,
`video_url` video containers only, so FFmpeg never probes an image); the headers give the pixel counts (images)
and duration, frame count, resolution and codec (videos, from the container with a small probe size), checked
against the limits; the request's decoded-pixel cost is checked against its budget and reserved from the
server's (decoded pixels in flight); only then is anything decoded. Images much larger than the processor's
largest resolution are decoded at reduced size (JPEG DCT scaling, or an integer box reduction right after
decoding); video frames are reached by seeking and decoding stops when the client leaves.
Every error is an `InvalidRequest` with a message written here: library error text (which can hold paths or
addresses) never reaches the client.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import io
import threading
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from onevision.server.errors import InvalidRequest, Overloaded
from onevision.server.fetch import RemoteFetcher, is_blocked_address, open_socket, system_resolver

IMAGE_FORMATS = "png, jpeg, webp, gif, bmp, tiff"
_PIL_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
VIDEO_CONTAINERS = "mp4/mov, webm/mkv, avi"
_VIDEO_CODECS = {"h264", "hevc", "vp8", "vp9", "av1", "libdav1d", "libaom-av1", "mpeg4", "mpeg1video",
                 "mpeg2video", "h263", "theora", "mjpeg", "msmpeg4v2", "msmpeg4v3", "wmv1", "wmv2", "wmv3", "vc1",
                 "prores", "dnxhd"}
_PROBE_BYTES = 1 << 20  # FFmpeg reads at most this much to find the streams (its default is 5 MB)


@dataclass
class MediaLimits:
    allow_remote: bool = False
    allowed_local_path: str | None = None
    max_image_bytes: int = 20 * 1024 * 1024
    max_video_bytes: int = 100 * 1024 * 1024
    max_image_pixels: int = 50_000_000  # one image, from its header
    num_frames: int = 8  # frames sampled per video
    max_frames: int = 64  # sampled frames
    image_fetch_timeout: float = 5.0  # wall clock, connect + headers + body
    video_fetch_timeout: float = 30.0
    max_redirects: int = 3
    max_concurrent_fetches: int = 4
    fetch_wait: float = 0.0  # seconds a fetch waits for one of those slots before a 503 (batch jobs: forever)
    max_request_pixels: int = 200_000_000  # decoded pixels one request may hold (see request_cost)
    max_server_pixels: int = 400_000_000  # decoded pixels in flight over all requests
    pixel_wait: float = 10.0  # seconds a request waits for the server's pixel budget before a 503
    max_video_seconds: float = 600.0
    max_video_frames: int = 36_000  # frames in the container (what decoding may have to walk through)
    max_video_frame_pixels: int = 3840 * 2160
    max_video_decode_pixels: int = 4_000_000_000  # decoded to reach the sampled frames (~2,000 1080p frames)


# --------------------------------------------------------------------------- sources
def decode_data_uri(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise InvalidRequest("malformed data URI (no comma)", code="invalid_data_uri")
    if not header.lower().endswith(";base64"):
        raise InvalidRequest("only base64 data URIs are supported (data:<mime>;base64,<data>)", code="invalid_data_uri")
    payload = "".join(payload.split())
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise InvalidRequest(f"the media data is larger than {max_bytes} bytes", code="media_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("the data URI is not valid base64", code="invalid_base64") from None
    if not data:
        raise InvalidRequest("the data URI is empty", code="invalid_data_uri")
    if len(data) > max_bytes:
        raise InvalidRequest(f"the media data is larger than {max_bytes} bytes", code="media_too_large")
    return data


def read_local_file(url: str, allowed: str | None, max_bytes: int) -> bytes:
    if not allowed:
        raise InvalidRequest("local files can't be loaded: start the server with --allowed-local-media-path DIR",
                             code="local_media_disabled")
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise InvalidRequest("malformed file URL; use file:///absolute/path", code="invalid_file_url")
    raw = urllib.request.url2pathname(parts.path)
    if not raw.startswith("/"):
        raise InvalidRequest("malformed file URL; use file:///absolute/path", code="invalid_file_url")
    root = Path(allowed).resolve()
    try:
        path = Path(raw).resolve(strict=True)
    except (OSError, RuntimeError):
        raise InvalidRequest("local media file not found or outside the allowed folder",
                             code="local_media_forbidden") from None
    if root not in path.parents or not path.is_file():
        raise InvalidRequest("local media file not found or outside the allowed folder", code="local_media_forbidden")
    if path.stat().st_size > max_bytes:
        raise InvalidRequest(f"the media file is larger than {max_bytes} bytes", code="media_too_large")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def media_bytes(url: str, *, kind: str, limits: MediaLimits, fetcher: RemoteFetcher) -> bytes:
    """Bytes behind a data:, http(s):// or file:// URL, or InvalidRequest (param is set by the caller).
    Every malformed URL form (bad IPv6 brackets, NUL bytes, bad ports) is a 400, never a 500."""
    try:
        return _media_bytes(url, kind=kind, limits=limits, fetcher=fetcher)
    except ValueError:  # urlsplit / ipaddress / os.path errors on malformed URLs: the text is never shown
        raise InvalidRequest("malformed media URL", code="invalid_media_url") from None


def _media_bytes(url: str, *, kind: str, limits: MediaLimits, fetcher: RemoteFetcher) -> bytes:
    max_bytes = limits.max_image_bytes if kind == "image" else limits.max_video_bytes
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_uri(url, max_bytes)
    if scheme in ("http", "https"):
        if not limits.allow_remote:
            raise InvalidRequest("remote media URLs are disabled on this server (start it with --allow-remote-media); "
                                 "send the media as a base64 data URI", code="remote_media_disabled")
        timeout = limits.image_fetch_timeout if kind == "image" else limits.video_fetch_timeout
        return fetcher.fetch(url, max_bytes, timeout)
    if scheme == "file":
        return read_local_file(url, limits.allowed_local_path, max_bytes)
    raise InvalidRequest("unsupported media URL; use a data: URI (base64), an http(s) URL or file:///path",
                         code="invalid_media_url")


# --------------------------------------------------------------------------- budgets and the request scope
GIVE_BACK_PIXELS = 20_000_000  # after a request that decoded this many pixels, freed heap goes back to the OS


class PixelBudget:
    """Decoded pixels in flight over the whole server: a request reserves its cost before decoding anything and
    gives it back when its preparation ends; one that can't get it within `wait` seconds gets a 503."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self._cond = threading.Condition()

    def reserve(self, pixels: int, wait: float, stopped=None) -> None:
        deadline = time.monotonic() + wait
        with self._cond:
            while self.used + pixels > self.capacity:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (stopped is not None and stopped()):
                    raise Overloaded(f"the server is already decoding {self.used} pixels of media for other requests "
                                     f"and this request needs {pixels}; the server-wide limit is {self.capacity} "
                                     "(--max-server-pixels); retry shortly", code="media_budget_busy", retry_after=2)
                self._cond.wait(min(remaining, 0.25))
            self.used += pixels

    def release(self, pixels: int) -> None:
        with self._cond:
            self.used -= pixels
            self._cond.notify_all()


class RequestScope:
    """One request's media work: a flag set when its client leaves (decoding stops) and its share of the budget."""

    def __init__(self, budget: PixelBudget | None = None):
        self.budget = budget
        self.cancelled = threading.Event()
        self.reserved = 0
        self.decoded = 0


_local = threading.local()


@contextmanager
def request_scope(scope: RequestScope):
    """Run one request's media work (on this thread) under `scope`; the reservation is returned at the end and
    after a large request the freed heap is handed back to the OS (glibc keeps it otherwise)."""
    _local.scope = scope
    try:
        yield scope
    finally:
        _local.scope = None
        if scope.budget is not None and scope.reserved:
            scope.budget.release(scope.reserved)
            scope.reserved = 0
        if scope.decoded >= GIVE_BACK_PIXELS:
            give_memory_back()


def current_scope() -> RequestScope | None:
    return getattr(_local, "scope", None)


def give_memory_back() -> None:
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc; other C libraries return large blocks by themselves
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- identifying and probing
def video_container(data: bytes) -> str | None:
    """FFmpeg's demuxer for the video container the bytes start with (by magic number), or None."""
    if data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mov"  # mp4, mov, m4v, 3gp
    if data[:4] == b"\x1aE\xdf\xa3":
        return "matroska"  # mkv, webm
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    return None


@dataclass
class Probe:
    """What the headers say, before any pixel is decoded."""

    kind: str
    width: int
    height: int
    scale: int  # integer reduction applied while / right after decoding (1: full size)
    need: int | None  # the processor's largest side (the reduction keeps both sides at or above it)
    decode_pixels: int  # held at once while decoding
    keep_pixels: int  # held after decoding, until the request's preparation ends
    container: str | None = None
    total: int = 0  # video frames in the container (0: unknown, counted while decoding)
    fps: float | None = None


def media_sizes(processor) -> dict[str, int | None]:
    """The largest side the processor resizes images / video frames to (None: unknown, no reduced decoding)."""
    def side(sub, pinpoints: bool) -> int | None:
        size = getattr(sub, "size", None) or {}
        sides = [int(v) for k, v in size.items() if k in ("height", "width", "shortest_edge", "longest_edge")]
        if pinpoints:
            sides += [int(v) for p in getattr(sub, "image_grid_pinpoints", None) or [] for v in p]
        return max(sides) if sides else None
    return {"image": side(getattr(processor, "image_processor", None), True),
            "video": side(getattr(processor, "video_processor", None), False)}


def _scale(width: int, height: int, need: int | None) -> int:
    """Integer reduction that keeps both sides >= `need` (the processor downscales below that anyway)."""
    if not need:
        return 1
    return max(1, min(width, height) // need)


def request_cost(probes: list[Probe]) -> int:
    """Decoded pixels the request holds at its peak: media are decoded one at a time and kept (reduced)."""
    if not probes:
        return 0
    return max(p.decode_pixels for p in probes) + sum(p.keep_pixels for p in probes)


def probe_image(data: bytes, limits: MediaLimits, need: int | None = None) -> Probe:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as image:
            width, height = image.size
            jpeg = image.format == "JPEG"
    except Image.DecompressionBombError:  # PIL refuses > 2x its own limit already when reading the header
        raise InvalidRequest(f"the image has more pixels than the limit of {limits.max_image_pixels}",
                             code="image_too_large") from None
    except Exception:  # noqa: BLE001 - PIL raises many types for non-images; the text is never shown
        raise InvalidRequest(f"could not read the image: image_url takes {IMAGE_FORMATS} images only (videos go in "
                             "video_url)", code="invalid_image") from None
    if width < 1 or height < 1:
        raise InvalidRequest("the image has no pixels", code="invalid_image")
    if width * height > limits.max_image_pixels:
        raise InvalidRequest(f"the image has {width}x{height} = {width * height} pixels; the limit is "
                             f"{limits.max_image_pixels} per image (--max-image-pixels)", code="image_too_large")
    scale = _scale(width, height, need)
    decoded = (width, height)
    if jpeg and scale >= 2:  # JPEG decodes straight to 1/2, 1/4 or 1/8 size (what Image.draft picks)
        draft = min(8, 1 << (scale.bit_length() - 1))
        decoded = (-(-width // draft), -(-height // draft))
    after = _scale(*decoded, need)  # then an integer box reduction
    return Probe("image", width, height, scale, need, decoded[0] * decoded[1],
                 (decoded[0] // after) * (decoded[1] // after))


def _open_video(data: bytes, container: str, limits: MediaLimits):
    import av

    options = {"probesize": str(_PROBE_BYTES), "max_pixels": str(limits.max_video_frame_pixels)}
    return av.open(io.BytesIO(data), format=container, options=options)


def probe_video(data: bytes, limits: MediaLimits, need: int | None = None) -> Probe:
    container = video_container(data)
    if container is None:
        raise InvalidRequest(f"video_url takes video containers only ({VIDEO_CONTAINERS}); these bytes are not one "
                             "(send images as image_url)", code="invalid_video")
    try:
        with _open_video(data, container, limits) as opened:
            if not opened.streams.video:
                raise InvalidRequest("the video has no video stream", code="invalid_video")
            stream = opened.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            codec = stream.codec_context.name
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else None
            total = max(0, int(stream.frames))
            seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else \
                (opened.duration / 1e6 if opened.duration else None)
    except InvalidRequest:
        raise
    except Exception:  # noqa: BLE001 - FFmpeg errors: text never shown
        raise InvalidRequest(f"could not read the video (supported containers: {VIDEO_CONTAINERS})",
                             code="invalid_video") from None
    if codec not in _VIDEO_CODECS:
        raise InvalidRequest(f"the video codec {codec!r} is not accepted (video codecs such as h264, hevc, vp9, av1, "
                             "mpeg4 are)", code="invalid_video")
    if width < 1 or height < 1:
        raise InvalidRequest("the video frames have no pixels", code="invalid_video")
    if width * height > limits.max_video_frame_pixels:
        raise InvalidRequest(f"the video frames have {width}x{height} = {width * height} pixels; the limit is "
                             f"{limits.max_video_frame_pixels} (--max-video-frame-pixels)", code="video_too_large")
    if seconds is not None and seconds > limits.max_video_seconds:
        raise InvalidRequest(f"the video lasts {seconds:.0f} s; the limit is {limits.max_video_seconds:g} s "
                             "(--max-video-seconds)", code="video_too_large")
    frames = total or (int(seconds * fps) if seconds and fps else 0)
    if frames > limits.max_video_frames:
        raise InvalidRequest(f"the video has {frames} frames; the limit is {limits.max_video_frames} "
                             "(--max-video-frames)", code="video_too_large")
    scale = _scale(width, height, need)
    sampled = min(limits.num_frames, total) if total else limits.num_frames
    keep = sampled * (width // scale) * (height // scale)
    return Probe("video", width, height, scale, need, 4 * width * height, keep, container, total, fps)


# --------------------------------------------------------------------------- decoding
def _stopped() -> bool:
    scope = current_scope()
    return scope is not None and scope.cancelled.is_set()


def _decode_image(data: bytes, probe: Probe, limits: MediaLimits):
    from PIL import Image

    from onevision.processing import ProcessingError
    from onevision.processing.media import load_image

    try:
        if probe.scale < 2:  # the library's loader: identical to what transformers decodes
            return load_image(data, max_pixels=limits.max_image_pixels)
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as image:
            orientation = image.getexif().get(0x0112)
            if image.format == "JPEG":
                image.draft("RGB", (probe.width // probe.scale, probe.height // probe.scale))
            image.load()
            # RGB first, as load_image (and transformers') converts: alpha dropped, not averaged in by reduce()
            rgb = image.convert("RGB")
            del image
            scale = _scale(*rgb.size, probe.need)
            reduced = rgb.reduce(scale) if scale >= 2 else rgb
            del rgb
        transpose = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                     4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                     7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}.get(orientation)
        if transpose is not None:
            reduced = reduced.transpose(transpose)
        return reduced
    except (ProcessingError, OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError):
        raise InvalidRequest(f"could not decode the image (corrupt or truncated; supported: {IMAGE_FORMATS})",
                             code="invalid_image") from None


def _decode_video(data: bytes, probe: Probe, limits: MediaLimits):
    import numpy as np

    from onevision.processing.media import read_frames, sample_indices

    try:
        with _open_video(data, probe.container, limits) as opened:
            total = probe.total
            if total <= 0:  # no frame count in the container (webm): count packets (no decoding), within the limit
                stream = opened.streams.video[0]
                for packet in opened.demux(stream):
                    total += packet.size > 0
                    if total > limits.max_video_frames:
                        raise InvalidRequest(f"the video has more than {limits.max_video_frames} frames "
                                             "(--max-video-frames)", code="video_too_large")
                opened.seek(0)
            if total <= 0:
                raise InvalidRequest("the video has no frames", code="invalid_video")
            indices = sample_indices(total, min(limits.num_frames, total)).tolist()
            size = (probe.width // probe.scale, probe.height // probe.scale) if probe.scale >= 2 else None
            walked = [0]

            def stop() -> bool:  # each decoded frame: the client still there, the decoding work within its limit
                walked[0] += probe.width * probe.height
                if walked[0] > limits.max_video_decode_pixels:
                    raise InvalidRequest(
                        f"reaching the sampled frames needs more than {limits.max_video_decode_pixels} decoded "
                        "pixels (--max-video-decode-pixels): the video's keyframes are too far apart; re-encode it "
                        "with more keyframes, or send a shorter or smaller video", code="video_too_large")
                return _stopped()
            frames = read_frames(opened, indices, probe.fps, size=size, should_stop=stop)
    except InvalidRequest:
        raise
    except Exception:  # noqa: BLE001 - FFmpeg and decoding errors: text never shown
        if _stopped():
            raise InvalidRequest("the client disconnected", code="client_disconnected") from None
        raise InvalidRequest("could not decode the video (corrupt, truncated or unsupported)",
                             code="invalid_video") from None
    if not frames:
        raise InvalidRequest("the video decoded to zero frames", code="invalid_video")
    return np.stack(frames)


def decode_image(data: bytes, limits: MediaLimits, need: int | None = None):
    """PIL RGB image, after the header checks (nothing is decoded before them). `need`: the processor's largest
    side (media_sizes); a much larger image is decoded at reduced size."""
    return _decode_image(data, probe_image(data, limits, need), limits)


def decode_video(data: bytes, limits: MediaLimits, need: int | None = None):
    """Frames uint8 (T, H, W, 3): `limits.num_frames` evenly spaced frames (all of them if the video is shorter),
    after the container checks."""
    return _decode_video(data, probe_video(data, limits, need), limits)


@contextmanager
def _at(param: str | None):
    try:
        yield
    except InvalidRequest as e:
        if e.param is None:
            e.param = param
        raise


def load_request_media(items: list[tuple[str, str, str]], limits: MediaLimits, fetcher: RemoteFetcher,
                       sizes: dict[str, int | None] | None = None) -> list:
    """[(kind 'image'|'video', url, param)] -> decoded media in order. Every item is fetched and probed first; the
    request's pixel cost is checked against the per-request limit and reserved from the server's budget (when
    run under request_scope) before anything is decoded."""
    sizes = sizes or {}
    datas, probes = [], []
    for kind, url, param in items:
        with _at(param):
            if _stopped():  # the client left: fetch nothing more
                raise InvalidRequest("the client disconnected", code="client_disconnected")
            data = media_bytes(url, kind=kind, limits=limits, fetcher=fetcher)
            probe = probe_image if kind == "image" else probe_video
            probes.append(probe(data, limits, sizes.get(kind)))
            datas.append(data)
    cost = request_cost(probes)
    if cost > limits.max_request_pixels:
        raise InvalidRequest(f"the request's media need {cost} decoded pixels at once; the limit is "
                             f"{limits.max_request_pixels} per request (--max-request-pixels): send fewer or smaller "
                             "images or videos", param="messages", code="media_too_large")
    scope = current_scope()
    if scope is not None and scope.budget is not None:
        if cost > scope.budget.capacity:
            raise InvalidRequest(f"the request's media need {cost} decoded pixels; the limit for all requests at once "
                                 f"is {scope.budget.capacity} (--max-server-pixels)", param="messages",
                                 code="media_too_large")
        scope.budget.reserve(cost, limits.pixel_wait, scope.cancelled.is_set)
        scope.reserved += cost
    out = []
    for (_, _, param), data, probe in zip(items, datas, probes, strict=True):
        with _at(param):
            if _stopped():
                raise InvalidRequest("the client disconnected", code="client_disconnected")
            out.append(_decode_image(data, probe, limits) if probe.kind == "image" else
                       _decode_video(data, probe, limits))
    if scope is not None:
        scope.decoded += cost
    return out


__all__ = ["IMAGE_FORMATS", "VIDEO_CONTAINERS", "MediaLimits", "PixelBudget", "Probe", "RemoteFetcher", "RequestScope",
           "current_scope", "decode_data_uri", "decode_image", "decode_video", "give_memory_back",
           "is_blocked_address", "load_request_media", "media_bytes", "media_sizes", "open_socket", "probe_image",
           "probe_video", "read_local_file", "request_cost", "request_scope", "system_resolver", "video_container"]
