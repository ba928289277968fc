"""Concurrency: 8 clients at once, queue overflow -> 503 + Retry-After (nobody hangs), and a client that
disconnects (streaming or not, running or queued) stops its generation and frees its slot.

    pytest tests/test_server_load.py -q
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _server_helpers import reference_answer, shared_ckpt, start_server

pytestmark = pytest.mark.timeout(180)


def _body(i: int = 0, tokens: int = 6, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": f"Question number {i}?"}],
            "max_tokens": tokens, "temperature": 0, **extra}


def _long(tokens: int = 400, **extra) -> dict:
    return _body(tokens=tokens, min_tokens=tokens, **extra)


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt, tmp_path_factory):
    return shared_ckpt(tiny_ckpt, tmp_path_factory)


def test_eight_concurrent_clients(ckpt):
    """8 clients at once (half streaming) each get transformers' greedy answer to their own question."""
    expected = [reference_answer(ckpt, [{"role": "user", "content": [{"type": "text", "text": msg["content"]}]}],
                                 max_new_tokens=6)[0] for msg in (_body(i)["messages"][0] for i in range(8))]
    assert len(set(expected)) == 8  # different questions, different answers: a mixed-up reply can't pass
    with start_server(ckpt, max_queue=16) as srv:
        url = srv.url + "/v1/chat/completions"

        def ask(i):
            return httpx.post(url, json=_body(i, stream=(i % 2 == 1)), timeout=120)
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(ask, range(8)))
        for i, r in enumerate(responses):
            assert r.status_code == 200
            if i % 2:
                text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                               for line in r.text.splitlines()
                               if line.startswith("data: {") and json.loads(line[6:])["choices"])
            else:
                text = r.json()["choices"][0]["message"]["content"]
            assert text == expected[i]
        assert _wait_for(lambda: srv.engine.running == 0 and srv.engine.waiting == 0)


def test_queue_overflow_gets_503_and_nobody_hangs(ckpt):
    with start_server(ckpt, max_queue=1, max_num_seqs=1) as srv:
        url = srv.url + "/v1/chat/completions"
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, url, json=_long(600), timeout=120)
            assert _wait_for(lambda: srv.engine.running == 1)
            second = pool.submit(httpx.post, url, json=_long(20), timeout=120)
            assert _wait_for(lambda: srv.engine.waiting == 1)
            started = time.monotonic()
            overflow = httpx.post(url, json=_body(), timeout=30)
            assert time.monotonic() - started < 5  # refused at once, not queued
            assert overflow.status_code == 503
            assert int(overflow.headers["retry-after"]) >= 1
            error = overflow.json()["error"]
            assert (error["type"], error["code"]) == ("server_overloaded", "queue_full")
            stream = httpx.post(url, json=_body(stream=True), timeout=30)
            assert stream.status_code == 503 and stream.headers["content-type"].startswith("application/json")
            assert first.result(timeout=120).status_code == 200
            assert second.result(timeout=120).status_code == 200
        assert _wait_for(lambda: srv.engine.running == 0 and srv.engine.waiting == 0)
        assert httpx.post(url, json=_body(), timeout=60).status_code == 200


def test_waiting_counts_requests_when_one_has_n_rows(ckpt):
    """A request with n = 3 runs as three rows but is one request: the one queued behind it is counted waiting."""
    with start_server(ckpt, max_queue=1, max_num_seqs=3) as srv:
        url = srv.url + "/v1/chat/completions"
        body = _long(3000, n=3, temperature=1.0, seed=0, stream=True)
        with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=60) as client, \
                client.stream("POST", url, json=body) as r:
            assert r.status_code == 200 and _wait_for(lambda: srv.engine.running == 3)
            second = pool.submit(httpx.post, url, json=_body(), timeout=120)
            assert _wait_for(lambda: srv.engine.running == 3 and srv.engine.waiting == 1)
            # leaving the block disconnects the stream: the second request runs
        assert second.result(timeout=120).status_code == 200
        assert _wait_for(lambda: srv.engine.running == 0 and srv.engine.waiting == 0)


