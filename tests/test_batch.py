"""Offline batch jobs (`onevision batch`, onevision.batch.run): every answer of a mixed JSONL equals transformers'
greedy `generate` on that request alone; bad lines get error records naming what was expected; a rerun after a
cut-short output gives every custom_id once with the same answers; the CLI's exit code says whether every line
succeeded. The Ray pipeline is tested in test_batch_ray.py.

    pytest tests/test_batch.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _server_helpers import MEDIA, data_uri, image_bytes, reference_answer, routed_fetcher, video_bytes
from PIL import Image

pytestmark = pytest.mark.timeout(300)

VIDEO = video_bytes(frames=10)
CAT = data_uri(image_bytes("cat.jpg"), "image/jpeg")
ROCKET = data_uri(image_bytes("rocket.jpg"), "image/jpeg")


def line(custom_id, body, **envelope):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body,
                       **envelope})


def chat(messages, **settings):
    return {"model": "tiny", "messages": messages, "temperature": 0, **settings}


def user(*parts):
    return [{"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}]


def image(url):
    return {"type": "image_url", "image_url": {"url": url}}


# (custom_id, body, images for the reference, max_new_tokens)
GOOD = [
    ("text-short", chat(user("Name a colour."), max_tokens=3), [], 3),
    ("text-turns", chat([{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": "Name a colour."},
                         {"role": "assistant", "content": "Blue."},
                         {"role": "user", "content": "And another one?"}], max_tokens=12), [], 12),
    ("text-long", chat(user("Tell me about " + "the sea and the sky, " * 40), max_completion_tokens=16), [], 16),
    ("image-one", chat(user(image(CAT), "What is in the picture?"), max_tokens=8), ["cat.jpg"], 8),
    ("image-two", chat(user(image(CAT), image(ROCKET), "Compare them."), max_tokens=6), ["cat.jpg", "rocket.jpg"],
     6),
    ("image-file", chat(user(image((MEDIA / "rocket.jpg").as_uri()), "Describe."), max_tokens=5), ["rocket.jpg"],
     5),
    ("text-n2", chat(user("Say something."), max_tokens=4, n=2), [], 4),
    ("video", chat(user({"type": "video_url", "video_url": {"url": data_uri(VIDEO, "video/mp4")}}, "What happens?"),
                   max_tokens=6), [], 6),
]
FIRST_BAD = len(GOOD) + 1

# raw line -> (custom_id in the record, expected error code, words the message must hold)
BAD = [
    ("{not json", None, "invalid_json", [f"line {FIRST_BAD}", "not valid JSON", "custom_id"]),
    ("[1, 2]", None, "invalid_line", ["expected a JSON object", "got a list"]),
    (json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": chat(user("hi"))}), None,
     "invalid_custom_id", ["custom_id", "missing"]),
    (line("bad-url", chat(user("hi")), url="/v1/completions"), "bad-url", "unsupported_url",
     ["/v1/chat/completions", "/v1/completions"]),
    (line("text-short", chat(user("again"))), None, "duplicate_custom_id", ["text-short", "earlier line"]),
    (line("bad-image", chat(user(image("data:image/png;base64,aGVsbG8="), "What?"))), "bad-image", "invalid_image",
     ["could not read the image", "png, jpeg"]),
    (line("bad-temperature", chat(user("hi"), temperature=7)), "bad-temperature", "invalid_value",
     ["temperature", "got 7"]),
    (line("bad-logprobs", chat(user("hi"), logprobs=True)), "bad-logprobs", "unsupported_parameter", ["logprobs"]),
    (line("bad-file", chat(user(image("file:///etc/passwd"), "hi"))), "bad-file", "local_media_forbidden",
     ["outside the allowed folder"]),
    (line("bad-context", chat(user("hi"), max_tokens=100000)), "bad-context", "context_length_exceeded",
     ["maximum context length"]),
    (line("no-messages", {"model": "tiny"}), "no-messages", "invalid_value", ["messages"]),
    (line("bad-body", "hello"), "bad-body", "invalid_body", ["body", "got a string"]),
]


def config():
    from onevision.server.app import ServerConfig
    from onevision.server.media import MediaLimits

    return ServerConfig(model_name=None, media=MediaLimits(allowed_local_path=str(MEDIA)), default_max_tokens=16)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(x + "\n" for x in lines))
    return path


def mixed_lines() -> list[str]:
    good = [line(cid, body) for cid, body, _, _ in GOOD]
    return good + [raw for raw, *_ in BAD]  # the first bad line is line FIRST_BAD


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def answers(recs: list[dict]) -> dict:
    """custom_id -> what must not change between runs (ids and timestamps do)."""
    out = {}
    for r in recs:
        if r["custom_id"] is not None and r["error"] is None:
            body = r["response"]["body"]
            out[r["custom_id"]] = (body["choices"], body["usage"])
    return out


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from onevision.batch import load_engine

    return load_engine(str(tiny_ckpt), dtype="float32", device="cpu", kv_cache_memory=64 << 20)


@pytest.fixture(scope="module")
def first_run(engine, tmp_path_factory):
    from onevision.batch import run

    folder = tmp_path_factory.mktemp("batch")
    source = write_jsonl(folder / "requests.jsonl", mixed_lines())
    summary = run(str(source), str(folder / "results.jsonl"), engine=engine, config=config(), progress=False)
    return source, folder / "results.jsonl", summary


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """transformers' greedy answer to each good request, run alone."""
    from onevision.processing.media import load_video

    out = {}
    for cid, body, images, max_new in GOOD:
        conversation = []
        for m in body["messages"]:
            content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            conversation.append({"role": m["role"], "content": [
                {"type": c["type"].removesuffix("_url")} if c["type"] != "text" else c for c in content]})
        pil = [Image.open(MEDIA / name).convert("RGB") for name in images]
        videos = [load_video(VIDEO, num_frames=8)[0]] if cid == "video" else None  # the server's 8 frames
        out[cid] = reference_answer(tiny_ckpt, conversation, images=pil or None, videos=videos,
                                    max_new_tokens=max_new)
    return out


