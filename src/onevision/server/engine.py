"""The server's side of the engine: bounded admission, per-request event queues on the event loop, and
cancellation. Generation itself runs in onevision.engine (continuous batching on its own thread).

    slot = serving.acquire()            # 503 Overloaded when max_num_seqs + max_queue requests are admitted
    job = serving.submit(slot, inputs, params, rows, request_id)
    job.cancel()                        # client gone: the engine aborts the request and frees its KV at once

A request holds its slot from admission (before its media is fetched and decoded) until its generation ends.
Events on job.events (an asyncio.Queue):
    ("delta", row, text)   ("finish", row, reason, completion_tokens)   ("end",)   ("error", message[, code])
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from onevision.engine import Engine, RequestOutput, SamplingParams
from onevision.engine.async_engine import AsyncEngine
from onevision.server.errors import Overloaded

log = logging.getLogger("onevision.server")


class Slot:
    """One admitted request; `release()` is idempotent."""

    def __init__(self, serving: ServingEngine):
        self.serving, self._released = serving, False

    def release(self) -> None:
        with self.serving._lock:
            if not self._released:
                self._released = True
                self.serving._admitted -= 1


@dataclass(eq=False)
class Job:
    slot: Slot
    request_id: str
    rows: int
    prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    serving: ServingEngine
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: bool = False
    created: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    completion_tokens: int = 0
    status: str = "running"
    rows_done: set = field(default_factory=set)

    def cancel(self) -> None:
        """Stop generating (the engine drops the request between two steps) and free the slot."""
        if not self.done:
            self.status = "cancelled"
            self.serving.engine.abort(self.request_id)

    def _on_output(self, out: Any) -> None:
        """[engine thread] hand the output over to the event loop."""
        try:
            self.loop.call_soon_threadsafe(self._translate, out)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
            pass

    def _translate(self, out: Any) -> None:
        if self.done:
            return
        if isinstance(out, Exception):
            self._end("failed")
            log.error("generation failed (request_id=%s): %s", self.request_id, out)
            self.events.put_nowait(("error", f"internal error during generation (request_id={self.request_id})"))
            return
        out: RequestOutput
        for c in out.outputs:
            if c.delta:
                if self.first_token is None:
                    self.first_token = time.monotonic()
                self.events.put_nowait(("delta", c.index, c.delta))
            if c.finish_reason not in (None, "abort") and c.index not in self.rows_done:
                self.rows_done.add(c.index)
                self.events.put_nowait(("finish", c.index, c.finish_reason, len(c.token_ids)))
        self.completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        if out.finished:
            if any(c.finish_reason == "abort" for c in out.outputs):
                self._end("cancelled" if self.status == "cancelled" else "aborted")
                if self.serving.stopping:
                    self.events.put_nowait(("error", "the server is shutting down; retry the request",
                                            "shutting_down"))
                else:
                    self.events.put_nowait(("error", "the generation was cancelled"))
                return
            self._end("ok")
            self.events.put_nowait(("end",))

    def _end(self, status: str) -> None:
        self.done, self.status = True, status
        self.slot.release()
        self.serving._log_request(self)


class ServingEngine:
    def __init__(self, engine: Engine, max_queue: int = 64, stats_interval: float = 10.0, threads: int | None = None):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = AsyncEngine(engine, log_every=stats_interval, threads=threads)
        self.capacity = engine.config.max_num_seqs + max_queue
        self._lock = threading.Lock()
        self._admitted = 0
        self.draining = self.stopping = False
        self.completed = self.cancelled = 0

    def snapshot(self) -> dict[str, Any]:
        return self.engine.snapshot()

    @property
    def running(self) -> int:
        return self.engine.snapshot()["running"]

    @property
    def waiting(self) -> int:
        """Admitted requests not yet decoding (media being prepared, or queued in the engine)."""
        return max(0, self._admitted - self.engine.snapshot()["running_requests"])

    def acquire(self) -> Slot:
        with self._lock:
            if self.draining:
                raise Overloaded("the server is shutting down and accepts no new requests", retry_after=5,
                                 code="server_shutting_down")
            if self._admitted >= self.capacity:
                raise Overloaded(f"the server is busy ({self._admitted} requests admitted, the limit is "
                                 f"{self.capacity}); retry later", retry_after=1, code="queue_full")
            self._admitted += 1
            return Slot(self)

    def submit(self, slot: Slot, inputs: dict[str, Any], params: SamplingParams, rows: int, request_id: str,
               prompt_tokens: int = 0) -> Job:
        job = Job(slot, request_id, rows, prompt_tokens, asyncio.get_running_loop(), self)
        self.engine.add(request_id, inputs, params, job._on_output)
        return job

    def _log_request(self, job: Job) -> None:
        with self._lock:
            if job.status == "ok":
                self.completed += 1
            else:
                self.cancelled += 1
        ttft = "-" if job.first_token is None else f"{job.first_token - job.created:.3f}s"
        log.info("request %s %s: prompt %d tokens, completion %d tokens, TTFT %s, %.3fs", job.request_id,
                 job.status, job.prompt_tokens, job.completion_tokens, ttft, time.monotonic() - job.created)

    def start_draining(self) -> None:
        with self._lock:
            self.draining = True

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is still running (each stream gets an error event) and stop the engine thread."""
        self.start_draining()
        self.stopping = True
        self.engine.shutdown(timeout)


__all__ = ["Job", "ServingEngine", "Slot"]
