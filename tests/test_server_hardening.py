"""Issue 10 (server hardening), on a real loopback server: every malformed media URL form is a 400 in OpenAI's
error shape (on main these were 500s: ValueError from urlsplit / ipaddress / a NUL byte in a path).

    pytest tests/test_server_hardening.py -q
"""

from __future__ import annotations

import pytest
from _server_helpers import shared_ckpt, start_server
from test_server_bad_input import P0, _base, _check, _img, _post, _user

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    with start_server(shared_ckpt(tiny_ckpt, tmp_path_factory), allow_remote=True,
                      allowed_local_path=str(allowed)) as srv:
        srv.allowed = allowed
        yield srv


@pytest.mark.parametrize("url", ["file://{d}/a%00.png", "http://[::1/x", "https://[zz]/x", "file://[::1/{d}/a.png",
                                 "http://example.com:99999/x"])
def test_malformed_urls_are_400(server, url):
    response = _post(server, _base(messages=_user(_img(url.format(d=server.allowed)))))
    _check(response, 400, "invalid_request_error", P0, "invalid_media_url")
    assert _post(server, _base()).status_code == 200  # and the server keeps serving
