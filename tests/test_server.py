"""OpenAI-compatible server: answers equal the reference's greedy decode, streaming, usage, the openai client.

    pytest tests/test_server.py -q
"""

from __future__ import annotations

import json

import httpx
import pytest
from _server_helpers import MEDIA, data_uri, image_bytes, reference_answer, shared_ckpt, start_server, video_bytes
from PIL import Image

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt, tmp_path_factory):
    return shared_ckpt(tiny_ckpt, tmp_path_factory)


@pytest.fixture(scope="module")
def server(ckpt):
    with start_server(ckpt, api_key="sk-test") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0, timeout=60)


TEXT_CONV = [{"role": "system", "content": "Answer briefly."},
             {"role": "user", "content": "Name a colour."},
             {"role": "assistant", "content": "Blue."},
             {"role": "user", "content": [{"type": "text", "text": "And another one?"}]}]


def _as_reference(messages):
    """OpenAI messages -> the transformers conversation format (images as {"type": "image"})."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        out.append({"role": m["role"], "content": [{"type": "image"} if c["type"] == "image_url" else c
                                                   for c in content]})
    return out


def test_text_answer_equals_reference_greedy(client, ckpt):
    text, prompt_tokens, completion_tokens = reference_answer(ckpt, _as_reference(TEXT_CONV), max_new_tokens=12)
    out = client.chat.completions.create(model="tiny", messages=TEXT_CONV, max_tokens=12, temperature=0)
    assert out.choices[0].message.content == text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == completion_tokens == 12
    assert out.usage.total_tokens == prompt_tokens + completion_tokens


def test_image_answer_and_stream_equal_reference(client, ckpt):
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image_bytes("cat.jpg"), "image/jpeg")}},
        {"type": "text", "text": "What is in the picture?"}]}]
    image = Image.open(MEDIA / "cat.jpg").convert("RGB")
    text, prompt_tokens, _ = reference_answer(ckpt, _as_reference(messages), images=[image], max_new_tokens=10)
    out = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10, temperature=0)
    assert out.choices[0].message.content == text
    assert out.usage.prompt_tokens == prompt_tokens
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text
    assert finish == "length"
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, 10)


def test_two_images_and_a_video_equal_reference(client, ckpt):
    from onevision.processing.media import load_video

    video = video_bytes(frames=10)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image_bytes("cat.jpg"), "image/jpeg")}},
        {"type": "image_url", "image_url": {"url": data_uri(image_bytes("logo_rgba.png"))}},
        {"type": "video_url", "video_url": {"url": data_uri(video, "video/mp4")}},
        {"type": "text", "text": "Compare them."}]}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    # the reference gets the same frames (8 sampled by the server, as the Python API's num_frames=8 does)
    frames, _ = load_video(video, num_frames=8)
    images = [Image.open(MEDIA / name).convert("RGB") for name in ("cat.jpg", "logo_rgba.png")]
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "video"},
                                         {"type": "text", "text": "Compare them."}]}]
    text, prompt_tokens, _ = reference_answer(ckpt, conv, images=images, videos=[frames], max_new_tokens=8)
    assert out.choices[0].message.content == text
    assert out.usage.prompt_tokens == prompt_tokens


def test_models_health_and_auth(server):
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer sk-test"}).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["max_model_len"] == 4096
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_sampling_options(client, ckpt):
    """A seeded sampled answer is transformers' draw with the same seed and settings (and so the same each time)."""
    msgs = [{"role": "user", "content": "Tell me a story."}]
    settings = dict(temperature=0.9, top_p=0.9, top_k=20, min_p=0.01)
    want, _, count = reference_answer(ckpt, _as_reference(msgs), max_new_tokens=6, seed=7, do_sample=True, **settings)
    other, _, _ = reference_answer(ckpt, _as_reference(msgs), max_new_tokens=6, seed=8, do_sample=True, **settings)
    assert want != other  # the seed matters for these settings, so the comparison below can fail
    for _ in range(2):
        a = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0.9, top_p=0.9,
                                           seed=7, extra_body={"top_k": 20, "min_p": 0.01})
        assert a.choices[0].message.content == want
        assert a.usage.completion_tokens == count
    many = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=1.0, n=3, seed=1)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.usage.completion_tokens == 12
    greedy_text, _, _ = reference_answer(ckpt, _as_reference(msgs), max_new_tokens=4)
    greedy = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0, n=2)
    assert [c.message.content for c in greedy.choices] == [greedy_text, greedy_text]
    assert greedy.usage.completion_tokens == 8


def test_stop_strings_cut_the_answer(client, ckpt):
    """The answer stops where transformers' stop_strings stop it (same token count), without the stop string."""
    msgs = [{"role": "user", "content": "Name a colour."}]
    text, _, _ = reference_answer(ckpt, _as_reference(msgs), max_new_tokens=12)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    _, _, count = reference_answer(ckpt, _as_reference(msgs), max_new_tokens=12, stop_strings=[stop])
    assert count < 12  # the reference stopped early, so the token count below is a real check
    cut = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens == count
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=12, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == text[: text.find(stop)]


def test_min_tokens_and_streamed_n(server, ckpt):
    """min_tokens is transformers' min_new_tokens (EOS banned until then); each streamed choice is its answer."""
    messages = [{"role": "user", "content": "hi"}]
    want, _, count = reference_answer(ckpt, _as_reference(messages), max_new_tokens=5, min_new_tokens=5)
    assert count == 5
    body = {"model": "tiny", "messages": messages, "max_tokens": 5, "min_tokens": 5,
            "n": 2, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": "Bearer sk-test"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
    assert texts == {0: want, 1: want}
