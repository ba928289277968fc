"""LlavaOnevisionProcessor: conversation -> prompt -> expanded placeholders -> token ids + pixel tensors,
exactly as transformers' default AutoProcessor does for the llava-hf llava-onevision checkpoints.

    processor = AutoProcessor.from_pretrained("path/or/repo-id")
    inputs = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    inputs = processor(images=..., text=..., videos=..., return_tensors="pt")

Each <image> becomes `geometry.num_image_tokens(...)` tokens and each <video> `geometry.num_video_tokens(T)`,
the same pure functions the model uses to pack features, so the two can never disagree.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

from onevision.geometry import num_image_tokens, num_video_tokens
from onevision.processing import BatchFeature, ProcessingError, read_json
from onevision.processing.chat_template import (blocks, content_spans, normalize_conversation, render_chat,
                                                template_variables)
from onevision.processing.image import (_CONFIG_KEYS as IMAGE_KEYS, LlavaOnevisionImageProcessor,
                                        LlavaOnevisionImageProcessorPil, split_batch)
from onevision.processing.tokenizer import Qwen2TokenizerFast
from onevision.processing.video import _CONFIG_KEYS as VIDEO_KEYS, LlavaOnevisionVideoProcessor, split_videos

TEXT_KEYS = ("add_special_tokens", "padding", "truncation", "max_length", "padding_side", "pad_to_multiple_of",
             "return_attention_mask", "return_offsets_mapping", "return_length")
IMAGE_ONLY_KEYS = ("max_pixels", "input_data_format")
PROCESSOR_FILES = ["*.json", "*.jinja", "*.txt", "video_processor/*", "additional_chat_templates/*"]
_MEDIA_KEYS = {"image": ("image", "url", "path", "base64"), "video": ("video", "url", "path")}


def _count_error(kind: str, token: str, in_text: int, passed: int) -> ProcessingError:
    return ProcessingError(
        f"the text has {in_text} {token} placeholder(s) but {passed} {kind}(s) were passed; "
        f"put exactly one {token} in the text per {kind}, in order")


class LlavaOnevisionProcessor:
    """Tokenizer + image processor + video processor + chat template of a llava-onevision checkpoint."""

    def __init__(self, image_processor=None, tokenizer=None, video_processor=None, num_image_tokens: int = 729,
                 vision_feature_select_strategy: str = "full", chat_template: str | dict | None = None,
                 image_token: str = "<image>", video_token: str = "<video>",
                 vision_aspect_ratio: str = "anyres_max_9", **unused):
        if tokenizer is None:
            raise ProcessingError("LlavaOnevisionProcessor needs a tokenizer")
        self.tokenizer = tokenizer
        self.image_processor = image_processor or LlavaOnevisionImageProcessor()
        self.video_processor = video_processor or LlavaOnevisionVideoProcessor()
        self.num_image_tokens = int(num_image_tokens or 729)
        self.vision_feature_select_strategy = vision_feature_select_strategy or "full"
        self.vision_aspect_ratio = vision_aspect_ratio or "anyres_max_9"
        self.chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        self.image_token, self.video_token = image_token, video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)

    # ---------------------------------------------------------------- loading / saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, backend: str | None = None, **kwargs) -> LlavaOnevisionProcessor:
        """Load a hub-layout or transformers-v5-layout processor folder (or a hub repo id, via AutoProcessor)."""
        folder = Path(path)
        if not folder.is_dir():
            return AutoProcessor.from_pretrained(path, backend=backend, **kwargs)
        config = read_json(folder / "processor_config.json")
        image_cls = LlavaOnevisionImageProcessorPil if backend == "pil" else LlavaOnevisionImageProcessor
        if backend not in (None, "pil", "torchvision"):
            raise ProcessingError(f"backend must be 'torchvision' (default) or 'pil', got {backend!r}")
        template = None
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif (folder / "chat_template.json").is_file():
            template = read_json(folder / "chat_template.json").get("chat_template")
        else:
            template = config.get("chat_template")
        settings = {k: config[k] for k in ("num_image_tokens", "vision_feature_select_strategy", "image_token",
                                           "video_token", "vision_aspect_ratio") if config.get(k) is not None}
        settings.update(kwargs)
        return cls(image_processor=image_cls.from_pretrained(folder),
                   tokenizer=Qwen2TokenizerFast.from_pretrained(folder),
                   video_processor=LlavaOnevisionVideoProcessor.from_pretrained(folder), chat_template=template,
                   **settings)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the transformers v5 layout: processor_config.json (everything), chat_template.jinja, tokenizer."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        config = {"image_processor": self.image_processor.to_dict(), "video_processor": self.video_processor.to_dict(),
                  "image_token": self.image_token, "video_token": self.video_token,
                  "num_image_tokens": self.num_image_tokens, "processor_class": "LlavaOnevisionProcessor",
                  "vision_aspect_ratio": self.vision_aspect_ratio,
                  "vision_feature_select_strategy": self.vision_feature_select_strategy}
        (folder / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if isinstance(self.chat_template, str):
            (folder / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")

    # ---------------------------------------------------------------- token counts
    def image_token_count(self, size: tuple[int, int], multi_image: bool = False) -> int:
        """Placeholders for one image of original (height, width) (730 per image of a multi-image sample)."""
        return num_image_tokens(size, self.image_processor.image_grid_pinpoints, tile=self.image_processor.tile[0],
                                side=math.isqrt(self.num_image_tokens), vision_aspect_ratio=self.vision_aspect_ratio,
                                multi_image=multi_image, strategy=self.vision_feature_select_strategy)

    def video_token_count(self, num_frames: int) -> int:
        return num_video_tokens(num_frames, side=math.isqrt(self.num_image_tokens))

    # ---------------------------------------------------------------- __call__
    def _split_kwargs(self, kwargs: dict) -> tuple[dict, dict, dict]:
        text_kw = dict(kwargs.pop("text_kwargs", None) or {})
        image_kw = dict(kwargs.pop("images_kwargs", None) or {})
        video_kw = dict(kwargs.pop("videos_kwargs", None) or {})
        for key, value in kwargs.items():
            known = False
            if key in TEXT_KEYS:
                text_kw.setdefault(key, value)
                known = True
            if key in IMAGE_KEYS or key in IMAGE_ONLY_KEYS:
                image_kw.setdefault(key, value)
                known = True
            if key in VIDEO_KEYS or key == "input_data_format":
                video_kw.setdefault(key, value)
                known = True
            if not known:
                warnings.warn(f"ignoring unknown processor option {key!r}", stacklevel=3)
        return text_kw, image_kw, video_kw

    def __call__(self, images=None, text: str | list[str] | None = None, videos=None,
                 return_tensors: str | None = None, **kwargs) -> BatchFeature:
        """Expand <image>/<video> placeholders, tokenize and preprocess media (the reference's output keys)."""
        track_offsets = kwargs.pop("_track_replacements", None)
        plain_spans = kwargs.pop("plain_text_spans", None)
        mm_token_type_ids = kwargs.pop("return_mm_token_type_ids", False)
        text_kw, image_kw, video_kw = self._split_kwargs(kwargs)
        if images is None and text is None and videos is None:
            raise ProcessingError("pass at least one of text, images or videos")
        texts = None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(t, str) for t in texts):
                raise ProcessingError("text must be a string or a list of strings")
        flat_images, batch_num_images = split_batch(images) if images is not None else ([], [])
        flat_videos = split_videos(videos) if videos is not None else []
        if texts is not None:
            for kind, token, media in (("image", self.image_token, flat_images), ("video", self.video_token,
                                                                                   flat_videos)):
                in_text = sum(t.count(token) for t in texts)
                if in_text != len(media):
                    raise _count_error(kind, token, in_text, len(media))

        data: dict[str, Any] = {}
        replacements: dict[str, list[int]] = {"image": [], "video": []}
        if images is not None:
            image_out = self.image_processor(images, **image_kw)
            multi = [n != 1 for n in batch_num_images for _ in range(n)]
            replacements["image"] = [self.image_token_count(size, m)
                                     for size, m in zip(image_out["image_sizes"], multi, strict=True)]
            data.update(image_out)
        if videos is not None:
            video_out = self.video_processor(videos, **video_kw)
            replacements["video"] = [self.video_token_count(len(v)) for v in video_out["pixel_values_videos"]]
        text_data = {}
        if texts is not None:
            expanded, shifts = self._expand(texts, replacements)
            if plain_spans is not None:
                text_kw["plain_text_spans"] = self._shift_spans(texts, plain_spans, shifts)
            text_data = self.tokenizer(expanded, **text_kw).data
            self._check_truncation(expanded, text_data["input_ids"])
            if track_offsets is not None:
                track_offsets.extend(shifts)
            if mm_token_type_ids:  # 0 text, 1 image, 2 video
                kinds = {self.image_token_id: 1, self.video_token_id: 2}
                text_data["mm_token_type_ids"] = [[kinds.get(i, 0) for i in row] for row in text_data["input_ids"]]
        if videos is not None:
            data.update(video_out)
        return BatchFeature({**text_data, **data}, tensor_type=return_tensors)

    def _expand(self, texts: list[str], counts: dict[str, list[int]]) -> tuple[list[str], list[list[tuple]]]:
        """Replace the i-th <image>/<video> (in order over the batch) by its placeholder run; also returns per
        sample (end of placeholder in the original text, chars gained so far) for the assistant mask."""
        groups = [f"(?P<{kind}>{re.escape(tok)})" for kind, tok in (("image", self.image_token),
                                                                    ("video", self.video_token)) if counts[kind]]
        if not groups:
            return list(texts), [[] for _ in texts]
        pattern = re.compile("|".join(groups))
        iters = {kind: iter(n) for kind, n in counts.items()}
        tokens = {"image": self.image_token, "video": self.video_token}
        out, shifts = [], []
        for text in texts:
            pieces, last, gained, sample_shifts = [], 0, 0, []
            for match in pattern.finditer(text):
                kind = match.lastgroup
                run = tokens[kind] * next(iters[kind])
                pieces += [text[last:match.start()], run]
                gained += len(run) - (match.end() - match.start())
                sample_shifts.append((match.end(), gained))
                last = match.end()
            pieces.append(text[last:])
            out.append("".join(pieces))
            shifts.append(sample_shifts)
        return out, shifts

    def _shift_spans(self, texts: list[str], spans: list, shifts: list) -> list[list[tuple[int, int]]]:
        """Plain-text spans of the texts -> the same spans in the expanded texts. A placeholder typed inside a
        plain-text span is refused: it would be taken for media."""
        if len(spans) != len(texts):
            raise ProcessingError(f"plain_text_spans needs one list of spans per text ({len(texts)}), got {len(spans)}")
        out = []
        for text, text_spans, text_shifts in zip(texts, spans, shifts, strict=True):
            moved = []
            for start, end in text_spans:
                for token in (self.image_token, self.video_token):
                    if token in text[start:end]:
                        raise ProcessingError(f"a message's text contains the placeholder {token!r}; attach media "
                                              "as image/video content items instead")
                gained = 0
                for placeholder_end, total in text_shifts:
                    if placeholder_end <= start:
                        gained = total
                moved.append((start + gained, end + gained))
            out.append(moved)
        return out

    def _check_truncation(self, texts: list[str], input_ids: list) -> None:
        for kind, token, token_id in (("image", self.image_token, self.image_token_id),
                                      ("video", self.video_token, self.video_token_id)):
            ids = [list(row).count(token_id) for row in input_ids]
            in_text = [t.count(token) for t in texts]
            if ids != in_text:
                raise ProcessingError(
                    f"truncation cut through {kind} placeholders: {in_text} {token} tokens expected per sample, "
                    f"{ids} left after tokenizing; disable truncation or raise max_length")

    # ---------------------------------------------------------------- chat
    def apply_chat_template(self, conversation, chat_template: str | None = None, tools=None, documents=None,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            return_assistant_tokens_mask: bool = False, tokenize: bool = False,
                            return_tensors: str | None = None, return_dict: bool = False,
                            processor_kwargs: dict | None = None, plain_text_content: bool = False, **kwargs):
        """Render conversation(s) with the chat template; with tokenize=True also load media and run __call__.
        `plain_text_content=True` (ours; off by default, as in transformers) tokenizes the messages' text as plain
        text: a special token typed in a message (`<|im_start|>`) is not one. The server always sets it."""
        template = self._resolve_template(chat_template)
        if continue_final_message and add_generation_prompt:
            raise ProcessingError("continue_final_message and add_generation_prompt can't both be set")
        if continue_final_message and return_assistant_tokens_mask:
            raise ProcessingError("continue_final_message is not compatible with return_assistant_tokens_mask")
        names = template_variables(template)
        processor_kwargs = {**(processor_kwargs or {}), **{k: v for k, v in kwargs.items() if k not in names}}
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and \
            isinstance(conversation[0], (list, tuple))
        conversations = [normalize_conversation(c) for c in (conversation if batched else [conversation])]
        template_kwargs = {**self.tokenizer.special_tokens_map, **kwargs}
        prompts, spans = [], []
        for chat in conversations:
            prompt, gen = render_chat(chat, template, add_generation_prompt=add_generation_prompt,
                                      continue_final_message=continue_final_message,
                                      track_generation=return_assistant_tokens_mask, tools=tools,
                                      documents=documents, **template_kwargs)
            prompts.append(prompt)
            spans.append(gen)
        if not tokenize:
            return prompts if batched else prompts[0]

        images = [[b[k] for b in blocks(chat, "image") for k in _MEDIA_KEYS["image"] if k in b]
                  for chat in conversations]
        videos = [[b[k] for b in blocks(chat, "video") for k in _MEDIA_KEYS["video"] if k in b]
                  for chat in conversations]
        if "do_sample_frames" not in processor_kwargs and (processor_kwargs.get("num_frames") is not None
                                                           or processor_kwargs.get("fps") is not None):
            processor_kwargs["do_sample_frames"] = True
        if return_tensors is None:
            return_tensors = processor_kwargs.get("return_tensors")
        processor_kwargs.pop("return_tensors", None)
        shifts: list = []
        if return_assistant_tokens_mask:
            processor_kwargs.update(return_offsets_mapping=True, _track_replacements=shifts)
        if plain_text_content:
            def render(chat):
                return render_chat(chat, template, add_generation_prompt=add_generation_prompt,
                                   continue_final_message=continue_final_message, tools=tools, documents=documents,
                                   **template_kwargs)[0]
            processor_kwargs["plain_text_spans"] = [content_spans(p, c, self.tokenizer.special_token_strings, render)
                                                    for p, c in zip(prompts, conversations, strict=True)]
        out = self(text=prompts, images=images if any(images) else None, videos=videos if any(videos) else None,
                   return_tensors=return_tensors, **processor_kwargs)
        if return_assistant_tokens_mask:
            offsets = out.data.pop("offset_mapping")
            if hasattr(offsets, "tolist"):
                offsets = offsets.tolist()
            out["assistant_masks"] = assistant_masks(offsets, spans, shifts)
            out.convert_to_tensors(return_tensors)
        return out if return_dict else out["input_ids"]

    def _resolve_template(self, chat_template: str | None) -> str:
        templates = self.chat_template
        if chat_template is not None:
            return templates[chat_template] if isinstance(templates, dict) and chat_template in templates \
                else chat_template
        if isinstance(templates, dict):
            if "default" not in templates:
                raise ProcessingError(f"several chat templates and none named 'default': {sorted(templates)}")
            return templates["default"]
        if templates is None:
            raise ProcessingError("this processor has no chat template; pass chat_template=...")
        return templates

    # ---------------------------------------------------------------- decoding
    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images",
                "pixel_values_videos"]

    def __repr__(self) -> str:
        return (f"LlavaOnevisionProcessor(image_processor={self.image_processor!r}, "
                f"video_processor={self.video_processor.to_dict()}, num_image_tokens={self.num_image_tokens}, "
                f"vision_feature_select_strategy={self.vision_feature_select_strategy!r})")


