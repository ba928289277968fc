"""The server's one way to turn a client's media URL into an image or video frames, with limits everywhere.

    data:image/png;base64,...   always (size checked before decoding the base64)
    http(s)://...               only with --allow-remote-media; SSRF-safe (below)
    file:///abs/path            only under --allowed-local-media-path (symlinks resolved before the check)

SSRF: the host is resolved, every address must be public (no loopback, private, link-local, CGNAT, multicast,
reserved, unspecified, metadata; IPv4-mapped/6to4/NAT64 IPv6 unwrapped), the connection goes to the validated
address (no second DNS lookup, so DNS rebinding can't swap it), and each redirect hop is checked again.
Decoding reuses onevision.processing.media, after a header-only pixel check (decompression bombs are refused
before any pixel is decoded). Every error is an `InvalidRequest` with a message written here: library error
text (which can hold paths or addresses) never reaches the client.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import socket
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from onevision.server.errors import InvalidRequest

IMAGE_FORMATS = "png, jpeg, webp, gif, bmp, tiff"
_EXTRA_BLOCKED = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15", "169.254.0.0/16", "2002::/16", "64:ff9b::/96",
    "64:ff9b:1::/48", "fc00::/7", "fe80::/10")]


@dataclass
class MediaLimits:
    allow_remote: bool = False
    allowed_local_path: str | None = None
    max_image_bytes: int = 20 * 1024 * 1024
    max_video_bytes: int = 100 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    num_frames: int = 8
    max_frames: int = 64
    image_fetch_timeout: float = 5.0
    video_fetch_timeout: float = 30.0
    max_redirects: int = 3


# --------------------------------------------------------------------------- address checks
def is_blocked_address(address: str) -> bool:
    """True for every address a media fetch must not reach (anything not globally routable)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return is_blocked_address(str(ip.ipv4_mapped))
        if ip.sixtofour is not None and is_blocked_address(str(ip.sixtofour)):
            return True
    if (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified or not ip.is_global):
        return True
    return any(ip in net for net in _EXTRA_BLOCKED if net.version == ip.version)


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def open_socket(address: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((address, port), timeout=timeout)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float, opener: Callable):
        super().__init__(host, port, timeout=timeout)
        self._address, self._opener = address, opener

    def connect(self) -> None:
        self.sock = self._opener(self._address, self.port, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float, opener: Callable):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address, self._opener = address, opener

    def connect(self) -> None:
        sock = self._opener(self._address, self.port, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class RemoteFetcher:
    """GET a public http(s) URL with a byte cap, a deadline and per-hop SSRF checks.

    `resolver(host, port) -> [addresses]` and `opener(address, port, timeout) -> socket` are injectable so tests
    can stub DNS and route a "public" address to a local test server without leaving the machine."""

    def __init__(self, resolver: Callable[[str, int], list[str]] = system_resolver,
                 opener: Callable[[str, int, float], socket.socket] = open_socket, max_redirects: int = 3):
        self.resolver, self.opener, self.max_redirects = resolver, opener, max_redirects

    def check_url(self, url: str) -> tuple[urllib.parse.SplitResult, str, int]:
        """-> (parts, validated address, port), or InvalidRequest naming why the URL is refused."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise InvalidRequest("only http and https media URLs can be fetched")
        try:
            host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise InvalidRequest("malformed media URL", code="invalid_media_url") from None
        if not host:
            raise InvalidRequest("malformed media URL (no host)", code="invalid_media_url")
        try:
            addresses = self.resolver(host, port)
        except (OSError, UnicodeError, ValueError):
            raise InvalidRequest("media URL host could not be resolved", code="media_fetch_failed") from None
        if not addresses:
            raise InvalidRequest("media URL host could not be resolved", code="media_fetch_failed")
        if any(is_blocked_address(a) for a in addresses):
            raise InvalidRequest("media URL host resolves to a blocked address (loopback, private, link-local or "
                                 "metadata addresses can't be fetched)", code="blocked_media_url")
        return parts, addresses[0], port

    def fetch(self, url: str, max_bytes: int, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        for _ in range(self.max_redirects + 1):
            parts, address, port = self.check_url(url)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InvalidRequest("fetching the media URL timed out", code="media_fetch_failed")
            cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
            conn = cls(parts.hostname, port, address, remaining, self.opener)
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            try:
                conn.request("GET", target, headers={"User-Agent": "onevision-server", "Accept": "*/*"})
                response = conn.getresponse()
                if response.status in (301, 302, 303, 307, 308):
                    location = response.getheader("Location")
                    if not location:
                        raise InvalidRequest("media URL redirected without a Location", code="media_fetch_failed")
                    url = urllib.parse.urljoin(url, location)
                    continue
                if response.status != 200:
                    raise InvalidRequest(f"fetching the media URL failed: HTTP {response.status}",
                                         code="media_fetch_failed")
                length = response.getheader("Content-Length")
                if length and length.isdigit() and int(length) > max_bytes:
                    raise InvalidRequest(f"the media at the URL is larger than {max_bytes} bytes",
                                         code="media_too_large")
                data = bytearray()
                while len(data) <= max_bytes:
                    if time.monotonic() > deadline:
                        raise InvalidRequest("fetching the media URL timed out", code="media_fetch_failed")
                    chunk = response.read(min(65536, max_bytes + 1 - len(data)))
                    if not chunk:
                        break
                    data += chunk
                if len(data) > max_bytes:
                    raise InvalidRequest(f"the media at the URL is larger than {max_bytes} bytes",
                                         code="media_too_large")
                return bytes(data)
            except InvalidRequest:
                raise
            except (OSError, http.client.HTTPException, ValueError):
                raise InvalidRequest("fetching the media URL failed (connection error or timeout)",
                                     code="media_fetch_failed") from None
            finally:
                conn.close()
        raise InvalidRequest(f"the media URL redirected more than {self.max_redirects} times",
                             code="media_fetch_failed")


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


# --------------------------------------------------------------------------- decoding
def decode_image(data: bytes, limits: MediaLimits):
    """PIL RGB image, after checking the header's size against the pixel limit (nothing decoded before that)."""
    from PIL import Image

    from onevision.processing import ProcessingError
    from onevision.processing.media import load_image

    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError:  # PIL refuses > 2x its own limit already when reading the header
        raise InvalidRequest(f"the image has more pixels than the limit of {limits.max_image_pixels}",
                             code="image_too_large") from None
    except Exception:  # noqa: BLE001 - PIL raises many types for non-images; the text is never shown
        raise InvalidRequest(f"could not decode the image (supported: {IMAGE_FORMATS})", code="invalid_image") from None
    if width < 1 or height < 1:
        raise InvalidRequest("the image has no pixels", code="invalid_image")
    if width * height > limits.max_image_pixels:
        raise InvalidRequest(f"the image has {width}x{height} = {width * height} pixels; the limit is "
                             f"{limits.max_image_pixels}", code="image_too_large")
    try:
        return load_image(data, max_pixels=limits.max_image_pixels)
    except (ProcessingError, OSError, ValueError, SyntaxError, MemoryError):
        raise InvalidRequest(f"could not decode the image (corrupt or truncated; supported: {IMAGE_FORMATS})",
                             code="invalid_image") from None


def decode_video(data: bytes, limits: MediaLimits):
    """(frames uint8 (T, H, W, 3)): `num_frames` evenly spaced frames (all of them if the video is shorter)."""
    import av

    from onevision.processing import ProcessingError
    from onevision.processing.media import load_video

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise InvalidRequest("the video has no video stream", code="invalid_video")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            total = int(stream.frames)
            codec = stream.codec_context.name
    except InvalidRequest:
        raise
    except Exception:  # noqa: BLE001 - FFmpeg errors: text never shown
        raise InvalidRequest("could not decode the video (supported containers: mp4, webm, mkv, avi, mov)",
                             code="invalid_video") from None
    if width * height > limits.max_image_pixels:
        raise InvalidRequest(f"the video frames have {width}x{height} pixels; the limit is {limits.max_image_pixels}",
                             code="video_too_large")
    num_frames = limits.num_frames
    if 0 < total < num_frames:
        num_frames = total
    try:
        frames, _ = load_video(data, num_frames=num_frames)
    except ProcessingError as e:
        if "has only" in str(e):  # the container's frame count was wrong: retry with every frame it has
            try:
                frames, _ = load_video(data)
            except Exception:  # noqa: BLE001
                frames = None
            if frames is not None and 0 < len(frames) <= limits.max_frames:
                return frames
        raise InvalidRequest(f"could not decode the video (codec {codec!r}; corrupt, truncated or unsupported)",
                             code="invalid_video") from None
    except Exception:  # noqa: BLE001
        raise InvalidRequest(f"could not decode the video (codec {codec!r}; corrupt, truncated or unsupported)",
                             code="invalid_video") from None
    return frames


__all__ = ["MediaLimits", "RemoteFetcher", "decode_data_uri", "decode_image", "decode_video", "is_blocked_address",
           "media_bytes", "read_local_file"]
