"""End-to-end processor parity: apply_chat_template(tokenize=True) and processor(...) against transformers'
AutoProcessor on the same hub folder (input_ids, attention_mask, image_sizes, batch_num_images identical;
pixel_values / pixel_values_videos max |Δ| <= 1e-6), media from objects/paths/URLs/base64, loading layouts,
and the error messages.

Run: .venv/bin/python -m pytest tests/test_processing_processor.py -q
"""

from __future__ import annotations

import base64
import copy
import functools
import http.server
import json
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch
from _processing_helpers import (HUB_PROCESSOR, MEDIA, assert_same_outputs, photo, processor,  # noqa: F401
                                 random_image, ref_processor, reference_video_frames, write_video)

from onevision import AutoProcessor, LlavaOnevisionProcessor
from onevision.processing import BatchFeature, ProcessingError


def text(t):
    return {"type": "text", "text": t}


def ref_chat(ref, convs, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ref.apply_chat_template(copy.deepcopy(convs), **kwargs)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames=24, width=80, height=48, fps=8)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def media_url(tmp_path_factory, video_path):
    """Serve a copy of tests/fixtures/media (+ clip.mp4) over http on localhost: yields the base URL."""
    root = tmp_path_factory.mktemp("served")
    for f in MEDIA.iterdir():
        shutil.copy(f, root / f.name)
    shutil.copy(video_path, root / "clip.mp4")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_chat_with_images_and_video(processor, ref_processor, padding_side):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (12, 60, 90, 3), dtype=np.uint8)
    conv1 = [{"role": "system", "content": [text("You are a helpful assistant.")]},
             {"role": "user", "content": [text("What is this?"), {"type": "image", "image": photo("cat.jpg")}]},
             {"role": "assistant", "content": [text("A cat.")]},
             {"role": "user", "content": [{"type": "image", "image": photo("coffee.jpg")},
                                          {"type": "image", "image": photo("camera_gray.png")}, text("Compare.")]}]
    conv2 = [{"role": "user", "content": [{"type": "video", "video": frames},
                                          {"type": "image", "image": photo("rocket.jpg")}, text("Q")]}]
    conv3 = [{"role": "user", "content": [text("just text")]}]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, padding=True,
                  padding_side=padding_side, return_tensors="pt", num_frames=8)
    want = ref_chat(ref_processor, [conv1, conv2, conv3], **kwargs)
    got = processor.apply_chat_template([conv1, conv2, conv3], **kwargs)
    assert_same_outputs(got, want)
    assert got["batch_num_images"].tolist() == [3, 1]


def test_single_image_prompt_token_count(processor, ref_processor):
    conv = [{"role": "user", "content": [{"type": "image", "image": random_image(1024, 899)},
                                         text("What do you see in this image?")]}]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    got = processor.apply_chat_template(conv, **kwargs)
    assert_same_outputs(got, ref_chat(ref_processor, conv, **kwargs))
    assert (got["input_ids"] == processor.image_token_id).sum().item() == 6551
    assert tuple(got["pixel_values"].shape) == (1, 10, 3, 384, 384)


