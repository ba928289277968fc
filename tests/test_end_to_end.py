"""End to end, as a user of the model doc runs it: conversation -> processor -> generate -> decoded text,
with onevision on one side and transformers (processor + model) on the other, from the same folder.

Run: .venv/bin/python -m pytest tests/test_end_to_end.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _processing_helpers import photo

N = 48


@pytest.fixture(scope="module")
def processors(tiny_ckpt):
    from transformers import AutoProcessor as RefProcessor

    from onevision import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_ckpt), RefProcessor.from_pretrained(tiny_ckpt)


def video_frames(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 48, 64, 3), dtype=np.uint8)


def conversation(*media, text="What is shown here?"):
    return [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
            {"role": "user", "content": [*media, {"type": "text", "text": text}]}]


CASES = {
    "photo": lambda: conversation({"type": "image", "image": photo("cat.jpg")}),
    "two_photos": lambda: conversation({"type": "image", "image": photo("coffee.jpg")},
                                       {"type": "image", "image": photo("rocket.jpg")}, text="Compare them."),
    "video": lambda: conversation({"type": "video", "video": list(video_frames())}, text="Why is this funny?"),
    "photo_and_video": lambda: conversation({"type": "image", "image": photo("camera_gray.png")},
                                            {"type": "video", "video": list(video_frames(3, 1))}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_conversation_to_text_matches_reference(case, processors, our_model, reference_model):
    ours_p, ref_p = processors
    conv = CASES[case]()
    kw = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    ours_in = ours_p.apply_chat_template(conv, **kw)
    ref_in = ref_p.apply_chat_template(conv, **kw)
    assert torch.equal(ours_in["input_ids"], ref_in["input_ids"])
    ours_ids = our_model.generate(**ours_in, max_new_tokens=N, do_sample=False)
    ref_ids = reference_model.generate(**ref_in, max_new_tokens=N, do_sample=False)
    assert torch.equal(ours_ids, ref_ids)
    new = ours_ids[:, ours_in["input_ids"].shape[1]:]
    assert ours_p.batch_decode(new, skip_special_tokens=True) == ref_p.batch_decode(new, skip_special_tokens=True)


def test_left_padded_batch_of_conversations(processors, our_model, reference_model):
    ours_p, ref_p = processors
    convs = [CASES["photo"](), [{"role": "user", "content": [{"type": "text", "text": "Hello there!"}]}],
             CASES["two_photos"]()]
    kw = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True,
              padding_side="left")
    ours_in, ref_in = ours_p.apply_chat_template(convs, **kw), ref_p.apply_chat_template(convs, **kw)
    for key in ("input_ids", "attention_mask", "image_sizes", "batch_num_images", "pixel_values"):
        assert torch.equal(ours_in[key], ref_in[key]), key
    ours_ids = our_model.generate(**ours_in, max_new_tokens=N, do_sample=False)
    assert torch.equal(ours_ids, reference_model.generate(**ref_in, max_new_tokens=N, do_sample=False))
    # each row equals the conversation run alone
    for i, conv in enumerate(convs):
        alone_in = ours_p.apply_chat_template(conv, **{k: v for k, v in kw.items() if k != "padding_side"})
        alone = our_model.generate(**alone_in, max_new_tokens=N, do_sample=False)
        assert torch.equal(ours_ids[i, -alone.shape[1]:], alone[0])


def test_bf16_inputs_and_model_match_reference_bf16(processors, tiny_ckpt):
    """`.to(device, torch.bfloat16)` casts floating inputs only, and the bf16 model's logits and greedy tokens are
    transformers' bf16 ones on the same inputs."""
    from transformers import LlavaOnevisionForConditionalGeneration as Reference

    from onevision import LlavaOnevisionForConditionalGeneration

    ours_p, _ = processors
    inputs = ours_p.apply_chat_template(CASES["photo"](), add_generation_prompt=True, tokenize=True,
                                        return_dict=True, return_tensors="pt").to("cpu", torch.bfloat16)
    assert inputs["pixel_values"].dtype == torch.bfloat16 and inputs["input_ids"].dtype == torch.long
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    reference = Reference.from_pretrained(tiny_ckpt, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits, want_logits = model(**inputs).logits, reference(**inputs).logits
    assert logits.dtype == want_logits.dtype == torch.bfloat16
    assert torch.equal(logits, want_logits)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, reference.generate(**inputs, max_new_tokens=8, do_sample=False))
