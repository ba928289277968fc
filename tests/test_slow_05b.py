"""Slow parity checks at the real 0.5B shapes with random weights (fp32): forward logits and 32 greedy tokens.

Run: .venv/bin/python -m pytest -m slow tests/test_slow_05b.py -q   (about 3-5 minutes on 2 cores, ~12 GB RAM)
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_reference_05b
from onevision import geometry
from onevision.config import DEFAULT_PINPOINTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_reference_05b(tmp_path_factory.mktemp("real05b") / "ckpt")


def inputs_with_image(size=(384, 576), text=(12, 9), seed=0):
    pinpoints = DEFAULT_PINPOINTS
    gen = torch.Generator().manual_seed(seed)
    n_tokens = geometry.num_image_tokens(size, pinpoints)
    n_patches = geometry.num_anyres_patches(size, pinpoints, 384)
    ids = torch.cat([torch.randint(0, 151000, (text[0],), generator=gen), torch.full((n_tokens,), 151646),
                     torch.randint(0, 151000, (text[1],), generator=gen)])[None]
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), image_sizes=torch.tensor([size]),
                pixel_values=torch.rand(1, n_patches, 3, 384, 384, generator=gen) * 2 - 1)


def test_real_shapes_forward_and_greedy(ckpt):
    from transformers import LlavaOnevisionForConditionalGeneration as Ref

    from onevision import LlavaOnevisionForConditionalGeneration as Ours

    ours = Ours.from_pretrained(ckpt, dtype=torch.float32)
    ref = Ref.from_pretrained(ckpt, dtype=torch.float32).eval()
    inputs = inputs_with_image()
    with torch.inference_mode():
        diff = (ours(**inputs).logits - ref(**inputs).logits).abs().max().item()
    print(f"0.5B-shape fp32 logits max |diff| = {diff:.3g}")
    assert diff <= 1e-5
    text_only = {k: v[:, :12] for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    for inp in (text_only, inputs):
        a = ours.generate(**inp, max_new_tokens=32, do_sample=False)
        b = ref.generate(**inp, max_new_tokens=32, do_sample=False)
        assert torch.equal(a, b)