def test_every_answer_equals_transformers_generate_alone(first_run, reference):
    _, output, summary = first_run
    recs = [r for r in records(output) if r["error"] is None]
    assert sorted(r["custom_id"] for r in recs) == sorted(cid for cid, *_ in GOOD)
    for r in recs:
        text, prompt_tokens, completion_tokens = reference[r["custom_id"]]
        response = r["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req-")
        body = response["body"]
        assert body["object"] == "chat.completion"
        n = 2 if r["custom_id"] == "text-n2" else 1
        assert [c["message"]["content"] for c in body["choices"]] == [text] * n, r["custom_id"]
        assert [c["index"] for c in body["choices"]] == list(range(n))
        assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens * n,
                                 "total_tokens": prompt_tokens + completion_tokens * n}
        max_new = next(m for cid, _, _, m in GOOD if cid == r["custom_id"])
        assert {c["finish_reason"] for c in body["choices"]} == {"length" if completion_tokens == max_new else "stop"}
    assert summary.succeeded == len(GOOD) and summary.lines == len(GOOD) + len(BAD)


def test_bad_lines_get_error_records_and_the_job_goes_on(first_run):
    _, output, summary = first_run
    errors = [r for r in records(output) if r["error"] is not None]
    assert len(errors) == len(BAD) and summary.failed == len(BAD) and not summary.ok and summary.exit_code == 1
    by_line = {r["error"]["line"]: r for r in errors}
    for i, (_, custom_id, code, words) in enumerate(BAD):
        r = by_line[FIRST_BAD + i]
        assert r["custom_id"] == custom_id and r["error"]["code"] == code, (code, r)
        for word in words:
            assert word in r["error"]["message"], (word, r["error"]["message"])
        if custom_id is None:  # no request: no response, the line number says where
            assert r["response"] is None
        else:  # a refused request: the server's 400 body, as /v1/chat/completions would answer it
            assert r["response"]["status_code"] == 400
            assert r["response"]["body"]["error"]["code"] == code