@pytest.mark.parametrize("num_frames,fps", [(6, None), (None, 2)])
def test_video_path_in_chat(processor, ref_processor, video_path, num_frames, fps):
    """Ours decodes the path; the reference (needs torchcodec for paths) gets the frames its reader picks."""
    frames = reference_video_frames(video_path, num_frames, fps)
    ours_conv = [{"role": "user", "content": [{"type": "video", "path": str(video_path)}, text("Why?")]}]
    ref_conv = [{"role": "user", "content": [{"type": "video", "video": frames}, text("Why?")]}]
    got = processor.apply_chat_template(ours_conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt", num_frames=num_frames, fps=fps)
    want = ref_chat(ref_processor, ref_conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                    return_tensors="pt")
    assert_same_outputs(got, want)
    assert (got["input_ids"] == processor.video_token_id).sum().item() == len(frames) * 196 + 1


def test_two_videos_and_images_in_one_prompt(processor, ref_processor, video_path):
    frames = reference_video_frames(video_path, 4)
    other = np.random.default_rng(1).integers(0, 256, (4, 30, 30, 3), dtype=np.uint8)
    prompt = "<|im_start|>user <image><video><video><image>\nQ<|im_end|><|im_start|>assistant\n"
    images = [random_image(300, 200, 1), random_image(64, 640, 2)]
    kwargs = dict(return_tensors="pt", do_sample_frames=True, num_frames=4)
    want = ref_processor(images=images, videos=[frames, other], text=prompt, **kwargs)
    got = processor(images=images, videos=[str(video_path), other], text=prompt, **kwargs)
    assert_same_outputs(got, want)
    assert tuple(got["pixel_values_videos"].shape) == (2, 4, 3, 384, 384)


@pytest.mark.parametrize("return_tensors", [None, "pt"])
@pytest.mark.parametrize("layout", ["flat", "nested", "single"])
def test_call_layouts(processor, ref_processor, layout, return_tensors):
    a, b = random_image(640, 480, 3), random_image(100, 333, 4)
    if layout == "flat":
        text_in, images = ["<image> first", "second <image> here"], [a, b]
    elif layout == "nested":
        text_in, images = ["<image><image> both", "none"], [[a, b], []]
    else:
        text_in, images = "<image>\nDescribe.", a
    kwargs = dict(padding=True, return_tensors=return_tensors)
    assert_same_outputs(processor(images=images, text=text_in, **kwargs),
                        ref_processor(images=images, text=text_in, **kwargs))


def test_text_only_and_truncation(processor, ref_processor):
    texts = ["Hello there, how are you?", "Hi"]
    for kwargs in (dict(), dict(padding=True, return_tensors="pt"), dict(truncation=True, max_length=3),
                   dict(padding="max_length", max_length=12, padding_side="left", return_tensors="pt")):
        assert_same_outputs(processor(text=texts, **kwargs), ref_processor(text=texts, **kwargs))


def test_truncation_through_image_is_an_error(processor):
    with pytest.raises(ProcessingError, match="truncation"):
        processor(images=random_image(50, 50), text="<image> hi", truncation=True, max_length=100)


@pytest.mark.parametrize("source", ["path", "url", "base64", "data_uri"])
@pytest.mark.parametrize("name", ["cat.jpg", "logo_rgba.png", "camera_gray.png"])
def test_image_sources(processor, ref_processor, media_url, source, name):
    raw = (MEDIA / name).read_bytes()
    value = {"path": str(MEDIA / name), "url": f"{media_url}/{name}", "base64": base64.b64encode(raw).decode(),
             "data_uri": "data:image/png;base64," + base64.b64encode(raw).decode()}[source]
    key = {"path": "path", "url": "url", "base64": "base64", "data_uri": "url"}[source]
    conv = [{"role": "user", "content": [{"type": "image", key: value}, text("Q")]}]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert_same_outputs(processor.apply_chat_template(conv, **kwargs), ref_chat(ref_processor, conv, **kwargs))


def test_video_from_url(processor, media_url):
    conv = [{"role": "user", "content": [{"type": "video", "url": f"{media_url}/clip.mp4"}, text("Q")]}]
    got = processor.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt", num_frames=3)
    assert tuple(got["pixel_values_videos"].shape) == (1, 3, 3, 384, 384)
    with pytest.raises(ProcessingError, match="could not download"):
        processor(videos=f"{media_url}/missing.mp4", text="<video>")


def test_batch_feature_to(processor, ref_processor):
    """`.to(device, dtype)` / `.to(dtype)` cast what transformers' BatchFeature casts (floating tensors only)."""
    image = random_image(64, 64)
    out = processor(images=image, text="<image>x", return_tensors="pt")
    want = ref_processor(images=image, text="<image>x", return_tensors="pt")
    assert isinstance(out, BatchFeature)
    for args in (("cpu", torch.float16), (torch.bfloat16,)):
        got, ref = out.to(*args), want.to(*args)
        assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in ref.items()}, args
        assert got.pixel_values.dtype == args[-1] and got["input_ids"].dtype == torch.int64
    assert out.to(torch.float32)["pixel_values"].dtype == torch.float32


