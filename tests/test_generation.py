"""generate() parity with transformers' generate (the oracle): greedy token ids, sampling filters, stops, streaming.

Run: .venv/bin/python -m pytest tests/test_generation.py -q
"""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import HUB_PROCESSOR
from onevision.generation import sampling
from onevision.generation.generate import GenerationConfig, generate_naive
from test_model_parity import make_inputs

N = 64


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(HUB_PROCESSOR)


def with_mask(inputs):
    return {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}


def both(our_model, reference_model, inputs, **kwargs):
    ref = reference_model.generate(**inputs, **kwargs)
    ours = our_model.generate(**inputs, **kwargs)
    return ours, ref


def left_pad(rows, pad=151643):
    width = max(r["input_ids"].shape[1] for r in rows)
    ids, masks = [], []
    for r in rows:
        n = width - r["input_ids"].shape[1]
        ids.append(torch.cat([torch.full((1, n), pad), r["input_ids"]], 1))
        masks.append(torch.cat([torch.zeros(1, n, dtype=torch.long), torch.ones_like(r["input_ids"])], 1))
    return torch.cat(ids), torch.cat(masks)


GREEDY = {
    "text": dict(text=(6, 5)),
    "image": dict(sizes=[(899, 1024)]),
    "multi_image": dict(sizes=[(100, 300), (300, 100)], multi=True),
    "video": dict(frames=3),
    "image_and_video": dict(sizes=[(200, 120)], frames=2),
}


@pytest.mark.parametrize("case", list(GREEDY))
def test_greedy_is_token_identical(case, our_model, reference_model):
    inputs = with_mask(make_inputs(**GREEDY[case], seed=11))
    ours, ref = both(our_model, reference_model, inputs, max_new_tokens=N, do_sample=False)
    assert ours.shape == ref.shape == (1, inputs["input_ids"].shape[1] + N)
    assert torch.equal(ours, ref)
    assert len(set(ours[0, -N:].tolist())) > 3, "random weights should give varied greedy output"


def test_left_padded_mixed_batch(our_model, reference_model):
    rows = [make_inputs(sizes=[(300, 200)], seed=1), make_inputs(text=(3, 2), seed=2),
            make_inputs(sizes=[(56, 300)], seed=3)]
    ids, mask = left_pad(rows)
    pixel_values = torch.zeros(2, max(r["pixel_values"].shape[1] for r in (rows[0], rows[2])), 3, 56, 56)
    pixel_values[0, : rows[0]["pixel_values"].shape[1]] = rows[0]["pixel_values"][0]
    pixel_values[1, : rows[2]["pixel_values"].shape[1]] = rows[2]["pixel_values"][0]
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                  image_sizes=torch.cat([rows[0]["image_sizes"], rows[2]["image_sizes"]]))
    ours, ref = both(our_model, reference_model, inputs, max_new_tokens=N, do_sample=False)
    assert torch.equal(ours, ref)
    # each row equals running it alone
    for i, row in enumerate(rows):
        alone = our_model.generate(**with_mask(row), max_new_tokens=N, do_sample=False)
        assert torch.equal(ours[i, ids.shape[1] - row["input_ids"].shape[1]:], alone[0])


def test_repetition_penalty_and_min_new_tokens(our_model, reference_model):
    inputs = with_mask(make_inputs(sizes=[(120, 90)], seed=5))
    ours, ref = both(our_model, reference_model, inputs, max_new_tokens=N, do_sample=False, repetition_penalty=1.3)
    assert torch.equal(ours, ref)
    plain = our_model.generate(**inputs, max_new_tokens=N, do_sample=False)
    assert not torch.equal(ours, plain)


