"""SSRF-safe remote media fetching for the server (the only place the server opens an outgoing connection).

The host is resolved, every address must be public (no loopback, private, link-local, CGNAT, multicast,
reserved, unspecified, metadata; IPv4-mapped/6to4/NAT64 IPv6 unwrapped), the connection goes to the validated
address (no second DNS lookup, so DNS rebinding can't swap it), and each redirect hop is checked again.

Bounded in time and in number: one wall-clock deadline covers connect, headers and body of every hop together
(a watchdog shuts the socket down when it passes, so a server trickling one byte at a time cannot stretch it),
and at most `max_concurrent` fetches run at once; one more is refused at once with a 503 instead of taking a
media thread that other requests need.
"""

from __future__ import annotations

import http.client
import ipaddress
import math
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable

from onevision.server.errors import InvalidRequest, Overloaded

_EXTRA_BLOCKED = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15", "169.254.0.0/16", "2002::/16", "64:ff9b::/96",
    "64:ff9b:1::/48", "fc00::/7", "fe80::/10")]


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


class _Watchdog:
    """Shuts down the sockets of one fetch when its deadline passes, wherever the fetch is blocked."""

    def __init__(self, deadline: float):
        self.deadline, self.fired = deadline, False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            if self.fired:
                _shutdown(sock)
        return sock

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self._sockets:
                _shutdown(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float, opener: Callable, watchdog: _Watchdog):
        super().__init__(host, port, timeout=timeout)
        self._address, self._opener, self._watchdog = address, opener, watchdog

    def connect(self) -> None:
        self.sock = self._watchdog.watch(self._opener(self._address, self.port, self.timeout))


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float, opener: Callable, watchdog: _Watchdog):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address, self._opener, self._watchdog = address, opener, watchdog

    def connect(self) -> None:
        sock = self._watchdog.watch(self._opener(self._address, self.port, self.timeout))
        self.sock = self._watchdog.watch(self._context.wrap_socket(sock, server_hostname=self.host))


def _timed_out() -> InvalidRequest:
    return InvalidRequest("fetching the media URL timed out", code="media_fetch_failed")


class RemoteFetcher:
    """GET a public http(s) URL with a byte cap, a wall-clock deadline, per-hop SSRF checks and a cap on
    concurrent fetches.

    `resolver(host, port) -> [addresses]` and `opener(address, port, timeout) -> socket` are injectable so tests
    can stub DNS and route a "public" address to a local test server without leaving the machine."""

    def __init__(self, resolver: Callable[[str, int], list[str]] = system_resolver,
                 opener: Callable[[str, int, float], socket.socket] = open_socket, max_redirects: int = 3,
                 max_concurrent: int = 4, slot_wait: float = 0.0):
        self.resolver, self.opener, self.max_redirects = resolver, opener, max_redirects
        self.max_concurrent = max_concurrent
        self.slot_wait = slot_wait  # seconds a fetch waits for a free slot (0: refused at once; inf: waits)
        self._slots = threading.BoundedSemaphore(max_concurrent)

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
        """The body at `url`; `timeout` seconds of wall-clock time for everything (all hops, DNS aside)."""
        if not self._slots.acquire(timeout=None if math.isinf(self.slot_wait) else max(0.0, self.slot_wait)):
            raise Overloaded(f"{self.max_concurrent} remote media fetches are already running (the server's "
                             "limit); retry shortly or send the media as a base64 data URI", code="too_many_fetches")
        watchdog = _Watchdog(time.monotonic() + timeout)
        try:
            return self._fetch(url, max_bytes, watchdog)
        finally:
            watchdog.cancel()
            self._slots.release()

    def _fetch(self, url: str, max_bytes: int, watchdog: _Watchdog) -> bytes:
        for _ in range(self.max_redirects + 1):
            parts, address, port = self.check_url(url)
            remaining = watchdog.deadline - time.monotonic()
            if remaining <= 0:
                raise _timed_out()
            cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
            conn = cls(parts.hostname, port, address, remaining, self.opener, watchdog)
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
                    chunk = response.read1(min(65536, max_bytes + 1 - len(data)))
                    if not chunk:
                        break
                    data += chunk
                if watchdog.fired:
                    raise _timed_out()
                if len(data) > max_bytes:
                    raise InvalidRequest(f"the media at the URL is larger than {max_bytes} bytes",
                                         code="media_too_large")
                return bytes(data)
            except InvalidRequest:
                raise
            except (OSError, http.client.HTTPException, ValueError):
                if watchdog.fired:
                    raise _timed_out() from None
                raise InvalidRequest("fetching the media URL failed (connection error or timeout)",
                                     code="media_fetch_failed") from None
            finally:
                conn.close()
        raise InvalidRequest(f"the media URL redirected more than {self.max_redirects} times",
                             code="media_fetch_failed")


__all__ = ["RemoteFetcher", "is_blocked_address", "open_socket", "system_resolver"]