def test_decode(processor, ref_processor):
    ids = ref_processor(text="<|im_start|>user <image>\nHi<|im_end|>", images=random_image(30, 30))["input_ids"][0]
    for skip in (True, False):
        assert processor.decode(ids, skip_special_tokens=skip) == ref_processor.decode(ids, skip_special_tokens=skip)
    assert processor.batch_decode([ids, ids[:5]], skip_special_tokens=True) == \
        ref_processor.batch_decode([ids, ids[:5]], skip_special_tokens=True)


def test_attributes(processor, ref_processor):
    for name in ("image_token", "image_token_id", "video_token", "video_token_id", "num_image_tokens",
                 "vision_feature_select_strategy", "vision_aspect_ratio", "chat_template"):
        assert getattr(processor, name) == getattr(ref_processor, name), name
    assert processor.image_processor.image_grid_pinpoints == ref_processor.image_processor.image_grid_pinpoints


# ---------------------------------------------------------------------------------------------------- errors
def test_placeholder_count_errors(processor):
    with pytest.raises(ProcessingError, match=r"2 <image>.*1 image"):
        processor(images=[random_image(20, 20)], text="<image><image>")
    with pytest.raises(ProcessingError, match=r"0 <image>.*1 image"):
        processor(images=random_image(20, 20), text="no placeholder")
    with pytest.raises(ProcessingError, match=r"1 <video>.*0 video"):
        processor(text="<video>")
    conv = [{"role": "user", "content": [{"type": "image"}, text("Q")]}]
    with pytest.raises(ProcessingError, match=r"1 <image>.*0 image"):
        processor.apply_chat_template(conv, tokenize=True)


def test_unreadable_images(processor, tmp_path, monkeypatch):
    data = (MEDIA / "cat.jpg").read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 3])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG not really" * 10)
    for bad in (truncated, garbage):
        conv = [{"role": "user", "content": [{"type": "image", "path": str(bad)}, text("Q")]}]
        with pytest.raises(ProcessingError, match="could not decode"):
            processor.apply_chat_template(conv, tokenize=True)
    with pytest.raises(ProcessingError, match="not found"):
        processor(images=str(tmp_path / "missing.png"), text="<image>")
    import onevision.processing.media as media

    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ProcessingError, match="decompression-bomb.*max_pixels"):
        processor(images=str(MEDIA / "cat.jpg"), text="<image>")
    out = processor(images=str(MEDIA / "cat.jpg"), text="<image>", max_pixels=10**6)
    assert out["image_sizes"] == [(300, 451)]


def test_unsupported_content_type(processor):
    conv = [{"role": "user", "content": [{"type": "audio", "path": "a.wav"}, text("Q")]}]
    with pytest.raises(ProcessingError, match="unsupported content type 'audio'"):
        processor.apply_chat_template(conv, tokenize=True)


# ---------------------------------------------------------------------------------------------------- loading
def test_transformers_v5_layout(processor, ref_processor, tmp_path):
    ref_processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file() and not (tmp_path / "preprocessor_config.json").exists()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    conv = [{"role": "user", "content": [{"type": "image", "image": random_image(500, 300)}, text("Q")]}]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert_same_outputs(loaded.apply_chat_template(conv, **kwargs), ref_chat(ref_processor, conv, **kwargs))
    assert loaded.chat_template == ref_processor.chat_template


def test_save_pretrained_round_trip(processor, ref_processor, tmp_path):
    processor.save_pretrained(tmp_path)
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoProcessor.from_pretrained(str(tmp_path))
    mine = LlavaOnevisionProcessor.from_pretrained(tmp_path)
    conv = [{"role": "user", "content": [{"type": "image", "image": random_image(700, 200)},
                                         {"type": "video", "video": np.zeros((2, 20, 20, 3), np.uint8)}, text("Q")]}]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    want = ref_chat(ref_processor, conv, **kwargs)
    assert_same_outputs(ref_chat(theirs, conv, **kwargs), want)
    assert_same_outputs(mine.apply_chat_template(conv, **kwargs), want)


def test_video_processor_subfolder_layout(tmp_path):
    for f in HUB_PROCESSOR.iterdir():
        if f.name != "video_preprocessor_config.json":
            shutil.copy(f, tmp_path / f.name)
    (tmp_path / "video_processor").mkdir()
    config = json.loads((HUB_PROCESSOR / "video_preprocessor_config.json").read_text())
    config["size"] = {"height": 192, "width": 192}
    (tmp_path / "video_processor" / "preprocessor_config.json").write_text(json.dumps(config))
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.video_processor.size == {"height": 192, "width": 192}


