"""Runs generations off the event loop: a bounded admission count, worker thread(s) that own the model, and
per-request cancellation.

    slot = engine.acquire()            # 503 Overloaded when workers + max_queue requests are already admitted
    job = engine.submit(slot, ...)     # runs on a worker thread; events arrive on job.events (an asyncio.Queue)
    job.cancel()                       # stops it between two decode steps (client gone); frees the slot

A request holds its slot from admission (before its media is fetched and decoded) until its generation ends, so
"waiting" counts both requests being prepared and requests queued for a worker. Events:
    ("delta", row, text)   ("finish", row, reason, completion_tokens)   ("end",)   ("error", message)
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from onevision.server.errors import Overloaded

log = logging.getLogger("onevision.server")


class Slot:
    """One admitted request; `release()` is idempotent."""

    def __init__(self, engine: Engine):
        self.engine, self._released = engine, False

    def release(self) -> None:
        with self.engine._lock:
            if not self._released:
                self._released = True
                self.engine._admitted -= 1
                self.engine._idle.notify_all()


@dataclass(eq=False)
class Job:
    slot: Slot
    inputs: dict[str, Any]
    plan: Any  # onevision.generation.generate._Plan
    rows: int
    request_id: str
    loop: asyncio.AbstractEventLoop
    engine: Engine | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating (between two steps) or drop the job from the queue; frees the slot either way."""
        self.cancelled.set()
        if self.engine is not None:
            self.engine._drop_queued(self)

    def emit(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
            pass


class Engine:
    def __init__(self, model, tokenizer, max_queue: int = 64, workers: int = 1):
        if max_queue < 0 or workers < 1:
            raise ValueError(f"max_queue must be >= 0 and workers >= 1, got {max_queue}, {workers}")
        self.model, self.tokenizer = model, tokenizer
        self.capacity, self.workers = workers + max_queue, workers
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._jobs: collections.deque[Job] = collections.deque()
        self._admitted = 0
        self.running = 0
        self.draining = False
        self._stopping = False
        self._running_jobs: set[Job] = set()
        self.completed = self.cancelled = 0
        self._threads = [threading.Thread(target=self._work, name=f"onevision-worker-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ admission
    @property
    def waiting(self) -> int:
        with self._lock:
            return self._admitted - self.running

    def acquire(self) -> Slot:
        with self._lock:
            if self.draining or self._stopping:
                raise Overloaded("the server is shutting down and accepts no new requests", retry_after=5,
                                 code="server_shutting_down")
            if self._admitted >= self.capacity:
                raise Overloaded(f"the server is busy ({self._admitted} requests admitted, the limit is "
                                 f"{self.capacity}); retry later", retry_after=1, code="queue_full")
            self._admitted += 1
            return Slot(self)

    def submit(self, slot: Slot, inputs: dict[str, Any], plan: Any, rows: int, request_id: str) -> Job:
        job = Job(slot, inputs, plan, rows, request_id, asyncio.get_running_loop(), self)
        with self._lock:
            self._jobs.append(job)
            self._idle.notify_all()
        return job

    def _drop_queued(self, job: Job) -> None:
        with self._lock:
            try:
                self._jobs.remove(job)
            except ValueError:
                return  # already running (it stops at the next step) or finished
            self.cancelled += 1
        job.slot.release()

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self._stopping:
                    self._idle.wait()
                if self._stopping and not self._jobs:
                    return
                job = self._jobs.popleft()
                self.running += 1
                self._running_jobs.add(job)
            try:
                if job.cancelled.is_set():
                    self._count("cancelled")
                else:
                    job.started.set()
                    self._run(job)
            except Exception:
                log.exception("generation failed (request_id=%s)", job.request_id)
                job.emit("error", f"internal error during generation (request_id={job.request_id})")
            finally:
                with self._lock:
                    self.running -= 1
                    self._running_jobs.discard(job)
                job.slot.release()

    def _run(self, job: Job) -> None:
        from onevision.generation.generate import generate_steps
        from onevision.generation.streaming import IncrementalDecoder

        plan, rows = job.plan, job.rows
        eos = set(plan.eos.tolist()) if plan.eos is not None else set()
        stops = plan.stop_strings
        hold = max((len(s) for s in stops), default=1) - 1  # chars that could still become a stop string
        decoders = [IncrementalDecoder(self.tokenizer, skip_special_tokens=True) for _ in range(rows)]
        texts, sent = [""] * rows, [0] * rows
        counts, done = [0] * rows, [False] * rows
        inputs = dict(job.inputs)
        steps = generate_steps(self.model, inputs.pop("input_ids"), inputs.pop("attention_mask", None), plan=plan,
                               tokenizer=self.tokenizer, **inputs)
        try:
            for tokens in steps:
                if job.cancelled.is_set():
                    self._count("cancelled")
                    job.emit("error", "the generation was cancelled")
                    return
                for r, token in enumerate(tokens.tolist()):
                    if done[r]:
                        continue
                    counts[r] += 1
                    reason = None
                    if token in eos:
                        reason = "stop"
                    else:
                        texts[r] += decoders[r].push([token])
                        cut = _first_stop(texts[r], stops)
                        if cut is not None:
                            texts[r], reason = texts[r][:cut], "stop"
                    if reason is None and counts[r] >= plan.max_new:
                        texts[r] += decoders[r].flush()
                        reason = "length"
                        cut = _first_stop(texts[r], stops)
                        if cut is not None:
                            texts[r], reason = texts[r][:cut], "stop"
                    end = len(texts[r]) if reason else max(sent[r], len(texts[r]) - hold)
                    if end > sent[r]:
                        job.emit("delta", r, texts[r][sent[r]:end])
                        sent[r] = end
                    if reason:
                        done[r] = True
                        job.emit("finish", r, reason, counts[r])
                if all(done):
                    break
            for r in range(rows):  # the generator ended (every row finished) without our noticing a reason
                if not done[r]:
                    texts[r] += decoders[r].flush()
                    if len(texts[r]) > sent[r]:
                        job.emit("delta", r, texts[r][sent[r]:])
                    job.emit("finish", r, "stop" if counts[r] < plan.max_new else "length", counts[r])
            self._count("completed")
            job.emit("end")
        finally:
            steps.close()

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    # ------------------------------------------------------------------ shutdown
    def start_draining(self) -> None:
        with self._lock:
            self.draining = True

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is still queued or running and join the workers."""
        with self._lock:
            self.draining = self._stopping = True
            queued, self._jobs = list(self._jobs), collections.deque()
            for job in self._running_jobs:
                job.cancelled.set()
            self._idle.notify_all()
        for job in queued:
            job.cancelled.set()
            job.emit("error", "the server shut down before this request ran")
            job.slot.release()
        for t in self._threads:
            t.join(timeout)


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i != -1]
    return min(hits) if hits else None


__all__ = ["Engine", "Job", "Slot"]
