"""Every bad input gets the right 4xx in OpenAI's error shape, decided before any byte of an answer, and the
server keeps serving. The table below is the contract (also quoted in the README / closing note).

    pytest tests/test_server_bad_input.py -q
"""

from __future__ import annotations

import json
import struct
import zlib

import httpx
import pytest
from _server_helpers import data_uri, image_bytes, shared_ckpt, start_server, video_bytes

pytestmark = pytest.mark.timeout(120)
KEY = "sk-table"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb needs no more to be refused)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    allowed, sibling, outside = root / "allowed", root / "allowed_evil", root / "outside"
    for d in (allowed, sibling, outside):
        d.mkdir()
    (allowed / "cat.jpg").write_bytes(image_bytes("cat.jpg"))
    (sibling / "cat.jpg").write_bytes(image_bytes("cat.jpg"))
    (outside / "secret.png").write_bytes(image_bytes("cat.jpg"))
    (allowed / "link.png").symlink_to(outside / "secret.png")
    return {"allowed": allowed, "sibling": sibling, "outside": outside}


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory, folders):
    ckpt = shared_ckpt(tiny_ckpt, tmp_path_factory)
    with start_server(ckpt, api_key=KEY, allow_remote=True, allowed_local_path=str(folders["allowed"]),
                      max_images=2, max_videos=1, max_body_bytes=1_000_000) as srv:
        yield srv


@pytest.fixture(scope="module")
def plain_server(tiny_ckpt, tmp_path_factory):
    """Defaults: no remote media, no local files, no API key."""
    with start_server(shared_ckpt(tiny_ckpt, tmp_path_factory)) as srv:
        yield srv


def _user(*parts) -> list:
    return [{"role": "user", "content": list(parts) + [{"type": "text", "text": "Describe."}]}]


