"""The offline API, in vLLM's conventions:

    llm = LLM("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", dtype="bfloat16")
    outs = llm.chat([conversation, ...], SamplingParams(temperature=0, max_tokens=64))
    outs = llm.generate([{"prompt": "<|im_start|>user <image>\\n...", "multi_modal_data": {"image": img}}, ...])

Outputs come back in input order. Inputs are prepared lazily, at most a few batches ahead of the engine, so a
long list never holds every image's pixels in memory at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from onevision.engine.engine import Engine, EngineConfig
from onevision.engine.params import RequestOutput, SamplingParams, default_sampling_params


class LLM:
    def __init__(self, model: str | os.PathLike | Any, processor: Any = None, *, dtype: Any = "auto",
                 device: str = "cpu", quantize: str | None = None, **engine_config: Any):
        if isinstance(model, (str, os.PathLike)):
            self.engine = Engine.from_pretrained(model, dtype=dtype, device=device, quantize=quantize,
                                                 processor=processor, **engine_config)
        elif processor is None:
            raise ValueError("LLM(model_object) needs processor=...; or pass a model folder or hub id")
        else:
            self.engine = Engine(model, processor, EngineConfig(**engine_config))
        self.processor = self.engine.processor

    def get_tokenizer(self):
        return self.processor.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What chat/generate use without sampling params: the checkpoint's generation config (greedy unless it
        samples, its repetition penalty, ...), as transformers' generate() would run it; max_tokens 16 unless the
        config sets max_new_tokens."""
        return default_sampling_params(self.engine.model.generation_config)

    # ------------------------------------------------------------------ entry points
    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, chat_template: str | None = None,
             **processor_kwargs: Any) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of them; content parts in transformers' form
        ({"type": "image", "image"|"url"|"path": ...}) or OpenAI's ({"type": "image_url", "image_url": {"url"}})."""
        if not messages:
            return []
        conversations = messages if isinstance(messages[0], (list, tuple)) else [messages]

        def prepare(conversation):
            return self.processor.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, chat_template=chat_template,
                tokenize=True, return_dict=True, return_tensors="pt", **processor_kwargs)

        return self._run(conversations, prepare, sampling_params, use_tqdm)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Prompts already in the chat format: a string, {"prompt": str, "multi_modal_data": {"image": ...,
        "video": ...}}, or {"prompt_token_ids": [...]}; or a list of them."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]

        def prepare(prompt):
            if isinstance(prompt, str):
                prompt = {"prompt": prompt}
            if "prompt_token_ids" in prompt:
                return {"input_ids": [list(prompt["prompt_token_ids"])]}
            media = prompt.get("multi_modal_data") or {}
            unknown = set(media) - {"image", "video"}
            if unknown:
                raise ValueError(f"multi_modal_data takes 'image' and 'video', got {sorted(unknown)}")
            images, videos = media.get("image"), media.get("video")
            if images is not None and not isinstance(images, (list, tuple)):
                images = [images]
            if videos is not None and not isinstance(videos, (list, tuple)):
                videos = [videos]
            return self.processor(text=prompt["prompt"], images=[list(images)] if images else None,
                                  videos=list(videos) if videos else None, return_tensors="pt")

        return self._run(list(prompts), prepare, sampling_params, use_tqdm)

    # ------------------------------------------------------------------ the loop
    def _run(self, items: list, prepare, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(items):
                raise ValueError(f"{len(sampling_params)} sampling params for {len(items)} prompts; pass one, or "
                                 "one per prompt")
            params = list(sampling_params)
        else:
            params = [sampling_params or self.get_default_sampling_params()] * len(items)
        results: list[RequestOutput | None] = [None] * len(items)
        ahead = 2 * self.engine.config.max_num_seqs  # requests prepared and queued beyond those running
        pending: Iterator[int] = iter(range(len(items)))
        bar = _progress(len(items), use_tqdm)
        start, tokens, in_flight = time.monotonic(), 0, 0
        base = f"llm-{id(self)}-{time.monotonic_ns()}-"
        try:
            while True:
                while in_flight < ahead:
                    i = next(pending, None)
                    if i is None:
                        break
                    self.engine.add_request(base + str(i), prepare(items[i]), params[i])
                    in_flight += 1
                if not self.engine.has_unfinished():
                    break
                for out in self.engine.step():
                    if out.finished:
                        i = int(out.request_id[len(base):])
                        results[i] = out
                        in_flight -= 1
                        tokens += sum(len(c.token_ids) for c in out.outputs)
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix_str(f"{tokens / (time.monotonic() - start):.1f} tok/s", refresh=False)
        except BaseException:
            for request_id in list(self.engine.requests):
                if request_id.startswith(base):
                    self.engine.abort(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]


def _progress(total: int, enabled: bool):
    if not enabled or total < 2:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="Processed prompts", unit="req", dynamic_ncols=True)


__all__ = ["LLM"]
