"""Helpers for the issue-10 attack tests: a real `onevision serve` subprocess (so memory and CPU time are read
from /proc of the server process itself), a /proc sampler, raw loopback sockets and attack media builders."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from _server_helpers import free_port

CMD = [sys.executable, "-m", "onevision"]


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1", PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))


class Served:
    """`onevision serve` on 127.0.0.1:<free port> in a subprocess; `nofile` lowers its open-file limit."""

    def __init__(self, ckpt: Path, *args: str, nofile: int | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = CMD + ["serve", "--model", str(ckpt), "--port", str(self.port), "--served-model-name", "tiny",
                           "--log-level", "warning", "--no-web", *args]
        self.nofile = nofile

    def __enter__(self) -> Served:
        def limit():
            if self.nofile:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server's logging
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=self.log, text=True, env=_env(),
                                     preexec_fn=limit)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(self.log.read())
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not come up")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def chat(self, body: dict, timeout: float = 60, **headers) -> httpx.Response:
        return httpx.post(self.url + "/v1/chat/completions", json={"model": "tiny", **body}, timeout=timeout,
                          headers=headers)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PeakRSS:
    """Samples a process's RSS every 10 ms while the block runs: .base, .peak (bytes)."""

    def __init__(self, pid: int):
        self.pid, self.base, self.peak = pid, rss_bytes(pid), 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, rss_bytes(self.pid))
                time.sleep(0.01)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def grew(self) -> int:
        return self.peak - self.base


def user(*parts, text: str = "Describe.") -> list:
    return [{"role": "user", "content": list(parts) + [{"type": "text", "text": text}]}]


def part(kind: str, url: str) -> dict:
    return {"type": kind, kind: {"url": url}}


def blank_png(width: int, height: int) -> bytes:
    """A 1-bit PNG that declares width x height of black (a few KB: a decompression bomb)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def video(frames: int, size: int = 16, gop: int = 12, rate: int = 25, codec: str = "mpeg4") -> bytes:
    """An mp4 of `frames` frames, keyframe every `gop` (mpeg4 caps it at 600; libx264 doesn't), moving content."""
    import av

    buf = io.BytesIO()
    base = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.roll(base, i, axis=1), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True when the server closes `sock` (EOF or reset, after any answer) within `within` seconds."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False