def test_resume_after_a_torn_last_line_gives_every_custom_id_once_with_the_same_answers(first_run, engine, tmp_path):
    from onevision.batch import run

    source, output, _ = first_run
    full = output.read_bytes().split(b"\n")
    cut = tmp_path / "results.jsonl"
    cut.write_bytes(b"\n".join(full[:3]) + b"\n" + full[3][: len(full[3]) // 2])  # killed mid-write
    summary = run(str(source), str(cut), engine=engine, config=config(), progress=False)
    assert summary.skipped == 3 and summary.repaired_bytes == len(full[3]) // 2
    assert summary.succeeded + summary.failed + summary.skipped == len(GOOD) + len(BAD)
    recs = records(cut)
    assert cut.read_bytes().startswith(b"\n".join(full[:3]) + b"\n")  # what was there is kept as it was
    ids = [r["custom_id"] for r in recs if r["custom_id"] is not None]
    assert len(ids) == len(set(ids)) == len(GOOD) + sum(c is not None for _, c, _, _ in BAD)
    assert sorted(r["error"]["line"] for r in recs if r["custom_id"] is None) == \
        sorted(r["error"]["line"] for r in records(output) if r["custom_id"] is None)
    assert answers(recs) == answers(records(output))
    again = run(str(source), str(cut), engine=engine, config=config(), progress=False)  # nothing left to do
    assert again.skipped == len(GOOD) + len(BAD) and again.succeeded == again.failed == 0
    assert again.exit_code == 1 and records(cut) == recs  # the earlier error records still count


def test_output_file_repairs(tmp_path):
    from onevision.batch.records import OutputError, open_output

    record = json.dumps({"id": "x", "custom_id": "a", "response": {"status_code": 200}, "error": None})
    path = tmp_path / "out.jsonl"
    path.write_text(record)  # complete JSON, newline never written: kept
    done, f = open_output(path)
    f.close()
    assert path.read_text() == record + "\n" and done.custom_ids == {"a": True} and done.repaired == 0
    path.write_text(record + "\nnot a record\n" + record + "\n")  # damage in the middle: refuse, touch nothing
    with pytest.raises(OutputError, match="line 2 is not a batch result record"):
        open_output(path)
    assert path.read_text() == record + "\nnot a record\n" + record + "\n"


def _cli(args, env_extra=None, timeout=240):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2",
               PYTHONPATH=str(Path(__file__).parents[1] / "src"), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "onevision", "batch", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_exit_code_says_whether_every_line_succeeded(tiny_ckpt, first_run, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [line(cid, body) for cid, body, *_ in GOOD[:2]])
    out = tmp_path / "good-results.jsonl"
    done = _cli(["--model", str(tiny_ckpt), "--input", str(good), "--output", str(out), "--dtype", "float32",
                 "--kv-cache-memory", "64MiB"])
    assert done.returncode == 0, done.stderr
    assert "2 request(s) run: 2 succeeded, 0 failed" in done.stderr
    assert "2/2" in done.stderr  # the progress bar (tqdm) on stderr
    assert answers(records(out)) == {k: v for k, v in answers(records(first_run[1])).items()
                                     if k in ("text-short", "text-turns")}
    bad = write_jsonl(tmp_path / "bad.jsonl", [line("a", chat(user("hi"), max_tokens=2)), "{oops"])
    failed = _cli(["--model", str(tiny_ckpt), "-i", str(bad), "-o", str(tmp_path / "bad-out.jsonl"), "--no-progress",
                  "--kv-cache-memory", "64MiB"])
    assert failed.returncode == 1
    assert "1 succeeded, 1 failed" in failed.stderr and "Error records" in failed.stderr


def test_cli_batch_takes_the_servers_media_limits(tiny_ckpt, tmp_path):
    """`onevision batch` has serve's hardened media options (same defaults): a record over --max-request-pixels
    gets an error record naming the option, the limit and what it needed; the other records still run."""
    from onevision.cli import build_parser, request_limits

    parser = build_parser()
    assert request_limits(parser.parse_args(["batch", "-i", "in", "-o", "out"])) == \
        request_limits(parser.parse_args(["serve"]))
    source = write_jsonl(tmp_path / "in.jsonl", [line("big", chat(user(image(CAT), "What?"), max_tokens=2)),
                                                 line("text", chat(user("Name a colour."), max_tokens=2))])
    out = tmp_path / "out.jsonl"
    done = _cli(["--model", str(tiny_ckpt), "-i", str(source), "-o", str(out), "--no-progress",
                 "--kv-cache-memory", "64MiB", "--max-request-pixels", "1000"])
    assert done.returncode == 1, done.stderr
    assert "1 succeeded, 1 failed" in done.stderr
    by_id = {r["custom_id"]: r for r in records(out)}
    assert by_id["text"]["error"] is None
    error = by_id["big"]["error"]
    assert error["code"] == "media_too_large" and error["line"] == 1, error
    assert "--max-request-pixels" in error["message"] and "the limit is 1000 per request" in error["message"]
    assert by_id["big"]["response"]["status_code"] == 400


def test_the_pixel_budget_is_shared_by_the_jobs_media_threads(engine, tiny_ckpt, tmp_path):
    """--max-server-pixels bounds the media a batch job decodes at once: records that fit wait for each other
    (none fails for being busy), a record that needs more than the whole budget gets an error record."""
    from onevision import AutoProcessor
    from onevision.batch import run
    from onevision.server import media
    from onevision.server.app import ServerConfig

    sizes = media.media_sizes(AutoProcessor.from_pretrained(tiny_ckpt))
    probe = media.probe_image(image_bytes("cat.jpg"), media.MediaLimits(), sizes["image"])
    cat, two = media.request_cost([probe]), media.request_cost([probe, probe])
    rows = [line(f"cat-{i}", chat(user(image(CAT), "What?"), max_tokens=1)) for i in range(4)]
    rows.append(line("two", chat(user(image(CAT), image(CAT), "Compare."), max_tokens=1)))  # over the budget
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    budget = ServerConfig(model_name=None, media=media.MediaLimits(max_server_pixels=cat, pixel_wait=0.0))
    summary = run(str(source), str(tmp_path / "out.jsonl"), engine=engine, config=budget, progress=False,
                  media_threads=4)
    by_id = {r["custom_id"]: r for r in records(tmp_path / "out.jsonl")}
    assert summary.succeeded == 4 and summary.failed == 1, by_id
    error = by_id["two"]["error"]
    assert error["code"] == "media_too_large" and "--max-server-pixels" in error["message"], error
    assert two > cat and f"need {two} decoded pixels" in error["message"] and f"is {cat} " in error["message"]


def test_ray_without_ray_installed_says_how_to_install(tmp_path, monkeypatch):
    from onevision.batch import run

    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the extra has: no module
    source = write_jsonl(tmp_path / "in.jsonl", [line("a", chat(user("hi")))])
    with pytest.raises(ImportError, match=r"pip install \"onevision\[ray\]\""):
        run(str(source), str(tmp_path / "out.jsonl"), model="unused", ray=True)
    assert not (tmp_path / "out.jsonl").exists()


def test_served_model_name_refuses_other_models_and_the_cpu_stage_needs_no_weights(tiny_ckpt):
    from onevision import AutoProcessor
    from onevision.batch import ModelFacts, State, build
    from onevision.batch.records import Request
    from onevision.server.app import ServerConfig
    from onevision.server.errors import NotFound

    # what Ray's CPU stage runs: the server's checks on a weightless view of the model
    state = State(ModelFacts(str(tiny_ckpt)), AutoProcessor.from_pretrained(tiny_ckpt), ServerConfig(model_name="tiny"))
    inputs, params, prompt_tokens, copies = build(Request(1, "a", chat(user("hi"), max_tokens=2, n=3)), state)
    assert params.max_tokens == 2 and params.greedy and copies == 3 and inputs["input_ids"].shape[1] == prompt_tokens
    with pytest.raises(NotFound, match="`other`.*`tiny`"):
        build(Request(2, "b", {**chat(user("hi")), "model": "other"}), state)


def test_remote_fetches_beyond_the_limit_wait_in_a_batch_job_and_are_refused_by_the_server():
    """Three fetches at once with one slot: the server's fetcher refuses two (503 too_many_fetches), a batch job's
    State waits for the slot, so every record gets its image (the slot is shared, never exceeded)."""
    import http.server
    import math
    import threading
    import time
    from types import SimpleNamespace as NS

    from onevision.batch import State
    from onevision.server.app import ServerConfig
    from onevision.server.errors import Overloaded

    body = image_bytes("cat.jpg")
    running, most = [0], [0]
    lock = threading.Lock()

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.3)
            with lock:  # before the answer: a next fetch can only start after the client has read it
                running[0] -= 1
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def fetcher(**kwargs):
        return routed_fetcher(port, max_concurrent=1, **kwargs)

    def three_at_once(f):
        results = []

        def one():
            try:
                results.append(f.fetch("http://media.example/cat.jpg", 1 << 20, 10.0))
            except Overloaded as e:
                results.append(e)
        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    try:
        served = three_at_once(fetcher())  # the server's default: refused at once
        assert sum(r == body for r in served) == 1 and sum(isinstance(r, Overloaded) for r in served) == 2
        config = ServerConfig()
        config.media.max_concurrent_fetches = 1
        model = NS(config=NS(text_config=NS(max_position_embeddings=4096)))
        state = State(model, NS(tokenizer=None, image_token="<image>", video_token="<video>"), config)
        assert state.fetcher.slot_wait == math.inf and state.fetcher.max_concurrent == 1
        assert config.media.fetch_wait == 0.0  # the server's config is left as it was
        waited = three_at_once(fetcher(slot_wait=state.fetcher.slot_wait))
        assert waited == [body] * 3 and most[0] == 1
    finally:
        server.shutdown()


def test_ctrl_c_under_ray_stops_after_the_batch_in_hand():
    """Python's KeyboardInterrupt, raised inside Ray's code, made Ray cancel the tasks in flight (their requests
    became error records) and the job went on; the Ray path takes Ctrl-C itself (interrupt_event, at_once=False):
    the first one sets an event the loop checks between batches, a second one interrupts at once, and the previous
    handler comes back."""
    import os
    import signal
    import time

    from onevision.interrupt import interrupt_event

    before = signal.getsignal(signal.SIGINT)
    with interrupt_event(at_once=False) as interrupted:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs between bytecodes
        assert interrupted.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


def test_input_lines_are_read_streamed_bom_crlf_and_blanks_aside(tmp_path):
    from onevision.batch.records import parse_line, read_lines

    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"custom_id": "a", "body": {}}\r\n\r\n  \n{"custom_id": "b", "body": {}}\n')
    lines = list(read_lines(path))
    assert [n for n, _ in lines] == [1, 4]  # numbers as an editor shows them; blank lines skipped
    assert [parse_line(n, raw).custom_id for n, raw in lines] == ["a", "b"]  # the BOM is not part of line 1
