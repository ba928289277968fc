"""The server on the engine: concurrent clients through the real openai client get transformers' answers, the
second turn of a conversation reuses the first turn's KV, /metrics parses with Prometheus' own parser, and every
request leaves one log line.

    pytest tests/test_server_engine.py -q
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _server_helpers import data_uri, image_bytes, reference_answer, shared_ckpt, start_server
from PIL import Image

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt, tmp_path_factory):
    return shared_ckpt(tiny_ckpt, tmp_path_factory)


def _messages(i: int):
    if i % 3 == 0:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image_bytes(
            ["cat.jpg", "coffee.jpg", "rocket.jpg"][i % 9 // 3]), "image/jpeg")}},
            {"type": "text", "text": f"Question {i}: what is it?"}]}]
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say something about {i}."}]


def _reference(ckpt, i: int, max_tokens: int) -> str:
    messages = _messages(i)
    images = []
    conv = []
    for m in messages:
        content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        parts = []
        for c in content:
            if c["type"] == "image_url":
                images.append(Image.open(io.BytesIO(image_bytes(["cat.jpg", "coffee.jpg", "rocket.jpg"][i % 9 // 3]))))
                parts.append({"type": "image"})
            else:
                parts.append(c)
        conv.append({"role": m["role"], "content": parts})
    return reference_answer(ckpt, conv, images=images, max_new_tokens=max_tokens)[0]


def test_concurrent_openai_clients_get_the_reference_answers(ckpt, caplog):
    openai = pytest.importorskip("openai")
    lengths = [6, 30, 12, 4, 24, 9, 16, 20]
    caplog.set_level(logging.INFO, logger="onevision.engine")
    with caplog.at_level(logging.INFO, logger="onevision.server"), \
            start_server(ckpt, max_num_batched_tokens=64, stats_interval=0.1) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)

        def ask(i):
            kwargs = dict(model="tiny", messages=_messages(i), max_tokens=lengths[i], temperature=0)
            if i % 2:
                chunks = client.chat.completions.create(stream=True, **kwargs)
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return client.chat.completions.create(**kwargs).choices[0].message.content

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
    for i, answer in enumerate(answers):
        assert answer == _reference(ckpt, i, lengths[i]), i
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert len(lines) == 8 and all(" ok: prompt " in line and "TTFT" in line for line in lines)
    assert any(r.getMessage().startswith("generation ") and "tok/s" in r.getMessage() for r in caplog.records)


def test_second_turn_reuses_the_first_and_metrics_parse(ckpt):
    from prometheus_client.parser import text_string_to_metric_families

    with start_server(ckpt) as srv:
        url = srv.url + "/v1/chat/completions"
        first = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(image_bytes("cat.jpg"), "image/jpeg")}},
            {"type": "text", "text": "What is this?"}]}]
        r1 = httpx.post(url, json={"model": "tiny", "messages": first, "max_tokens": 8, "temperature": 0}, timeout=60)
        answer = r1.json()["choices"][0]["message"]["content"]
        second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Why?"}]
        r2 = httpx.post(url, json={"model": "tiny", "messages": second, "max_tokens": 8, "temperature": 0},
                        timeout=60)
        assert r2.status_code == 200
        text = httpx.get(srv.url + "/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {s.name: s.value for f in families.values() for s in f.samples if not s.labels.get("le")}
    assert value["vllm:num_requests_running"] == 0 and value["vllm:num_requests_waiting"] == 0
    prompt1 = r1.json()["usage"]["prompt_tokens"]
    assert value["vllm:prefix_cache_hits_total"] >= prompt1 // 16 * 16 > 0  # turn 2 found turn 1's blocks
    assert value["vllm:prefix_cache_queries_total"] == prompt1 + r2.json()["usage"]["prompt_tokens"]
    assert value["vllm:generation_tokens_total"] == 16
    assert value["vllm:time_to_first_token_seconds_count"] == 2
    assert families["vllm:inter_token_latency_seconds"].type == "histogram"
    assert 0 <= value["vllm:kv_cache_usage_perc"] <= 1
    assert all(f.type != "unknown" and f.samples for f in families.values())  # every sample under its TYPE line
    assert families["vllm:generation_tokens"].type == "counter"
    assert sum(s.value for s in families["vllm:request_success"].samples) == 2


def test_metrics_text_escapes_label_values():
    from prometheus_client.parser import text_string_to_metric_families

    from onevision.engine.metrics import Metrics, prometheus_text

    name = 'C:\\models\\"tiny"\nv2'
    state = dict(running=1, waiting=2, kv_usage=0.5, preemptions=0, prefix_queries=0, prefix_hits=0,
                 vision_queries=0, vision_hits=0)
    families = {f.name: f for f in text_string_to_metric_families(prometheus_text(Metrics(), state, name))}
    sample = families["vllm:num_requests_waiting"].samples[0]
    assert sample.labels["model_name"] == name and sample.value == 2
