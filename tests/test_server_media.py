"""Server-side media fetching: address classification, SSRF through DNS and redirects (a stubbed resolver and a
real HTTP server on 127.0.0.1; nothing leaves the machine), data URIs and local-file rules.

    pytest tests/test_server_media.py -q
"""

from __future__ import annotations

import http.server
import socket
import threading

import pytest
from _server_helpers import data_uri, image_bytes

from onevision.server.errors import InvalidRequest
from onevision.server.media import (
    MediaLimits,
    RemoteFetcher,
    decode_data_uri,
    decode_image,
    is_blocked_address,
    media_bytes,
    open_socket,
)

pytestmark = pytest.mark.timeout(60)
PUBLIC = "93.184.216.34"  # a public address: the stub opener routes it to the local test server instead


@pytest.mark.parametrize("address", ["127.0.0.1", "127.1.2.3", "10.1.2.3", "172.16.0.1", "192.168.1.1",
                                     "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255",
                                     "::1", "::", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
                                     "2002:7f00:1::", "64:ff9b::a9fe:a9fe", "fd00:ec2::254", "not-an-ip"])
def test_blocked_addresses(address):
    assert is_blocked_address(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses(address):
    assert not is_blocked_address(address)


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):
        status, headers, body = self.routes.get(self.path, (404, {}, b"missing"))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def local_http():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    _Handler.routes = {
        "/cat.jpg": (200, {"Content-Type": "image/jpeg"}, image_bytes("cat.jpg")),
        "/to-loopback": (302, {"Location": f"http://127.0.0.1:{port}/cat.jpg"}, b""),
        "/to-metadata-name": (301, {"Location": "http://metadata.internal/latest"}, b""),
        "/to-public": (307, {"Location": "/cat.jpg"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/big": (200, {}, b"x" * 5000),
    }
    yield port
    server.shutdown()
    server.server_close()


def _fetcher(port: int, dns: dict[str, str]) -> RemoteFetcher:
    def resolver(host, _port):
        if host in dns:
            return [dns[host]]
        return [info[4][0] for info in socket.getaddrinfo(host, _port)]  # numeric hosts only in these tests

    def opener(address, _port, timeout):
        assert address == PUBLIC, f"connected to {address}"  # only validated public addresses are dialled
        return open_socket("127.0.0.1", port, timeout)
    return RemoteFetcher(resolver=resolver, opener=opener)


def test_public_host_is_fetched(local_http):
    fetcher = _fetcher(local_http, {"images.test": PUBLIC})
    assert fetcher.fetch(f"http://images.test:{local_http}/cat.jpg", 10**6, 5) == image_bytes("cat.jpg")
    assert fetcher.fetch(f"http://images.test:{local_http}/to-public", 10**6, 5) == image_bytes("cat.jpg")


@pytest.mark.parametrize("path,code", [("/to-loopback", "blocked_media_url"),
                                       ("/to-metadata-name", "blocked_media_url"), ("/loop", "media_fetch_failed"),
                                       ("/nothing", "media_fetch_failed"), ("/big", "media_too_large")])
def test_redirects_and_failures(local_http, path, code):
    fetcher = _fetcher(local_http, {"images.test": PUBLIC, "metadata.internal": "169.254.169.254"})
    with pytest.raises(InvalidRequest) as info:
        fetcher.fetch(f"http://images.test:{local_http}{path}", 1000, 5)
    assert info.value.code == code


@pytest.mark.parametrize("host,address", [("evil.test", "10.0.0.5"), ("rebind.test", "127.0.0.1"),
                                          ("meta.test", "169.254.169.254"), ("v6.test", "::ffff:10.0.0.1")])
def test_dns_names_resolving_to_blocked_addresses(local_http, host, address):
    fetcher = _fetcher(local_http, {host: address})
    with pytest.raises(InvalidRequest) as info:
        fetcher.fetch(f"http://{host}/x.png", 1000, 5)
    assert info.value.code == "blocked_media_url"


def test_any_blocked_address_in_the_answer_blocks():
    fetcher = RemoteFetcher(resolver=lambda h, p: [PUBLIC, "127.0.0.1"], opener=None)
    with pytest.raises(InvalidRequest):
        fetcher.check_url("http://mixed.test/")


def test_remote_fetch_is_off_by_default(local_http):
    with pytest.raises(InvalidRequest) as info:
        media_bytes(f"http://127.0.0.1:{local_http}/cat.jpg", kind="image", limits=MediaLimits(),
                    fetcher=RemoteFetcher())
    assert info.value.code == "remote_media_disabled"


def test_data_uris():
    assert decode_data_uri(data_uri(b"abc"), 10) == b"abc"
    for uri, code in (("data:image/png;base64,", "invalid_data_uri"), ("data:image/png;base64,a", "invalid_base64"),
                      ("data:image/png;base64,@@@@", "invalid_base64"), ("data:nocomma", "invalid_data_uri"),
                      (data_uri(b"x" * 100), "media_too_large")):
        with pytest.raises(InvalidRequest) as info:
            decode_data_uri(uri, 50)
        assert info.value.code == code, uri


def test_decode_image_limits():
    image = decode_image(image_bytes("cat.jpg"), MediaLimits())
    assert image.mode == "RGB"
    with pytest.raises(InvalidRequest) as info:
        decode_image(image_bytes("cat.jpg"), MediaLimits(max_image_pixels=100))
    assert info.value.code == "image_too_large"
    with pytest.raises(InvalidRequest) as info:
        decode_image(b"GIF89a" + b"\0" * 20, MediaLimits())
    assert info.value.code == "invalid_image"


class _Trap(http.server.ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that serves a real image and counts every TCP connection it accepts."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.connections = 0

    def verify_request(self, request, client_address) -> bool:
        self.connections += 1
        return True


@pytest.fixture()
def trap():
    server = _Trap()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _ask(srv, url: str, kind: str = "image_url"):
    import httpx

    body = {"model": "tiny", "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": kind, kind: {"url": url}}, {"type": "text", "text": "What is it?"}]}]}
    return httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt, tmp_path_factory):
    from _server_helpers import shared_ckpt

    return shared_ckpt(tiny_ckpt, tmp_path_factory)


