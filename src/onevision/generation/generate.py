"""generate(): prefill once (vision tower and projector included), then decode token by token on a KV cache
pre-allocated for prompt + max_new_tokens. Greedy output is token-identical to transformers' generate.

    prefill:  ids (B, S) + pixels -> logits of the last position, cache holds S tokens
    decode:   one token per row per step; rows that finished get the pad id until every row is done

`generate_naive` recomputes everything each step without a cache: the in-repo oracle for the fast path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from onevision.generation import sampling
from onevision.generation.config import GenerationConfig
from onevision.generation.streaming import IncrementalDecoder

_OFF_BY_DEFAULT = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
                   "output_hidden_states", "logits_processor", "stopping_criteria", "synced_gpus", "assistant_model",
                   "prefix_allowed_tokens_fn", "negative_prompt_ids")
MEDIA_KEYS = ("pixel_values", "image_sizes", "pixel_values_videos", "image_sizes_videos", "batch_num_images",
              "image_features", "video_features")


@dataclass
class _Plan:
    cfg: GenerationConfig
    max_new: int
    eos: torch.Tensor | None
    pad: int
    stop_strings: list[str]
    generator: torch.Generator | None


def _plan(model, input_ids: torch.Tensor, generation_config: GenerationConfig | None, tokenizer, seed, generator,
          kwargs: dict[str, Any]) -> _Plan:
    base = model.generation_config or GenerationConfig()
    if generation_config is not None:  # its settings over the model's defaults (eos, pad, ...), like the reference
        if not isinstance(generation_config, GenerationConfig):  # e.g. transformers' GenerationConfig
            generation_config = GenerationConfig.from_dict(
                {k: v for k, v in generation_config.to_dict().items() if v is not None})
        base = base.updated(**generation_config.to_dict(keep_extra=False))
    cfg = base.updated(**kwargs) if kwargs else dataclasses.replace(base)
    cfg.validate()
    prompt = input_ids.shape[1]
    if cfg.max_new_tokens is not None:
        max_new = cfg.max_new_tokens
    elif cfg.max_length is None:
        max_new = 20
    else:
        max_new = cfg.max_length - prompt
        if max_new <= 0:
            raise ValueError(f"the prompt has {prompt} tokens but max_length is {cfg.max_length}; pass "
                             "max_new_tokens=N to say how many tokens to generate")
    context = model.config.text_config.max_position_embeddings
    if prompt + max_new > context:
        raise ValueError(f"prompt ({prompt} tokens) + max_new_tokens ({max_new}) = {prompt + max_new} exceeds the "
                         f"model's context of {context} tokens; shorten the prompt or lower max_new_tokens")
    eos_ids = cfg.eos_ids()
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    stops = [cfg.stop_strings] if isinstance(cfg.stop_strings, str) else list(cfg.stop_strings or [])
    if stops and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer to read the text: pass tokenizer=processor.tokenizer")
    if seed is not None and generator is None:
        generator = torch.Generator(device=model.device).manual_seed(int(seed))
    eos = torch.tensor(eos_ids, device=model.device) if eos_ids else None
    return _Plan(cfg, max_new, eos, pad, stops, generator)


def _check_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    if attention_mask is None:
        return
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected the shape of input_ids "
                         f"{tuple(input_ids.shape)}")
    if not bool(attention_mask[:, -1].all()):
        rows = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(f"right-padded input (rows {rows} end in padding): generation continues from the last "
                         "position, so pad on the left: processor(..., padding_side='left') or "
                         "tokenizer.padding_side = 'left'")


def _stop_string_hit(token_bytes, ids: list[int], stops: list[bytes]) -> bool:
    """True when a stop string ends within the last token (the reference's StopStringCriteria rule), compared
    on UTF-8 bytes so that characters split across byte-level tokens (emoji, rare CJK) still match."""
    longest = max(len(s) for s in stops)
    tail = b""
    for i in reversed(ids):  # enough tokens to cover the longest stop string plus the last token
        tail = token_bytes(i) + tail
        if len(tail) >= longest + len(token_bytes(ids[-1])):
            break
    before = len(tail) - len(token_bytes(ids[-1]))
    for s in stops:
        start = tail.find(s, max(0, before - len(s) + 1))
        if start != -1 and start + len(s) > before:
            return True
    return False


def _byte_decoder():
    """GPT-2 byte-level BPE: the printable character that stands for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes_fn(tokenizer):
    """id -> the UTF-8 bytes the token stands for (byte-level tokens mapped back; special tokens as text)."""
    decoder = _byte_decoder()
    cache: dict[int, bytes] = {}

    def token_bytes(i: int) -> bytes:
        if i not in cache:
            piece = tokenizer.convert_ids_to_tokens(int(i)) or ""
            if all(ch in decoder for ch in piece):
                cache[i] = bytes(decoder[ch] for ch in piece)
            else:
                cache[i] = tokenizer.decode([int(i)]).encode("utf-8")
        return cache[i]

    return token_bytes


@torch.inference_mode()
def generate_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   plan: _Plan, tokenizer=None, **media: Any) -> Iterator[torch.Tensor]:
    """Yield the (B * num_return_sequences,) next tokens step by step (finished rows get the pad id)."""
    cfg = plan.cfg
    b, prompt = input_ids.shape
    n = cfg.num_return_sequences
    if attention_mask is None:  # inferred from an explicit pad id that is not also an eos id, like the reference
        pad_given = cfg.pad_token_id is not None and cfg.pad_token_id not in cfg.eos_ids()
        attention_mask = input_ids.ne(cfg.pad_token_id).long() if pad_given else torch.ones_like(input_ids)
    _check_padding(input_ids, attention_mask)  # once: the given mask, or the one inferred from the pad id
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    dtype = model.get_input_embeddings().weight.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = getattr(model, "compute_dtype", torch.float32)
    cache = model.language_model.make_cache(b, prompt + plan.max_new, dtype, input_ids.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=1, **media)
    logits = out.logits[:, -1].float()
    if n > 1:  # one prefill shared by every returned sequence
        cache.repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        input_ids = input_ids.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
        position_ids = position_ids.repeat_interleave(n, dim=0)
    rows = input_ids.shape[0]
    seen = torch.empty(rows, prompt + plan.max_new, dtype=torch.long, device=input_ids.device)
    seen[:, :prompt] = input_ids
    mask = torch.ones(rows, prompt + plan.max_new, dtype=attention_mask.dtype, device=input_ids.device)
    mask[:, :prompt] = attention_mask
    unfinished = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
    next_pos = position_ids[:, -1:] + 1
    min_new = max(cfg.min_new_tokens or 0, cfg.min_length - prompt)
    stop_bytes = [s.encode("utf-8") for s in plan.stop_strings]
    token_bytes = token_bytes_fn(tokenizer) if plan.stop_strings else None
    for step in range(plan.max_new):
        length = prompt + step
        ban = plan.eos if plan.eos is not None and step < min_new else None
        scores = sampling.process(logits, seen[:, :length], repetition=cfg.repetition_penalty, ban=ban,
                                  do_sample=cfg.do_sample, temperature=cfg.temperature, top_k=cfg.top_k,
                                  top_p=cfg.top_p, min_p=cfg.min_p)
        token = sampling.choose(scores, cfg.do_sample, plan.generator)
        token = torch.where(unfinished, token, torch.full_like(token, plan.pad))
        seen[:, length] = token
        if plan.eos is not None:
            unfinished &= ~torch.isin(token, plan.eos)
        if plan.stop_strings:
            for r in range(rows):
                if unfinished[r] and _stop_string_hit(token_bytes, seen[r, : length + 1].tolist(), stop_bytes):
                    unfinished[r] = False
        yield token
        if step + 1 == plan.max_new or not bool(unfinished.any()):
            return
        out = model(input_ids=token[:, None], attention_mask=mask[:, : length + 1], position_ids=next_pos,
                    past_key_values=cache, use_cache=True)
        next_pos = next_pos + 1
        logits = out.logits[:, -1].float()


