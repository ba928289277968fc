"""Helpers for the server and CLI tests: a tiny checkpoint whose processor matches the tiny vision tower
(56 px tiles, 16 tokens per tile), a uvicorn server on a free loopback port in a background thread, the
reference (transformers) greedy answer, and media builders."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np

TILE = 56
MEDIA = Path(__file__).parent / "fixtures" / "media"


def make_server_ckpt(tiny_ckpt: Path, dest: Path) -> Path:
    """Copy of tiny_ckpt with processor configs sized for the tiny tower (transformers accepts them too)."""
    from conftest import PINPOINTS

    shutil.copytree(tiny_ckpt, dest)
    pre = json.loads((dest / "preprocessor_config.json").read_text())
    pre.update(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    (dest / "preprocessor_config.json").write_text(json.dumps(pre))
    video = json.loads((dest / "video_preprocessor_config.json").read_text())
    video["size"] = {"height": TILE, "width": TILE}
    (dest / "video_preprocessor_config.json").write_text(json.dumps(video))
    proc = json.loads((dest / "processor_config.json").read_text())
    proc["num_image_tokens"] = (TILE // 14) ** 2
    (dest / "processor_config.json").write_text(json.dumps(proc))
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def routed_fetcher(port: int, **kwargs):
    """A RemoteFetcher whose every host resolves to a public address and whose connections go to the local test
    server on `port` instead: remote-media tests without leaving the machine."""
    from onevision.server.fetch import RemoteFetcher, open_socket

    return RemoteFetcher(resolver=lambda host, p: ["93.184.216.34"],
                         opener=lambda address, p, timeout: open_socket("127.0.0.1", port, timeout), **kwargs)


class ServerThread:
    """A real uvicorn server for `app` on 127.0.0.1:<free port>, run in a daemon thread; use as a context manager."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5, access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    @property
    def engine(self):
        return self.app.state.server.engine


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_bytes(name: str = "cat.jpg") -> bytes:
    return (MEDIA / name).read_bytes()


def png_bytes(width: int, height: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height), color=0).save(buf, format="PNG")
    return buf.getvalue()


def video_bytes(frames: int = 10, size: int = 64) -> bytes:
    """A small mp4 (mpeg4 codec) with moving colours."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            array = np.zeros((size, size, 3), dtype=np.uint8)
            array[..., 0] = (i * 25) % 256
            array[: size // 2, :, 1] = 200
            array[:, : (i * 5) % size, 2] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def reference_answer(folder: Path, conversation: list[dict], images=None, videos=None, max_new_tokens: int = 12,
                     seed: int | None = None, **generate_kwargs):
    """transformers' decode for the conversation -> (text, prompt_tokens, completion_tokens): greedy unless
    `generate_kwargs` say do_sample=True; `seed` seeds the global generator the reference draws from.
    `images`: the conversation's PIL images in order; `videos`: (T, H, W, 3) uint8 frame arrays."""
    import torch
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = _reference_model(folder)
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[images] if images else None, videos=videos or None, return_tensors="pt")
    if generate_kwargs.get("stop_strings"):
        generate_kwargs["tokenizer"] = processor.tokenizer
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, **{"do_sample": False, **generate_kwargs}, max_new_tokens=max_new_tokens)
    new = out[0, inputs["input_ids"].shape[1]:]
    return processor.tokenizer.decode(new, skip_special_tokens=True), int(inputs["input_ids"].shape[1]), len(new)


_REFERENCE: dict = {}


def _reference_model(folder: Path):
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    key = str(folder)
    if key not in _REFERENCE:
        _REFERENCE[key] = LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return _REFERENCE[key]


_SHARED: dict = {}


def shared_ckpt(tiny_ckpt: Path, tmp_path_factory) -> Path:
    """One server checkpoint folder per test session (built on first use)."""
    if "ckpt" not in _SHARED:
        _SHARED["ckpt"] = make_server_ckpt(tiny_ckpt, tmp_path_factory.mktemp("server") / "ckpt")
    return _SHARED["ckpt"]


def shared_model(folder: Path):
    """(our model, our processor) for `folder`, loaded once per session."""
    import torch

    from onevision import AutoProcessor, LlavaOnevisionForConditionalGeneration

    key = ("model", str(folder))
    if key not in _SHARED:
        _SHARED[key] = (LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=torch.float32),
                        AutoProcessor.from_pretrained(folder))
    return _SHARED[key]


def start_server(folder: Path, **settings) -> ServerThread:
    """ServerThread for an app over the shared model; ServerConfig, MediaLimits and EngineConfig fields as
    keywords."""
    from onevision.engine import EngineConfig
    from onevision.server.app import ServerConfig, create_app
    from onevision.server.media import MediaLimits

    fetcher = settings.pop("fetcher", None)
    media_keys = set(MediaLimits.__dataclass_fields__)
    media = MediaLimits(**{k: settings.pop(k) for k in list(settings) if k in media_keys})
    engine = EngineConfig(**{k: settings.pop(k) for k in list(settings) if k in EngineConfig.__dataclass_fields__})
    model, processor = shared_model(folder)
    config = ServerConfig(**{"model_name": "tiny", **settings}, media=media, engine=engine)
    return ServerThread(create_app(model, processor, config, fetcher=fetcher))
