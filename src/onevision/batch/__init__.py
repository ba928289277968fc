"""Offline batch jobs (`onevision batch`): a JSONL file of chat completion requests in OpenAI's batch format in,
one result record per line out, run on the serving engine's continuous batching.

    from onevision.batch import run
    summary = run("requests.jsonl", "results.jsonl", model="llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    summary.ok        # every line succeeded (also counting what an earlier run of the same output answered)

Nothing is lost: each record is appended and flushed as its request finishes; a rerun with the same output file
skips the custom_ids already answered (and repairs a torn last line); a bad line gets an error record and the job
goes on. With `ray=True` the same job runs as a Ray Data pipeline (onevision.batch.distributed).
File formats: onevision.batch.records.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from onevision.batch.records import (Done, LineError, Request, answer_record, error_record, new_id, open_output,
                                     parse_line, read_lines, write)

log = logging.getLogger("onevision.batch")


# --------------------------------------------------------------------------- request -> model inputs
def State(model, processor, config, fetcher=None, engine=None):
    """What the server's request checks (onevision.server.chat) read: limits, processor, model facts, fetcher,
    the pixel budget and the context (with `engine`, also capped by its KV pool, like the server's).
    `model` may be a weightless `ModelFacts` (Ray's CPU stage builds inputs without loading weights).
    Unlike the server, a record whose media wait for the pixel budget (--max-server-pixels, shared by the job's
    media threads) waits until other records' media are decoded instead of failing after `pixel_wait` seconds, and
    a remote fetch waits for one of the --max-concurrent-fetches slots instead of failing at once."""
    import dataclasses
    import math

    from onevision.server.chat import RequestState

    config = dataclasses.replace(config, media=dataclasses.replace(config.media, pixel_wait=math.inf,
                                                                   fetch_wait=math.inf))
    return RequestState(model, processor, config, fetcher, engine)


class ModelFacts:
    """The parts of a model the request checks read (config, generation config, device, dtype), without weights."""

    def __init__(self, path: str, dtype: str = "auto", revision: str | None = None):
        import torch

        from onevision.config import LlavaOnevisionConfig
        from onevision.generation.config import GenerationConfig
        from onevision.loading import resolve_files

        hub = {"revision": revision} if revision else {}
        folder = resolve_files(path, ["*.json", "*.jinja", "*.txt"], **hub)
        self.config = LlavaOnevisionConfig.from_pretrained(folder)
        self.generation_config = GenerationConfig.from_model_folder(folder, self.config)
        self.device = torch.device("cpu")
        self.dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)


def build(request: Request, state: State):
    """The body through the server's schema, checks and media rules -> (inputs, SamplingParams, prompt_tokens,
    copies of each answer).
    Raises the server's APIError (an error record) for anything refused."""
    from pydantic import ValidationError

    from onevision.server import chat
    from onevision.server.app import _validation_error
    from onevision.server.errors import unknown_model
    from onevision.server.media import RequestScope, request_scope
    from onevision.server.schemas import ChatCompletionRequest

    try:
        body = ChatCompletionRequest.model_validate(request.body)
    except ValidationError as e:
        raise _validation_error(list(e.errors())) from None
    except RecursionError:
        from onevision.server.errors import InvalidRequest

        raise InvalidRequest("the request body is nested too deeply", code="invalid_body") from None
    names = state.config.model_name
    if names is not None and body.model != names:
        raise unknown_model(body.model, [names])
    chat.check_request(body, state)
    with request_scope(RequestScope(state.pixels)):  # the job's pixel budget, as the server's app._prepare
        inputs, params, prompt_tokens = chat.prepare(body, state)
    copies = (body.n or 1) if params.greedy else 1  # greedy answers are identical: run once (like the server)
    return inputs, params, prompt_tokens, copies


def completion_body(output, request_id: str, model_name: str, prompt_tokens: int, created: int,
                    copies: int = 1) -> dict:
    """A finished RequestOutput as the server's chat.completion JSON; `copies` > 1: a greedy answer run once for
    n identical choices (like the server)."""
    outs = [c for c in output.outputs for _ in range(copies)]
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                "logprobs": None} for i, c in enumerate(outs)]
    completion = sum(len(c.token_ids) for c in outs)
    return {"id": f"chatcmpl-{request_id.removeprefix('req-')}", "object": "chat.completion", "created": created,
            "model": model_name, "choices": choices, "system_fingerprint": None,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}


