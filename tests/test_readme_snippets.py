"""The README's server snippets executed as written: `onevision serve` started as the README says (on a local
checkpoint folder, on a free port), then the README's `openai` client snippet run against it.

    pytest tests/test_readme_snippets.py -q
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from _server_helpers import free_port, shared_ckpt

pytestmark = pytest.mark.timeout(150)
ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt, tmp_path_factory):
    return shared_ckpt(tiny_ckpt, tmp_path_factory)


def test_readme_client_snippet_against_a_server_started_as_the_readme_says(ckpt):
    section = _section("OpenAI-compatible server")
    serve = re.search(r"```bash\n(onevision serve [^\n]+)\n```", section).group(1)
    snippet = re.search(r"```python\n(.+?)```", section, re.S).group(1)
    port = str(free_port())
    argv = shlex.split(serve)
    argv[argv.index("--model") + 1] = str(ckpt)  # the README's model, as a local folder (no download here)
    argv[argv.index("--port") + 1] = port
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
    server = subprocess.Popen([sys.executable, "-m", "onevision", *argv[1:]], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read() if server.poll() else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        out = subprocess.run([sys.executable, "-c", snippet.replace(":8000/", f":{port}/")], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip(), "the snippet printed no answer"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