def _img(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _base(**changes) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    body.update(changes)
    return body


GOOD_IMAGE = data_uri(image_bytes("cat.jpg"), "image/jpeg")
TRUNCATED = image_bytes("cat.jpg")[:600]
P0 = "messages[0].content[0].image_url"

# (id, body (dict, or raw bytes), status, type, param, code)
BAD = [
    ("malformed json", b'{"model": "tiny", "messages": [', 400, "invalid_request_error", None, "invalid_json"),
    ("body not an object", b"[1, 2]", 400, "invalid_request_error", None, "invalid_body"),
    ("empty body", b"", 400, "invalid_request_error", None, "invalid_body"),
    ("deeply nested json", b"[" * 100000 + b"]" * 100000, 400, "invalid_request_error", None, "invalid_json"),
    ("max_tokens is a string", _base(max_tokens="8"), 400, "invalid_request_error", "max_tokens", "invalid_value"),
    ("messages is a string", _base(messages="hi"), 400, "invalid_request_error", "messages", "invalid_value"),
    ("unknown role", _base(messages=[{"role": "robot", "content": "hi"}]), 400, "invalid_request_error",
     "messages[0].role", "invalid_value"),
    ("stream is a string", _base(stream="yes"), 400, "invalid_request_error", "stream", "invalid_value"),
    ("temperature NaN", b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"temperature":NaN}', 400,
     "invalid_request_error", "temperature", "invalid_value"),
    ("temperature Infinity", b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"temperature":Infinity}',
     400, "invalid_request_error", "temperature", "invalid_value"),
    ("temperature > 2", _base(temperature=3.0), 400, "invalid_request_error", "temperature", "invalid_value"),
    ("temperature < 0", _base(temperature=-0.5), 400, "invalid_request_error", "temperature", "invalid_value"),
    ("top_p 0", _base(top_p=0), 400, "invalid_request_error", "top_p", "invalid_value"),
    ("top_p > 1", _base(top_p=1.5), 400, "invalid_request_error", "top_p", "invalid_value"),
    ("top_k < -1", _base(top_k=-5), 400, "invalid_request_error", "top_k", "invalid_value"),
    ("max_tokens 0", _base(max_tokens=0), 400, "invalid_request_error", "max_tokens", "invalid_value"),
    ("max_tokens negative", _base(max_tokens=-46771), 400, "invalid_request_error", "max_tokens", "invalid_value"),
    ("n 0", _base(n=0), 400, "invalid_request_error", "n", "invalid_value"),
    ("n over the server limit", _base(n=9, temperature=1), 400, "invalid_request_error", "n", "invalid_value"),
    ("n huge", _base(n=10**6), 400, "invalid_request_error", "n", "invalid_value"),
    ("seed too large", _base(seed=2**70), 400, "invalid_request_error", "seed", "invalid_value"),
    ("too many stop strings", _base(stop=["a", "b", "c", "d", "e"]), 400, "invalid_request_error", "stop",
     "invalid_value"),
    ("presence_penalty", _base(presence_penalty=0.5), 400, "invalid_request_error", "presence_penalty",
     "unsupported_parameter"),
    ("frequency_penalty out of range", _base(frequency_penalty=5), 400, "invalid_request_error",
     "frequency_penalty", "invalid_value"),
    ("logprobs", _base(logprobs=True), 400, "invalid_request_error", "logprobs", "unsupported_parameter"),
    ("tools", _base(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "invalid_request_error", "tools",
     "unsupported_parameter"),
    ("json_schema response_format", _base(response_format={"type": "json_schema"}), 400, "invalid_request_error",
     "response_format", "unsupported_parameter"),
    ("max_tokens != max_completion_tokens", _base(max_tokens=3, max_completion_tokens=4), 400,
     "invalid_request_error", "max_tokens", "invalid_value"),
    ("min_tokens > max_tokens", _base(min_tokens=5), 400, "invalid_request_error", "min_tokens", "invalid_value"),
    ("empty messages", _base(messages=[]), 400, "invalid_request_error", "messages", "invalid_value"),
    ("only empty content", _base(messages=[{"role": "user", "content": ""}, {"role": "assistant", "content": None}]),
     400, "invalid_request_error", "messages", "empty_messages"),
    ("unknown content type", _base(messages=[{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]), 400,
     "invalid_request_error", "messages[0].content[0].type", "invalid_value"),
    ("image part without image_url", _base(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "invalid_request_error", "messages[0].content[0]", "invalid_value"),
    ("image in an assistant message", _base(messages=[{"role": "assistant", "content": [_img(GOOD_IMAGE)]}]), 400,
     "invalid_request_error", "messages[0].content[0]", "invalid_value"),
    ("unknown model", _base(model="gpt-4o"), 404, "invalid_request_error", "model", "model_not_found"),
    ("too many images", _base(messages=_user(_img(GOOD_IMAGE), _img(GOOD_IMAGE), _img(GOOD_IMAGE))), 400,
     "invalid_request_error", "messages[0].content[2].image_url", "too_many_images"),
    ("too many videos", _base(messages=_user(*[{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
                                               ] * 2)), 400, "invalid_request_error",
     "messages[0].content[1].video_url", "too_many_videos"),
    ("non-image bytes", _base(messages=_user(_img(data_uri(b"hello, this is not an image at all")))), 400,
     "invalid_request_error", P0, "invalid_image"),
    ("truncated jpeg", _base(messages=_user(_img(data_uri(TRUNCATED, "image/jpeg")))), 400, "invalid_request_error",
     P0, "invalid_image"),
    ("html served as image", _base(messages=_user(_img(data_uri(b"<html><body>404</body></html>", "image/png")))),
     400, "invalid_request_error", P0, "invalid_image"),
    ("bad base64", _base(messages=_user(_img("data:image/png;base64,!!!notbase64***"))), 400,
     "invalid_request_error", P0, "invalid_base64"),
    ("data uri without base64", _base(messages=_user(_img("data:image/png,rawdata"))), 400, "invalid_request_error",
     P0, "invalid_data_uri"),
    ("decompression bomb", _base(messages=_user(_img(data_uri(_png_header_only(30000, 30000))))), 400,
     "invalid_request_error", P0, "image_too_large"),
    ("undecodable video", _base(messages=_user({"type": "video_url", "video_url": {
        "url": data_uri(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200, "video/mp4")}})), 400, "invalid_request_error",
     "messages[0].content[0].video_url", "invalid_video"),
    ("<image> typed in text", _base(messages=[{"role": "user", "content": "look: <image>"}]), 400,
     "invalid_request_error", "messages[0].content", "invalid_placeholder"),
    ("<video> typed in a text part", _base(messages=_user({"type": "text", "text": "<video> here"})), 400,
     "invalid_request_error", "messages[0].content[0].text", "invalid_placeholder"),
    ("prompt + max_tokens over the context", _base(max_tokens=5000), 400, "invalid_request_error", "messages",
     "context_length_exceeded"),
    ("ssrf loopback", _base(messages=_user(_img("http://127.0.0.1:1/x.png"))), 400, "invalid_request_error", P0,
     "blocked_media_url"),
    ("ssrf localhost name", _base(messages=_user(_img("http://localhost:1/x.png"))), 400, "invalid_request_error", P0,
     "blocked_media_url"),
    ("ssrf metadata", _base(messages=_user(_img("http://169.254.169.254/latest/meta-data/"))), 400,
     "invalid_request_error", P0, "blocked_media_url"),
    ("ssrf ipv4-mapped ipv6 metadata", _base(messages=_user(_img("http://[::ffff:169.254.169.254]/"))), 400,
     "invalid_request_error", P0, "blocked_media_url"),
    ("ssrf ipv6 loopback", _base(messages=_user(_img("http://[::1]:1/"))), 400, "invalid_request_error", P0,
     "blocked_media_url"),
    ("ssrf private", _base(messages=_user(_img("https://10.0.0.1/a.png"))), 400, "invalid_request_error", P0,
     "blocked_media_url"),
    ("ssrf decimal ip", _base(messages=_user(_img("http://2130706433/"))), 400, "invalid_request_error", P0,
     "blocked_media_url"),
    ("ssrf unspecified", _base(messages=_user(_img("http://0.0.0.0:1/"))), 400, "invalid_request_error", P0,
     "blocked_media_url"),
    ("unsupported scheme", _base(messages=_user(_img("ftp://example.com/a.png"))), 400, "invalid_request_error", P0,
     "invalid_media_url"),
    ("bare path", _base(messages=_user(_img("/etc/passwd"))), 400, "invalid_request_error", P0, "invalid_media_url"),
    ("file outside the allowed folder", _base(messages=_user(_img("file:///etc/passwd"))), 400,
     "invalid_request_error", P0, "local_media_forbidden"),
    ("relative file url", _base(messages=_user(_img("file://../outside/secret.png"))), 400, "invalid_request_error",
     P0, "invalid_file_url"),
    ("lone surrogate in text", _base(messages=[{"role": "user", "content": "\ud800x"}]), 400,
     "invalid_request_error", "messages", "invalid_value"),
    ("lone surrogate in model", _base(model="\ud800"), 404, "invalid_request_error", "model", "model_not_found"),
]


def _local_cases(folders) -> list:
    a = folders["allowed"]
    return [
        ("traversal out of the allowed folder", f"file://{a}/../outside/secret.png", "local_media_forbidden"),
        ("symlink out of the allowed folder", f"file://{a}/link.png", "local_media_forbidden"),
        ("sibling folder sharing the prefix", f"file://{folders['sibling']}/cat.jpg", "local_media_forbidden"),
        ("the allowed folder itself", f"file://{a}", "local_media_forbidden"),
        ("missing file", f"file://{a}/nope.png", "local_media_forbidden"),
    ]


def _post(server, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + "/v1/chat/completions", content=content, headers=headers, timeout=60)


def _check(response: httpx.Response, status: int, type_: str, param, code) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (type_, param, code), error
    message = error["message"]
    for leak in ("Traceback", "object at 0x", "Error(", "/tmp/", "site-packages", "PIL", "UnidentifiedImage"):
        assert leak not in message, message
    return error


@pytest.mark.parametrize("name,body,status,type_,param,code", BAD, ids=[case[0] for case in BAD])
def test_bad_input_table(server, name, body, status, type_, param, code):
    _check(_post(server, body), status, type_, param, code)


def test_local_file_rules(server, folders):
    for name, url, code in _local_cases(folders):
        error = _check(_post(server, _base(messages=_user(_img(url)))), 400, "invalid_request_error", P0, code)
        assert str(folders["outside"]) not in error["message"], name
    ok = _post(server, _base(messages=_user(_img(f"file://{folders['allowed']}/cat.jpg"))))
    assert ok.status_code == 200, ok.text


def test_context_error_carries_numbers(server):
    error = _post(server, _base(max_tokens=5000)).json()["error"]
    assert error["max_context"] == 4096 and error["max_tokens"] == 5000 and error["prompt_tokens"] > 0
    assert "4096" in error["message"] and "5000" in error["message"]


def test_body_too_large(server):
    big = _base(messages=_user(_img(data_uri(b"x" * 1_200_000))))
    _check(_post(server, big), 413, "invalid_request_error", None, "request_too_large")

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 65536):
            yield payload[i:i + 65536]
    response = httpx.post(server.url + "/v1/chat/completions", content=chunks(), timeout=60,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    _check(response, 413, "invalid_request_error", None, "request_too_large")


def test_api_key(server):
    _check(_post(server, _base(), key=None), 401, "authentication_error", None, "invalid_api_key")
    _check(_post(server, _base(), key="sk-wrong"), 401, "authentication_error", None, "invalid_api_key")
    _check(_post(server, _base(), key=KEY + "x"), 401, "authentication_error", None, "invalid_api_key")
    _check(_post(server, b"{not json", key=None), 401, "authentication_error", None, "invalid_api_key")  # key first
    _check(_post(server, b"x" * 2_000_000, key=None), 401, "authentication_error", None, "invalid_api_key")
    assert httpx.get(server.url + "/health").status_code == 200  # public


def test_unknown_route_and_method(server):
    r = httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json()


def test_stream_errors_come_before_the_stream(server):
    r = _post(server, _base(stream=True, messages=_user(_img("data:image/png;base64,!!!"))))
    _check(r, 400, "invalid_request_error", P0, "invalid_base64")


def test_defaults_refuse_remote_and_local_media(plain_server):
    for url, code in (("http://example.com/cat.png", "remote_media_disabled"),
                      ("file:///etc/hosts", "local_media_disabled")):
        _check(_post(plain_server, _base(messages=_user(_img(url))), key=None), 400, "invalid_request_error", P0, code)


@pytest.mark.parametrize("size,mode", [((1, 1), "RGB"), ((1, 300), "RGB"), ((300, 2), "L"), ((40, 40), "RGBA"),
                                       ((40, 40), "P"), ((40, 40), "I;16"), ((40, 40), "CMYK")])
def test_degenerate_but_valid_images_are_answered(server, size, mode):
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new(mode, size).save(buf, format="TIFF" if mode == "CMYK" else "PNG")
    r = _post(server, _base(messages=_user(_img(data_uri(buf.getvalue())))))
    assert r.status_code == 200, r.text


def test_huge_text_is_refused_before_tokenizing(server):
    """Text that cannot fit the context even at 64 characters a token is refused without tokenizing it."""
    import time

    start = time.monotonic()
    error = _check(_post(server, _base(messages=[{"role": "user", "content": "ab " * 300_000}])), 400,
                   "invalid_request_error", "messages", "context_length_exceeded")
    assert "characters" in error["message"] and time.monotonic() - start < 10


def test_tiny_temperature_is_greedy_not_an_overflow(server):
    """Like vLLM, 0 < temperature < 1e-5 decodes greedily (logits / 1e-40 would overflow to inf)."""
    tiny, zero = _post(server, _base(temperature=1e-40)), _post(server, _base(temperature=0))
    assert tiny.status_code == zero.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"] == zero.json()["choices"][0]["message"]


def test_server_still_up_after_the_table(server):
    ok = _post(server, _base(messages=_user(_img(GOOD_IMAGE), {"type": "video_url", "video_url": {
        "url": data_uri(video_bytes(6), "video/mp4")}})))
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["completion_tokens"] > 0 and body["choices"][0]["finish_reason"] in ("stop", "length")
    again = _post(server, _base())
    assert again.status_code == 200 and isinstance(again.json()["choices"][0]["message"]["content"], str)
