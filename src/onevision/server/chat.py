"""One chat completion, after the app has parsed and authenticated it: cheap checks, then (in a thread pool)
media -> prompt ids -> context check -> sampling parameters, then the answer as JSON or as server-sent events.
Only `create_app` (app.py) calls these; they never run model or media work on the event loop."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from onevision.server.engine import Job
from onevision.server.errors import APIError, ContextLengthExceeded, InvalidRequest
from onevision.server.fetch import RemoteFetcher
from onevision.server.media import PixelBudget, load_request_media, media_sizes
from onevision.server.schemas import ChatCompletionRequest


# --------------------------------------------------------------------------- what the checks read
class RequestState:
    """What check_request and prepare read: the model (or a weightless view of it), processor, tokenizer, the
    ServerConfig's limits, the media fetcher, the decoded-pixel budget shared by concurrent requests
    (--max-server-pixels; used by media work run under media.request_scope), the context a request must fit and the
    reserved placeholder texts. The server's state (app.py) and batch jobs (onevision.batch.State) both build on it."""

    def __init__(self, model, processor, config, fetcher: RemoteFetcher | None = None, engine=None):
        self.model, self.processor, self.config = model, processor, config
        self.tokenizer = processor.tokenizer
        self.fetcher = fetcher or RemoteFetcher(max_redirects=config.media.max_redirects,
                                                max_concurrent=config.media.max_concurrent_fetches,
                                                slot_wait=config.media.fetch_wait)
        self.pixels = PixelBudget(config.media.max_server_pixels)
        self.context = request_context(model, engine)
        self.placeholders = [processor.image_token, processor.video_token]


def request_context(model, engine=None) -> int:
    """The tokens one request may span (prompt + completion): the model's context; with an `onevision.engine.
    Engine`, also no more than its KV pool holds (the engine refuses more; the checks say so with a 400)."""
    if engine is None:
        return int(model.config.text_config.max_position_embeddings)
    return min(engine.max_model_len, engine.blocks.num_blocks * engine.blocks.block_size)


# --------------------------------------------------------------------------- validation
def _text_parts(message) -> list[tuple[str, str]]:
    """(param suffix, text) of a message's text content."""
    if isinstance(message.content, str):
        return [("content", message.content)]
    return [(f"content[{j}].text", p.text) for j, p in enumerate(message.content or []) if p.type == "text"]


MAX_CHARS_PER_TOKEN = 64  # Qwen2 BPE tokens of real text are far shorter; only whitespace runs come close


def check_request(body: ChatCompletionRequest, state) -> None:
    """Everything that can be refused without touching media or the model."""
    config = state.config
    unsupported = [("logprobs", bool(body.logprobs)), ("top_logprobs", bool(body.top_logprobs)),
                   ("tools", bool(body.tools)), ("tool_choice", body.tool_choice not in (None, "none", "auto")),
                   ("logit_bias", bool(body.logit_bias)),
                   ("response_format", body.response_format is not None and body.response_format.type != "text"),
                   ("presence_penalty", bool(body.presence_penalty)),
                   ("frequency_penalty", bool(body.frequency_penalty))]
    for name, used in unsupported:
        if used:
            hint = " (use repetition_penalty instead)" if name.endswith("_penalty") else ""
            raise InvalidRequest(f"{name} is not supported by this server{hint}", param=name,
                                 code="unsupported_parameter")
    if (body.n or 1) > config.max_n:
        raise InvalidRequest(f"n must be <= {config.max_n}, got {body.n}", param="n", code="invalid_value")
    if body.max_tokens is not None and body.max_completion_tokens is not None and \
            body.max_tokens != body.max_completion_tokens:
        raise InvalidRequest("max_tokens and max_completion_tokens differ; send only one", param="max_tokens",
                             code="invalid_value")
    images = videos = 0
    has_content = False
    characters = 0
    for i, message in enumerate(body.messages):
        for suffix, text in _text_parts(message):
            has_content = has_content or bool(text.strip())
            characters += len(text)
            for token in state.placeholders:
                if token in text:
                    raise InvalidRequest(
                        f"the text contains the placeholder {token!r}, which is reserved; attach media as "
                        "image_url / video_url content parts instead", param=f"messages[{i}].{suffix}",
                        code="invalid_placeholder")
        for j, part in enumerate(message.content if isinstance(message.content, list) else []):
            if part.type == "text":
                continue
            if message.role != "user":
                raise InvalidRequest(f"{part.type} content is only supported in user messages",
                                     param=f"messages[{i}].content[{j}]", code="invalid_value")
            has_content = True
            if part.type == "image_url":
                images += 1
                if images > config.max_images:
                    raise InvalidRequest(f"at most {config.max_images} image(s) may be sent in one request",
                                         param=f"messages[{i}].content[{j}].image_url", code="too_many_images")
            else:
                videos += 1
                if videos > config.max_videos:
                    raise InvalidRequest(f"at most {config.max_videos} video(s) may be sent in one request",
                                         param=f"messages[{i}].content[{j}].video_url", code="too_many_videos")
    if not has_content:
        raise InvalidRequest("the messages have no content (no text, images or videos)", param="messages",
                             code="empty_messages")
    if characters > MAX_CHARS_PER_TOKEN * state.context:  # cheap refusal before an expensive tokenization
        raise InvalidRequest(
            f"the messages hold {characters} characters: more than the model's context of {state.context} tokens "
            f"can take (a token covers at most ~{MAX_CHARS_PER_TOKEN} characters); shorten the messages",
            param="messages", code="context_length_exceeded")


