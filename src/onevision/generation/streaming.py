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
