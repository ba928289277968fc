"""Chat template rendering (text and ids) against transformers' processor.apply_chat_template.

Run: .venv/bin/python -m pytest tests/test_chat_template.py -q
"""

from __future__ import annotations

import copy

import pytest
from _processing_helpers import assert_same_outputs, processor, random_image, ref_processor  # noqa: F401

from onevision.processing import ProcessingError


def text(t):
    return {"type": "text", "text": t}


IMG = {"type": "image"}
VID = {"type": "video"}
CONVERSATIONS = {
    "text_only": [{"role": "user", "content": [text("Hello")]}],
    "image_text": [{"role": "user", "content": [IMG, text("What is shown in this image?")]}],
    "text_then_image": [{"role": "user", "content": [text("Describe"), IMG]}],
    "two_images": [{"role": "user", "content": [IMG, IMG, text("Compare.")]}],
    "two_texts": [{"role": "user", "content": [text("A"), text("B")]}],
    "video": [{"role": "user", "content": [VID, text("Why is this funny?")]}],
    "video_image_text": [{"role": "user", "content": [VID, IMG, text("Q")]}],
    "system": [{"role": "system", "content": [text("You are a helpful assistant.")]},
               {"role": "user", "content": [IMG, text("Q")]}],
    "multi_turn": [{"role": "user", "content": [IMG, text("What is shown?")]},
                   {"role": "assistant", "content": [text("A stop sign.")]},
                   {"role": "user", "content": [text("More detail.")]}],
    "unicode_and_specials": [{"role": "user", "content": [text("héllo 你好 <image> typed\n\nnewlines")]}],
    "empty_content": [{"role": "user", "content": []}],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendered_text_matches(processor, ref_processor, name, add_generation_prompt):
    conv = CONVERSATIONS[name]
    want = ref_processor.apply_chat_template(copy.deepcopy(conv), add_generation_prompt=add_generation_prompt)
    got = processor.apply_chat_template(copy.deepcopy(conv), add_generation_prompt=add_generation_prompt)
    assert got == want


def test_spec_strings(processor):
    assert processor.apply_chat_template(CONVERSATIONS["image_text"], add_generation_prompt=True) == \
        "<|im_start|>user <image>\nWhat is shown in this image?<|im_end|><|im_start|>assistant\n"
    assert processor.apply_chat_template(CONVERSATIONS["video_image_text"], add_generation_prompt=True) == \
        "<|im_start|>user <image><video>\nQ<|im_end|><|im_start|>assistant\n"


@pytest.mark.parametrize("name", ["text_only", "two_texts", "multi_turn", "system"])
def test_batched_text_and_ids_match(processor, ref_processor, name):
    convs = [CONVERSATIONS[name], CONVERSATIONS["text_only"]]
    assert processor.apply_chat_template(copy.deepcopy(convs), add_generation_prompt=True) == \
        ref_processor.apply_chat_template(copy.deepcopy(convs), add_generation_prompt=True)
    convs = [[{"role": m["role"], "content": [c for c in m["content"] if c["type"] == "text"]} for m in conv]
             for conv in convs]  # media-free, so it can be tokenized without images
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, padding=True, padding_side="left")
    want = ref_processor.apply_chat_template(copy.deepcopy(convs), **kwargs)
    got = processor.apply_chat_template(copy.deepcopy(convs), **kwargs)
    assert_same_outputs(got, want)
    want_ids = ref_processor.apply_chat_template(copy.deepcopy(convs[0]), tokenize=True)
    assert processor.apply_chat_template(copy.deepcopy(convs[0]), tokenize=True) == want_ids


def test_plain_string_content_is_rendered_as_text(processor, ref_processor):
    as_string = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    as_items = [{"role": "system", "content": [text("Be brief.")]}, {"role": "user", "content": [text("Hi there")]}]
    got = processor.apply_chat_template(as_string, add_generation_prompt=True)
    assert got == ref_processor.apply_chat_template(as_items, add_generation_prompt=True)
    assert "Hi there" in got  # the reference would silently render "<|im_start|>user <|im_end|>"


def test_openai_image_url_items(processor, ref_processor):
    conv = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}, text("Q")]}]
    assert processor.apply_chat_template(conv) == ref_processor.apply_chat_template(copy.deepcopy(conv))


def test_assistant_tokens_mask_matches(processor, ref_processor):
    conv = [{"role": "system", "content": [text("S")]},
            {"role": "user", "content": [{"type": "image", "image": random_image(50, 40)}, text("What?")]},
            {"role": "assistant", "content": [text("A red square."), text("Second part")]},
            {"role": "user", "content": [text("And?")]},
            {"role": "assistant", "content": [text("Nothing else.")]}]
    kwargs = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    want = ref_processor.apply_chat_template([copy.deepcopy(conv), copy.deepcopy(conv[:3])], padding=True,
                                             return_tensors="pt", **kwargs)
    got = processor.apply_chat_template([copy.deepcopy(conv), copy.deepcopy(conv[:3])], padding=True,
                                        return_tensors="pt", **kwargs)
    assert_same_outputs(got, want)
    assert got["assistant_masks"].sum() > 0
    masked = got["input_ids"][0][got["assistant_masks"][0].bool()]
    decoded = processor.decode(masked)
    assert "A red square." in decoded and "Nothing else." in decoded and "What" not in decoded


def test_continue_final_message(processor, ref_processor):
    conv = [{"role": "user", "content": [text("Count")]}, {"role": "assistant", "content": [text("1, 2,")]}]
    want = ref_processor.apply_chat_template(copy.deepcopy(conv), continue_final_message=True)
    assert processor.apply_chat_template(conv, continue_final_message=True) == want
    assert want.endswith("1, 2,")
    with pytest.raises(ProcessingError):
        processor.apply_chat_template(conv, continue_final_message=True, add_generation_prompt=True)


def test_custom_template_and_kwargs(processor, ref_processor):
    template = "{% for m in messages %}[{{ m['role'] | upper }}:{{ m['content'][0]['text'] }}]{% endfor %}" \
               "{{ bos_token }}{{ eos_token }}{{ extra }}{{ messages | tojson }}"
    conv = CONVERSATIONS["two_texts"]
    want = ref_processor.apply_chat_template(copy.deepcopy(conv), chat_template=template, extra="X")
    assert processor.apply_chat_template(conv, chat_template=template, extra="X") == want


def test_sandbox_blocks_unsafe_templates(processor):
    unsafe = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ProcessingError, match="unsafe|failed"):
        processor.apply_chat_template(CONVERSATIONS["text_only"], chat_template=unsafe)
    with pytest.raises(ProcessingError, match="stop here"):
        processor.apply_chat_template(CONVERSATIONS["text_only"],
                                      chat_template="{{ raise_exception('stop here') }}")


def test_media_objects_are_invisible_to_the_template(processor):
    conv = [{"role": "user", "content": [{"type": "image", "image": random_image(8, 8)}, text("Q")]}]
    out = processor.apply_chat_template(conv, chat_template="{{ messages[0]['content'][0]['image'] }}")
    assert out == "<Image>"


@pytest.mark.parametrize("content", [[{"type": "audio", "audio": "x.wav"}], [{"text": "no type"}], ["bare str"],
                                     [{"type": "text", "text": 3}]])
def test_unsupported_content_is_an_error(processor, content):
    with pytest.raises(ProcessingError):
        processor.apply_chat_template([{"role": "user", "content": content}])
