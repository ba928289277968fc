"""Qwen2 byte-level BPE tokenizer on the `tokenizers` library, with transformers' padding/truncation/decode rules.

Loads tokenizer.json (or builds it from vocab.json + merges.txt, SPEC §2.2) plus tokenizer_config.json /
special_tokens_map.json for the special tokens, padding side and limits.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from onevision.processing import BatchFeature, ProcessingError, read_json

_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _build_from_vocab(folder: Path, added: list[tuple[int, str]]) -> Tokenizer:
    """SPEC §2.2: byte-level BPE from vocab.json/merges.txt, NFC, Qwen2 split regex, added special tokens."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False,
                              byte_fallback=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(text, special=True, normalized=False) for _, text in sorted(added)])
    return tk


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization_spaces` rule (remove spaces before punctuation / contractions)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


class Qwen2TokenizerFast:
    """The llava-onevision tokenizer: 151643 BPE tokens + <|endoftext|>, <|im_start|>, <|im_end|>, <image>, <video>."""

    model_input_names = ["input_ids", "attention_mask"]
    backend = "tokenizers"

    def __init__(self, tokenizer: Tokenizer, config: dict | None = None):
        config = dict(config or {})
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.init_kwargs = config
        for key in _SPECIAL_KEYS:
            setattr(self, key, _token_text(config.get(key)))
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        self.additional_special_tokens = [_token_text(t) for t in extra] if isinstance(extra, list) else []
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        self.model_max_length = int(config.get("model_max_length") or 10**30)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.chat_template = config.get("chat_template")
        force_key = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
        self.force_bpe_cleanup = bool(config.get(force_key))

    # ---------------------------------------------------------------- loading / saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> Qwen2TokenizerFast:
        folder = Path(path)
        config = {**read_json(folder / "special_tokens_map.json"), **read_json(folder / "tokenizer_config.json")}
        config.update(overrides)
        added = [(int(i), t["content"]) for i, t in (config.get("added_tokens_decoder") or {}).items()]
        if (folder / "tokenizer.json").is_file():
            tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
            missing = [text for _, text in sorted(added) if tk.token_to_id(text) is None]
            if missing:
                tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tk = _build_from_vocab(folder, added)
        else:
            raise FileNotFoundError(f"no tokenizer.json (or vocab.json + merges.txt) in {str(folder)!r}")
        return cls(tk, config)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(folder / "tokenizer.json"))
        config = {k: v for k, v in self.init_kwargs.items() if k not in ("chat_template", "added_tokens_decoder")}
        config.update({k: getattr(self, k) for k in _SPECIAL_KEYS})
        config.update(padding_side=self.padding_side, model_max_length=self.model_max_length,
                      clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
                      tokenizer_class="Qwen2Tokenizer")
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ---------------------------------------------------------------- vocabulary
    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._tokenizer.token_to_id(tokens)
        return [self._tokenizer.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        return [self._tokenizer.id_to_token(int(i)) for i in ids]

    def __getattr__(self, name: str):
        if name.endswith("_token_id") and name[: -len("_id")] in _SPECIAL_KEYS:
            token = getattr(self, name[: -len("_id")])
            return None if token is None else self._tokenizer.token_to_id(token)
        raise AttributeError(name)

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        """The named special tokens only (transformers 5 leaves the additional ones out of this map)."""
        return {k: getattr(self, k) for k in _SPECIAL_KEYS if getattr(self, k) is not None}

    def apply_chat_template(self, conversation, chat_template: str | None = None, add_generation_prompt: bool = False,
                            tokenize: bool = True, return_tensors: str | None = None, return_dict: bool = True,
                            continue_final_message: bool = False, plain_text_content: bool = False, **kwargs):
        """Text-only chat templating like transformers 5's tokenizer method (tokenize=True and return_dict=True by
        default, as there). `plain_text_content=True` (ours; off by default, as in transformers) tokenizes the
        messages' text as plain text: a special token typed in a message (`<|im_start|>`) is not one.
        Media in a conversation need the processor's apply_chat_template."""
        from onevision.processing.chat_template import content_spans, normalize_conversation, render_chat

        template = chat_template or self.chat_template
        if not isinstance(template, str):
            raise ProcessingError("this tokenizer has no chat template; pass chat_template=... or use the processor")
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and \
            isinstance(conversation[0], (list, tuple))
        chats = [normalize_conversation(c) for c in (conversation if batched else [conversation])]

        def render(chat):
            return render_chat(chat, template, add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message, **self.special_tokens_map)[0]
        prompts = [render(chat) for chat in chats]
        if not tokenize:
            return prompts if batched else prompts[0]
        if plain_text_content:
            kwargs["plain_text_spans"] = [content_spans(prompt, chat, self.special_token_strings, render)
                                          for prompt, chat in zip(prompts, chats, strict=True)]
        encoded = self(prompts if batched else prompts[0], return_tensors=return_tensors, add_special_tokens=False,
                       **kwargs)
        return encoded if return_dict else encoded["input_ids"]

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens + additional ones (like transformers; <image>/<video> are added, not listed)."""
        named = [getattr(self, k) for k in _SPECIAL_KEYS if getattr(self, k) is not None]
        return list(dict.fromkeys(named + self.additional_special_tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._tokenizer.token_to_id(t) for t in self.all_special_tokens]

    @property
    def special_token_strings(self) -> list[str]:
        """Every added token marked special (<|im_start|>, <image>, ...): text that becomes one token id."""
        return [t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special]

    def _encode_with_plain_spans(self, text: str, spans, add_special_tokens: bool):
        """Like encode(), but the characters in `spans` [(start, end)] are tokenized as plain text (special tokens
        typed there are split like any text). The text is encoded whole unless a span holds a special token, so
        the ids only differ from transformers' where such a token was typed."""
        specials = self.special_token_strings
        spans = sorted((int(a), int(b)) for a, b in spans or [] if b > a)
        if not any(token in text[a:b] for a, b in spans for token in specials):
            encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
            return list(encoding.ids), list(encoding.offsets)
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = Tokenizer.from_str(self._tokenizer.to_str())
            plain.encode_special_tokens = True
            self.__dict__["_plain"] = plain
        ids, offsets, pos = [], [], 0
        for start, end in spans + [(len(text), len(text))]:
            for tokenizer, a, b in ((self._tokenizer, pos, start), (plain, start, end)):
                if b > a:
                    encoding = tokenizer.encode(text[a:b], add_special_tokens=False)
                    ids += encoding.ids
                    offsets += [(x + a, y + a) for x, y in encoding.offsets]
            pos = max(pos, end)
        return ids, offsets

    # ---------------------------------------------------------------- encoding
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def tokenize(self, text: str) -> list[str]:
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, padding: bool | str = False,
                 truncation: bool | str | None = None, max_length: int | None = None,
                 padding_side: str | None = None, pad_to_multiple_of: int | None = None,
                 return_tensors: str | None = None, return_attention_mask: bool = True,
                 return_offsets_mapping: bool = False, return_length: bool = False, plain_text_spans=None,
                 **unused) -> BatchFeature:
        """Token ids (+ attention mask) for one text or a batch, with transformers' padding/truncation rules.
        `plain_text_spans` (ours): per text, [(start, end)] character spans tokenized as plain text."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ProcessingError(f"text must be a string or a list of strings, got {type(text).__name__}")
        padding_side = padding_side or self.padding_side
        if padding_side not in ("left", "right"):
            raise ProcessingError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        padding = {True: "longest", False: "do_not_pad", None: "do_not_pad"}.get(padding, padding)
        if padding not in ("longest", "max_length", "do_not_pad"):
            raise ProcessingError(f"padding must be True/False, 'longest' or 'max_length', got {padding!r}")
        if truncation is None and max_length is not None and padding != "max_length":
            truncation = True  # transformers defaults to 'longest_first' when only max_length is given
        if truncation in (True, "longest_first", "only_first") and max_length is None:
            max_length = self.model_max_length
        if padding == "max_length" and max_length is None:
            max_length = self.model_max_length

        for i, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ProcessingError(f"text {i} is not valid Unicode ({e.reason} at position {e.start}, e.g. a lone "
                                      "surrogate); send UTF-8 text") from None
        if plain_text_spans is not None:
            if len(plain_text_spans) != len(texts):
                raise ProcessingError(f"plain_text_spans needs one list of spans per text ({len(texts)}), got "
                                      f"{len(plain_text_spans)}")
            rows = [self._encode_with_plain_spans(t, spans, add_special_tokens)
                    for t, spans in zip(texts, plain_text_spans, strict=True)]
        else:
            encodings = self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
            rows = [(list(e.ids), list(e.offsets)) for e in encodings]
        if truncation not in (None, False, "do_not_truncate"):
            keep = slice(0, max_length) if self.truncation_side == "right" else slice(-max_length or None, None)
            rows = [(ids[keep], offs[keep]) if len(ids) > max_length else (ids, offs) for ids, offs in rows]
        target = None
        if padding == "longest":
            target = max((len(ids) for ids, _ in rows), default=0)
        elif padding == "max_length":
            target = max_length
        if target is not None and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        if target is not None and self.pad_token_id is None and any(len(ids) < target for ids, _ in rows):
            raise ProcessingError("this tokenizer has no pad_token, so it cannot pad; set tokenizer.pad_token")

        data: dict[str, list] = {"input_ids": []}
        if return_attention_mask:
            data["attention_mask"] = []
        if return_offsets_mapping:
            data["offset_mapping"] = []
        if return_length:
            data["length"] = []
        for ids, offsets in rows:
            n_pad = max(0, target - len(ids)) if target is not None else 0
            left, right = (n_pad, 0) if padding_side == "left" else (0, n_pad)
            data["input_ids"].append([self.pad_token_id] * left + ids + [self.pad_token_id] * right)
            if return_attention_mask:
                data["attention_mask"].append([0] * left + [1] * len(ids) + [0] * right)
            if return_offsets_mapping:
                data["offset_mapping"].append([(0, 0)] * left + [tuple(o) for o in offsets] + [(0, 0)] * right)
            if return_length:
                data["length"].append(len(ids) + n_pad)
        if single and return_tensors is None:
            data = {k: v[0] for k, v in data.items()}
        return BatchFeature(data, tensor_type=return_tensors)

    # ---------------------------------------------------------------- decoding
    def decode(self, token_ids, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None, **unused) -> str | list[str]:
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if token_ids and isinstance(token_ids[0], (list, tuple)):  # a batch, as transformers 5 accepts
            return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces) for row in token_ids]
        text = self._tokenizer.decode([int(i) for i in token_ids], skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces and not self.force_bpe_cleanup:
            # like transformers 5: the WordPiece-era cleanup would corrupt byte-level BPE text, so it is skipped
            warnings.warn("ignoring clean_up_tokenization_spaces=True for a BPE tokenizer (it would strip real "
                          "spaces before punctuation)", stacklevel=2)
            return text
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(seq, **kwargs) for seq in sequences]


__all__ = ["Qwen2TokenizerFast", "clean_up_tokenization"]
