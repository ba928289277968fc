"""Checkpoint loading: layouts, shards, tied embeddings, dtypes, strict errors, save_pretrained round trip.

Run: .venv/bin/python -m pytest tests/test_loading.py -q
Every checkpoint is written by transformers; parity is checked against transformers loading the same folder.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import build_reference
from onevision import LlavaOnevisionForConditionalGeneration as Ours
from onevision.loading import CheckpointError
from test_model_parity import close, make_inputs


def reference(folder, **kw):
    from transformers import LlavaOnevisionForConditionalGeneration as Ref

    return Ref.from_pretrained(folder, **{"dtype": torch.float32, **kw}).eval()


def assert_same_logits(folder, inputs=None, dtype=torch.float32, atol=1e-5, **ref_kw):
    inputs = inputs or make_inputs(sizes=[(300, 500)], frames=1)
    # compute="reference": transformers' own fp16 numerics even on a CPU without fp16 arithmetic (onevision/cpu.py)
    ours, ref = Ours.from_pretrained(folder, dtype=dtype, compute="reference"), reference(folder, dtype=dtype, **ref_kw)
    if dtype != torch.float32:
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        close(ours(**inputs).logits, ref(**inputs).logits, atol=atol)
    return ours


@pytest.mark.parametrize("layout", ["v5", "hub"])
@pytest.mark.parametrize("variant", ["untied", "tied", "sharded", "feature_layers"])
def test_layouts_and_variants(tmp_path, layout, variant):
    kwargs = {"untied": {}, "tied": {"tied": True}, "sharded": {"max_shard_size": "2MB"},
              "feature_layers": {"feature_layer": [-1, -3, 0]}}[variant]
    folder = build_reference(tmp_path / "ckpt", layout=layout, seed=3, **kwargs)
    if variant == "sharded":
        assert (folder / "model.safetensors.index.json").exists()
    model = assert_same_logits(folder)
    if variant == "tied":
        assert model.lm_head.weight is model.get_input_embeddings().weight


def test_half_precision_short_input(tiny_ckpt):
    inputs = make_inputs(sizes=[(56, 56)], text=(3, 3))
    for dtype, atol in ((torch.bfloat16, 0.0), (torch.float16, 0.0)):
        model = assert_same_logits(tiny_ckpt, inputs, dtype=dtype, atol=atol)
        assert all(p.dtype == dtype for p in model.parameters())


def test_dtype_auto_reads_config(tmp_path):
    folder = build_reference(tmp_path / "c", layout="hub")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert Ours.from_pretrained(folder).dtype == torch.bfloat16
    assert Ours.from_pretrained(folder, dtype="float16").dtype == torch.float16
    assert Ours.from_pretrained(folder, torch_dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be"):
        Ours.from_pretrained(folder, dtype="float17")


def test_save_pretrained_round_trip_is_read_by_reference(tmp_path, tiny_ckpt):
    ours = Ours.from_pretrained(tiny_ckpt, dtype=torch.float32)
    out = tmp_path / "saved"
    ours.save_pretrained(out)
    keys = set(load_file(out / "model.safetensors"))
    assert "language_model.lm_head.weight" in keys and "image_newline" in keys
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    inputs = make_inputs(sizes=[(90, 200)])
    with torch.no_grad():
        close(reference(out)(**inputs).logits, ours(**inputs).logits, atol=0.0)
    ours.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert_same_logits(tmp_path / "sharded", inputs)


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    folder = build_reference(tmp_path / "c", layout="hub")
    tensors = load_file(folder / "model.safetensors")
    key = "multi_modal_projector.linear_1.weight"
    tensors[key] = torch.zeros(64, 33)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"multi_modal_projector.linear_1.weight.*\(64, 33\).*\(64, 32\)"):
        Ours.from_pretrained(folder)


def test_missing_and_unexpected_tensors(tmp_path):
    folder = build_reference(tmp_path / "c", layout="hub")
    tensors = load_file(folder / "model.safetensors")
    tensors.pop("image_newline")
    tensors["vision_tower.vision_model.head.probe"] = torch.zeros(1)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\) \['model.image_newline'\].*unexpected 1 "
                                              r"tensor\(s\) \['vision_tower.vision_model.head.probe'\]"):
        Ours.from_pretrained(folder)


def test_missing_and_corrupted_shards(tmp_path):
    folder = build_reference(tmp_path / "c", layout="hub", max_shard_size="2MB")
    shards = sorted(folder.glob("model-*.safetensors"))
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        Ours.from_pretrained(folder)
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"lists shard.*{shards[-1].name}.*Download"):
        Ours.from_pretrained(folder)
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Ours.from_pretrained(folder)


def test_hub_id_offline_error_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(OSError, match="pass the local folder path"):
        Ours.from_pretrained("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        Ours.from_pretrained(str(tmp_path / "no" / "such" / "dir"))


def test_device_map_and_attention_options(tiny_ckpt):
    want = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert Ours.from_pretrained(tiny_ckpt, device_map="auto").device.type == want
    assert Ours.from_pretrained(tiny_ckpt, device_map=torch.device("cpu")).device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            Ours.from_pretrained(tiny_ckpt, device_map="cuda")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        Ours.from_pretrained(tiny_ckpt, attn_implementation="flex")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="flash-attn"):
            Ours.from_pretrained(tiny_ckpt, use_flash_attention_2=True)


def test_nothing_is_left_on_the_meta_device(tiny_ckpt):
    """Every parameter and buffer of the meta-built model is assigned (that no parameter is materialised twice is
    measured by test_no_parameter_is_copied_after_it_is_read)."""
    model = Ours.from_pretrained(tiny_ckpt)
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())


def test_base_model_matches_reference_base_model(tiny_ckpt):
    from transformers import LlavaOnevisionModel as RefBase

    from onevision import LlavaOnevisionModel

    ours = LlavaOnevisionModel.from_pretrained(tiny_ckpt, dtype=torch.float32)
    ref = RefBase.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    assert not any(p.is_meta for p in ours.parameters())
    inputs = make_inputs(sizes=[(140, 100)], frames=1)
    with torch.no_grad():
        close(ours(**inputs).last_hidden_state, ref(**inputs).last_hidden_state, atol=0.0)


class _InlinePool(concurrent.futures.Executor):
    """Runs each read on the calling thread, so a dispatch mode there sees every tensor the load creates."""

    def __init__(self, *args, **kwargs):
        pass

    def submit(self, fn, *args, **kwargs):
        future = concurrent.futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future


class _AllocatedBytes(TorchDispatchMode):
    """Sums the storage bytes of every fresh (non-view) tensor an aten op returns off the meta device."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t._base is None and not func.is_view:
                self.bytes += t.untyped_storage().nbytes()
        return out


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_no_parameter_is_copied_after_it_is_read(tiny_ckpt, monkeypatch, dtype):
    """Measured: the tensors a load allocates beyond those read from the file (a cast to `dtype` is the one
    allowed copy) stay far below the weights' bytes, so no parameter is materialised twice."""
    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", _InlinePool)
    with _AllocatedBytes() as seen:
        model = Ours.from_pretrained(tiny_ckpt, dtype=dtype)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    read = sum(f.stat().st_size for f in Path(tiny_ckpt).glob("*.safetensors"))  # each tensor read once
    allowed = read + (weights if dtype is not None else 0)  # float32 file -> bf16: one cast per tensor
    assert seen.bytes <= allowed, f"the load allocated {seen.bytes} bytes; one read (+ one cast) is {allowed}"
