"""`onevision chat` in a real pseudo-terminal (stdlib pty): the progress spinner while the prompt is prefilled,
`--verbose` figures, and Ctrl-C semantics (stop the answer, keep the session; Ctrl-C at the prompt quits).

    pytest tests/test_cli_terminal.py -q
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest
from _server_helpers import MEDIA, shared_ckpt

pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(sys.platform == "win32", reason="needs a pty")]


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt, tmp_path_factory):
    return shared_ckpt(tiny_ckpt, tmp_path_factory)


class Terminal:
    """`python -m onevision ARGS` with stdin, stdout and stderr on one pseudo-terminal."""

    def __init__(self, args: list[str]):
        self.master, slave = pty.openpty()
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
        self.proc = subprocess.Popen([sys.executable, "-m", "onevision", *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.seen = ""

    def read_until(self, text: str, timeout: float = 60, start: int = 0) -> int:
        """Read until `text` appears in the output after index `start`; returns the index after it."""
        deadline = time.monotonic() + timeout
        while text not in self.seen[start:]:
            left = deadline - time.monotonic()
            trouble = [line for line in self.seen.splitlines() if "Exception ignored" in line or "Error" in line]
            assert left > 0 and self.proc.poll() is None, \
                f"waited for {text!r}; got {self.seen[-2000:]!r}; lines about errors: {trouble[:5]}"
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.seen += os.read(self.master, 65536).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    pass
        return self.seen.index(text, start) + len(text)

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            os.close(self.master)


def test_ctrl_c_stops_the_answer_and_keeps_the_session(ckpt):
    term = Terminal(["chat", "--model", str(ckpt), "--device", "cpu", "--max-new-tokens", "3500"])
    at = term.read_until(">>> ")
    term.send("/image\n")
    at = term.read_until("usage: /image PATH_OR_URL", start=at)
    term.send(f"/image {MEDIA / 'cat.jpg'}\n")
    at = term.read_until("attached to your next message", start=at)
    term.send("Tell me a very long story.\n")
    time.sleep(0.3)
    at = term.read_until("reading the prompt", start=at)  # the spinner (stderr is a terminal)
    term.read_until("\x1b[K", start=at)  # the spinner's line erased when text starts
    time.sleep(0.5)
    term.proc.send_signal(signal.SIGINT)  # mid-answer (3500 tokens take far longer than this)
    at = term.read_until("(answer interrupted; not added to the conversation)", start=at)
    at = term.read_until(">>> ", start=at)
    assert term.proc.poll() is None  # still alive, model loaded
    term.send("/help\n")  # the session still answers commands
    at = term.read_until("/clear", start=at)
    term.read_until(">>> ", start=at)
    term.proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt quits
    assert term.close() == 0


def test_one_shot_progress_and_verbose(ckpt):
    term = Terminal(["chat", "--model", str(ckpt), "--device", "cpu", "--max-new-tokens", "6", "--verbose",
                     "--image", str(MEDIA / "cat.jpg"), "What is this?"])
    at = term.read_until("encoding 1 media item and reading the prompt")
    term.read_until(" tok/s, TTFT ", start=at)
    assert term.close() == 0
    figures = re.search(r"(\d+) tokens, [\d.]+ tok/s, TTFT [\d.]+ s", term.seen)
    assert figures and 1 <= int(figures.group(1)) <= 6, term.seen


def test_ctrl_d_quits(ckpt):
    term = Terminal(["chat", "--model", str(ckpt), "--device", "cpu"])
    term.read_until(">>> ")
    term.send("\x04")
    assert term.close() == 0
