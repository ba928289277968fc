"""Image processing parity: our default and PIL image processors against transformers' torchvision-backend
(default) and PIL-backend LlavaOnevision image processors, on real photos, every input mode, arrays/tensors,
extreme sizes and batch layouts. Required: identical image_sizes/batch_num_images, pixel_values max |Δ| <= 1e-6
(observed: 0.0 everywhere).

Run: .venv/bin/python -m pytest tests/test_processing_image.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _processing_helpers import (HUB_PROCESSOR, PHOTOS, assert_same_outputs, photo, processor,  # noqa: F401
                                 random_image, ref_pil_image_processor, ref_processor)
from PIL import Image

from onevision import LlavaOnevisionImageProcessor, LlavaOnevisionImageProcessorPil
from onevision.processing import ProcessingError


@pytest.fixture(scope="module")
def ours():
    return LlavaOnevisionImageProcessor.from_pretrained(HUB_PROCESSOR)


@pytest.fixture(scope="module")
def ours_pil():
    return LlavaOnevisionImageProcessorPil.from_pretrained(HUB_PROCESSOR)


@pytest.fixture(scope="module", params=["torchvision", "pil"])
def pair(request, ours, ours_pil, ref_processor, ref_pil_image_processor):
    """(ours, reference) for each backend."""
    if request.param == "pil":
        return ours_pil, ref_pil_image_processor
    return ours, ref_processor.image_processor


def check(pair, images, **kwargs):
    mine, ref = pair
    want = ref(images, return_tensors="pt", **kwargs)
    got = mine(images, return_tensors="pt", **kwargs)
    return assert_same_outputs(got, want)


@pytest.mark.parametrize("name", PHOTOS)
def test_real_photos(pair, name):
    check(pair, photo(name))


def test_real_photos_as_multi_image_sample(pair):
    check(pair, [[photo(n) for n in PHOTOS[:3]], [photo(PHOTOS[3])], [photo(PHOTOS[4]), photo(PHOTOS[0])]])


def _modes() -> dict[str, Image.Image]:
    rgb = photo("cat.jpg").resize((120, 90))
    rgba = rgb.convert("RGBA")
    alpha = Image.linear_gradient("L").resize(rgb.size)
    rgba.putalpha(alpha)
    p_trans = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p_trans.info["transparency"] = 3
    la = rgb.convert("L").convert("LA")
    la.putalpha(alpha)
    i16 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 200)  # mode I;16
    return {"RGBA": rgba, "LA": la, "P+transparency": p_trans, "P": rgb.convert("P"), "L": rgb.convert("L"),
            "1": rgb.convert("1"), "CMYK": rgb.convert("CMYK"), "I;16": i16, "I": rgb.convert("I"),
            "YCbCr": rgb.convert("YCbCr"), "PA": p_trans.convert("PA"), "RGBA-opaque": rgb.convert("RGBA"),
            "logo": photo("logo_rgba.png")}


MODES = _modes()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_pil_modes(pair, mode):
    check(pair, MODES[mode])


@pytest.mark.parametrize("case", ["hwc", "chw", "hwc1", "chw1", "hwc4", "chw4", "float_hwc", "tiny_hwc"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_arrays_and_tensors(pair, case, kind):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    array = {"hwc": base[..., :3], "chw": base[..., :3].transpose(2, 0, 1), "hwc1": base[..., :1],
             "chw1": base[..., :1].transpose(2, 0, 1), "hwc4": base, "chw4": base.transpose(2, 0, 1),
             "float_hwc": base[..., :3].astype(np.float32), "tiny_hwc": base[:5, :7, :3]}[case]
    image = torch.from_numpy(np.ascontiguousarray(array)) if kind == "torch" else np.ascontiguousarray(array)
    check(pair, image)


@pytest.mark.parametrize("case", ["float32_01", "float64_01", "float16_torch", "uint16", "bool", "rgba_float01"])
def test_unusual_dtypes(pair, case):
    rng = np.random.default_rng(7)
    image = {"float32_01": rng.random((30, 44, 3)).astype(np.float32), "float64_01": rng.random((30, 44, 3)),
             "float16_torch": torch.rand(3, 30, 44, generator=torch.Generator().manual_seed(0)).half(),
             "uint16": rng.integers(0, 256, (30, 44, 3)).astype(np.uint16), "bool": rng.random((30, 44, 3)) > 0.5,
             "rgba_float01": rng.random((30, 44, 4)).astype(np.float32)}[case]
    check(pair, image)


@pytest.mark.parametrize("fmt", ["channels_last", "channels_first"])
def test_explicit_input_data_format(pair, fmt):
    array = np.random.default_rng(2).integers(0, 256, (3, 40, 3), dtype=np.uint8)  # ambiguous without a hint
    check(pair, array, input_data_format=fmt)
    check(pair, array)


@pytest.mark.parametrize("size", [(1, 1), (2000, 17), (17, 2000), (1, 500), (384, 384), (385, 383), (768, 384),
                                  (640, 480), (2, 3)])
def test_extreme_sizes(pair, size):
    check(pair, random_image(*size, seed=size[0] * 7 + size[1]))


@pytest.mark.parametrize("layout", ["single", "flat", "nested", "nested_with_empty", "all_multi"])
def test_batch_layouts(pair, layout):
    a, b, c = random_image(640, 480, 1), random_image(200, 300, 2), random_image(1000, 100, 3)
    images = {"single": a, "flat": [a, b, c], "nested": [[a, b], [c]], "nested_with_empty": [[], [a], [], [b, c]],
              "all_multi": [[a, b, c]]}[layout]
    check(pair, images)


def test_large_photo_path(pair):
    check(pair, photo("coffee.jpg").resize((2600, 1700), Image.Resampling.BILINEAR))


def test_unpadded_list_outputs(pair):
    mine, ref = pair
    images = [[random_image(300, 200, 4), random_image(50, 90, 5)], [random_image(500, 400, 6)]]
    want = ref(images, do_pad=False)
    got = mine(images, do_pad=False)
    assert [tuple(p.shape) for p in got["pixel_values"]] == [tuple(p.shape) for p in want["pixel_values"]]
    assert_same_outputs(got, want)
    assert type(got["pixel_values"][0]) is type(want["pixel_values"][0])
    want, got = ref(images), mine(images)  # return_tensors=None: lists, like the reference
    assert_same_outputs(got, want)


def test_clip_defaults_and_overrides(ours, ours_pil, ref_processor, ref_pil_image_processor):
    """Class defaults (CLIP mean/std) and per-call overrides behave as the reference's."""
    image = random_image(500, 333, 9)
    ref_cls = type(ref_processor.image_processor)
    assert_same_outputs(LlavaOnevisionImageProcessor()(image, return_tensors="pt"), ref_cls()(image,
                                                                                               return_tensors="pt"))
    kwargs = dict(image_mean=[0.1, 0.2, 0.3], image_std=[0.9, 0.8, 0.7], do_rescale=True)
    assert_same_outputs(ours(image, return_tensors="pt", **kwargs),
                        ref_processor.image_processor(image, return_tensors="pt", **kwargs))
    assert_same_outputs(ours_pil(image, return_tensors="pt", **kwargs),
                        ref_pil_image_processor(image, return_tensors="pt", **kwargs))


def test_token_counts_match_reference(processor, ref_processor):
    rng = np.random.default_rng(0)
    sizes = [(384, 384), (480, 640), (640, 480), (1080, 1920), (1920, 1080), (2000, 100), (100, 2000), (899, 1024),
             (4000, 4000), (1, 1), (17, 2000), (2000, 17)]
    sizes += [tuple(int(x) for x in rng.integers(1, 5000, 2)) for _ in range(300)]
    for height, width in sizes:
        want = ref_processor._get_number_of_features(height, width, 384, 384)
        assert processor.image_token_count((height, width)) == want, (height, width)
    assert processor.image_token_count((480, 640)) == 2929 and processor.image_token_count((5, 5), True) == 730


def test_errors(ours):
    with pytest.raises(ProcessingError, match="channels"):
        ours(np.zeros((10, 10, 7), dtype=np.uint8))
    with pytest.raises(ProcessingError, match="unknown image processing option"):
        ours(random_image(10, 10), bogus=1)
    with pytest.raises(ProcessingError):
        ours(12345)