def test_no_request_reaches_a_loopback_server(ckpt, trap, local_http):
    """Through the HTTP API of a server started with remote media on: URLs naming a live HTTP server on 127.0.0.1
    (as an image or a video, by address, name or numeric alias) and redirects to it are refused, and the
    server never gets a connection (a fetch path that skips the address check would reach it)."""
    import httpx
    from _server_helpers import start_server

    port = trap.server_address[1]
    assert httpx.get(f"http://127.0.0.1:{port}/cat.jpg").content == image_bytes("cat.jpg")  # the trap works
    assert trap.connections == 1
    trap.connections = 0
    urls = [f"http://127.0.0.1:{port}/cat.jpg", f"http://localhost:{port}/cat.jpg", f"http://127.1:{port}/cat.jpg",
            f"http://2130706433:{port}/cat.jpg", f"http://0x7f000001:{port}/cat.jpg", f"http://0.0.0.0:{port}/cat.jpg",
            f"https://127.0.0.1:{port}/cat.jpg", f"http://[::ffff:127.0.0.1]:{port}/cat.jpg"]
    with start_server(ckpt, allow_remote=True) as srv:
        for url in urls:
            for kind in ("image_url", "video_url"):
                response = _ask(srv, url, kind)
                assert response.status_code == 400, (url, kind, response.text)
                assert response.json()["error"]["code"] in ("blocked_media_url", "media_fetch_failed"), url
    assert trap.connections == 0

    # redirects: "images.test" resolves to a public address that the opener routes to a second local server, which
    # answers with redirects to the trap; every other address is dialled for real.
    _Handler.routes.update({"/to-trap": (302, {"Location": f"http://127.0.0.1:{port}/cat.jpg"}, b""),
                            "/to-trap-name": (301, {"Location": f"http://localhost:{port}/cat.jpg"}, b""),
                            "/to-trap-later": (307, {"Location": "/to-trap"}, b"")})

    def resolver(host, _port):
        return [PUBLIC] if host == "images.test" else [i[4][0] for i in socket.getaddrinfo(host, _port)]

    def opener(address, _port, timeout):
        return open_socket("127.0.0.1", local_http, timeout) if address == PUBLIC else \
            open_socket(address, _port, timeout)

    fetcher = RemoteFetcher(resolver=resolver, opener=opener)
    with start_server(ckpt, allow_remote=True, fetcher=fetcher) as srv:
        ok = _ask(srv, f"http://images.test:{local_http}/to-public")  # redirect to a public place: answered
        assert ok.status_code == 200, ok.text
        for path in ("/to-trap", "/to-trap-name", "/to-trap-later"):
            response = _ask(srv, f"http://images.test:{local_http}{path}")
            assert response.status_code == 400 and response.json()["error"]["code"] == "blocked_media_url", path
    assert trap.connections == 0
