"""The `onevision` command (also `python -m onevision`).

    onevision chat [--model M] [--image PATH_OR_URL ...] [--video PATH --num-frames 8] [PROMPT]
    onevision serve [--model M] [--host 127.0.0.1] [--port 8000] [--api-key K] ...
    onevision batch [--model M] --input requests.jsonl --output results.jsonl [--ray] ...

Errors are one readable line on stderr and a non-zero exit code (1: error, 2: bad usage, 130: interrupted);
`batch` exits 1 when any line of the input has an error record.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

from onevision.interrupt import interrupt_event

DEFAULT_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


def _int_in(low: int, high: int | None = None):
    """argparse type: an integer in [low, high] (no upper bound when high is None)."""
    bound = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {bound}, got {text!r}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


_positive_int, _nonneg_int = _int_in(1), _int_in(0)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"hub repo id or local folder (default: {DEFAULT_MODEL}; downloaded on first use)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (default: the checkpoint's; float16 checkpoints run in float32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only int8/int4 (torchao's configs, packed CPU kernels; bf16 activations; needs "
                        "torchao: pip install 'onevision[cpu]')")


_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "M": 10**6, "MB": 10**6, "MIB": 2**20,
               "G": 10**9, "GB": 10**9, "GIB": 2**30}


def _size(text: str) -> int:
    """'4GiB', '512MB', '1.5G' or a number of bytes."""
    t = text.strip().upper()
    number = t.rstrip("BKMGI")
    unit = t[len(number):]
    try:
        value = int(float(number) * _SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a size such as 4GiB, 512MB or 1000000 (bytes), got {text!r}"
                                         ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a size >= 0, got {text!r}")
    return value


def _engine_args(p: argparse.ArgumentParser) -> None:
    """The serving engine's knobs (vLLM's names)."""
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=_positive_int, default=16, help="sequences decoded together (default 16)")
    g.add_argument("--max-num-batched-tokens", type=_positive_int, default=None,
                   help="new tokens per engine step; decodes first, then prompt chunks (default 256 on CPU, 2048 on "
                        "CUDA: lower keeps streams smoother while long prompts are read, higher reads prompts faster)")
    g.add_argument("--kv-cache-memory", type=_size, default=None, metavar="SIZE",
                   help="memory for the KV cache, e.g. 2GiB (default: a quarter of free memory, at most 4 GiB, on "
                        "CPU; 80%% of free memory on CUDA; never more than --max-num-seqs full contexts hold)")
    g.add_argument("--vision-cache-memory", type=_size, default=512 << 20, metavar="SIZE",
                   help="memory for vision features kept by image content, e.g. 512MiB (default); 0 turns it off")
    g.add_argument("--no-enable-prefix-caching", dest="prefix_caching", action="store_false",
                   help="do not reuse the KV of earlier requests that share a prefix")
    g.add_argument("--cpu-weight-packing", choices=("auto", "off"), default="auto",
                   help="auto (default): on CPU, float32 linears keep a second, oneDNN-packed copy of their weights "
                        "for batched steps (~1.5x faster decode of 8 streams) when it fits in a quarter of free "
                        "memory; off: one copy, reference GEMMs")


def engine_config(args: argparse.Namespace):
    from onevision.engine import EngineConfig

    return EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        kv_cache_memory=args.kv_cache_memory or None, vision_cache_memory=args.vision_cache_memory,
                        enable_prefix_caching=args.prefix_caching, cpu_weight_packing=args.cpu_weight_packing)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onevision", description="LLaVA-OneVision in pure PyTorch: chat in the "
                                     "terminal, serve an OpenAI-compatible API, or run offline batch jobs.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{chat,serve,batch}")

    chat = sub.add_parser("chat", help="answer one prompt (streamed), or chat interactively without PROMPT",
                          description="Without PROMPT: interactive chat; type /help for commands (/image, /video, "
                          "/clear, /exit).")
    _model_args(chat)
    chat.add_argument("prompt", nargs="?", help="the question; omit it for an interactive chat")
    chat.add_argument("--image", "-i", action="append", default=[], metavar="PATH_OR_URL",
                      help="an image for the (first) prompt; repeat for several")
    chat.add_argument("--video", "-v", action="append", default=[], metavar="PATH", help="a video file")
    chat.add_argument("--num-frames", type=_positive_int, default=8, help="frames sampled per video (default 8)")
    chat.add_argument("--system", "-s", default=None, help="system prompt")
    chat.add_argument("--max-new-tokens", type=_positive_int, default=512, help="default 512")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    chat.add_argument("--top-p", type=float, default=None)
    chat.add_argument("--top-k", type=_nonneg_int, default=None)
    chat.add_argument("--repetition-penalty", type=float, default=None)
    chat.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=None, help="seed for sampling")
    chat.add_argument("--plain-text", action="store_true",
                      help="tokenize what you type as plain text: '<|im_start|>' typed in a prompt stays text (by "
                           "default it becomes the special token, as in transformers; the server always uses "
                           "plain text)")
    chat.add_argument("--verbose", action="store_true",
                      help="after each answer print 'N tokens, X tok/s, TTFT Y s' on stderr (like ollama run --verbose)")
    _engine_args(chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models, /health)")
    _model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_int_in(0, 65535), default=8000)
    serve.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model as given, e.g. the folder path)")
    serve.add_argument("--api-key", default=os.environ.get("ONEVISION_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $ONEVISION_API_KEY, else no key)")
    serve.add_argument("--max-queue", type=_nonneg_int, default=64,
                       help="requests that may wait beyond the --max-num-seqs running ones; more get 503 (default 64)")
    serve.add_argument("--max-body-mb", type=_positive_float, default=32.0, help="largest request body in MB (default 32)")
    serve.add_argument("--shutdown-timeout", type=_positive_float, default=30.0,
                       help="on SIGTERM, seconds to let running requests finish (default 30)")
    serve.add_argument("--no-web", action="store_true", help="do not serve the chat page at /")
    serve.add_argument("--docs", action="store_true",
                       help="serve the interactive API page at /docs (assets served locally, works offline)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _engine_args(serve)
    _request_limit_args(serve)
    _serve_limits(serve)
    _batch_args(sub)
    return parser


def _request_limit_args(p: argparse.ArgumentParser) -> None:
    """The request and media limits `serve` and `batch` share (server/chat.py, server/media.py); read back by
    request_limits(args). Every refusal names the option that sets it."""
    # the defaults from server.media, not server.app: `onevision chat` must not need the server's packages
    from onevision.server.media import MediaLimits

    m = MediaLimits()
    g = p.add_argument_group("request and media limits (each refusal names the option that sets it)")
    g.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="allow file:// media URLs for files under DIR")
    g.add_argument("--allow-remote-media", action="store_true",
                   help="allow http(s) media URLs (public addresses only; redirects re-checked)")
    g.add_argument("--max-images", type=_nonneg_int, default=8, help="images per request (default 8)")
    g.add_argument("--max-videos", type=_nonneg_int, default=1, help="videos per request (default 1)")
    g.add_argument("--num-frames", type=_positive_int, default=m.num_frames,
                   help=f"frames sampled per video (default {m.num_frames})")
    g.add_argument("--max-n", type=_positive_int, default=8, help="largest n (default 8)")
    g.add_argument("--default-max-tokens", type=_positive_int, default=1024,
                   help="completion limit when a request sets none (default 1024, capped by the context)")
    g.add_argument("--max-image-pixels", type=_positive_int, default=m.max_image_pixels,
                   help=f"largest image width*height, checked before decoding (default {m.max_image_pixels:,})")
    g.add_argument("--max-request-pixels", type=_positive_int, default=m.max_request_pixels,
                   help="decoded media pixels one request may hold at once, checked from the headers before "
                        f"decoding (default {m.max_request_pixels:,})")
    g.add_argument("--max-server-pixels", type=_positive_int, default=m.max_server_pixels,
                   help="decoded media pixels in flight over all requests; more wait (serve: then get 503 after "
                        f"{m.pixel_wait:g} s), one request needing more is refused (default {m.max_server_pixels:,})")
    g.add_argument("--max-video-seconds", type=_positive_float, default=m.max_video_seconds,
                   help=f"longest video, from the container (default {m.max_video_seconds:g})")
    g.add_argument("--max-video-frames", type=_positive_int, default=m.max_video_frames,
                   help=f"most frames in a video's container (default {m.max_video_frames:,})")
    g.add_argument("--max-video-frame-pixels", type=_positive_int, default=m.max_video_frame_pixels,
                   help=f"largest video frame width*height (default {m.max_video_frame_pixels:,}: 3840x2160)")
    g.add_argument("--max-video-decode-pixels", type=_positive_int, default=m.max_video_decode_pixels,
                   help="pixels a video may need decoded to reach its sampled frames (keyframes far apart cost "
                        f"more; default {m.max_video_decode_pixels:,}, about 2,000 1080p frames)")
    g.add_argument("--fetch-timeout", type=_positive_float, default=m.image_fetch_timeout,
                   help="wall-clock seconds for a remote image fetch, connect to last byte (default "
                        f"{m.image_fetch_timeout:g}; videos get {m.video_fetch_timeout / m.image_fetch_timeout:g}x)")
    g.add_argument("--max-concurrent-fetches", type=_positive_int, default=m.max_concurrent_fetches,
                   help=f"remote media fetches at once; serve refuses more (503), batch makes them wait "
                        f"(default {m.max_concurrent_fetches})")


def request_limits(args: argparse.Namespace) -> dict:
    """ServerConfig keywords (media=MediaLimits, counts, default_max_tokens) from _request_limit_args' options."""
    from onevision.server.media import MediaLimits

    folder = args.allowed_local_media_path
    if folder and not os.path.isdir(folder):
        raise CLIError(f"--allowed-local-media-path {folder!r} is not a folder")
    video_timeout = MediaLimits.video_fetch_timeout / MediaLimits.image_fetch_timeout  # as the defaults: 6x
    media = MediaLimits(allow_remote=args.allow_remote_media, allowed_local_path=folder,
                        max_image_pixels=args.max_image_pixels, num_frames=args.num_frames,
                        max_request_pixels=args.max_request_pixels, max_server_pixels=args.max_server_pixels,
                        max_video_seconds=args.max_video_seconds, max_video_frames=args.max_video_frames,
                        max_video_frame_pixels=args.max_video_frame_pixels,
                        max_video_decode_pixels=args.max_video_decode_pixels, image_fetch_timeout=args.fetch_timeout,
                        video_fetch_timeout=args.fetch_timeout * video_timeout,
                        max_concurrent_fetches=args.max_concurrent_fetches)
    return {"media": media, "max_images": args.max_images, "max_videos": args.max_videos, "max_n": args.max_n,
            "default_max_tokens": args.default_max_tokens}


