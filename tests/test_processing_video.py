"""Video processing parity: our PyAV decoding + frame sampling + LlavaOnevisionVideoProcessor against the
reference video processor fed the frames that the reference's own reader picks (its path loading needs
torchcodec, which is not installed, so frames come from transformers.video_utils.load_video(backend="pyav")
with the reference's default_sample_indices_fn). Videos are encoded with PyAV into tmp_path.

Run: .venv/bin/python -m pytest tests/test_processing_video.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _processing_helpers import (HUB_PROCESSOR, assert_same_outputs, max_abs_diff, processor,  # noqa: F401
                                 random_image, ref_processor, reference_video_frames, write_video)

from onevision import LlavaOnevisionVideoProcessor
from onevision.processing import ProcessingError
from onevision.processing.media import load_video, sample_indices


@pytest.fixture(scope="module")
def ours():
    return LlavaOnevisionVideoProcessor.from_pretrained(HUB_PROCESSOR)


@pytest.fixture(scope="module")
def ref(ref_processor):
    return ref_processor.video_processor


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames=20, width=96, height=64, fps=10)


@pytest.mark.parametrize("total,num_frames,fps,video_fps", [(50, 8, None, 10), (50, None, 1, 10), (50, 3, None, 10),
                                                             (20, 20, None, 25), (7, None, 0.5, 30), (33, 1, None, 3),
                                                             (50, None, None, 10)])
def test_sample_indices_match_reference(total, num_frames, fps, video_fps):
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    meta = VideoMetadata(total_num_frames=total, fps=video_fps)
    want = default_sample_indices_fn(meta, num_frames=num_frames, fps=fps)
    assert sample_indices(total, num_frames, fps, video_fps).tolist() == want.tolist()


def test_too_many_frames_is_an_error():
    with pytest.raises(ProcessingError, match="only 5"):
        sample_indices(5, num_frames=6)
    with pytest.raises(ProcessingError, match="mutually exclusive"):
        sample_indices(5, num_frames=2, fps=1, video_fps=10)


@pytest.mark.parametrize("num_frames,fps", [(8, None), (None, 2), (None, None), (20, None)])
def test_decoded_file_matches_reference(ours, ref, video_path, num_frames, fps):
    frames = reference_video_frames(video_path, num_frames, fps)
    mine, meta = load_video(video_path, num_frames=num_frames, fps=fps)
    assert mine.shape == frames.shape and np.array_equal(mine, frames)
    assert meta["total_num_frames"] == 20 and meta["fps"] == 10.0
    want = ref(frames, return_tensors="pt")
    got = ours(str(video_path), return_tensors="pt", do_sample_frames=num_frames is not None or fps is not None,
               num_frames=num_frames, fps=fps)
    assert_same_outputs(got, want)


@pytest.mark.parametrize("layout", ["thwc", "tchw", "torch_tchw", "pil_frames", "array_frames", "gray_t1hw",
                                    "batch_5d", "list_of_videos", "nested"])
def test_in_memory_videos(ours, ref, layout):
    rng = np.random.default_rng(3)
    thwc = rng.integers(0, 256, (6, 45, 70, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (6, 30, 20, 3), dtype=np.uint8)
    from PIL import Image

    video = {"thwc": thwc, "tchw": thwc.transpose(0, 3, 1, 2).copy(),
             "torch_tchw": torch.from_numpy(thwc.transpose(0, 3, 1, 2).copy()),
             "pil_frames": [Image.fromarray(f) for f in thwc], "array_frames": list(thwc),
             "gray_t1hw": thwc[:, None, :, :, 0].copy(), "batch_5d": np.stack([thwc, thwc[::-1]]),
             "list_of_videos": [thwc, other], "nested": [[thwc], [other, thwc]]}[layout]
    assert_same_outputs(ours(video, return_tensors="pt") if layout not in ("list_of_videos", "nested")
                        else ours(video), ref(video, return_tensors="pt")
                        if layout not in ("list_of_videos", "nested") else ref(video))


def test_in_memory_sampling(ours, ref):
    thwc = np.random.default_rng(4).integers(0, 256, (13, 40, 50, 3), dtype=np.uint8)
    kwargs = dict(do_sample_frames=True, num_frames=4)
    assert_same_outputs(ours(thwc, return_tensors="pt", **kwargs), ref(thwc, return_tensors="pt", **kwargs))


def test_rgba_video(ours, ref):
    video = np.random.default_rng(5).integers(0, 256, (3, 20, 30, 4), dtype=np.uint8)
    video[1, ..., 3] = 255  # one opaque frame; the reference blends in float only when some alpha < 255
    want = ref(video, return_tensors="pt", input_data_format="channels_last")  # it can't infer 4 channels itself
    assert_same_outputs(ours(video, return_tensors="pt"), want)
    opaque = video.copy()
    opaque[..., 3] = 255
    want = ref(opaque, return_tensors="pt", input_data_format="channels_last")
    assert_same_outputs(ours(opaque, return_tensors="pt"), want)


def test_frames_match_reference_video_and_image_processors(processor, ref_processor, video_path):
    """Decoded frames through our video processor equal transformers' video processor, and each frame equals
    transformers' image base patch of that frame (SPEC §4: a frame is processed like the base patch)."""
    frames, _ = load_video(video_path, num_frames=2)
    video = processor.video_processor(frames, return_tensors="pt")["pixel_values_videos"][0]
    want = ref_processor.video_processor(frames, return_tensors="pt")["pixel_values_videos"][0]
    assert video.shape == want.shape == (2, 3, 384, 384)
    assert max_abs_diff(video, want) <= 1e-6
    for i in range(2):
        base = ref_processor.image_processor(frames[i], return_tensors="pt")["pixel_values"][0, 0]
        assert max_abs_diff(video[i], base) <= 1e-6, i


def test_different_lengths_cannot_stack(ours):
    rng = np.random.default_rng(6)
    videos = [rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8), rng.integers(0, 256, (4, 20, 20, 3),
                                                                                 dtype=np.uint8)]
    with pytest.raises(ProcessingError, match="different shapes"):
        ours(videos, return_tensors="pt")
    assert [v.shape[0] for v in ours(videos)["pixel_values_videos"]] == [3, 4]


def test_bad_videos(ours, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    with pytest.raises(ProcessingError, match="could not decode"):
        ours(str(garbage))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ProcessingError):
        ours(str(empty))
    with pytest.raises(ProcessingError, match="not found"):
        ours(str(tmp_path / "missing.mp4"))
    with pytest.raises(ProcessingError, match="zero frames"):
        ours(np.zeros((0, 10, 10, 3), dtype=np.uint8))
    with pytest.raises(ProcessingError, match="frame rate"):
        ours(np.zeros((4, 10, 10, 3), dtype=np.uint8), do_sample_frames=True, fps=1)


def test_zero_frame_container(ours, tmp_path):
    import av

    path = tmp_path / "noframes.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()  # writes the header: a valid file with a video stream and no frames
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(ProcessingError, match="no video stream|no frames|zero frames|could not decode"):
        ours(str(path))


def test_truncated_video(ours, tmp_path):
    data = write_video(tmp_path / "full.mp4").read_bytes()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ProcessingError, match="could not decode|zero frames|no frames"):
        ours(str(path))