def test_early_eos_pads_finished_rows(our_model, reference_model):
    a, b = make_inputs(text=(4, 4), seed=7), make_inputs(text=(4, 4), seed=8)
    ids = torch.cat([a["input_ids"], b["input_ids"]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    free = our_model.generate(**inputs, max_new_tokens=N, do_sample=False)
    eos = int(free[0, ids.shape[1] + 5])  # a token the first row emits at step 5
    ours, ref = both(our_model, reference_model, inputs, max_new_tokens=N, do_sample=False, eos_token_id=eos,
                     pad_token_id=7)
    assert torch.equal(ours, ref)
    row0 = ours[0, ids.shape[1]:].tolist()
    stop = row0.index(eos)
    assert stop <= 5 and set(row0[stop + 1:]) <= {7}
    # two eos ids, min_new_tokens forbids stopping before 10 tokens
    ours, ref = both(our_model, reference_model, inputs, max_new_tokens=N, do_sample=False,
                     eos_token_id=[eos, 151645], min_new_tokens=10)
    assert torch.equal(ours, ref)
    assert ours.shape[1] >= ids.shape[1] + 10


def test_stop_strings(our_model, reference_model, hf_tokenizer):
    inputs = with_mask(make_inputs(text=(5, 5), seed=9))
    free = our_model.generate(**inputs, max_new_tokens=N, do_sample=False)
    text = hf_tokenizer.decode(free[0, -N:][10:14])
    stop = text[len(text) // 2:][:3] or text
    kwargs = dict(max_new_tokens=N, do_sample=False, stop_strings=[stop], tokenizer=hf_tokenizer)
    ours, ref = both(our_model, reference_model, inputs, **kwargs)
    assert torch.equal(ours, ref)
    assert ours.shape[1] < free.shape[1]


def test_fast_path_equals_naive_path(our_model):
    for kw in (dict(sizes=[(300, 500)]), dict(frames=2), dict(text=(3, 3))):
        inputs = make_inputs(**kw, seed=13)
        fast = our_model.generate(**with_mask(inputs), max_new_tokens=24, do_sample=False)
        naive = generate_naive(our_model, inputs.pop("input_ids"), 24, **inputs)
        assert torch.equal(fast, naive)


def test_sampling_reproducible_and_matches_reference_draws(our_model, reference_model):
    inputs = with_mask(make_inputs(sizes=[(100, 100)], seed=4))
    kw = dict(max_new_tokens=24, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05,
              repetition_penalty=1.1)
    first = our_model.generate(**inputs, **kw, seed=123)
    assert torch.equal(first, our_model.generate(**inputs, **kw, seed=123))
    assert not torch.equal(first, our_model.generate(**inputs, **kw, seed=124))
    torch.manual_seed(123)  # the reference draws from the global generator with the same multinomial
    assert torch.equal(first, reference_model.generate(**inputs, **kw))
    many = our_model.generate(**inputs, max_new_tokens=8, do_sample=True, num_return_sequences=3, seed=1)
    assert many.shape[0] == 3


def test_each_filter_equals_reference_processor():
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 1000, generator=gen) * 3
    seen = torch.randint(0, 1000, (3, 40), generator=gen)
    assert torch.equal(sampling.repetition_penalty(scores, seen, 1.3), RepetitionPenaltyLogitsProcessor(1.3)(seen, scores))
    assert torch.equal(sampling.top_k_filter(scores, 50), TopKLogitsWarper(50)(seen, scores))
    for p in (0.1, 0.5, 0.9, 0.999):
        assert torch.equal(sampling.top_p_filter(scores, p), TopPLogitsWarper(p)(seen, scores))
    for p in (0.01, 0.2, 0.9):
        assert torch.equal(sampling.min_p_filter(scores, p), MinPLogitsWarper(p)(seen, scores))
    assert torch.equal(sampling.process(scores, seen, do_sample=True, temperature=0.5, top_k=None),
                       TemperatureLogitsWarper(0.5)(seen, scores))


def test_defaults_come_from_generation_config(our_model, reference_model, tiny_ckpt):
    cfg, ref = our_model.generation_config, reference_model.generation_config
    assert (cfg.eos_token_id, cfg.bos_token_id) == (ref.eos_token_id, ref.bos_token_id) == (151645, 151643)
    assert not cfg.do_sample and cfg.top_k == 50  # transformers' generate() defaults for unset values
    inputs = with_mask(make_inputs(text=(2, 2)))
    out = our_model.generate(**inputs, max_length=10)
    assert out.shape == (1, 10) and torch.equal(out, reference_model.generate(**inputs, max_length=10))


def test_bad_arguments_are_errors_with_a_remedy(our_model):
    inputs = with_mask(make_inputs(text=(3, 3)))
    with pytest.raises(TypeError, match=r"unsupported argument\(s\) \['temprature'\]"):
        our_model.generate(**inputs, temprature=0.5)
    with pytest.raises(ValueError, match="exceeds the model's context of 4096"):
        our_model.generate(**inputs, max_new_tokens=5000)
    with pytest.raises(ValueError, match="pass max_new_tokens"):
        our_model.generate(**with_mask(make_inputs(text=(20, 20))), max_length=10)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        our_model.generate(**inputs, max_new_tokens=3.0)
    with pytest.raises(ValueError, match="output_scores"):
        our_model.generate(**inputs, max_new_tokens=2, output_scores=True)
    with pytest.raises(ValueError, match="num_beams"):
        our_model.generate(**inputs, num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p must be in"):
        our_model.generate(**inputs, do_sample=True, top_p=1.5, max_new_tokens=2)
    with pytest.raises(ValueError, match="needs do_sample=True"):
        our_model.generate(**inputs, num_return_sequences=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="stop_strings need the tokenizer"):
        our_model.generate(**inputs, stop_strings=["x"], max_new_tokens=2)
    right = inputs["attention_mask"].clone()
    right[0, -1] = 0
    with pytest.raises(ValueError, match="right-padded.*padding_side='left'"):
        our_model.generate(input_ids=inputs["input_ids"], attention_mask=right, max_new_tokens=2)
    with pytest.warns(UserWarning, match="no effect"):
        our_model.generate(**inputs, temperature=0.3, max_new_tokens=1)


def test_streaming_matches_generate(our_model, hf_tokenizer):
    from onevision import TextIteratorStreamer

    inputs = with_mask(make_inputs(sizes=[(90, 90)], seed=21))
    ids = our_model.generate(**inputs, max_new_tokens=N, do_sample=False)
    expected = hf_tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    streamer = TextIteratorStreamer(hf_tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=our_model.generate, kwargs=dict(**inputs, max_new_tokens=N, streamer=streamer))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == expected
    streamed = list(our_model.stream(**inputs, tokenizer=hf_tokenizer, max_new_tokens=N))
    assert "".join(streamed) == expected and all("\ufffd" not in p for p in streamed)


def test_incremental_decoder_never_splits_characters(hf_tokenizer):
    from onevision.generation.streaming import IncrementalDecoder

    text = "naïve 你好，世界 😀🎉 done"
    ids = hf_tokenizer.encode(text)
    assert len(ids) > len(text.split())
    decoder = IncrementalDecoder(hf_tokenizer)
    pieces = [decoder.push([i]) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_incremental_decoder_equals_full_decode_with_bounded_work(hf_tokenizer):
    """Random ids (byte fragments, special tokens): the pieces join to transformers' full decode, and each
    push decodes only the ids since the last released piece (O(1) per token, not the whole sequence)."""
    from onevision.generation.streaming import IncrementalDecoder

    calls = []

    class Counting:
        def decode(self, ids, **kw):
            calls.append(len(ids))
            return hf_tokenizer.decode(ids, **kw)

    g = torch.Generator().manual_seed(0)
    specials = hf_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    for trial in range(20):
        ids = torch.randint(0, 151000, (150,), generator=g).tolist()
        ids[::37] = [specials[trial % 2]] * len(ids[::37])
        decoder = IncrementalDecoder(Counting(), skip_special_tokens=True)
        calls.clear()
        pieces = [decoder.push([i]) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == hf_tokenizer.decode(ids, skip_special_tokens=True)
        assert max(calls) <= 8, f"a push decoded {max(calls)} ids: the window should stay a few tokens long"


def test_generation_config_round_trip(tmp_path):
    cfg = GenerationConfig(eos_token_id=[1, 2], do_sample=True, temperature=0.5, extra={"foo": 1})
    cfg.save_pretrained(tmp_path)
    again = GenerationConfig.from_pretrained(tmp_path)
    assert again.eos_token_id == [1, 2] and again.temperature == 0.5 and again.extra == {"foo": 1}
    from transformers import GenerationConfig as Ref

    ref = Ref.from_pretrained(tmp_path)
    assert ref.temperature == 0.5 and ref.do_sample


def test_mask_inferred_from_pad_and_transformers_generation_config(our_model, reference_model):
    from transformers import GenerationConfig as RefConfig

    a, b = make_inputs(text=(6, 5), seed=30), make_inputs(text=(3, 2), seed=31)
    ids, _ = left_pad([a, b], pad=151643)
    ref_cfg = RefConfig(max_new_tokens=12, do_sample=False, pad_token_id=151643, eos_token_id=151645)
    ours = our_model.generate(input_ids=ids, generation_config=ref_cfg)
    ref = reference_model.generate(input_ids=ids, generation_config=ref_cfg)
    assert torch.equal(ours, ref)


def test_defaults_without_a_length_and_merged_generation_config(our_model, reference_model):
    from transformers import GenerationConfig as RefConfig

    inputs = with_mask(make_inputs(sizes=[(300, 200)], seed=1))
    ours, ref = both(our_model, reference_model, inputs, output_scores=False)  # no length: 20 new tokens
    assert torch.equal(ours, ref) and ours.shape[1] == inputs["input_ids"].shape[1] + 20
    eos = int(ours[0, inputs["input_ids"].shape[1] + 1])
    saved = our_model.generation_config.eos_token_id, reference_model.generation_config.eos_token_id
    our_model.generation_config.eos_token_id = reference_model.generation_config.eos_token_id = eos
    try:  # a generation_config argument keeps the model's eos underneath, like the reference
        ours, ref = both(our_model, reference_model, inputs, generation_config=RefConfig(max_new_tokens=8))
        assert torch.equal(ours, ref) and ours.shape[1] < inputs["input_ids"].shape[1] + 8
    finally:
        our_model.generation_config.eos_token_id, reference_model.generation_config.eos_token_id = saved


def test_stop_strings_split_across_byte_tokens_match_reference(hf_tokenizer):
    from transformers.generation.stopping_criteria import StopStringCriteria

    from onevision import AutoProcessor
    from onevision.generation.generate import _stop_string_hit, token_bytes_fn

    ours_tok = AutoProcessor.from_pretrained(HUB_PROCESSOR).tokenizer
    token_bytes = token_bytes_fn(ours_tok)
    cases = [("x🦩", "🦩"), ("abc𓀀", "𓀀"), ("x🫠 y", "🫠 y"), ("𠀋", "𠀋"), ("hello world", "lo w"),
             ("hello world", "world"), ("hello world", "hello"), ("stop<|im_end|>", "p<|im_end|>"), ("naïve", "ïv")]
    for text, stop in cases:
        ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        for end in range(1, len(ids) + 1):
            expected = bool(StopStringCriteria(hf_tokenizer, [stop])(torch.tensor([ids[:end]]), None)[0])
            assert _stop_string_hit(token_bytes, ids[:end], [stop.encode()]) == expected, (text, stop, end)