def _serve_limits(serve: argparse.ArgumentParser) -> None:
    """The HTTP server's own resource limits (server/http.py); every refusal names the option."""
    g = serve.add_argument_group("connection limits (each refusal names the option that sets it)")
    g.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="comma-separated Host names the server answers to, '*' for any (default: localhost, "
                        "127.0.0.1, ::1 and --host; any name when --api-key is set); guards against DNS rebinding")
    g.add_argument("--max-connections", type=_positive_int, default=None,
                   help="open HTTP connections; more get 503 and are closed (default: 256, or half the open-file "
                        "limit if that is lower)")
    g.add_argument("--header-timeout", type=_positive_float, default=10.0,
                   help="seconds a connection has to send a request head; idle connections close (default 10)")
    g.add_argument("--body-timeout", type=_positive_float, default=60.0,
                   help="seconds to receive a request body; slower gets 408 (default 60)")
    g.add_argument("--max-json-elements", type=_positive_int, default=200_000,
                   help="JSON values in a request body; more gets 413 (default 200,000)")


def _batch_args(sub) -> None:
    batch = sub.add_parser(
        "batch", help="offline job: a JSONL of chat completion requests (OpenAI batch format) -> results JSONL",
        description="Each input line: {\"custom_id\": ..., \"method\": \"POST\", \"url\": \"/v1/chat/completions\", "
        "\"body\": {chat completion request}}. Each result is appended to --output as it finishes; a rerun with the "
        "same --output skips what is already answered. Exit code 0 only if every line succeeded.")
    _model_args(batch)
    batch.add_argument("--input", "-i", required=True, metavar="FILE", help="requests, one JSON object per line")
    batch.add_argument("--output", "-o", required=True, metavar="FILE",
                       help="results (appended; an existing file is resumed)")
    batch.add_argument("--served-model-name", default=None,
                       help="refuse lines whose body.model differs (default: accept any; records name --model)")
    batch.add_argument("--max-in-flight", type=_positive_int, default=None,
                       help="requests prepared and in the engine at once (default 2 x max-num-seqs)")
    batch.add_argument("--media-threads", type=_positive_int, default=4,
                       help="threads decoding media and building inputs ahead of the engine (default 4)")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _engine_args(batch)
    _request_limit_args(batch)
    ray = batch.add_argument_group("Ray (pip install 'onevision[ray]')")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Data pipeline (a local Ray cluster unless "
                     "--ray-address)")
    ray.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="an existing Ray cluster (e.g. ray://head:10001 or auto); implies --ray")
    ray.add_argument("--ray-replicas", metavar="N", type=_positive_int, default=1,
                     help="engine actors, one engine each (default 1)")
    ray.add_argument("--ray-num-cpus", metavar="N", type=_positive_float, default=1.0,
                     help="CPUs per engine actor (default 1)")
    ray.add_argument("--ray-num-gpus", metavar="N", type=float, default=0.0, help="GPUs per engine actor (default 0)")
    ray.add_argument("--ray-prepare-workers", metavar="N", type=_positive_int, default=1,
                     help="CPU actors decoding media and building inputs (default 1)")
    ray.add_argument("--ray-prepare-cpus", metavar="N", type=_positive_float, default=1.0,
                     help="CPUs per prepare actor (default 1)")
    ray.add_argument("--ray-batch-size", metavar="N", type=_positive_int, default=16,
                     help="requests per Ray batch (default 16)")
    ray.add_argument("--ray-batches-per-replica", metavar="N", type=_positive_int, default=4,
                     help="Ray batches an engine actor runs at once, in one continuous batch (default 4)")


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load(args: argparse.Namespace):
    """(model, processor), with progress on stderr (the hub download shows its own progress bars)."""
    import torch

    from onevision import AutoProcessor, LlavaOnevisionForConditionalGeneration

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        from onevision.loading import cuda_unavailable_message

        raise CLIError(cuda_unavailable_message(f"--device {device}", "--device cpu (or leave --device out)"))
    _status(f"Loading {args.model} ({device}, dtype {args.dtype}) ...")
    start = time.monotonic()
    hub = {"revision": args.revision} if args.revision else {}
    quant = {}
    if getattr(args, "quantize", None):  # int8/int4 kernels take bf16 activations: bf16 unless --dtype says otherwise
        from onevision.quantization import torchao_config_for

        quant = {"quantization_config": torchao_config_for(args.quantize)}
    dtype = "bfloat16" if quant and args.dtype == "auto" else args.dtype
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(args.model, dtype=dtype, device_map=device,
                                                                   **hub, **quant)
    if args.dtype == "auto" and model.device.type == "cpu" and model.dtype == torch.float16:
        model = model.float()  # float16 matmuls are slow (or missing) on CPUs; pass --dtype float16 to keep it
    processor = AutoProcessor.from_pretrained(args.model, **hub)
    _status(f"Loaded in {time.monotonic() - start:.1f} s ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
            f"parameters, {model.dtype}).")
    return model, processor