# --------------------------------------------------------------------------- bookkeeping
@dataclass
class Summary:
    """The outcome of a run: `ok` is True when every line of the input has a successful answer in the output."""

    lines: int = 0  # non-blank input lines
    succeeded: int = 0  # answered by this run
    failed: int = 0  # error records written by this run
    skipped: int = 0  # already in the output file (from an earlier run)
    skipped_failed: int = 0  # ... of which error records
    completion_tokens: int = 0
    seconds: float = 0.0
    first_record_seconds: float | None = None  # when the first record was written (start-up: load, actors)
    repaired_bytes: int = 0  # a torn last line cut off the output file
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.skipped_failed == 0

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def describe(self) -> str:
        ran = self.succeeded + self.failed
        text = f"{ran} request(s) run: {self.succeeded} succeeded, {self.failed} failed"
        if self.skipped:
            text += f"; {self.skipped} already in the output ({self.skipped_failed} of them failed)"
        if self.seconds > 0 and ran:
            text += (f"; {ran / self.seconds:.2f} requests/s, {self.completion_tokens / self.seconds:.1f} "
                     "generated tokens/s")
        if not self.ok:
            text += (f". Error records (\"error\" not null) in {self.output} say what was wrong with each line; "
                     "to retry them, remove them from the output and rerun")
        return text


class Writer:
    """Appends records to the output (flushed each), counts them and moves the progress bar."""

    def __init__(self, f, done: Done, summary: Summary, lines: int, progress: bool):
        self.f, self.done, self.summary = f, done, summary
        self.start = time.monotonic()
        self.bar = _bar(lines, progress)

    def skip(self, line: int, custom_id: str | None) -> None:
        self.summary.skipped += 1
        self.summary.skipped_failed += not self.done.ok(line, custom_id)
        if self.bar is not None:
            self.bar.total = max(self.bar.total - 1, self.bar.n)
            self.bar.set_postfix_str(self._postfix(), refresh=False)

    def put(self, record: dict, tokens: int = 0) -> None:
        write(self.f, record)
        if self.summary.first_record_seconds is None:
            self.summary.first_record_seconds = time.monotonic() - self.start
        if record["error"] is None:
            self.summary.succeeded += 1
        else:
            self.summary.failed += 1
        self.summary.completion_tokens += tokens
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.update(1)

    def _postfix(self) -> str:
        s = self.summary
        rate = s.completion_tokens / max(time.monotonic() - self.start, 1e-9)
        text = f"{rate:.1f} tok/s, {s.failed} failed"
        return text + (f", {s.skipped} skipped (done before)" if s.skipped else "")

    def close(self) -> None:
        self.summary.seconds = time.monotonic() - self.start
        if self.bar is not None:
            self.bar.close()
        self.f.close()


def _bar(total: int, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True, smoothing=0.1, desc="batch")


def count_lines(path) -> int:
    return sum(1 for _ in read_lines(path))


def requests(path, done: Done, writer: Writer):
    """The input's requests still to run, in order. Request-less lines and repeated custom_ids become error
    records here; lines the output already answers are skipped."""
    seen: set[str] = set()
    for number, raw in read_lines(path):
        item = parse_line(number, raw)
        if item.custom_id is not None:
            if item.custom_id in seen:
                from onevision.server.errors import InvalidRequest

                item = LineError(number, None, InvalidRequest(
                    f"line {number}: custom_id {item.custom_id!r} was used by an earlier line; every request needs "
                    "its own custom_id (this line was not run)", param="custom_id", code="duplicate_custom_id"))
            else:
                seen.add(item.custom_id)
        if done.has(item.line, item.custom_id):
            writer.skip(item.line, item.custom_id)
        elif isinstance(item, LineError):
            writer.put(error_record(item.line, item.custom_id, item.error))
        else:
            yield item


