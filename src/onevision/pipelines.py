"""transformers' task pipeline for this model family: `pipeline("image-text-to-text", model=...)`.

The call forms, options and output records are those of transformers' ImageTextToTextPipeline:

    pipe = pipeline("image-text-to-text", model="llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    pipe(images=image, text="<image>What is shown?")         -> [{"input_text": ..., "generated_text": prompt + answer}]
    pipe(text=messages, max_new_tokens=30)                    -> [{"input_text": messages,
                                                                   "generated_text": messages + [assistant message]}]
    pipe(text=[messages_a, messages_b])                       -> one list of records per chat
    pipe(images=[a, b], text=["<image>A?", "<image>B?"])      -> one record per prompt (one padded batch)

Options: max_new_tokens, generate_kwargs, return_full_text, return_tensors, continue_final_message,
skip_special_tokens, clean_up_tokenization_spaces, stop_sequence, processor_kwargs (or processor options as
keywords), batch_size (a list of inputs runs that many at a time, each batch left-padded). Generation options
given to `pipeline(...)` apply to every call; given to a call, they go in generate_kwargs (a generation setting
passed directly is an error: transformers' pipeline hands it to the processor, which ignores it). Like
transformers, the default is max_new_tokens=256 unless the model's generation_config.json sets a length.

One deliberate difference: a batch of prompts is padded on the left. transformers' pipeline pads on the
tokenizer's side (right for this model), warns, and generates from the padding; onevision's generate refuses
right padding, so the pipeline asks for left padding unless `padding_side` is passed.

(The module is `pipelines`, as in transformers, so that `onevision.pipeline` is always the function: a
submodule of the same name would replace it on the package once imported.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

TASK = "image-text-to-text"
DEFAULT_MAX_NEW_TOKENS = 256  # transformers' ImageTextToTextPipeline default
_CALL_OPTIONS = ("max_new_tokens", "generate_kwargs", "return_full_text", "return_tensors", "return_type",
                 "continue_final_message", "skip_special_tokens", "clean_up_tokenization_spaces", "stop_sequence",
                 "processor_kwargs", "timeout")


def pipeline(task: str | None = None, model: Any = None, processor: Any = None, *, dtype: Any = "auto",
             device: Any = None, device_map: Any = None, model_kwargs: dict | None = None,
             revision: str | None = None, token: str | bool | None = None, trust_remote_code: bool = False,
             torch_dtype: Any = None, **kwargs: Any) -> ImageTextToTextPipeline:
    """transformers.pipeline for the one task onevision implements. `model`: a folder, a hub repo id or a loaded
    LlavaOnevisionForConditionalGeneration (then `processor` defaults to the one saved with it). Other keywords
    are call options or generation settings applied to every call (e.g. max_new_tokens=64)."""
    if task not in (None, TASK):
        raise ValueError(f"onevision implements only the {TASK!r} task (LLaVA-OneVision); got task={task!r}. "
                         f"Use pipeline({TASK!r}, model=...), or transformers.pipeline for other tasks.")
    if model is None:
        raise ValueError(f"pipeline({TASK!r}) needs model=: a LLaVA-OneVision folder or hub repo id such as "
                         "'llava-hf/llava-onevision-qwen2-0.5b-ov-hf', or a loaded model")
    from onevision.models.llava_onevision import LlavaOnevisionForConditionalGeneration
    from onevision.processing.processor import AutoProcessor

    hub = {k: v for k, v in (("revision", revision), ("token", token)) if v is not None}
    if device is not None and device_map is not None:
        raise ValueError(f"pass device= or device_map=, not both (got device={device!r}, device_map={device_map!r})")
    if isinstance(device, int):
        device = "cpu" if device < 0 else f"cuda:{device}"
    if isinstance(model, (str, os.PathLike)):
        source = model
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            model, dtype=dtype, torch_dtype=torch_dtype, device_map=device_map or device,
            trust_remote_code=trust_remote_code, **hub, **(model_kwargs or {}))
    else:
        source = getattr(model, "name_or_path", None)
        if device is not None or device_map is not None:
            model = model.to(device or device_map)
    if processor is None:
        if not source:
            raise ValueError("a model object given without processor=: pass processor=AutoProcessor.from_pretrained("
                             "<the model's folder or repo id>)")
        processor = AutoProcessor.from_pretrained(source, **hub)
    elif isinstance(processor, (str, os.PathLike)):
        processor = AutoProcessor.from_pretrained(processor, **hub)
    return ImageTextToTextPipeline(model, processor, **kwargs)


def _is_chat(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], (list, tuple, dict))


def _is_image(value: Any) -> bool:
    """transformers' valid_images: a PIL image, an array or tensor, or a (nested) list of them (not a path)."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_is_image(v) for v in value)
    from PIL import Image

    return isinstance(value, Image.Image) or hasattr(value, "ndim")


