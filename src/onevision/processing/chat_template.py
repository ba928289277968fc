"""Chat templates rendered with Jinja2 in a sandbox, as transformers does (trim_blocks, lstrip_blocks, tojson,
raise_exception, strftime_now, loopcontrols) plus the `{% generation %}` block that marks assistant text.

`render_chat(messages, template, ...)` returns the prompt and the (start, end) character spans of every
`{% generation %}` block, from which the processor builds `assistant_masks`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from onevision.processing import ProcessingError

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_SPANS: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar("onevision_spans", default=None)


class _GenerationExtension(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body and records where it landed in the output."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_track", []), [], [], body).set_lineno(lineno)

    def _track(self, caller) -> str:
        text = caller()
        tracking = _SPANS.get()
        if tracking is not None:
            blocks, spans = tracking
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationExtension, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ProcessingError(f"the chat template is not valid Jinja: {e}") from None


@lru_cache(maxsize=16)
def template_variables(template: str) -> frozenset[str]:
    """Names the template reads from its context (kwargs not in here are processor kwargs). Cached: parsing the
    template again took ~3 ms of every request's preparation."""
    env = compile_template(template).environment
    return frozenset(jinja2.meta.find_undeclared_variables(env.parse(template)))


def plain_data(value: Any) -> Any:
    """Rebuild the template's inputs from plain JSON types; media objects become inert "<type>" strings."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, np.generic):  # np.bool_(False) must stay falsy
        return plain_data(value.item())
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def render_chat(messages: list[dict], template: str, add_generation_prompt: bool = False,
                continue_final_message: bool = False, track_generation: bool = False,
                **kwargs) -> tuple[str, list[tuple[int, int]]]:
    """Render one conversation; returns (prompt, spans of {% generation %} blocks, empty unless tracked)."""
    compiled = compile_template(template)
    chat = plain_data(list(messages))
    final_text = None
    if continue_final_message:
        if not chat:
            raise ProcessingError("continue_final_message is set but the conversation is empty")
        content = chat[-1].get("content")
        if isinstance(content, str):
            final_text, chat[-1]["content"] = content, content + _CONTINUE_TAG
        else:
            for block in reversed(content or []):
                if isinstance(block, dict) and "text" in block:
                    final_text = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ProcessingError("continue_final_message is set but the final message has no text to continue")
    context = dict(plain_data(kwargs), messages=chat, add_generation_prompt=add_generation_prompt)
    context.setdefault("tools", None)
    context.setdefault("documents", None)
    spans: list[tuple[int, int]] = []
    try:
        if track_generation:
            blocks: list[str] = []
            token = _SPANS.set((blocks, spans))
            try:
                for block in compiled.generate(**context):
                    blocks.append(block)
            finally:
                _SPANS.reset(token)
            prompt = "".join(blocks)
        else:
            prompt = compiled.render(**context)
    except jinja2.exceptions.SecurityError as e:
        raise ProcessingError(f"the chat template tried an unsafe operation: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ProcessingError(f"the chat template failed: {e}") from None
    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if tag not in prompt or final_text.strip() not in prompt:
            raise ProcessingError("continue_final_message is set but the template dropped the final message")
        loc = prompt.rindex(tag)
        prompt = prompt[:loc] if prompt[loc:loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG else prompt[:loc].rstrip()
    return prompt, spans


def normalize_conversation(conversation) -> list[dict]:
    """Copy of the messages: None-valued keys dropped, string content -> one text item, OpenAI image_url -> image,
    unsupported content types rejected."""
    if not isinstance(conversation, (list, tuple)):
        raise ProcessingError(f"a conversation must be a list of messages, got {type(conversation).__name__}")
    messages = []
    for message in conversation:
        if hasattr(message, "model_dump"):
            message = message.model_dump()
        if not isinstance(message, dict):
            raise ProcessingError(f"each message must be a dict with 'role' and 'content', got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = [{"type": "text", "text": content}]
        elif isinstance(content, (list, tuple)):
            items = []
            for item in content:
                if not isinstance(item, dict) or "type" not in item:
                    raise ProcessingError(f"each content item must be a dict with a 'type', got {item!r}")
                if item["type"] == "image_url":
                    url = item.get("image_url")
                    item = {"type": "image", "url": url.get("url", "") if isinstance(url, dict) else url}
                if item["type"] not in ("text", "image", "video"):
                    raise ProcessingError(f"unsupported content type {item['type']!r}; use 'text', 'image' or "
                                          "'video' (or OpenAI 'image_url')")
                if item["type"] == "text" and not isinstance(item.get("text"), str):
                    raise ProcessingError(f"a text item needs a string 'text', got {item!r}")
                items.append(dict(item))
            message["content"] = items
        messages.append(message)
    return messages


def content_spans(prompt: str, conversation: list[dict], specials: list[str], render) -> list[tuple[int, int]]:
    """Where the messages' text landed in `prompt` (= render(conversation)), for the texts that hold a special
    token string: [(start, end)] character spans, to be tokenized as plain text.

    The conversation is rendered again with every text replaced by a unique marker, and the markers' places give
    the spans; the texts put back must give `prompt` exactly (a template that transforms text can't be mapped:
    ProcessingError), so a typed special token is never silently left special, and markup that happens to equal
    a message's text is never taken for it."""
    texts = []

    def mark(content):
        if isinstance(content, str):
            texts.append(content)
            return f"\ue000{nonce}:{len(texts) - 1}\ue001"
        if isinstance(content, list):
            return [dict(item, text=mark(item["text"])) if isinstance(item, dict) and item.get("type") == "text"
                    and isinstance(item.get("text"), str) else item for item in content]
        return content

    nonce = secrets.token_hex(8)
    marked = [dict(m, content=mark(m.get("content"))) if isinstance(m, dict) else m for m in conversation]
    if not any(token in text for text in texts for token in specials):
        return []
    pieces, spans, size, last = [], [], 0, 0
    rendered = render(marked)
    for match in re.finditer(f"\ue000{nonce}:(\\d+)\ue001", rendered):
        text = texts[int(match.group(1))]
        pieces += [rendered[last:match.start()], text]
        size += match.start() - last
        if any(token in text for token in specials):
            spans.append((size, size + len(text)))
        size += len(text)
        last = match.end()
    pieces.append(rendered[last:])
    if "".join(pieces) != prompt:
        raise ProcessingError("a message's text holds a special token and the chat template transforms message "
                              "text, so it can't be tokenized as plain text; remove the special token")
    return spans


def blocks(conversation: list[dict], kind: str) -> list[dict]:
    return [b for m in conversation if isinstance(m.get("content"), list) for b in m["content"] if b["type"] == kind]


__all__ = ["blocks", "compile_template", "content_spans", "normalize_conversation", "plain_data", "render_chat",
           "template_variables"]