def prepare(body: ChatCompletionRequest, state):
    """[thread pool] media -> conversation -> prompt ids -> context check -> (inputs, SamplingParams, prompt
    tokens) for the engine."""
    from onevision.processing import ProcessingError
    from onevision.processing.chat_template import content_spans

    config = state.config
    conversation, items = [], []
    for i, message in enumerate(body.messages):
        content: list[dict] = []
        parts = [("content", None)] if isinstance(message.content, str) else \
            [(f"content[{j}]", p) for j, p in enumerate(message.content or [])]
        for suffix, part in parts:
            if part is None:
                content.append({"type": "text", "text": message.content})
            elif part.type == "text":
                content.append({"type": "text", "text": part.text})
            else:
                kind = "image" if part.type == "image_url" else "video"
                items.append((kind, (part.image_url or part.video_url).url, f"messages[{i}].{suffix}.{part.type}"))
                content.append({"type": kind})
        role = "system" if message.role == "developer" else message.role
        conversation.append({"role": role, "content": content})
    media = load_request_media(items, config.media, state.fetcher, media_sizes(state.processor))
    images = [m for (kind, _, _), m in zip(items, media, strict=True) if kind == "image"]
    videos = [m for (kind, _, _), m in zip(items, media, strict=True) if kind == "video"]
    processor = state.processor
    try:
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        spans = content_spans(prompt, conversation, state.tokenizer.special_token_strings,  # typed tokens: text
                              lambda marked: processor.apply_chat_template(marked, add_generation_prompt=True))
        inputs = processor(text=prompt, images=[images] if images else None, videos=videos or None,
                           return_tensors="pt", plain_text_spans=[spans])
    except ProcessingError as e:
        raise InvalidRequest(f"the messages could not be processed: {e}", param="messages", code="invalid_value") from None
    prompt_tokens = int(inputs["input_ids"].shape[1])
    requested = body.max_completion_tokens or body.max_tokens
    room = state.context - prompt_tokens
    if requested is None:
        if room <= 0:
            raise ContextLengthExceeded(prompt_tokens, 1, state.context)
        max_new = min(config.default_max_tokens, room)
    else:
        if requested > room:
            raise ContextLengthExceeded(prompt_tokens, requested, state.context)
        max_new = requested
    if body.min_tokens and body.min_tokens > max_new:
        raise InvalidRequest(f"min_tokens ({body.min_tokens}) is larger than max_tokens ({max_new})",
                             param="min_tokens", code="invalid_value")
    model = state.model
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs and inputs[key].is_floating_point():
            inputs[key] = inputs[key].to(model.dtype)
    try:
        params = sampling_params(body, model, max_new)
    except ValueError as e:
        raise InvalidRequest(f"invalid generation settings: {e}", code="invalid_value") from None
    return dict(inputs), params, prompt_tokens


def sampling_params(body: ChatCompletionRequest, model, max_new: int):
    """The request's settings over the checkpoint's generation config, as transformers' generate() merges them
    (a left-out temperature means the checkpoint's default: greedy for the llava-hf checkpoints; a sampled
    request without top_k gets the config's top_k, 50 by default). Greedy requests with n > 1 run once."""
    from onevision.engine.params import SamplingParams, generation_defaults

    gen = generation_defaults(model.generation_config)
    # like vLLM, a temperature below 1e-5 means greedy (dividing logits by it would overflow)
    sample = gen["sample"] if body.temperature is None else body.temperature >= 1e-5
    settings: dict[str, Any] = {"max_tokens": max_new, "min_tokens": body.min_tokens or 0,
                                "repetition_penalty": body.repetition_penalty if body.repetition_penalty is not None
                                else gen["repetition_penalty"],
                                "stop": [body.stop] if isinstance(body.stop, str) else list(body.stop or []),
                                "seed": None if body.seed is None else body.seed % 2**63}
    if sample:
        settings.update(
            n=body.n or 1,
            temperature=gen["temperature"] if body.temperature is None else body.temperature,
            top_p=gen["top_p"] if body.top_p is None else body.top_p,
            top_k=gen["top_k"] if body.top_k is None else max(body.top_k, 0),
            min_p=gen["min_p"] if body.min_p is None else body.min_p)
    else:  # settings that only shape sampling are dropped for greedy decoding
        settings["temperature"] = 0.0
    return SamplingParams(**settings)