def _check_chat(messages: Any) -> list:
    for m in messages:
        if not (isinstance(m, Mapping) and "role" in m and "content" in m):
            got = sorted(m) if isinstance(m, Mapping) else type(m).__name__
            raise ValueError(f"When passing chat dicts as input, each dict must have a 'role' and 'content' key "
                             f"(got {got}), e.g. {{'role': 'user', 'content': [{{'type': 'text', 'text': 'Hi'}}]}}")
    return messages


class _Chat:
    """A conversation input (kept apart from a list of prompts)."""

    def __init__(self, messages: list):
        self.messages = _check_chat(messages)


class ImageTextToTextPipeline:
    """`pipe(images=..., text=...)` / `pipe(text=messages)`: generate with a LLaVA-OneVision model."""

    task = TASK

    def __init__(self, model: Any, processor: Any, **defaults: Any):
        from onevision.generation.generate import GenerationConfig

        self.model, self.processor = model, processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self._generation_keys = {f for f in GenerationConfig.__dataclass_fields__ if f != "extra"}
        self._generate_kwargs = {k: defaults.pop(k) for k in list(defaults) if k in self._generation_keys}
        self._call_defaults = defaults

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return self.model.dtype

    # ---------------------------------------------------------------- call forms
    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> list:
        """One input -> a list of records; a list of inputs (chats, prompts, {"images", "text"} dicts) -> a list
        of such lists."""
        kwargs = {**self._call_defaults, **kwargs}
        batch_size = kwargs.pop("batch_size", None)
        batch_size = 1 if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if images is None and text is None:
            raise ValueError("You must at least provide either text or images.")
        if _is_chat(text):
            if images is not None:
                raise ValueError("Invalid input: you passed `chat` and `images` as separate input arguments. Images "
                                 "must be placed inside the chat message's `content`. For example, 'content': "
                                 "[{'type': 'image', 'url': 'image_url'}, {'type': 'text', 'text': 'Describe the "
                                 "image.'}]")
            return self._chats(text, kwargs, batch_size)
        if text is None and _is_chat(images):
            return self._chats(images, kwargs, batch_size)
        if images is not None and text is None and not _is_image(images):
            if isinstance(images, Mapping):  # {"images": ..., "text": ...}
                return self._one(images, kwargs)
            raise ValueError(f"got images={type(images).__name__} and no text: pass text=... with the images, "
                             "a chat as text=[{'role': ..., 'content': [...]}], or {'images': ..., 'text': ...}")
        if images is None:
            return self._many(list(text), kwargs, batch_size) if isinstance(text, (list, tuple)) else \
                self._one(text, kwargs)
        if text is None:
            raise ValueError("You must provide text for this pipeline.")
        return self._one({"images": images, "text": text}, kwargs)

    def _chats(self, chats: Any, kwargs: dict, batch_size: int) -> list:
        if isinstance(chats[0], Mapping):
            return self._one(_Chat(list(chats)), kwargs)
        return self._many([_Chat(list(c)) for c in chats], kwargs, batch_size)

    def _many(self, items: list, kwargs: dict, batch_size: int) -> list:
        """One list of records per item; items run `batch_size` at a time in one left-padded batch, which gives
        each item the records it gets alone."""
        out = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prefills = {isinstance(i, _Chat) and i.messages[-1]["role"] == "assistant" for i in chunk}
            if len(chunk) == 1 or len(prefills) > 1:  # chats that end differently can't share one template call
                out.extend(self._one(item, kwargs) for item in chunk)
            else:
                out.extend(self._one(chunk, kwargs))
        return out

    def _one(self, item: Any, kwargs: dict) -> list:
        """Records for one input; for a list of inputs (a batch from _many), one list of records per input."""
        unknown_call = {k: v for k, v in kwargs.items() if k not in _CALL_OPTIONS}
        options = {k: v for k, v in kwargs.items() if k in _CALL_OPTIONS}
        if options.get("return_type") is not None:
            raise ValueError("return_type is not supported; use return_full_text=True/False or return_tensors=True")
        misplaced = sorted(set(unknown_call) & self._generation_keys - {"max_new_tokens"})
        if misplaced:  # transformers' pipeline hands these to the processor, which ignores them
            example = ", ".join(f"{k!r}: {unknown_call[k]!r}" for k in misplaced)
            raise ValueError(f"{misplaced} are generation settings, which a pipeline call does not take directly: "
                             f"pass generate_kwargs={{{example}}}, or give them to pipeline(...) for every call")
        inputs = self.preprocess(item, options.get("continue_final_message"),
                                 {**unknown_call, **(options.get("processor_kwargs") or {})})
        sequences = self._generate(inputs, options)
        if not isinstance(item, list):
            return self.postprocess(item, inputs["input_ids"], sequences, options)
        per_input = len(sequences) // len(item)
        return [self.postprocess(one, inputs["input_ids"][i:i + 1], sequences[i * per_input:(i + 1) * per_input],
                                 options) for i, one in enumerate(item)]

    # ---------------------------------------------------------------- steps
    def preprocess(self, item: Any, continue_final_message: bool | None, processor_kwargs: dict):
        batch = isinstance(item, list) and not isinstance(item[0], str)  # chats batched by _many
        if isinstance(item, _Chat) or batch:
            chats = item if batch else [item]
            if continue_final_message is None:
                continue_final_message = chats[0].messages[-1]["role"] == "assistant"
            if batch:
                processor_kwargs = {"padding": True, "padding_side": "left", **processor_kwargs}
            inputs = self.processor.apply_chat_template(
                [c.messages for c in chats] if batch else item.messages, continue_final_message=continue_final_message,
                tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=not continue_final_message,
                processor_kwargs=processor_kwargs)
        else:
            images, text = (None, item) if isinstance(item, (str, list, tuple)) else (item.get("images"), item["text"])
            if isinstance(text, (list, tuple)) and len(text) > 1:
                processor_kwargs = {"padding": True, "padding_side": "left", **processor_kwargs}
            inputs = self.processor(images=images, text=text, return_tensors="pt", **processor_kwargs)
        return inputs.to(dtype=self.dtype).to(self.device)

    def _generate(self, inputs, options: dict):
        call = dict(options.get("generate_kwargs") or {})
        if options.get("max_new_tokens") is not None:
            if "max_new_tokens" in call:
                raise ValueError("'max_new_tokens' is defined twice, once in 'generate_kwargs' and once as a direct "
                                 "parameter, please use only one")
            call["max_new_tokens"] = options["max_new_tokens"]
        stop = options.get("stop_sequence")
        if stop is not None:
            call.update(stop_strings=[stop] if isinstance(stop, str) else list(stop), tokenizer=self.tokenizer)
        call = {**self._generate_kwargs, **call}
        model_config = self.model.generation_config
        set_length = {k for k in ("max_new_tokens", "max_length")
                      if call.get(k) is not None or getattr(model_config, k, None) is not None}
        if not set_length:
            call["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        if "pad_token_id" not in call and getattr(model_config, "pad_token_id", None) is None \
                and self.tokenizer.pad_token_id is not None:
            call["pad_token_id"] = self.tokenizer.pad_token_id
        return self.model.generate(**inputs, **call)

    def postprocess(self, item: Any, input_ids, sequences, options: dict) -> list:
        """The reference's records: decoded answers, with or without the prompt (text or chat)."""
        prompts = item["text"] if isinstance(item, Mapping) else item
        prompts = [prompts] if isinstance(prompts, (str, _Chat)) else list(prompts)
        per_input = len(sequences) // len(prompts)
        prompts = [p for p in prompts for _ in range(per_input)]
        shown = [p.messages if isinstance(p, _Chat) else p for p in prompts]
        full = options.get("return_full_text")
        if options.get("return_tensors"):
            if full is not None:
                raise ValueError("`return_full_text` is mutually exclusive with `return_tensors`")
            return [{"input_text": s, "generated_token_ids": seq} for s, seq in zip(shown, sequences, strict=True)]
        decode = {"skip_special_tokens": True if options.get("skip_special_tokens") is None
                  else options["skip_special_tokens"]}
        if options.get("clean_up_tokenization_spaces") is not None:
            decode["clean_up_tokenization_spaces"] = options["clean_up_tokenization_spaces"]
        texts = self.processor.batch_decode(sequences, **decode)
        decoded_inputs = [t for t in self.processor.batch_decode(input_ids, **decode) for _ in range(per_input)]
        answers = []
        for generated, decoded_input in zip(texts, decoded_inputs, strict=True):
            start = generated.find(decoded_input)  # the prompt, up to 2 leading characters in (the reference's rule)
            answers.append(generated[start + len(decoded_input):] if 0 <= start <= 2 else generated)
        if full is None or full:
            answers = [self._full(p, a, options.get("continue_final_message")) for p, a in zip(prompts, answers,
                                                                                                 strict=True)]
        return [{"input_text": s, "generated_text": a} for s, a in zip(shown, answers, strict=True)]

    @staticmethod
    def _full(prompt: Any, answer: str, continue_final_message: bool | None):
        if isinstance(prompt, str):
            return prompt + answer
        messages = list(prompt.messages)
        if continue_final_message is None:
            continue_final_message = messages[-1]["role"] == "assistant"
        if not continue_final_message:
            return messages + [{"role": "assistant", "content": answer}]
        content = messages[-1]["content"]
        if isinstance(content, str):
            content += answer
        else:
            content = list(content[:-1]) + [{**content[-1], "text": content[-1]["text"] + answer}]
        return messages[:-1] + [{"role": messages[-1]["role"], "content": content}]

    def __repr__(self) -> str:
        return f"ImageTextToTextPipeline(task={TASK!r}, model={getattr(self.model, 'name_or_path', None)!r})"


__all__ = ["ImageTextToTextPipeline", "pipeline"]
