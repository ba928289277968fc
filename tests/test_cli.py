"""The `onevision` command, run for real in subprocesses: chat (one-shot and interactive) answers equal the
reference's greedy decode, errors are one line with an exit code, `serve` answers and drains on SIGTERM.

    pytest tests/test_cli.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from _server_helpers import MEDIA, free_port, reference_answer, shared_ckpt
from PIL import Image

pytestmark = pytest.mark.timeout(180)
CMD = [sys.executable, "-m", "onevision"]


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2",
               PYTHONUNBUFFERED="1")
    return env


def _run(args: list[str], stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(CMD + args, input=stdin, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt, tmp_path_factory):
    return shared_ckpt(tiny_ckpt, tmp_path_factory)


def test_version_and_help():
    out = _run(["--version"])
    assert out.returncode == 0 and out.stdout.startswith("onevision ")
    out = _run(["chat", "--help"])
    assert out.returncode == 0 and "--image" in out.stdout and "--num-frames" in out.stdout
    out = _run(["serve", "--help"])
    assert out.returncode == 0 and "--allow-remote-media" in out.stdout and "--max-queue" in out.stdout
    assert _run([]).returncode == 2


def test_chat_one_shot_equals_reference(ckpt):
    conv = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    image = Image.open(MEDIA / "cat.jpg").convert("RGB")
    expected, _, _ = reference_answer(ckpt, conv, images=[image], max_new_tokens=8)
    out = _run(["chat", "--model", str(ckpt), "--device", "cpu", "--image", str(MEDIA / "cat.jpg"),
                "--system", "Be brief.", "--max-new-tokens", "8", "What is this?"])
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    assert "Loading" in out.stderr and "Loaded in" in out.stderr


def test_chat_interactive_multi_turn(ckpt):
    out = _run(["chat", "--model", str(ckpt), "--max-new-tokens", "5"],
               stdin=f"Name a colour.\n/image {MEDIA / 'cat.jpg'}\nWhat is in the picture?\n/image nope.png\n/exit\n")
    assert out.returncode == 0, out.stderr
    answers = out.stdout.split("\n")[:2]
    # the same two turns through the reference
    first, _, _ = reference_answer(ckpt, [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}],
                                   max_new_tokens=5)
    conv = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
            {"role": "assistant", "content": [{"type": "text", "text": first}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    second, _, _ = reference_answer(ckpt, conv, images=[Image.open(MEDIA / "cat.jpg").convert("RGB")],
                                    max_new_tokens=5)
    expected = [first, second]
    assert answers == expected
    assert "error:" in out.stderr and "Traceback" not in out.stderr  # the missing image was reported, chat went on


@pytest.mark.parametrize("args", [
    ["chat", "--model", "/nonexistent/model-folder", "hi"],
    ["chat", "--model", "{ckpt}", "--image", "/nonexistent/cat.png", "hi"],
    ["chat", "--model", "{ckpt}", "--video", "/nonexistent/clip.mp4", "hi"],
    ["chat", "--model", "{ckpt}", "--max-new-tokens", "5000", "hi"],
    ["serve", "--model", "{ckpt}", "--allowed-local-media-path", "/nonexistent/dir"],
])
def test_errors_are_one_line(ckpt, args):
    out = _run([a.replace("{ckpt}", str(ckpt)) for a in args])
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("onevision: error:")]
    assert len(errors) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_bad_usage_exits_2(ckpt):
    out = _run(["chat", "--model", str(ckpt), "--max-new-tokens", "-3", "hi"])
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_serve_answers_and_drains_on_sigterm(ckpt):
    openai = pytest.importorskip("openai")
    port = free_port()
    proc = subprocess.Popen(CMD + ["serve", "--model", str(ckpt), "--port", str(port), "--served-model-name", "tiny",
                                   "--api-key", "sk-cli", "--shutdown-timeout", "60", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-cli", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["tiny"]
        conv = [{"role": "user", "content": "Say something."}]
        expected, _, _ = reference_answer(ckpt, [{"role": "user", "content": [{"type": "text",
                                                                                "text": "Say something."}]}],
                                          max_new_tokens=6)
        answer = client.chat.completions.create(model="tiny", messages=conv, max_tokens=6, temperature=0)
        assert answer.choices[0].message.content == expected
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()

        # a long streaming answer is in flight when SIGTERM arrives: it finishes, new requests are refused
        lines: list[str] = []
        body = {"model": "tiny", "messages": conv, "max_tokens": 150, "min_tokens": 150, "temperature": 0,
                "stream": True}

        def stream():
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120,
                              headers={"Authorization": "Bearer sk-cli"}) as r:
                for line in r.iter_lines():
                    lines.append(line)
        reader = threading.Thread(target=stream)
        reader.start()
        deadline = time.monotonic() + 60
        while sum(line.startswith("data: {") for line in lines) < 3:
            assert time.monotonic() < deadline and reader.is_alive()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:
            refused = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2},
                                 headers={"Authorization": "Bearer sk-cli"}, timeout=10).status_code
        except httpx.TransportError:
            refused = "connection refused"
        assert refused in (503, "connection refused")
        reader.join(120)
        assert [line for line in lines if line][-1] == "data: [DONE]"
        deltas = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert deltas[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_out_of_range_numbers_are_argparse_errors():
    import subprocess
    import sys

    for args in (["serve", "--port", "99999"], ["chat", "--seed", "1" * 30, "hi"], ["serve", "--max-body-mb", "0"]):
        run = subprocess.run([sys.executable, "-m", "onevision", *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and "Traceback" not in run.stderr and "expected" in run.stderr, run.stderr
