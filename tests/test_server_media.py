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


def test_one_fetch_function():
    """The server reaches URLs only through RemoteFetcher (vLLM's SSRF bugs came back through side paths)."""
    import pathlib

    import onevision.server as pkg

    for path in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        text = path.read_text()
        for needle in ("urlopen(", "requests.get", "httpx.get", "fetch_url(", "load_image(url", "load_video(url"):
            assert needle not in text, f"{path.name} uses {needle}"