def assistant_masks(offsets: list, spans: list, shifts: list) -> list[list[int]]:
    """1 for every token overlapping a {% generation %} span (spans shifted past expanded placeholders)."""
    masks = []
    for i, row in enumerate(offsets):
        ends = [end for end, _ in shifts[i]] if i < len(shifts) else []
        gained = [0] + [g for _, g in shifts[i]] if i < len(shifts) else [0]
        mask = [0] * len(row)
        for span in spans[i]:
            start, end = (c + gained[bisect.bisect_right(ends, c)] for c in span)
            for pos, (tok_start, tok_end) in enumerate(row):
                if tok_start < end and tok_end > start:
                    mask[pos] = 1
        masks.append(mask)
    return masks


class AutoProcessor:
    """`AutoProcessor.from_pretrained(folder_or_repo_id)` -> LlavaOnevisionProcessor."""

    @staticmethod
    def from_pretrained(path_or_repo_id: str | os.PathLike, backend: str | None = None,
                        revision: str | None = None, **kwargs) -> LlavaOnevisionProcessor:
        if os.path.isdir(path_or_repo_id):
            return LlavaOnevisionProcessor.from_pretrained(path_or_repo_id, backend=backend, **kwargs)
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(str(path_or_repo_id), revision=revision, allow_patterns=PROCESSOR_FILES)
        except Exception as e:  # offline, unknown repo, no network...
            raise OSError(
                f"could not get processor files for {str(path_or_repo_id)!r} from the Hugging Face Hub "
                f"({type(e).__name__}: {e}). If you are offline, pass a local folder path that holds the processor "
                "files (tokenizer.json, preprocessor_config.json, processor_config.json, chat template)") from None
        return LlavaOnevisionProcessor.from_pretrained(folder, backend=backend, **kwargs)


__all__ = ["AutoProcessor", "LlavaOnevisionProcessor", "assistant_masks"]
