"""Model forward parity with transformers (the oracle) on tiny random checkpoints built by transformers.

Run: .venv/bin/python -m pytest tests/test_model_parity.py -q
Tolerance: fp32 max |diff| <= 1e-5 (observed 0.0 for most cases: same kernels, same order of operations).
"""

from __future__ import annotations

import pytest
import torch

from conftest import PINPOINTS, TILE
from onevision import geometry

IMAGE, VIDEO = 151646, 151647
ATOL = 1e-5


def close(ours, ref, atol=ATOL):
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0, equal_nan=True)


def image_tokens(size, multi=False):
    return geometry.num_image_tokens(size, PINPOINTS, tile=TILE, side=TILE // 14, multi_image=multi)


def make_inputs(sizes=(), multi=False, frames=None, text=(5, 7), seed=0, batch_num_images=None):
    """Random ids around the right number of placeholders + random pixel tensors."""
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randint(0, 151000, (text[0],), generator=gen)]
    kwargs = {}
    if sizes:
        patches = [1 if multi else geometry.num_anyres_patches(s, PINPOINTS, TILE) for s in sizes]
        for s in sizes:
            parts.append(torch.full((image_tokens(s, multi),), IMAGE))
        kwargs["pixel_values"] = torch.zeros(len(sizes), max(patches), 3, TILE, TILE)
        for i, p in enumerate(patches):
            kwargs["pixel_values"][i, :p] = torch.randn(p, 3, TILE, TILE, generator=gen)
        kwargs["image_sizes"] = torch.tensor(sizes)
        if multi:
            kwargs["batch_num_images"] = torch.tensor([len(sizes)])
        elif batch_num_images is not None:
            kwargs["batch_num_images"] = torch.tensor(batch_num_images)
    if frames:
        parts.append(torch.full((geometry.num_video_tokens(frames, side=TILE // 14),), VIDEO))
        kwargs["pixel_values_videos"] = torch.randn(1, frames, 3, TILE, TILE, generator=gen)
    parts.append(torch.randint(0, 151000, (text[1],), generator=gen))
    kwargs["input_ids"] = torch.cat(parts)[None]
    return kwargs


CASES = {
    "text": dict(),
    "square": dict(sizes=[(TILE, TILE)]),
    "landscape_4x3": dict(sizes=[(480, 640)]),
    "portrait": dict(sizes=[(640, 480)]),
    "radar_downscale": dict(sizes=[(899, 1024)]),
    "huge_downscale": dict(sizes=[(4000, 4000)]),
    "wide_2000x17": dict(sizes=[(17, 2000)]),
    "tall_17x2000": dict(sizes=[(2000, 17)]),
    "one_pixel": dict(sizes=[(1, 1)]),
    "odd_sizes": dict(sizes=[(113, 57)]),
    "two_flat_images_patched": dict(sizes=[(100, 300), (300, 100)]),
    "multi_image": dict(sizes=[(100, 300), (300, 100), (56, 56)], multi=True),
    "video": dict(frames=3),
    "image_and_video": dict(sizes=[(200, 120)], frames=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(case, our_model, reference_model):
    inputs = make_inputs(**CASES[case])
    with torch.no_grad():
        ref = reference_model(**inputs, output_hidden_states=True)
        ours = our_model(**inputs, output_hidden_states=True)
    close(ours.logits, ref.logits)
    assert len(ours.hidden_states) == len(ref.hidden_states)
    for a, b in zip(ours.hidden_states, ref.hidden_states):
        close(a, b)
    if "pixel_values" in inputs:
        close(ours.image_hidden_states, torch.cat(ref.image_outputs.pooler_output))
    if "pixel_values_videos" in inputs:
        close(ours.video_hidden_states, ref.video_outputs.pooler_output)


def test_loss_matches_reference(our_model, reference_model):
    inputs = make_inputs(sizes=[(300, 200)])
    labels = inputs["input_ids"].clone()
    labels[labels == IMAGE] = -100
    with torch.no_grad():
        ref = reference_model(**inputs, labels=labels)
        ours = our_model(**inputs, labels=labels)
    close(ours.loss, ref.loss)
    assert ours.loss.dtype == torch.float32 and ours.loss.ndim == 0


def test_left_padded_batch_matches_reference(our_model, reference_model):
    a = make_inputs(sizes=[(300, 200)], seed=1)
    b = make_inputs(text=(3, 4), seed=2)
    la, lb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    pad = torch.full((1, la - lb), 151643)
    input_ids = torch.cat([a["input_ids"], torch.cat([pad, b["input_ids"]], 1)])
    mask = torch.ones_like(input_ids)
    mask[1, : la - lb] = 0
    inputs = dict(input_ids=input_ids, attention_mask=mask, pixel_values=a["pixel_values"],
                  image_sizes=a["image_sizes"])
    with torch.no_grad():
        ref = reference_model(**inputs).logits
        ours = our_model(**inputs).logits
    close(ours, ref)
    assert torch.isfinite(ours[:, -1]).all()


def test_feature_functions_match_reference(our_model, reference_model):
    inputs = make_inputs(sizes=[(899, 1024), (20, 40)])
    with torch.no_grad():
        ref = reference_model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        ours = our_model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        assert len(ours) == len(ref)
        for x, y in zip(ours, ref):
            close(x, y)
        video = torch.randn(2, 2, 3, TILE, TILE)
        close(our_model.get_video_features(video).pooler_output,
              reference_model.get_video_features(video).pooler_output)
        # pack_image_features without a newline adds none, like the reference
        sizes = torch.tensor([[300, 200], [40, 40]])
        raw = [torch.randn(geometry.num_anyres_patches((300, 200), PINPOINTS, TILE), 16, 64), torch.randn(1, 16, 64)]
        ours_packed, ours_lens = our_model.pack_image_features(raw, sizes)
        ref_packed, ref_lens = reference_model.model.pack_image_features(raw, sizes)
        assert torch.equal(ours_lens, ref_lens)
        for x, y in zip(ours_packed, ref_packed):
            close(x, y)


def test_incremental_decoding_matches_full_forward(our_model, reference_model):
    """Prefill with the image, then feed tokens one at a time through past_key_values."""
    inputs = make_inputs(sizes=[(120, 300)])
    ids = inputs.pop("input_ids")
    with torch.no_grad():
        full_ref = reference_model(input_ids=ids, **inputs).logits
        out = our_model(input_ids=ids[:, :-3], **inputs, use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for i in range(3, 0, -1):
            out = our_model(input_ids=ids[:, -i:][:, :1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    close(torch.cat(steps, 1), full_ref)


def test_inputs_embeds_and_logits_to_keep(our_model, reference_model):
    inputs = make_inputs(sizes=[(56, 112)])
    ids = inputs.pop("input_ids")
    with torch.no_grad():
        embeds = our_model.get_input_embeddings()(ids)
        ref = reference_model(inputs_embeds=embeds, **inputs, logits_to_keep=2).logits
        ours = our_model(inputs_embeds=embeds, **inputs, logits_to_keep=2).logits
    assert ours.shape[1] == 2
    close(ours, ref)


def test_eager_attention_and_attention_weights(tiny_ckpt, our_model):
    from transformers import LlavaOnevisionForConditionalGeneration as Ref

    ref = Ref.from_pretrained(tiny_ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    inputs = make_inputs(sizes=[(70, 90)])
    with torch.no_grad():
        r = ref(**inputs, output_attentions=True)
        ours = our_model(**inputs, output_attentions=True)
    close(ours.logits, r.logits)
    assert len(ours.attentions) == len(r.attentions)
    for a, b in zip(ours.attentions, r.attentions):
        close(a, b)


def test_placeholder_count_mismatch_names_both_counts(our_model):
    inputs = make_inputs(sizes=[(56, 56)])
    inputs["input_ids"] = inputs["input_ids"][:, 1:-8]  # drop one placeholder (the last text is 7 tokens)
    n = int((inputs["input_ids"] == IMAGE).sum())
    with pytest.raises(ValueError, match=f"tokens: {n}, features: {n + 1}"):
        with torch.no_grad():
            our_model(**inputs)


def test_training_gradients_match_reference(tiny_ckpt):
    """Fine-tuning works: loss.backward() gives the reference's gradients (use_cache=False, train mode)."""
    from transformers import LlavaOnevisionForConditionalGeneration as Ref

    from onevision import LlavaOnevisionForConditionalGeneration as Ours

    ours, ref = Ours.from_pretrained(tiny_ckpt, dtype=torch.float32), Ref.from_pretrained(tiny_ckpt, dtype=torch.float32)
    ours.train(), ref.train()
    inputs = make_inputs(sizes=[(120, 250)], seed=3)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE, -100)
    ours(**inputs, labels=labels, use_cache=False).loss.backward()
    ref(**inputs, labels=labels, use_cache=False).loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if name == "lm_head.weight" and ours.config.tie_word_embeddings:
            continue
        close(p.grad, ref_params[name].grad, atol=1e-5)


def test_cache_logits_to_keep_and_tuple_outputs_like_reference(our_model, reference_model):
    inputs = make_inputs(sizes=[(120, 300)], seed=6)
    ids = inputs.pop("input_ids")
    with torch.no_grad():
        # a passed cache is used even with use_cache=False
        ours_cache = our_model(input_ids=ids, **inputs, use_cache=True).past_key_values
        ref_cache = reference_model(input_ids=ids, **inputs, use_cache=True).past_key_values
        step = torch.tensor([[7]])
        close(our_model(input_ids=step, past_key_values=ours_cache, use_cache=False).logits,
              reference_model(input_ids=step, past_key_values=ref_cache, use_cache=False).logits)
        # crop(-n) forgets the last n tokens
        ours_cache.crop(-2)
        ref_cache.crop(-2)
        close(our_model(input_ids=step, past_key_values=ours_cache).logits,
              reference_model(input_ids=step, past_key_values=ref_cache).logits)
        n = ids.shape[1]
        for keep in (torch.tensor([[0, 3, n - 1]]), torch.arange(n)[None] % 5 == 0, -1, 3, torch.tensor([1, 2])):
            a = our_model(input_ids=ids, **inputs, logits_to_keep=keep).logits
            b = reference_model(input_ids=ids, **inputs, logits_to_keep=keep).logits
            assert a.shape == b.shape
            close(a, b)
        as_tuple = our_model(input_ids=ids, **inputs, return_dict=False)
        assert isinstance(as_tuple, tuple)
        close(as_tuple[0], reference_model(input_ids=ids, **inputs).logits)


def test_out_of_range_feature_layer_is_an_error(our_model):
    inputs = make_inputs(sizes=[(56, 56)])
    with pytest.raises(ValueError, match="out of range"):
        our_model(**inputs, vision_feature_layer=7)
