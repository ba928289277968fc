"""Runs an Engine on its own thread so that the server's event loop and the CLI's terminal never wait on the
model. Requests and aborts enter through a queue and are applied between two steps; each request's outputs go
to the callback given with it (called on the engine thread: hand them over, don't work in it)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from onevision.engine.engine import Engine
from onevision.engine.params import RequestOutput, SamplingParams

log = logging.getLogger("onevision.engine")
Sink = Callable[[Any], None]  # receives RequestOutputs, then possibly an Exception (the request failed)


class AsyncEngine:
    def __init__(self, engine: Engine, log_every: float = 10.0, threads: int | None = None):
        self.engine = engine
        # intra-op threads of the engine thread (None: the creating thread's, which cpu.reserve_threads_for_engine
        # may have lowered to 1 for itself)
        self.threads = threads or torch.get_num_threads()
        self._cond = threading.Condition()
        self._inbox: collections.deque[tuple] = collections.deque()
        self._sinks: dict[str, Sink] = {}
        self._stopping = False
        self.log_every, self._last_log, self._logged_tokens = log_every, time.monotonic(), 0
        self._thread = threading.Thread(target=self._loop, name="onevision-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called from any thread
    def add(self, request_id: str, inputs: Any, params: SamplingParams, sink: Sink) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self._inbox.append(("add", request_id, inputs, params, sink))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._inbox.append(("abort", request_id))
            self._cond.notify()

    def snapshot(self) -> dict[str, Any]:
        return self.engine.snapshot()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything still running (each sink gets its final output) and stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        engine = self.engine
        torch.set_num_threads(self.threads)
        while True:
            with self._cond:
                while not self._inbox and not engine.has_unfinished() and not self._stopping:
                    self._cond.wait()
                inbox, self._inbox = list(self._inbox), collections.deque()
                stopping = self._stopping
            for command in inbox:
                self._apply(command)
            if stopping:
                for request_id in list(self._sinks):
                    self._deliver(engine.abort(request_id), request_id)
                return
            if not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # a bug or an out-of-memory: fail the running requests, keep serving
                log.exception("engine step failed; aborting %d request(s)", len(self._sinks))
                for request_id in list(self._sinks):
                    engine.abort(request_id)
                    self._sinks.pop(request_id)(e)
                continue
            for out in outputs:
                self._deliver(out, out.request_id)
            self._maybe_log()

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, inputs, params, sink = command
            try:
                self.engine.add_request(request_id, inputs, params)
            except Exception as e:
                sink(e)
                return
            self._sinks[request_id] = sink
        else:
            out = self.engine.abort(command[1])
            if out is not None:
                self._deliver(out, command[1])

    def _deliver(self, out: RequestOutput | None, request_id: str) -> None:
        sink = self._sinks.get(request_id)
        if out is None or sink is None:
            return
        if out.finished:
            del self._sinks[request_id]
        try:
            sink(out)
        except Exception:
            log.exception("output callback failed (request %s)", request_id)

    def _maybe_log(self) -> None:
        """A throughput line every `log_every` seconds while busy (like vLLM's periodic stats)."""
        now = time.monotonic()
        if now - self._last_log < self.log_every:
            return
        m, s = self.engine.metrics, self.engine.snapshot()
        tokens = m.generation_tokens - self._logged_tokens
        log.info("generation %.1f tok/s, running %d, waiting %d, KV cache %.1f%%, prefix cache hits %.1f%%, "
                 "vision cache hits %d/%d", tokens / (now - self._last_log), s["running"], s["waiting"],
                 100 * s["kv_usage"], 100 * s["prefix_hits"] / max(1, s["prefix_queries"]), s["vision_hits"],
                 s["vision_queries"])
        self._last_log, self._logged_tokens = now, m.generation_tokens


__all__ = ["AsyncEngine"]
