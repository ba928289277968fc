"""TEMPORARY stand-in with onevision.engine.Engine's interface (one request at a time through generate_steps),
so the batch job can be built and tested before the continuous-batching engine lands. Deleted at the merge."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    num_cached_tokens: int = 0


class Engine:
    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.queue: collections.deque = collections.deque()

    @classmethod
    def from_pretrained(cls, path, dtype="auto", device="cpu", quantize=None, revision=None, **_):
        from onevision import AutoProcessor, LlavaOnevisionForConditionalGeneration

        model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map=device)
        return cls(model, AutoProcessor.from_pretrained(path))

    def add_request(self, request_id, inputs, params):
        self.queue.append((request_id, dict(inputs), params))

    def abort(self, request_id):
        self.queue = collections.deque(q for q in self.queue if q[0] != request_id)

    def has_unfinished(self):
        return bool(self.queue)

    def step(self):
        import torch

        from onevision.generation.generate import generate_steps

        request_id, inputs, plan = self.queue.popleft()
        ids = inputs.pop("input_ids")
        mask = inputs.pop("attention_mask", None)
        eos = set(plan.eos.tolist()) if plan.eos is not None else set()
        tokens, reason = [], "length"
        with torch.no_grad():
            for step in generate_steps(self.model, ids, mask, plan=plan, tokenizer=self.processor.tokenizer, **inputs):
                token = int(step[0])
                tokens.append(token)
                if token in eos:
                    reason = "stop"
                    break
                if len(tokens) >= plan.max_new:
                    break
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in plan.stop_strings:
            if s in text:
                text, reason = text[:text.index(s)], "stop"
        return [RequestOutput(request_id, ids[0].tolist(), [CompletionOutput(0, text, tokens, reason)])]