def test_image_and_video_processors_saved_alone_are_read_by_the_reference(processor, tmp_path):
    """Each processor's own save_pretrained file is what transformers' Auto classes read, with the same outputs;
    a folder with no settings at all is an error that names the files looked for."""
    import transformers

    custom = {"size": {"height": 112, "width": 112}, "image_mean": [0.5, 0.4, 0.3]}
    image = processor.image_processor.from_dict(processor.image_processor.to_dict(), **custom)
    video = processor.video_processor.from_dict(processor.video_processor.to_dict(), **custom)
    image.save_pretrained(tmp_path / "image")
    video.save_pretrained(tmp_path / "video")
    picture, frames = random_image(300, 200), np.random.default_rng(0).integers(0, 256, (3, 40, 30, 3), np.uint8)
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path / "image")
    assert_same_outputs(type(image).from_pretrained(tmp_path / "image")(picture, return_tensors="pt"),
                        theirs(picture, return_tensors="pt"))
    theirs = transformers.AutoVideoProcessor.from_pretrained(tmp_path / "video")
    mine = type(video).from_pretrained(tmp_path / "video")
    assert mine.size == {"height": 112, "width": 112}
    assert_same_outputs(mine(frames, return_tensors="pt"), theirs(frames, return_tensors="pt"))
    with pytest.raises(FileNotFoundError, match="video_preprocessor_config.json"):
        type(video).from_pretrained(tmp_path / "image" / "missing")


def test_offline_repo_id_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="local folder"):
        AutoProcessor.from_pretrained("no-such-user/no-such-processor-repo")


def test_pil_backend_processor(ref_processor):
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    mine = AutoProcessor.from_pretrained(HUB_PROCESSOR, backend="pil")
    assert mine.image_processor.backend == "pil"
    image = photo("coffee.jpg")
    want = LlavaOnevisionImageProcessorPil.from_pretrained(str(HUB_PROCESSOR))(image, return_tensors="pt")
    got = mine(images=image, text="<image>", return_tensors="pt")
    assert torch.equal(got["pixel_values"], want["pixel_values"])


def test_pixel_values_buffer_roundtrip(processor, ref_processor):
    """Outputs pickle (server workers) and still equal transformers' after the round trip."""
    import pickle

    image = random_image(40, 40)
    out = pickle.loads(pickle.dumps(processor(images=image, text="<image>", return_tensors="pt")))
    want = ref_processor(images=image, text="<image>", return_tensors="pt")
    assert set(out.keys()) == set(want.keys())
    for key in want:
        assert type(out[key]) is torch.Tensor and torch.equal(out[key], want[key]), key


def test_video_as_frame_paths(processor, ref_processor):
    frames = [str(MEDIA / "cat.jpg")] * 3
    conv = [{"role": "user", "content": [{"type": "video", "video": frames}, text("Q")]}]
    kwargs = dict(tokenize=True, return_dict=True, return_tensors="pt")
    assert_same_outputs(processor.apply_chat_template(conv, **kwargs), ref_chat(ref_processor, conv, **kwargs))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_from_file(processor, ref_processor, tmp_path, orientation):
    from PIL import Image

    image = photo("cat.jpg").resize((120, 80))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    image.save(path, quality=95, exif=exif)
    conv = [{"role": "user", "content": [{"type": "image", "path": str(path)}, text("Q")]}]
    kwargs = dict(tokenize=True, return_dict=True, return_tensors="pt")
    got = processor.apply_chat_template(conv, **kwargs)
    assert_same_outputs(got, ref_chat(ref_processor, conv, **kwargs))
    assert got["image_sizes"].tolist() == ([[80, 120]] if orientation == 3 else [[120, 80]])


def test_mm_token_type_ids(processor, ref_processor):
    frames = np.zeros((2, 20, 20, 3), np.uint8)
    kwargs = dict(images=random_image(40, 30), videos=frames, text="<image> and <video>", return_tensors="pt",
                  return_mm_token_type_ids=True)
    assert_same_outputs(processor(**kwargs), ref_processor(**kwargs))
