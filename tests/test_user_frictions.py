"""What a new user meets (issue 16): messages that point the right way, the served model named in a 404, an
offline /docs, the fp16-on-CPU and `torch_dtype=` warnings, transformers' Auto idioms against transformers.

    pytest tests/test_user_frictions.py -q
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from _server_helpers import shared_ckpt

pytestmark = pytest.mark.timeout(120)
CMD = [sys.executable, "-m", "onevision"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt, tmp_path_factory):
    return shared_ckpt(tiny_ckpt, tmp_path_factory)


def _run(args):
    return subprocess.run(CMD + args, capture_output=True, text=True, timeout=90, env=ENV)


def test_text_file_as_image_is_reported_before_the_model_loads(ckpt, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    out = _run(["chat", "--model", str(ckpt), "--image", str(text), "hi"])
    assert out.returncode == 1 and "could not decode" in out.stderr and str(text) in out.stderr
    assert "Loading" not in out.stderr


def test_device_cuda_without_gpu_names_the_flag(ckpt):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = _run(["chat", "--model", str(ckpt), "--device", "cuda", "hi"])
    assert out.returncode == 1 and "--device cuda" in out.stderr and "--device cpu" in out.stderr, out.stderr
    assert "device_map" not in out.stderr
    if torch.version.cuda:  # a CUDA build is installed: do not tell the user to install one
        assert "install a CUDA build" not in out.stderr and torch.version.cuda in out.stderr


def test_offline_error_suggests_hf_download(monkeypatch):
    from onevision import loading

    with pytest.raises(OSError) as e:
        loading.resolve_files("nobody/not-a-model", ["*.json"], local_files_only=True)
    assert "`hf download nobody/not-a-model`" in str(e.value) and "huggingface-cli" not in str(e.value)


def _client(ckpt, **config):
    from fastapi.testclient import TestClient

    from onevision import AutoProcessor, LlavaOnevisionForConditionalGeneration
    from onevision.server.app import ServerConfig, create_app

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt)
    app = create_app(model, AutoProcessor.from_pretrained(ckpt), ServerConfig(model_name=str(ckpt), **config))
    return TestClient(app, base_url="http://localhost")  # the server answers loopback Host names only (issue 10)


def test_unknown_model_404_names_the_served_model_and_docs(ckpt):
    with _client(ckpt) as client:
        body = {"model": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "messages": [{"role": "user", "content": "hi"}]}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 404 and f"serves `{ckpt}`" in r.json()["error"]["message"]
        assert "--served-model-name" in r.json()["error"]["message"]
        r = client.get("/v1/models/gpt-4o")
        assert r.status_code == 404 and f"`{ckpt}`" in r.json()["error"]["message"]
        assert client.get("/docs").status_code == 404  # off by default
    with _client(ckpt, docs=True) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "swagger-ui" in page.text
        assert not re.search(r"""(src|href)=["']?https?://""", page.text), page.text  # nothing from a CDN
        for asset in re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text):
            assert client.get(asset).status_code == 200, asset


def test_torch_dtype_warns_like_transformers_and_still_works(ckpt, caplog):
    from onevision import LlavaOnevisionForConditionalGeneration, loading

    loading._warned.clear()
    with caplog.at_level(logging.WARNING, logger="onevision"):
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt, torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert "`torch_dtype` is deprecated! Use `dtype` instead!" in caplog.text


def test_fp16_on_a_slow_cpu_warns_once(ckpt, caplog):
    from onevision import LlavaOnevisionForConditionalGeneration, cpu, loading

    loading._warned.clear()
    with caplog.at_level(logging.WARNING, logger="onevision"):
        for _ in range(2):
            LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float16)
        LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    assert caplog.text.count("float16 on a CPU") == (1 if cpu.fp16_is_slow() else 0)


def test_auto_classes_load_what_transformers_loads(ckpt):
    import transformers

    import onevision

    ours = onevision.AutoConfig.from_pretrained(ckpt)
    ref = transformers.AutoConfig.from_pretrained(ckpt)
    assert type(ours).__name__ == type(ref).__name__
    assert ours.text_config.hidden_size == ref.text_config.hidden_size

    text = "Hello world, 你好"
    assert (onevision.AutoTokenizer.from_pretrained(ckpt)(text)["input_ids"]
            == transformers.AutoTokenizer.from_pretrained(ckpt)(text)["input_ids"])

    from PIL import Image

    image = Image.new("RGB", (90, 60), (200, 30, 60))
    a = onevision.AutoImageProcessor.from_pretrained(ckpt)(image, return_tensors="pt")["pixel_values"]
    b = transformers.AutoImageProcessor.from_pretrained(ckpt)(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(a, b)

    model = onevision.AutoModelForImageTextToText.from_pretrained(ckpt)
    reference = transformers.AutoModelForImageTextToText.from_pretrained(ckpt)
    assert type(model).__name__ == type(reference).__name__
    ids = torch.tensor([[151643, 9707, 1879, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