# --------------------------------------------------------------------------- the job
def run(input: str, output: str, *, model: str | None = None, engine=None, config=None, dtype: str = "auto",
        device: str = "cpu", quantize: str | None = None, revision: str | None = None,
        engine_kwargs: dict[str, Any] | None = None, max_in_flight: int | None = None, media_threads: int = 4,
        progress: bool = True, ray: bool = False, ray_address: str | None = None, ray_replicas: int = 1,
        ray_num_cpus: float = 1.0, ray_num_gpus: float = 0.0, ray_prepare_workers: int = 1,
        ray_prepare_cpus: float = 1.0, ray_batch_size: int = 16, ray_batches_per_replica: int = 4,
        fetcher=None) -> Summary:
    """Run every request of `input` (JSONL, OpenAI batch format) and append one record per line to `output`.

    model: hub id or folder (an Engine is built with `dtype`, `device`, `quantize`, `engine_kwargs`), or
    engine: an `onevision.engine.Engine` already built (local runs). config: `onevision.server.ServerConfig`
    for the request limits and media rules (model_name None accepts any body "model"; records name --model).
    max_in_flight: requests prepared and handed to the engine at once (default 2 * max_num_seqs).
    ray: run as a Ray Data pipeline (`ray_replicas` engine actors with `ray_num_cpus`/`ray_num_gpus` each, taking
    `ray_batches_per_replica` batches of `ray_batch_size` requests at once; `ray_prepare_workers` CPU actors with
    `ray_prepare_cpus` each build the inputs) on the cluster at `ray_address`, else the one already initialised,
    else one `ray.init()` starts."""
    from onevision.server.app import ServerConfig

    if model is None and engine is None:
        raise ValueError("pass model= (a hub id or folder) or engine= (an onevision.engine.Engine)")
    if ray and model is None:
        raise ValueError("ray=True loads the model in each engine actor: pass model= (a hub id or a folder every "
                         "node can read), not engine=")
    if ray:
        from onevision.batch.distributed import require_ray

        require_ray()  # before anything is read or written
    elif engine is None:  # before the output is touched: a model that can't load leaves no trace
        engine = load_engine(model, dtype=dtype, device=device, quantize=quantize, revision=revision,
                             **(engine_kwargs or {}))
    config = config or ServerConfig(model_name=None)
    model_name = config.model_name or model or "onevision"
    total = count_lines(input)
    done, f = open_output(output)
    summary = Summary(lines=total, repaired_bytes=done.repaired, output=str(output))
    writer = Writer(f, done, summary, total, progress)
    try:
        if ray:
            from onevision.batch.distributed import run_ray

            run_ray(requests(input, done, writer), writer, model=model, config=config, model_name=model_name,
                    dtype=dtype, device=device, quantize=quantize, revision=revision,
                    engine_kwargs=engine_kwargs or {}, address=ray_address, replicas=ray_replicas,
                    num_cpus=ray_num_cpus, num_gpus=ray_num_gpus, prepare_workers=ray_prepare_workers,
                    prepare_cpus=ray_prepare_cpus, batch_size=ray_batch_size,
                    batches_per_replica=ray_batches_per_replica)
        else:
            state = State(engine.model, engine.processor, config, fetcher, engine)
            limit = max_in_flight or 2 * _max_num_seqs(engine)
            run_local(requests(input, done, writer), writer, engine, state, model_name, limit, media_threads)
    finally:
        writer.close()
    return summary


def load_engine(model: str, revision: str | None = None, **kwargs):
    """Engine.from_pretrained(model, dtype=, device=, quantize=, **EngineConfig fields); a hub `revision` is
    resolved to its downloaded folder first."""
    if revision:
        from onevision.loading import resolve_files

        model = resolve_files(model, ["*.json", "*.safetensors", "*.jinja", "*.txt"], revision=revision)
    from onevision.engine import Engine

    return Engine.from_pretrained(model, **kwargs)


def _max_num_seqs(engine) -> int:
    config = getattr(engine, "config", None)
    return int(getattr(config, "max_num_seqs", 0) or 32)


