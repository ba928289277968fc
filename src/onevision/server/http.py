"""HTTP-level limits under the API: what a client can hold open and how long, which Host names are answered,
and how much JSON a body may carry. The request-level limits live in app.py's GuardMiddleware, which uses these.

    connections   at most `max_connections` open at once (one more gets a 503 and is closed at once);
                  a connection must deliver a complete request head within `header_timeout` seconds of
                  connecting or of its previous answer (idle keep-alive and slow-header sockets are closed)
    body          read within `body_timeout` seconds (408 otherwise), at most `max_body_bytes` (413)
    JSON          at most `max_json_elements` values, counted off the event loop before FastAPI parses it (413)
    Host          must be one of `allowed_hosts` (DNS rebinding: a browser page on evil.example whose name
                  resolves to 127.0.0.1 would otherwise reach a key-less local server)
"""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Iterable

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


# --------------------------------------------------------------------------- Host header
def default_allowed_hosts(bind_host: str, api_key: str | None) -> list[str]:
    """Loopback names and the bind address; any name when a key protects the server."""
    if api_key:
        return ["*"]
    hosts = list(LOOPBACK_HOSTS)
    if bind_host not in WILDCARD_BINDS and bind_host.lower() not in hosts:
        hosts.append(bind_host.lower().strip("[]"))
    return hosts


def host_name(header: str) -> str:
    """'Example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return header.rstrip(".")


def host_allowed(header: str | None, allowed: Iterable[str]) -> bool:
    allowed = list(allowed)
    if header is None or "*" in allowed:  # HTTP/1.0 without Host: no browser sends that
        return True
    return host_name(header) in {a.lower().strip("[]") for a in allowed}


# --------------------------------------------------------------------------- JSON size
def count_json_elements(body: bytes, limit: int) -> int:
    """Upper bound of the values in a JSON text (separators and openers outside strings), counting stops once
    over `limit`. C-speed scans between strings; the Python loop runs once per string."""
    count, pos, size = 0, 0, len(body)
    while pos < size:
        quote = body.find(b'"', pos)
        stop = size if quote < 0 else quote
        count += body.count(b",", pos, stop) + body.count(b"[", pos, stop) + body.count(b"{", pos, stop)
        if count > limit or quote < 0:
            return count
        end = quote + 1
        while True:  # the closing quote: one not preceded by an odd number of backslashes
            end = body.find(b'"', end)
            if end < 0:
                return count  # unterminated string: the parser reports it
            slashes = 0
            while body[end - 1 - slashes] == 0x5C:
                slashes += 1
            if slashes % 2 == 0:
                break
            end += 1
        pos = end + 1
    return count


# --------------------------------------------------------------------------- connections
def guarded_protocol(base: type, max_connections: int, header_timeout: float) -> type:
    """A uvicorn HTTP protocol class (h11 or httptools) with a cap on open connections and a deadline for each
    request head; both counted per server (each call makes a new class with its own counter)."""
    error = json.dumps({"error": {"message": f"the server has {max_connections} connections open (its limit, "
                                             "--max-connections); retry shortly", "type": "server_overloaded",
                                  "param": None, "code": "too_many_connections"}}).encode()
    refusal = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
               b"connection: close\r\ncontent-length: " + str(len(error)).encode() + b"\r\n\r\n" + error)
    counter = {"open": 0}

    class Guarded(base):
        _counted = False
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if counter["open"] >= max_connections:
                transport.write(refusal)
                transport.close()
                return
            counter["open"] += 1
            self._counted = True
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._counted:
                counter["open"] -= 1
                self._counted = False
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and self._idle():
                self._arm()
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(header_timeout, self._head_deadline)

        def _head_deadline(self) -> None:
            self._head_timer = None
            if self._idle() and not self.transport.is_closing():
                self.transport.close()

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded


def http_protocol(http: str = "auto") -> type:
    """The protocol class uvicorn would pick for `http` ('auto': httptools when installed, else h11)."""
    if http in ("auto", "httptools"):
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

            return HttpToolsProtocol
        except ImportError:
            if http == "httptools":
                raise
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket bound to host:port (SO_REUSEADDR, as uvicorn binds), or OSError with a one-line
    message: called before the model loads, so a busy port is reported at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise OSError(f"cannot bind to {host!r}: not an address or a name this machine resolves") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host in WILDCARD_BINDS else 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        busy = e.errno == errno.EADDRINUSE
        reason = "is already in use (another server?)" if busy else f"can't be bound ({e.strerror})"
        raise OSError(f"port {port} on {host} {reason}; stop the other process or choose another --port") from None
    sock.set_inheritable(True)
    return sock


__all__ = ["LOOPBACK_HOSTS", "bind_socket", "count_json_elements", "default_allowed_hosts", "guarded_protocol",
           "host_allowed", "host_name", "http_protocol"]