# --------------------------------------------------------------------------- chat
class ChatSession:
    """A conversation with its media, run on the engine: a follow-up turn finds the earlier turns' KV in the
    prefix cache and their images in the vision cache, so it costs only its new tokens."""

    def __init__(self, model, processor, args: argparse.Namespace):
        from onevision.engine import Engine

        self.model, self.processor, self.args = model, processor, args
        self.engine = Engine(model, processor, engine_config(args))
        self.messages: list[dict[str, Any]] = []
        self.images: list[Any] = []
        self.videos: list[Any] = []
        self.pending: list[tuple[str, Any]] = []
        self.turns = 0
        if args.system:
            self.messages.append({"role": "system", "content": [{"type": "text", "text": args.system}]})

    def add_image(self, source: str) -> None:
        from onevision.processing.media import load_image

        self.pending.append(("image", load_image(source)))

    def add_video(self, source: str) -> None:
        from onevision.processing.media import load_video

        frames, _ = load_video(source, num_frames=self.args.num_frames)
        self.pending.append(("video", frames))

    def clear(self) -> None:
        self.messages = self.messages[:1] if self.args.system else []
        self.images, self.videos, self.pending = [], [], []

    def sampling_params(self):
        from onevision.engine.params import SamplingParams, generation_defaults

        args, gen = self.args, generation_defaults(self.model.generation_config)
        settings: dict[str, Any] = {"max_tokens": args.max_new_tokens, "temperature": max(args.temperature, 0.0),
                                    "seed": args.seed, "repetition_penalty": gen["repetition_penalty"]
                                    if args.repetition_penalty is None else args.repetition_penalty}
        if args.temperature > 0:
            settings.update(top_p=args.top_p if args.top_p is not None else gen["top_p"],
                            top_k=args.top_k if args.top_k is not None else gen["top_k"])
        return SamplingParams(**settings)

    def ask(self, prompt: str, out=None) -> str:
        """Stream the answer to `out` (stdout) and remember the turn; Ctrl-C aborts the request in the engine."""
        out = out or sys.stdout
        content = [{"type": kind} for kind, _ in self.pending] + [{"type": "text", "text": prompt}]
        images = self.images + [m for k, m in self.pending if k == "image"]
        videos = self.videos + [m for k, m in self.pending if k == "video"]
        messages = self.messages + [{"role": "user", "content": content}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        plain = {}
        if self.args.plain_text:  # typed special tokens stay text (the server always does this)
            from onevision.processing.chat_template import content_spans

            render = lambda marked: self.processor.apply_chat_template(marked, add_generation_prompt=True)  # noqa: E731
            plain["plain_text_spans"] = [content_spans(text, messages, self.processor.tokenizer.special_token_strings,
                                                       render)]
        inputs = self.processor(text=text, images=[images] if images else None, videos=videos or None,
                                return_tensors="pt", **plain).to(self.model.device, self.model.dtype)
        self.turns += 1
        request_id = f"turn-{self.turns}"
        self.engine.add_request(request_id, inputs, self.sampling_params())
        pieces: list[str] = []
        try:
            # Ctrl-C raises KeyboardInterrupt at once; should it land where it is swallowed (a finalizer), the
            # answer still stops at the end of the step instead of running on
            with interrupt_event() as interrupted:
                done = False
                while not done:
                    if interrupted.is_set():
                        raise KeyboardInterrupt
                    for result in self.engine.step():
                        piece = result.outputs[0].delta
                        if piece:
                            pieces.append(piece)
                            out.write(piece)
                            out.flush()
                        done = done or result.finished
        except BaseException:
            self.engine.abort(request_id)
            raise
        out.write("\n")
        out.flush()
        answer = "".join(pieces)
        self.messages = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        self.images, self.videos, self.pending = images, videos, []
        return answer


HELP = """commands:
  /image PATH_OR_URL   attach an image to your next message
  /video PATH          attach a video to your next message
  /clear               start a new conversation
  /exit                quit (also Ctrl-D)"""


def _load_media(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The --image/--video media, decoded before the (slow) model load so a bad file is reported at once."""
    from onevision.processing.media import load_image, load_video

    media: list[tuple[str, Any]] = []
    for source in args.image:
        if not source.startswith(("http://", "https://", "data:")) and not os.path.isfile(source):
            raise CLIError(f"image not found: {source}")
        media.append(("image", load_image(source)))
    for path in args.video:
        if not os.path.isfile(path):
            raise CLIError(f"video not found: {path}")
        media.append(("video", load_video(path, num_frames=args.num_frames)[0]))
    return media


class _Progress:
    """Wraps the answer's output stream: a spinner on stderr (a terminal only, like ollama) until the first text
    arrives, then timing figures for --verbose. The answer's text goes to `out` unchanged."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, out, label: str):
        import threading

        self.out, self.label = out, label
        self.start = time.monotonic()
        self.first: float | None = None
        self.pieces = 0  # streamed text pieces: one per generated token except where a character spans tokens
        self._done = threading.Event()
        self._shown = False
        self._thread = threading.Thread(target=self._spin, daemon=True) if sys.stderr.isatty() else None
        if self._thread is not None:
            self._thread.start()

    def _spin(self) -> None:
        frame = 0
        while not self._done.is_set():
            elapsed = time.monotonic() - self.start
            sys.stderr.write(f"\r{self.FRAMES[frame % len(self.FRAMES)]} {self.label} ({elapsed:.0f} s)")
            sys.stderr.flush()
            self._shown, frame = True, frame + 1
            self._done.wait(0.1)

    def stop(self) -> None:
        """Stop the spinner and erase its line (before the first text, or on an interrupt)."""
        if self._thread is not None and not self._done.is_set():
            self._done.set()
            self._thread.join()
            if self._shown:
                sys.stderr.write("\r\033[K")
                sys.stderr.flush()

    def write(self, text: str) -> int:
        if text and text != "\n":
            self.pieces += 1
        if self.first is None and text:
            self.first = time.monotonic()
            self.stop()
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()

    def summary(self, tokens: int) -> str:
        """`N tokens, X tok/s, TTFT Y s` (rate over the tokens after the first, like ollama's eval rate; N counts
        streamed pieces, so a character spanning several tokens counts once)."""
        end = time.monotonic()
        first = self.first if self.first is not None else end
        rate = (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0
        return f"{tokens} tokens, {rate:.1f} tok/s, TTFT {first - self.start:.2f} s"


def _ask(session: ChatSession, prompt: str) -> None:
    """One answer with progress; Ctrl-C stops it (KeyboardInterrupt reaches the caller after the line is cleaned)."""
    kinds = [kind for kind, _ in session.pending]
    label = f"encoding {len(kinds)} {'media item' if len(kinds) == 1 else 'media items'} and reading the prompt" \
        if kinds else "reading the prompt"
    progress = _Progress(sys.stdout, label)
    try:
        session.ask(prompt, progress)
    finally:
        progress.stop()
    if session.args.verbose:
        _status(progress.summary(progress.pieces))


def run_chat(args: argparse.Namespace) -> int:
    media = _load_media(args)
    model, processor = load(args)
    session = ChatSession(model, processor, args)
    session.pending.extend(media)
    if args.prompt is not None:
        _ask(session, args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        _status("Interactive chat. /help for commands; Ctrl-C stops an answer; Ctrl-D (or Ctrl-C here) quits.")
    while True:
        try:
            if interactive:
                print(">>> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt quits (during an answer it only stops the answer)
            _status("")
            return 0
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            rest = rest.strip()
            try:
                if command in ("/exit", "/quit"):
                    return 0
                if command == "/help":
                    _status(HELP)
                elif command == "/clear":
                    session.clear()
                    _status("(new conversation)")
                elif command in ("/image", "/video") and not rest:
                    what = "PATH_OR_URL" if command == "/image" else "PATH"
                    _status(f"usage: {command} {what}  (attaches the {command[1:]} to your next message), "
                            f"e.g. {command} {'examples/cat.jpg' if command == '/image' else 'clip.mp4'}")
                elif command in ("/image", "/video"):
                    (session.add_image if command == "/image" else session.add_video)(rest)
                    _status(f"({command[1:]} attached to your next message)")
                else:
                    _status(f"unknown command {line!r}; /help lists the commands")
            except (ValueError, OSError) as e:
                _status(f"error: {_one_line(e)}")
            continue
        try:
            _ask(session, line)
        except KeyboardInterrupt:  # the answer stops; model, history and attached media are kept, the cut turn is not
            sys.stdout.write("\n")
            sys.stdout.flush()
            _status("(answer interrupted; not added to the conversation)")
        except ValueError as e:  # e.g. the conversation outgrew the context: say so and keep the session
            _status(f"error: {_one_line(e)}")


# --------------------------------------------------------------------------- serve
def _spin_between_parallel_regions() -> None:
    """Before torch (and its libgomp) loads in a server process: OpenMP workers keep spinning for ~1M iterations
    between parallel regions (libgomp's default: 300k) so that the engine thread's thousands of small regions a step
    do not wait on worker wake-ups. Measured with the engine on its own thread (0.5B fp32, 2-core Xeon, one
    computing thread, cpu.reserve_threads_for_engine): decode steps of 1 / 8 sequences 100 / 145 ms -> 85 / 135 ms,
    as fast as on the main thread. An explicit GOMP_SPINCOUNT (or OMP_WAIT_POLICY) in the environment wins."""
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "1000000")


def run_serve(args: argparse.Namespace) -> int:
    _spin_between_parallel_regions()
    try:
        import uvicorn

        from onevision.server.app import ServerConfig, create_app, server_options
    except ImportError as e:
        raise CLIError(f"the server needs extra packages ({e.name} is missing): pip install 'onevision[server]'"
                       ) from None
    limits = request_limits(args)  # a bad --allowed-local-media-path is reported before the port is bound
    from onevision import cpu

    engine_threads = cpu.reserve_threads_for_engine()  # this thread loads and serves HTTP; the engine's computes
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        _status(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it")
    from onevision.server.http import bind_socket, default_allowed_hosts

    sock = bind_socket(args.host, args.port)  # a busy port is reported now, not after the model load
    port = sock.getsockname()[1]
    allowed = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()] if args.allowed_hosts else \
        default_allowed_hosts(args.host, args.api_key)
    if "*" not in allowed and args.host in ("0.0.0.0", "::"):
        _status(f"note: without --api-key the server answers only to the Host names {', '.join(allowed)}; add the "
                "names clients use with --allowed-hosts (a guard against DNS rebinding)")
    _log_to_stderr(args.log_level)
    model, processor = load(args)
    config = ServerConfig(model_name=args.served_model_name or args.model, api_key=args.api_key, **limits,
                          max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_queue=args.max_queue,
                          web=not args.no_web, docs=args.docs, allowed_hosts=tuple(allowed),
                          body_timeout=args.body_timeout, header_timeout=args.header_timeout,
                          max_json_elements=args.max_json_elements,
                          max_connections=args.max_connections or _default_connections(),
                          engine=engine_config(args), engine_threads=engine_threads)
    app = create_app(model, processor, config)
    engine = app.state.server.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: stop admitting (503), let running requests finish
            engine.start_draining()
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()  # a drained SIGTERM is a clean exit (0), not death by signal

    server = Server(uvicorn.Config(app, host=args.host, port=port, log_level=args.log_level,
                                   timeout_graceful_shutdown=args.shutdown_timeout, access_log=False,
                                   **server_options(config)))
    _status(f"Serving {config.model_name!r} on http://{args.host}:{port}/v1 (Ctrl-C to stop)")
    server.run(sockets=[sock])
    return 0 if server.started else 1


def _log_to_stderr(level: str) -> None:
    """onevision's own log lines (one per request, engine throughput while busy) next to uvicorn's."""
    import logging

    logger = logging.getLogger("onevision")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def _default_connections() -> int:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 256
    return 256 if soft == resource.RLIM_INFINITY else max(8, min(256, soft // 2))


# --------------------------------------------------------------------------- batch
def run_batch(args: argparse.Namespace) -> int:
    try:
        from onevision.batch import run
        from onevision.server.app import ServerConfig
    except ImportError as e:
        raise CLIError(f"batch jobs need extra packages ({e.name} is missing): pip install 'onevision[server]'"
                       ) from None
    if not os.path.isfile(args.input):
        raise CLIError(f"--input {args.input!r} is not a file")
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        raise CLIError("--output must not be the --input file")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise CLIError(f"--output: the folder {folder!r} does not exist")
    config = ServerConfig(model_name=args.served_model_name, **request_limits(args))
    device = args.device
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            from onevision.loading import cuda_unavailable_message

            raise CLIError(cuda_unavailable_message(f"--device {device}", "--device cpu (or leave --device out)"))
    import dataclasses

    engine_kwargs = dataclasses.asdict(engine_config(args))
    use_ray = args.ray or args.ray_address is not None
    if not use_ray and device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    _status(f"Batch job {args.input} -> {args.output} with {args.model}" + (" on Ray" if use_ray else "") + " ...")
    summary = run(args.input, args.output, model=args.model, config=config, dtype=args.dtype, device=device,
                  quantize=args.quantize, revision=args.revision, engine_kwargs=engine_kwargs,
                  max_in_flight=args.max_in_flight, media_threads=args.media_threads,
                  progress=not args.no_progress, ray=use_ray, ray_address=args.ray_address,
                  ray_replicas=args.ray_replicas, ray_num_cpus=args.ray_num_cpus, ray_num_gpus=args.ray_num_gpus,
                  ray_prepare_workers=args.ray_prepare_workers, ray_prepare_cpus=args.ray_prepare_cpus,
                  ray_batch_size=args.ray_batch_size, ray_batches_per_replica=args.ray_batches_per_replica)
    if summary.repaired_bytes:
        _status(f"(cut off a torn last line of {summary.repaired_bytes} bytes from {args.output}; its request ran "
                "again)")
    _status(summary.describe())
    return summary.exit_code


# --------------------------------------------------------------------------- entry point
def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from onevision import __version__

        print(f"onevision {__version__}")
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return {"chat": run_chat, "serve": run_serve, "batch": run_batch}[args.command](args)
    except KeyboardInterrupt:
        _status("interrupted")
        return 130
    except BrokenPipeError:
        return 1
    except (CLIError, ValueError, TypeError, OSError, RuntimeError, NotImplementedError, ImportError) as e:
        _status(f"onevision: error: {_one_line(e)}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