def test_disconnect_mid_stream_frees_the_slot(ckpt):
    with start_server(ckpt, max_queue=0, max_num_seqs=1) as srv:
        url = srv.url + "/v1/chat/completions"
        cancelled = srv.engine.cancelled
        with httpx.Client(timeout=60) as client, client.stream("POST", url, json=_long(3000, stream=True)) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                if seen >= 4:
                    break
            # leaving the block closes the connection mid-stream
        assert _wait_for(lambda: srv.engine.running == 0 and srv.engine.waiting == 0, 15)
        assert srv.engine.cancelled == cancelled + 1
        assert httpx.post(url, json=_body(), timeout=60).status_code == 200  # the one slot is free again


def test_disconnect_while_waiting_for_a_full_answer(ckpt):
    with start_server(ckpt, max_queue=1, max_num_seqs=1) as srv:
        url = srv.url + "/v1/chat/completions"
        cancelled = srv.engine.cancelled
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=_long(3000), timeout=httpx.Timeout(60, read=1.0))
        assert _wait_for(lambda: srv.engine.running == 0 and srv.engine.waiting == 0, 15)
        assert srv.engine.cancelled == cancelled + 1

        # a queued request whose client leaves frees its place at once, while the first one keeps running
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(httpx.post, url, json=_long(600), timeout=120)
            assert _wait_for(lambda: srv.engine.running == 1)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url, json=_long(10), timeout=httpx.Timeout(60, read=0.5))
            assert _wait_for(lambda: srv.engine.waiting == 0, 10)
            assert srv.engine.running == 1
            assert running.result(timeout=120).status_code == 200


def test_event_loop_stays_responsive_during_generation(ckpt):
    with start_server(ckpt, max_queue=4) as srv:
        url = srv.url + "/v1/chat/completions"
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(httpx.post, url, json=_long(600), timeout=120)
            assert _wait_for(lambda: srv.engine.running == 1)
            for _ in range(5):
                started = time.monotonic()
                assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
                assert time.monotonic() - started < 1.0
            assert job.result(timeout=120).status_code == 200
        assert threading.active_count() < 200


def test_internal_errors_carry_only_a_request_id(ckpt, monkeypatch):
    import onevision.engine.runner as runner_module
    import onevision.server.chat as chat_module

    def broken_step(*args, **kwargs):
        raise RuntimeError("secret detail /srv/internal/path")

    with start_server(ckpt) as srv:
        url = srv.url + "/v1/chat/completions"
        monkeypatch.setattr(runner_module.ModelRunner, "execute", broken_step)
        r = httpx.post(url, json=_body(), timeout=60)
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["type"] == "server_error" and "secret" not in r.text
        assert r.headers["x-request-id"] in error["message"]
        with httpx.stream("POST", url, json=_body(stream=True), timeout=60) as s:  # mid-stream: an error frame
            lines = [line for line in s.iter_lines() if line]
        assert json.loads(lines[-2][6:])["error"]["type"] == "server_error" and lines[-1] == "data: [DONE]"
        assert "secret" not in "".join(lines)
        monkeypatch.undo()

        def broken_prepare(*args, **kwargs):
            raise KeyError("secret detail")
        monkeypatch.setattr(chat_module, "prepare", broken_prepare)
        r = httpx.post(url, json=_body(), timeout=60)
        assert r.status_code == 500 and "secret" not in r.text
        assert r.json()["error"]["message"] == f"internal error (request_id={r.headers['x-request-id']})"
        monkeypatch.undo()
        assert _wait_for(lambda: srv.engine.running == 0 and srv.engine.waiting == 0)
        assert httpx.post(url, json=_body(), timeout=60).status_code == 200  # still serving