def _pop_model_inputs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the media and vision options for the model out of generate()'s kwargs; drop what it does not need."""
    media = {k: kwargs.pop(k) for k in list(kwargs)
             if k in MEDIA_KEYS or k in ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio")}
    kwargs.pop("mm_token_type_ids", None)  # a processor output the model does not need
    for name in _OFF_BY_DEFAULT:  # transformers arguments accepted at their "off" value only
        if name in kwargs:
            if kwargs[name]:
                raise ValueError(f"generate({name}=...) is not supported by onevision; leave it unset")
            del kwargs[name]
    return media


def generate(model, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
             streamer=None, tokenizer=None, seed: int | None = None, generator: torch.Generator | None = None,
             input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             **kwargs: Any) -> torch.Tensor:
    """transformers-style generate: returns (B * num_return_sequences, prompt + new) token ids."""
    input_ids = inputs if input_ids is None else input_ids
    if input_ids is None:
        raise ValueError("generate() needs input_ids (e.g. model.generate(**processor(...)))")
    media = _pop_model_inputs(kwargs)
    plan = _plan(model, input_ids, generation_config, tokenizer, seed, generator, kwargs)
    if streamer is not None:
        if input_ids.shape[0] * plan.cfg.num_return_sequences != 1:
            raise ValueError("a streamer follows one sequence: use batch size 1 and num_return_sequences=1")
        streamer.put(input_ids.cpu())
    steps = []
    for token in generate_steps(model, input_ids, attention_mask, plan=plan, tokenizer=tokenizer, **media):
        steps.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
    if streamer is not None:
        streamer.end()
    prompt = input_ids.repeat_interleave(plan.cfg.num_return_sequences, dim=0)
    if not steps:
        return prompt
    return torch.cat([prompt, torch.stack(steps, dim=1)], dim=1)


def stream(model, processor=None, tokenizer=None, skip_special_tokens: bool = True, **kwargs: Any) -> Iterator[str]:
    """Yield the generated text of one sequence piece by piece; pieces never split a multi-byte character."""
    tokenizer = tokenizer or getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("stream() needs processor=... or tokenizer=... to turn tokens into text")
    input_ids = kwargs.pop("input_ids", None)
    if input_ids is None or input_ids.shape[0] != 1:
        raise ValueError("stream() follows one sequence: pass input_ids of batch size 1")
    attention_mask = kwargs.pop("attention_mask", None)
    media = _pop_model_inputs(kwargs)
    seed, generator = kwargs.pop("seed", None), kwargs.pop("generator", None)
    plan = _plan(model, input_ids, kwargs.pop("generation_config", None), tokenizer, seed, generator, kwargs)
    if plan.cfg.num_return_sequences != 1:
        raise ValueError("stream() follows one sequence: num_return_sequences must be 1")
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    for token in generate_steps(model, input_ids, attention_mask, plan=plan, tokenizer=tokenizer, **media):
        piece = decoder.push([int(token[0])])
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


@torch.inference_mode()
def generate_naive(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                   **media: Any) -> torch.Tensor:
    """Greedy, batch of one, no cache: recompute the whole sequence every step. The oracle for generate()."""
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, use_cache=False, **media).logits[:, -1].float()
        token = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        if eos_token_id is not None and int(token) == eos_token_id:
            break
    return ids
