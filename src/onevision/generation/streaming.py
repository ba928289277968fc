"""Streamers with the transformers interface (`put(ids)`, `end()`): text arrives in pieces that never split a
multi-byte character, because a piece is only released once its decoded text no longer ends in U+FFFD."""

from __future__ import annotations

import queue
import sys
from collections.abc import Iterator
from typing import Any

import torch


class IncrementalDecoder:
    """Turns a growing list of token ids into new text pieces with O(1) work per token: only the window of ids
    since the last released piece is decoded (read-offset scheme), never the whole sequence."""

    def __init__(self, tokenizer: Any, **decode_kwargs: Any):
        self.tokenizer, self.decode_kwargs = tokenizer, decode_kwargs
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded already; they give the context of the next piece
        self.read = 0

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], **self.decode_kwargs)
        text = self.tokenizer.decode(self.ids[self.prefix:], **self.decode_kwargs)
        if text.endswith("\ufffd") or len(text) <= len(before):  # an incomplete UTF-8 sequence: wait
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], **self.decode_kwargs)
        text = self.tokenizer.decode(self.ids[self.prefix:], **self.decode_kwargs)
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


class TextTracker:
    """The one place that finishes a generated row: eos ids, stop token ids, stop strings (found in the decoded
    text, which never holds half a character), the token limit and cancellation; and the text released so far.

        tracker = TextTracker(tokenizer, eos_ids=[...], stop=["###"], max_tokens=100)
        delta, reason = tracker.push(token)   # reason: None, "stop" or "length"; delta: text safe to show now

    Text that could still turn into a stop string is held back until it cannot. After a stop string the text
    ends before it (like vLLM and the OpenAI API); the token that completed it is kept in `token_ids`."""

    def __init__(self, tokenizer: Any, *, eos_ids=(), stop_token_ids=(), stop=(), max_tokens: int | None = None,
                 min_tokens: int = 0, ignore_eos: bool = False, skip_special_tokens: bool = True):
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
        self.eos = set() if ignore_eos else set(int(i) for i in eos_ids)
        self.stop_ids, self.stops = set(int(i) for i in stop_token_ids), list(stop)
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.token_ids: list[int] = []
        self.text, self.sent = "", 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> tuple[str, str | None]:
        if self.finished:
            raise RuntimeError("push() after the row finished")
        token = int(token)
        self.token_ids.append(token)
        checking = len(self.token_ids) > self.min_tokens  # no stop of any kind before min_tokens (like vLLM)
        if checking and token in self.eos:
            self._finish("stop", None)
        elif checking and token in self.stop_ids:
            self._finish("stop", token)
        else:
            self._add(self.decoder.push([token]), checking)
        if not self.finished and self.max_tokens is not None and len(self.token_ids) >= self.max_tokens:
            self._add(self.decoder.flush(), checking)
            if not self.finished:
                self._finish("length", None)
        return self._release(), self.finish_reason

    def cancel(self, reason: str = "abort") -> str:
        """Finish now (client gone, server stopping); returns the text still held back."""
        if not self.finished:
            self._finish(reason, None)
        return self._release()

    def _add(self, piece: str, checking: bool) -> None:
        if not piece:
            return
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        if checking and self.stops:
            hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) != -1]
            if hits:
                cut, stop = min(hits)
                self.text = self.text[:cut]
                self._finish("stop", stop)

    def _finish(self, reason: str, stop_reason) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason

    def _release(self) -> str:
        end = len(self.text) if self.finished else max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece


class TextStreamer:
    """Prints generated text to stdout as it is produced (transformers' TextStreamer)."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any):
        self.tokenizer, self.skip_prompt, self.decode_kwargs = tokenizer, skip_prompt, decode_kwargs
        self._decoder = IncrementalDecoder(tokenizer, **decode_kwargs)
        self._prompt_pending = True

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError(f"streamers take one sequence at a time, got a batch of {value.shape[0]}")
        ids = value.reshape(-1).tolist()
        if self._prompt_pending:
            self._prompt_pending = False
            if self.skip_prompt:
                return
        self.on_text(self._decoder.push(ids), stream_end=False)

    def end(self) -> None:
        self.on_text(self._decoder.flush(), stream_end=True)
        self._decoder = IncrementalDecoder(self.tokenizer, **self.decode_kwargs)
        self._prompt_pending = True

    def on_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else "\n", file=sys.stdout)


class TextIteratorStreamer(TextStreamer):
    """Iterate over text pieces while generate() runs in another thread (transformers' TextIteratorStreamer)."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: queue.Queue = queue.Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration()
        return value