@dataclass
class Running:
    """A request handed to the engine, and the records it can end with."""

    request: Request
    request_id: str
    prompt_tokens: int
    copies: int = 1
    created: int = field(default_factory=lambda: int(time.time()))

    def answered(self, out, model_name: str) -> tuple[dict, int]:
        body = completion_body(out, self.request_id, model_name, self.prompt_tokens, self.created, self.copies)
        return answer_record(self.request.custom_id, self.request_id, body), body["usage"]["completion_tokens"]

    def refused(self, error: Exception) -> dict:
        """The engine would not take it (settings it can't run, e.g. more KV cache than it holds)."""
        from onevision.server.errors import APIError

        return error_record(self.request.line, self.request.custom_id, APIError(
            f"the request could not be run: {error}", code="invalid_value"), self.request_id)

    def failed(self) -> dict:
        from onevision.server.errors import Internal

        return error_record(self.request.line, self.request.custom_id, Internal(
            f"internal error during generation (request_id={self.request_id})", code="generation_failed"),
            self.request_id)


class Driver:
    """Requests into an engine (driven on this thread), finished records out. A request the engine refuses, or
    one in a step that fails, gets an error record; the job goes on."""

    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.running: dict[str, Running] = {}

    def submit(self, request: Request, inputs, params, prompt_tokens: int, copies: int = 1) -> dict | None:
        """Hand the request to the engine; -> an error record if it refuses it, else None."""
        job = Running(request, new_id("req-"), prompt_tokens, copies)
        try:
            self.engine.add_request(job.request_id, inputs, params)
        except (ValueError, TypeError) as e:
            return job.refused(e)
        self.running[job.request_id] = job
        return None

    def step(self) -> list[tuple[dict, int]]:
        """One engine step -> (record, completion tokens) of each request that finished."""
        try:
            outputs = self.engine.step()
        except Exception:  # a failed step takes the requests in it down, not the job
            log.exception("engine step failed; %d request(s) get error records", len(self.running))
            failed = [(job.failed(), 0) for job in self.running.values()]
            self.abort_all()
            return failed
        return [self.running.pop(out.request_id).answered(out, self.model_name) for out in outputs
                if out.finished and out.request_id in self.running]

    def abort_all(self) -> None:
        for request_id in self.running:
            _abort(self.engine, request_id)
        self.running.clear()


def prepared(request: Request, future: Future) -> tuple[Any, dict | None]:
    """(inputs, params, prompt_tokens, copies) of a build, or (None, error record)."""
    from onevision.server.errors import APIError, Internal

    try:
        return future.result(), None
    except APIError as e:
        return None, error_record(request.line, request.custom_id, e)
    except Exception:
        log.exception("preparing line %d (custom_id %r) failed", request.line, request.custom_id)
        return None, error_record(request.line, request.custom_id, Internal(
            f"internal error while preparing line {request.line}", code="internal_error"))


def run_local(items, writer: Writer, engine, state: State, model_name: str, max_in_flight: int,
              media_threads: int) -> None:
    """Inputs are built on a thread pool a little ahead of the engine (media decoding overlaps generation); at
    most `max_in_flight` requests are in the engine; each record is written as its request finishes."""
    driver = Driver(engine, model_name)
    pending: collections.deque[tuple[Request, Future]] = collections.deque()
    exhausted = False
    with ThreadPoolExecutor(media_threads, thread_name_prefix="onevision-batch") as pool:
        try:
            while True:
                while not exhausted and len(pending) < max_in_flight + media_threads:
                    request = next(items, None)
                    if request is None:
                        exhausted = True
                    else:
                        pending.append((request, pool.submit(build, request, state)))
                # hand over what is ready; wait for the next one only when the engine has nothing to do
                while pending and len(driver.running) < max_in_flight and (
                        pending[0][1].done() or not driver.running):
                    request, future = pending.popleft()
                    built, record = prepared(request, future)
                    if built is not None:
                        record = driver.submit(request, *built)
                    if record is not None:
                        writer.put(record)
                if driver.running:
                    for record, tokens in driver.step():
                        writer.put(record, tokens)
                elif exhausted and not pending:
                    return
        finally:  # interrupted: nothing half-done stays in the engine
            driver.abort_all()
            for _, future in pending:
                future.cancel()


def _abort(engine, request_id: str) -> None:
    try:
        engine.abort(request_id)
    except Exception:  # noqa: BLE001 - best effort while cleaning up
        pass


__all__ = ["Driver", "Running", "ModelFacts", "State", "Summary", "build", "completion_body", "run"]
