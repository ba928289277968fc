"""Tokenizer parity with transformers' Qwen2 tokenizer loaded from the same hub folder.

Run: .venv/bin/python -m pytest tests/test_tokenizer.py -q
"""

from __future__ import annotations

import shutil

import pytest
from _processing_helpers import HUB_PROCESSOR, assert_same_outputs, processor, ref_processor  # noqa: F401

from onevision.processing import ProcessingError
from onevision.processing.tokenizer import Qwen2TokenizerFast

TEXTS = [
    "Hello world", " Hello", "12345", "你好，世界", " \n", "\n", "\n\n", "",
    "<|im_start|>user <video>\nWhat is shown in this video?<|im_end|><|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
    "What is shown in this image?<|im_end|>\n<|im_start|>assistant\n",
    "typed <image> and <video> by a user, <|endoftext|> too", "  leading  and trailing spaces  ",
    "emoji 😀👍🏽 and accents: café naïve Ελληνικά русский", "tabs\tand\r\nwindows lines",
    "I'm sure it's they'll",
    "code: def f(x):\n    return x**2  # comment", "ｆｕｌｌ-width ＡＢＣ", "e\u0301 (decomposed é)",
]


@pytest.fixture(scope="module")
def ours(processor):
    return processor.tokenizer


@pytest.fixture(scope="module")
def ref(ref_processor):
    return ref_processor.tokenizer


def test_spec_ids(ours):
    assert ours.encode("Hello world") == [9707, 1879]
    assert ours.encode("<|im_start|>user <image>\nWhat is shown in this image?<|im_end|><|im_start|>assistant\n") == \
        [151644, 872, 220, 151646, 198, 3838, 374, 6839, 304, 419, 2168, 30, 151645, 151644, 77091, 198]
    assert len(ours) == 151648 and ours.vocab_size == 151643


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_reference(ours, ref, text):
    assert ours.encode(text) == ref.encode(text)
    assert ours(text)["input_ids"] == ref(text)["input_ids"]


def test_special_tokens_match(ours, ref):
    for name in ("pad_token", "eos_token", "bos_token", "unk_token"):
        assert getattr(ours, name) == getattr(ref, name), name
        assert getattr(ours, name + "_id") == getattr(ref, name + "_id"), name
    assert ours.padding_side == ref.padding_side == "right"
    assert ours.model_max_length == ref.model_max_length
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)
    assert ours.convert_tokens_to_ids(["<image>", "<video>"]) == ref.convert_tokens_to_ids(["<image>", "<video>"])


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("kwargs", [dict(padding=True), dict(padding="longest", pad_to_multiple_of=8),
                                    dict(padding="max_length", max_length=40), dict(truncation=True, max_length=5),
                                    dict(max_length=6), dict(padding=True, truncation=True, max_length=7),
                                    dict(padding=False)])
def test_batch_padding_and_truncation(ours, ref, padding_side, kwargs):
    batch = ["Hello world", "a much longer sentence with many more tokens in it", "你好", ""]
    want = ref(batch, padding_side=padding_side, **kwargs)
    got = ours(batch, padding_side=padding_side, **kwargs)
    assert_same_outputs(got, want)
    if kwargs.get("padding"):
        assert_same_outputs(ours(batch, padding_side=padding_side, return_tensors="pt", **kwargs),
                            ref(batch, padding_side=padding_side, return_tensors="pt", **kwargs))


def test_tokenizer_default_padding_side_is_right(ours, ref):
    got = ours(["a", "b c d"], padding=True, return_tensors="pt")
    assert got["input_ids"][0, -1].item() == ours.pad_token_id
    assert_same_outputs(got, ref(["a", "b c d"], padding=True, return_tensors="pt"))


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("cleanup", [None, False, True])
def test_decode_matches_reference(ours, ref, skip, cleanup):
    for text in TEXTS + ["Hello , world . It 's here ! n't ?"]:
        ids = ref.encode(text)
        kwargs = dict(skip_special_tokens=skip)
        if cleanup is not None:
            kwargs["clean_up_tokenization_spaces"] = cleanup
        assert ours.decode(ids, **kwargs) == ref.decode(ids, **kwargs)
    batch = ref(["<image>Hi there<|im_end|>", "<video>Bye now!<|im_end|>"], padding=True, return_tensors="pt").input_ids
    assert ours.batch_decode(batch, skip_special_tokens=skip) == ref.batch_decode(batch, skip_special_tokens=skip)


def test_build_from_vocab_and_merges_matches_tokenizer_json(tmp_path, ours):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(HUB_PROCESSOR / name, tmp_path / name)
    built = Qwen2TokenizerFast.from_pretrained(tmp_path)
    assert len(built) == len(ours)
    for text in TEXTS:
        assert built.encode(text) == ours.encode(text), text


def test_save_and_reload(tmp_path, ours, ref):
    ours.save_pretrained(tmp_path)
    again = Qwen2TokenizerFast.from_pretrained(tmp_path)
    assert again.encode(TEXTS[9]) == ours.encode(TEXTS[9])
    assert again.pad_token == ours.pad_token and again.padding_side == ours.padding_side
    import transformers

    their = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert their.encode(TEXTS[8]) == ref.encode(TEXTS[8]) and their.pad_token_id == ref.pad_token_id


def test_bad_arguments(ours):
    with pytest.raises(ProcessingError, match="padding_side"):
        ours(["a"], padding=True, padding_side="middle")
    with pytest.raises(ProcessingError, match="text must be"):
        ours([1, 2])


def test_tokenizer_apply_chat_template_matches_reference():
    import json

    import torch

    from transformers import AutoTokenizer

    from onevision import AutoProcessor

    ref = AutoTokenizer.from_pretrained(HUB_PROCESSOR)
    ours = AutoProcessor.from_pretrained(HUB_PROCESSOR).tokenizer
    template = json.loads((HUB_PROCESSOR / "chat_template.json").read_text())["chat_template"]
    chat = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hi there 你好"}]}]
    for kwargs in (dict(tokenize=False), dict(), dict(return_dict=False), dict(add_generation_prompt=True),
                   dict(return_tensors="pt", add_generation_prompt=True)):
        a = ref.apply_chat_template(chat, chat_template=template, **kwargs)
        b = ours.apply_chat_template(chat, chat_template=template, **kwargs)
        if isinstance(a, (str, list)):
            assert a == b
        else:
            assert set(a) == set(b) and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    assert ours.special_tokens_map == ref.special_tokens_map
    empty = AutoProcessor.from_pretrained(HUB_PROCESSOR)(text="", return_tensors="pt")
    assert empty["input_ids"].dtype == torch.long and empty["attention_mask"].dtype == torch.long


def test_decode_of_a_batch_like_reference():
    import torch
    from transformers import AutoTokenizer

    from onevision import AutoProcessor

    ref, ours = AutoTokenizer.from_pretrained(HUB_PROCESSOR), AutoProcessor.from_pretrained(HUB_PROCESSOR).tokenizer
    for ids in ([[1, 2], [3]], torch.tensor([[9707, 1879]]), [9707, 151645]):
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
