"""The OpenAI-compatible HTTP server: `create_app(model, processor, ServerConfig(...))` -> FastAPI app.

Request path, cheap checks first, every 4xx decided before a response byte is sent:
    [protocol, server/http.py] connection cap (503), request head deadline (connection closed)
    Host header (400) -> API key (401) -> body size and read deadline (413, 408) -> JSON element count (413,
    in a thread) -> JSON + schema (400, param = field path) -> model name (404)
    -> unsupported options, counts, placeholders typed in text (400) -> admission (503 + Retry-After)
    -> [thread pool] fetch, probe, pixel budgets, decode media (server/media.py), chat template, tokenize with
       message text as plain text, context check (400) -> [worker] generate
Media work and generation never run on the event loop. A client that disconnects stops its media decoding and
cancels its generation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from onevision.server import chat
from onevision.engine import Engine, EngineConfig
from onevision.server.engine import ServingEngine
from onevision.server.docs import add_docs
from onevision.server.errors import APIError, AuthError, InvalidRequest, PayloadTooLarge, unknown_model
from onevision.server.http import LOOPBACK_HOSTS, count_json_elements, host_allowed
from onevision.server.media import MediaLimits, RemoteFetcher, RequestScope, request_scope
from onevision.server.schemas import ChatCompletion, ChatCompletionRequest, ErrorResponse, Health, ModelCard, ModelList

log = logging.getLogger("onevision.server")


@dataclass
class ServerConfig:
    model_name: str = "onevision"
    api_key: str | None = None
    media: MediaLimits = field(default_factory=MediaLimits)
    max_images: int = 8
    max_videos: int = 1
    max_n: int = 8
    max_body_bytes: int = 32 * 1024 * 1024
    default_max_tokens: int = 1024
    max_queue: int = 64
    docs: bool = False  # /docs (Swagger UI, assets served locally); off by default like a production server
    engine: EngineConfig = field(default_factory=EngineConfig)  # batching, KV and vision cache sizes
    metrics: bool = True  # GET /metrics (Prometheus text format)
    stats_interval: float = 10.0  # seconds between throughput log lines while busy
    engine_threads: int | None = None  # intra-op threads of the engine thread (None: the creating thread's)
    media_threads: int = 4
    web: bool = True  # the chat page at GET / (server/web/)
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS  # Host names answered ("*": any); see server/http.py
    body_timeout: float = 60.0  # seconds to receive a request body
    max_json_elements: int = 200_000  # values in a JSON body
    max_connections: int = 256  # open connections (used by the uvicorn protocol, see server_options)
    header_timeout: float = 10.0  # seconds for a request head, from connect or from the previous answer
    keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open


# --------------------------------------------------------------------------- ASGI middleware
class GuardMiddleware:
    """Request id on every response; the Host header checked against the allowed names (400); the API key
    checked for /v1/* before the body is read (401); bodies over the limit refused with 413 (by Content-Length,
    and while the body streams in), a body not in within `body_timeout` seconds with 408; a JSON body with more
    than `max_json_elements` values with 413 (counted in a thread, before FastAPI parses it on the event loop).
    When a forced shutdown cancels a request, its client still gets an OpenAI-shaped answer: a 503, or for a
    stream already under way an error event and `data: [DONE]`."""

    def __init__(self, app, max_body_bytes: int, api_key: str | None = None, allowed_hosts=("*",),
                 body_timeout: float = 60.0, max_json_elements: int = 200_000):
        self.app, self.max_body_bytes, self.api_key = app, max_body_bytes, api_key
        self.allowed_hosts, self.body_timeout, self.max_json_elements = list(allowed_hosts), body_timeout, \
            max_json_elements

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = f"req-{uuid.uuid4().hex[:16]}"
        scope.setdefault("state", {})["request_id"] = request_id
        sent = {"started": False, "done": False, "stream": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
                sent["started"] = True
                sent["stream"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                     for k, v in message["headers"])
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                sent["done"] = True
            await send(message)

        try:
            await self._guarded(scope, receive, send_with_id)
        except asyncio.CancelledError:  # forced shutdown (--shutdown-timeout passed): answer, then let go
            if not sent["done"]:
                await _shutdown_answer(send_with_id, sent)

    async def _guarded(self, scope, receive, send):
        headers = dict(scope.get("headers", []))
        host = headers.get(b"host")
        if not host_allowed(None if host is None else host.decode("latin-1"), self.allowed_hosts):
            return await _send_error(send, _bad_host(host.decode("latin-1"), self.allowed_hosts))
        if self.api_key and scope.get("path", "").startswith("/v1/"):
            error = key_error(headers.get(b"authorization", b"").decode("latin-1"), self.api_key)
            if error is not None:
                return await _send_error(send, error)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                too_big = False
            if too_big:
                return await _send_error(send, _too_large(self.max_body_bytes))
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, seen = [], 0  # read the (bounded) body here: chunked uploads are cut off at the limit
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await _send_error(send, APIError(
                    f"the request body did not arrive within {self.body_timeout:g} s (the server's limit, "
                    "--body-timeout)", status=408, code="body_timeout", headers={"connection": "close"}))
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.max_body_bytes:
                return await _send_error(send, _too_large(self.max_body_bytes))
            chunks.append(body)
            if not message.get("more_body"):
                break
        data = b"".join(chunks)
        del chunks
        if len(data) < 65536:
            elements = count_json_elements(data, self.max_json_elements)
        else:  # a big body is counted off the event loop
            elements = await asyncio.to_thread(count_json_elements, data, self.max_json_elements)
        if elements > self.max_json_elements:
            return await _send_error(send, PayloadTooLarge(
                f"the request body holds more than {self.max_json_elements} JSON values (the server's limit, "
                "--max-json-elements)", code="too_many_json_elements"))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _shutdown_answer(send, sent: dict) -> None:
    message, code = "the server is shutting down (its --shutdown-timeout passed); retry the request", "shutting_down"
    error = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    try:
        if not sent["started"]:
            await _send_error(send, APIError(message, status=503, type="server_error", code=code,
                                             headers={"connection": "close"}))
        elif sent["stream"]:
            body = b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n"
            await send({"type": "http.response.body", "body": body, "more_body": False})
    except Exception:  # noqa: BLE001 - the client is gone: nothing left to tell it
        pass


def _bad_host(host: str, allowed: list[str]) -> InvalidRequest:
    return InvalidRequest(f"this server does not answer to the Host {host!r} (it answers to {', '.join(allowed)}); "
                          "if that is its name, start it with --allowed-hosts (a guard against DNS rebinding)",
                          code="invalid_host")


def key_error(header: str, api_key: str) -> AuthError | None:
    """None when `header` is 'Bearer <api_key>' (constant-time comparison), else the 401 to send."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return AuthError("missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        return AuthError("invalid API key", code="invalid_api_key")
    return None


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is larger than {limit} bytes", code="request_too_large")


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_response(error: APIError) -> JSONResponse:
    body = _printable(error.body())  # a client's invalid Unicode echoed in a message must not break the reply
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _printable(value):
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()}
    return value


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_of(loc: tuple) -> str | None:
    """pydantic loc ('body', 'messages', 0, 'content', 'list[ContentPart]', 1, 'text')
    -> 'messages[0].content[1].text' (union branch tags dropped)."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part not in _UNION_TAGS and "[" not in part and "-" not in part:
            out += f".{part}" if out else part
    return out or None


def _validation_error(errors: list[dict]) -> InvalidRequest:
    if not errors:
        return InvalidRequest("invalid request body")
    first = max(errors, key=lambda e: len([p for p in e.get("loc", ()) if p not in _UNION_TAGS]))
    if first.get("type") in ("json_invalid", "json_type"):
        return InvalidRequest("the request body is not valid JSON", code="invalid_json")
    loc = tuple(first.get("loc", ()))
    param = _param_of(loc)
    if param is None and loc in ((), ("body",)):
        return InvalidRequest("the request body must be a JSON object with 'model' and 'messages'",
                              code="invalid_body")
    message = str(first.get("msg", "invalid value"))
    got = first.get("input")
    if isinstance(got, (bool, int, float)) or (isinstance(got, str) and len(got) <= 40):  # say what was sent
        message += f" (got {json.dumps(got, ensure_ascii=False)})"
    return InvalidRequest(f"{param}: {message}" if param else message, param=param, code="invalid_value")


# --------------------------------------------------------------------------- the app
class _State(chat.RequestState):
    """The checks' state (chat.RequestState) plus what serving adds: the engine and the media pool."""

    def __init__(self, model, processor, config: ServerConfig, fetcher: RemoteFetcher | None):
        core = Engine(model, processor, config.engine)
        super().__init__(model, processor, config, fetcher, core)
        self.engine = ServingEngine(core, max_queue=config.max_queue, stats_interval=config.stats_interval,
                                    threads=config.engine_threads)
        # room for the most remote fetches at once on top of media_threads: a slow remote ties up nothing else
        self.pool = ThreadPoolExecutor(config.media_threads + config.media.max_concurrent_fetches,
                                       thread_name_prefix="onevision-media")
        self.created = int(time.time())


def create_app(model, processor, config: ServerConfig | None = None, *, fetcher: RemoteFetcher | None = None
               ) -> FastAPI:
    """The FastAPI app serving `model` under `config.model_name`. Call `app.state.server.engine.stop()` (done at
    lifespan shutdown) to cancel what is left and join the worker."""
    from contextlib import asynccontextmanager

    config = config or ServerConfig()
    state = _State(model, processor, config, fetcher)

    @asynccontextmanager
    async def lifespan(app):
        yield
        state.engine.stop()
        state.pool.shutdown(wait=False, cancel_futures=True)

    errors = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 500, 503)}
    app = FastAPI(title="onevision", version=_version(), lifespan=lifespan, responses=errors, docs_url=None,
                  redoc_url=None)
    if config.docs:
        add_docs(app)
    app.state.server = state
    app.add_middleware(GuardMiddleware, max_body_bytes=config.max_body_bytes, api_key=config.api_key,
                       allowed_hosts=config.allowed_hosts, body_timeout=config.body_timeout,
                       max_json_elements=config.max_json_elements)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error_response(_validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {400: "the request body could not be parsed as JSON", 404: "unknown route",
                   405: "method not allowed"}.get(exc.status_code, "request error")
        return _error_response(APIError(message, status=exc.status_code, code=kind,
                                        type="invalid_request_error" if exc.status_code < 500 else "server_error"))

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError):
        return _error_response(InvalidRequest("the request body is nested too deeply", code="invalid_json"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        request_id = request.scope.get("state", {}).get("request_id", "?")
        log.error("internal error (request_id=%s)", request_id, exc_info=exc)
        # this answer is sent from outside the middleware stack, so the request id header is set here
        return _error_response(APIError(f"internal error (request_id={request_id})", status=500,
                                        type="server_error", code="internal_error",
                                        headers={"x-request-id": request_id}))

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health():
        engine = state.engine
        body = {"status": "draining" if engine.draining else "ok", "running": engine.running,
                "waiting": engine.waiting}
        return JSONResponse(body, status_code=503 if engine.draining else 200)

    if config.metrics:
        from fastapi.responses import PlainTextResponse

        from onevision.engine.metrics import prometheus_text

        @app.get("/metrics", response_class=PlainTextResponse)
        async def metrics():
            """Engine state in the Prometheus text format, under vLLM's metric names."""
            text = prometheus_text(state.engine.engine.engine.metrics, state.engine.snapshot(), config.model_name)
            return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=config.model_name, created=state.created, max_model_len=state.context)])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def model_card(model_id: str):
        if model_id != config.model_name:
            raise unknown_model(model_id, [config.model_name])
        return ModelCard(id=config.model_name, created=state.created, max_model_len=state.context)

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        request_id = request.scope.get("state", {}).get("request_id", f"req-{uuid.uuid4().hex[:16]}")
        if body.model != config.model_name:
            raise unknown_model(body.model, [config.model_name])
        chat.check_request(body, state)
        slot = state.engine.acquire()
        try:
            inputs, params, prompt_tokens = await _prepare(state, request, body)
            greedy = params.greedy
            n = body.n or 1
            job = state.engine.submit(slot, inputs, params, 1 if greedy else n, request_id, prompt_tokens)
        except BaseException:
            slot.release()
            raise
        meta = {"id": f"chatcmpl-{request_id[4:]}", "created": int(time.time()), "model": config.model_name}
        copies = n if greedy else 1  # greedy answers are identical: generate once, return n copies
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return chat.SSEResponse(job, chat.sse_events(job, meta, n, copies, prompt_tokens, include_usage))
        return await chat.complete(job, request, meta, n, copies, prompt_tokens)

    if config.web:
        from onevision.server.web import add_routes

        add_routes(app)
    return app


async def _prepare(state: _State, request: Request, body: ChatCompletionRequest):
    """chat.prepare in the media pool under a RequestScope: the server's pixel budget, and decoding stops when the
    client disconnects meanwhile."""
    scope = RequestScope(state.pixels)

    def run():
        with request_scope(scope):
            return chat.prepare(body, state)

    future = asyncio.get_running_loop().run_in_executor(state.pool, run)
    gone = asyncio.ensure_future(chat.wait_disconnect(request.receive))
    try:
        await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not future.done():
            scope.cancelled.set()
    if not future.done():
        await asyncio.gather(future, return_exceptions=True)
        raise APIError("the client disconnected", status=499, code="client_disconnected")
    return future.result()


def server_options(config: ServerConfig, http: str = "auto") -> dict:
    """uvicorn.Config keywords that enforce `config`'s connection limits (server/http.py)."""
    from onevision.server.http import guarded_protocol, http_protocol

    return {"http": guarded_protocol(http_protocol(http), config.max_connections, config.header_timeout),
            "timeout_keep_alive": config.keep_alive}


def _version() -> str:
    from onevision import __version__

    return __version__


__all__ = ["GuardMiddleware", "ServerConfig", "create_app", "server_options"]