# --------------------------------------------------------------------------- answering
async def wait_disconnect(receive) -> None:
    """Return once the client has gone (the one disconnect listener: preparing, answering and streaming)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _collect(job: Job, rows: int) -> tuple[list[str], list[str], list[int]]:
    texts, reasons, counts = [""] * rows, ["stop"] * rows, [0] * rows
    while True:
        event = await job.events.get()
        if event[0] == "delta":
            texts[event[1]] += event[2]
        elif event[0] == "finish":
            reasons[event[1]], counts[event[1]] = event[2], event[3]
        elif event[0] == "end":
            return texts, reasons, counts
        else:
            code = event[2] if len(event) > 2 else "generation_failed"
            if code == "shutting_down":
                raise APIError(event[1], status=503, type="server_error", code=code, headers={"Retry-After": "5"})
            raise APIError(event[1], status=500, type="server_error", code=code)


async def complete(job: Job, request: Request, meta: dict, n: int, copies: int, prompt_tokens: int):
    collect = asyncio.ensure_future(_collect(job, job.rows))
    gone = asyncio.ensure_future(wait_disconnect(request.receive))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():  # the client left (or the server is stopping): stop the generation
            job.cancel()
            collect.cancel()
    if not collect.done() or collect.cancelled():
        return JSONResponse({}, status_code=499)
    texts, reasons, counts = collect.result()
    choices = [{"index": i, "message": {"role": "assistant", "content": texts[i // copies]},
                "finish_reason": reasons[i // copies], "logprobs": None} for i in range(n)]
    completion = sum(counts[i // copies] for i in range(n))
    return JSONResponse({**meta, "object": "chat.completion", "choices": choices, "system_fingerprint": None,
                         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                   "total_tokens": prompt_tokens + completion}})


def _chunk(meta: dict, choices: list[dict], usage: dict | None = None) -> bytes:
    body = {**meta, "object": "chat.completion.chunk", "choices": choices, "system_fingerprint": None}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


async def sse_events(job: Job, meta: dict, n: int, copies: int, prompt_tokens: int, include_usage: bool):
    for i in range(n):
        yield _chunk(meta, [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])
    counts = [0] * job.rows
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), timeout=5.0)
        except asyncio.TimeoutError:  # still queued: a comment line keeps proxies (and disconnect detection) alive
            yield b": waiting\n\n"
            continue
        kind = event[0]
        if kind == "delta":
            row, text = event[1], event[2]
            for i in range(row * copies, row * copies + copies):
                yield _chunk(meta, [{"index": i, "delta": {"content": text}, "logprobs": None,
                                     "finish_reason": None}])
        elif kind == "finish":
            row, reason, counts[row] = event[1], event[2], event[3]
            for i in range(row * copies, row * copies + copies):
                yield _chunk(meta, [{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
        elif kind == "end":
            if include_usage:
                completion = sum(counts) * copies
                yield _chunk(meta, [], {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                        "total_tokens": prompt_tokens + completion})
            break
        else:  # failed mid-generation: the status line is already sent, so the error goes in the stream
            code = event[2] if len(event) > 2 else "generation_failed"
            error = {"error": {"message": event[1], "type": "server_error", "param": None, "code": code}}
            yield b"data: " + json.dumps(error).encode() + b"\n\n"
            break
    yield b"data: [DONE]\n\n"


class SSEResponse(Response):
    """text/event-stream response that cancels the job as soon as the client disconnects (it listens for
    http.disconnect while streaming, independent of the ASGI server's send behaviour)."""

    def __init__(self, job: Job, events):
        super().__init__(status_code=200, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.job, self.events = job, events

    async def __call__(self, scope, receive, send):
        headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        stream = asyncio.ensure_future(self._stream(send))
        gone = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await asyncio.wait({stream, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not stream.done():
                self.job.cancel()
                stream.cancel()
            gone.cancel()
            await asyncio.gather(stream, gone, return_exceptions=True)
            await self.events.aclose()

    async def _stream(self, send) -> None:
        try:
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we were writing
            self.job.cancel()


__all__ = ["SSEResponse", "check_request", "complete", "prepare", "sampling_params", "sse_events"]
