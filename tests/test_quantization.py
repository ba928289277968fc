"""bitsandbytes 4-bit (nf4, fp4) and 8-bit loading against transformers' own bitsandbytes path (the oracle).

The same tiny checkpoint and the same config are loaded by both; the quantized weights, the logits and greedy tokens
must match. The reference's 4-bit layers whose shapes bitsandbytes' AVX512-BF16 CPU kernel cannot repack (it
crashes on them) get the same generic-path switch that onevision applies by itself.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings

import pytest
import torch
from test_model_parity import make_inputs

from onevision.quantization import BitsAndBytesConfig, should_convert_module

try:
    import bitsandbytes as bnb
except Exception as e:  # noqa: BLE001  # pragma: no cover - CI installs the test extra, which has bitsandbytes
    bnb = None
    BNB_ERROR = f"bitsandbytes cannot be imported ({type(e).__name__}: {e})"
else:
    BNB_ERROR = ""

if bnb is not None and importlib.util.find_spec("accelerate") is None:
    bnb, BNB_ERROR = None, "accelerate is not installed; transformers' bitsandbytes path (the oracle) needs it"
needs_bnb = pytest.mark.skipif(bnb is None, reason=BNB_ERROR)

MODES = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-double-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}
PROMPTS = {"text": dict(), "square": dict(sizes=[(56, 56)]), "landscape": dict(sizes=[(480, 640)])}
ATOL = 1e-4  # measured: 0.0 for every mode and prompt (same bitsandbytes kernels on the same bits)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
        warnings.filterwarnings("ignore", message=".*Linear4bit.*")
        yield


def load_pair(folder, mode: str, **kwargs):
    from transformers import BitsAndBytesConfig as RefConfig
    from transformers import LlavaOnevisionForConditionalGeneration as Ref
    from transformers.utils import logging

    from onevision import LlavaOnevisionForConditionalGeneration

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    ref = Ref.from_pretrained(folder, quantization_config=RefConfig(**MODES[mode]), device_map="cpu", **kwargs).eval()
    for m in ref.modules():  # see the module docstring
        if hasattr(m, "support_avx512bf16_for_cpu") and (m.in_features % 64 or m.out_features % 32):
            m.support_avx512bf16_for_cpu = False
    ours = LlavaOnevisionForConditionalGeneration.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(**MODES[mode]), device_map="cpu", **kwargs)
    return ours, ref


@pytest.fixture(scope="module", params=list(MODES))
def pair(request, tiny_ckpt):
    return request.param, *load_pair(tiny_ckpt, request.param)


# -- parity -----------------------------------------------------------------------------------------------------
@needs_bnb
def test_same_layers_and_quantized_bits(pair):
    mode, ours, ref = pair
    target = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    kinds = lambda model: {n: type(m).__name__ for n, m in model.named_modules()
                           if isinstance(m, (torch.nn.Linear, target))}
    assert kinds(ours) == kinds(ref)
    assert type(ours.lm_head) is torch.nn.Linear and isinstance(ours.model.vision_tower.encoder.layers[0].mlp.fc1, target)
    assert isinstance(ours.model.multi_modal_projector.linear_1, target)
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert set(ours_state) == set(ref_state)
    for name, tensor in ref_state.items():
        assert ours_state[name].dtype == tensor.dtype, name
        assert torch.equal(ours_state[name], tensor), name


@needs_bnb
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_logits_match_reference(pair, prompt):
    mode, ours, ref = pair
    inputs = make_inputs(**PROMPTS[prompt])
    with torch.no_grad():
        a, b = ours(**inputs).logits, ref(**inputs).logits
    diff = (a.float() - b.float()).abs().max().item()
    print(f"{mode} {prompt}: max|logits - reference| = {diff:.3g}")
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@needs_bnb
@pytest.mark.parametrize("prompt", ["text", "square"])
def test_greedy_tokens_match_reference(pair, prompt):
    _, ours, ref = pair
    inputs = make_inputs(**PROMPTS[prompt])
    a = ours.generate(**inputs, max_new_tokens=5, do_sample=False)
    b = ref.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert a.tolist() == b.tolist()


@needs_bnb
def test_quantization_changes_the_model(pair, our_model):
    """The quantized model is really quantized: smaller, and its logits move away from full precision."""
    from onevision.quantization import quantized_footprint

    mode, ours, _ = pair
    size = lambda model: sum(quantized_footprint(model.get_submodule(n)) for n in ours.quantized_modules)
    assert len(ours.quantized_modules) == 34  # 3 SigLIP layers x 6, the projector's 2, 2 Qwen2 layers x 7
    assert size(ours) < (0.35 if mode == "int8" else 0.25) * size(our_model)  # biases and tables stay fp32
    inputs = make_inputs()
    with torch.no_grad():
        assert not torch.equal(ours(**inputs).logits, our_model(**inputs).logits)
    assert ours.is_quantized and ours.is_loaded_in_4bit == (mode != "int8")


@needs_bnb
def test_skip_modules_like_reference(tiny_ckpt):
    """An explicit llm_int8_skip_modules replaces the default (lm_head is then quantized, as in the reference)."""
    from transformers import BitsAndBytesConfig as RefConfig
    from transformers import LlavaOnevisionForConditionalGeneration as Ref

    from onevision import LlavaOnevisionForConditionalGeneration

    kw = dict(load_in_8bit=True, llm_int8_skip_modules=["vision_tower", "linear_2"])
    ref = Ref.from_pretrained(tiny_ckpt, quantization_config=RefConfig(**kw), device_map="cpu")
    ours = LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_ckpt, quantization_config=BitsAndBytesConfig(**kw), device_map="cpu")
    names = lambda model: sorted(n for n, m in model.named_modules() if type(m) is torch.nn.Linear)
    assert names(ours) == names(ref)
    assert "model.multi_modal_projector.linear_2" in names(ours) and "lm_head" not in names(ours)
    inputs = make_inputs(sizes=[(56, 56)])
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, ref(**inputs).logits, atol=ATOL, rtol=0)


@needs_bnb
def test_tied_checkpoint_keeps_lm_head_tied(tmp_path):
    from conftest import build_reference

    folder = build_reference(tmp_path / "tied", tied=True)
    ours, ref = load_pair(folder, "nf4")
    assert ours.lm_head.weight is ours.model.language_model.embed_tokens.weight
    inputs = make_inputs(sizes=[(56, 56)])
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, ref(**inputs).logits, atol=ATOL, rtol=0)


@needs_bnb
def test_dtype_applies_to_unquantized_parts(tiny_ckpt):
    """dtype keeps its usual meaning (as in the reference); the compute dtype only sets the 4-bit matmuls."""
    from onevision import LlavaOnevisionForConditionalGeneration

    rng = torch.random.get_rng_state()
    ours = LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_ckpt, quantization_config=BitsAndBytesConfig(**MODES["nf4"]), dtype=torch.bfloat16)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the backend probe draws no random numbers
    assert ours.dtype == torch.bfloat16 and ours.model.language_model.norm.weight.dtype == torch.bfloat16
    _, ref = load_pair(tiny_ckpt, "nf4", dtype=torch.bfloat16)
    assert ref.model.language_model.norm.weight.dtype == torch.bfloat16
    q, ref_q = (m.model.language_model.layers[0].self_attn.q_proj for m in (ours, ref))
    assert q.compute_dtype == ref_q.compute_dtype == torch.float16
    assert q.weight.quant_state.dtype == ref_q.weight.quant_state.dtype == torch.bfloat16
    inputs = make_inputs(sizes=[(56, 56)])
    with torch.no_grad():
        logits, want = ours(**inputs).logits, ref(**inputs).logits
    assert logits.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)


# -- saving -------------------------------------------------------------------------------------------------------
@needs_bnb
def test_save_pretrained_refuses(pair, tmp_path):
    _, ours, _ = pair
    with pytest.raises(NotImplementedError, match="quantization_config"):
        ours.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prequantized_checkpoint_is_refused(tiny_ckpt, tmp_path):
    import json
    import shutil

    from onevision import LlavaOnevisionForConditionalGeneration

    folder = tmp_path / "prequantized"
    shutil.copytree(tiny_ckpt, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = BitsAndBytesConfig(**MODES["nf4"]).to_dict()
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="pre-quantized"):
        LlavaOnevisionForConditionalGeneration.from_pretrained(folder)


# -- config and errors ----------------------------------------------------------------------------------------------
def test_config_fields_and_dict_match_reference():
    from transformers import BitsAndBytesConfig as RefConfig

    for kw in [{}, *MODES.values(), dict(load_in_8bit=True, llm_int8_threshold=4.0, llm_int8_skip_modules=["a"],
                                         bnb_4bit_quant_storage="bfloat16")]:
        ours, ref = BitsAndBytesConfig(**kw), RefConfig(**kw)
        assert ours.to_dict() == ref.to_dict()
        assert ours.quantization_method() == ref.quantization_method()
        assert BitsAndBytesConfig.from_dict(ref.to_dict()) == ours
        assert BitsAndBytesConfig.coerce(ref) == ours
        assert RefConfig.from_dict(ours.to_dict()).to_dict() == ref.to_dict()
    assert BitsAndBytesConfig(bnb_4bit_compute_dtype="float16").bnb_4bit_compute_dtype == torch.float16


def test_config_errors():
    with pytest.raises(ValueError, match="only one"):
        BitsAndBytesConfig(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="nf4"):
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4")
    with pytest.raises(TypeError, match="llm_int8_skip_modules"):
        BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules="lm_head")
    with pytest.raises(ValueError, match="bnb_4bit_compute_dtype"):
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype="half-ish")


def test_skip_pattern_matching():
    assert not should_convert_module("model.vision_tower.encoder.layers.0.mlp.fc1", ["model.vision_tower"])
    assert not should_convert_module("model.vision_tower.encoder.layers.0.mlp.fc1", ["fc1"])
    assert should_convert_module("model.language_model.layers.11.mlp.up_proj", ["model.language_model.layers.1"])
    assert not should_convert_module("model.language_model.layers.11.mlp.up_proj", [r"model.language_model.layers.\d+"])
    assert should_convert_module("model.language_model.layers.0.mlp.gate_proj", ["mlp.gate"])


def test_neither_mode_is_an_error(tiny_ckpt):
    from onevision import LlavaOnevisionForConditionalGeneration

    with pytest.raises(ValueError, match="load_in_4bit"):
        LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_ckpt, quantization_config=BitsAndBytesConfig())


def test_missing_bitsandbytes_says_what_to_install(tiny_ckpt, monkeypatch):
    from onevision import LlavaOnevisionForConditionalGeneration

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ImportError, match=r'pip install "onevision\[quant\]"'):
        LlavaOnevisionForConditionalGeneration.from_pretrained(
            tiny_ckpt, quantization_config=BitsAndBytesConfig(load_in_4bit=True))


@needs_bnb
def test_unsupported_device_is_explained():
    from conftest import tiny_config_dict

    from onevision.config import LlavaOnevisionConfig
    from onevision.models.llava_onevision import LlavaOnevisionForConditionalGeneration
    from onevision.quantization import prepare_quantized_loading

    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig.from_dict(tiny_config_dict()))
    with pytest.raises(ValueError, match="cannot run on device 'meta'.*device_map"):
        prepare_quantized_loading(model, BitsAndBytesConfig(load_in_4bit=True), torch.float32, "meta")


@needs_bnb
def test_backend_failure_names_the_option(monkeypatch):
    """An option the backend has no kernel for on this device fails before any weight is read, naming it."""
    from onevision.quantization import _check_device

    def broken(*args, **kwargs):
        raise NotImplementedError("no fp4 kernel here")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", broken)
    with pytest.raises(RuntimeError, match=r"4-bit fp4.*load_in_8bit"):
        _check_device(bnb, BitsAndBytesConfig(load_in_4bit=True), torch.device("cpu"))


# -- real 0.5B shapes (slow) ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt_05b_fp16(tmp_path_factory):
    from conftest import build_reference_05b

    return build_reference_05b(tmp_path_factory.mktemp("real05b-fp16") / "ckpt", dtype=torch.float16)


@needs_bnb
@pytest.mark.slow
def test_05b_quantized_load_memory(ckpt_05b_fp16, tmp_path):
    """Peak memory while loading stays near the quantized size: benchmarks/quantized_memory.py, ours only."""
    import json
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "quantized_memory.py"
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(script), "--folder", str(ckpt_05b_fp16), "--impls", "ours",
                          "--modes", "fp32,int8,nf4", "--threads", "2", "--json", str(out)],
                         check=False, capture_output=True, text=True, timeout=900)
    print(run.stdout)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["mode"]: r for r in json.loads(out.read_text())}
    gib = 2**30
    assert rows["fp32"]["peak_anon"] > 3.0 * gib
    # quantized weights: ~0.96 GiB (int8), ~0.65 GiB (nf4), of which the fp16 embedding (0.25 GiB) stays memory-mapped
    assert rows["int8"]["peak_anon"] < 1.1 * gib and rows["nf4"]["peak_anon"] < 0.8 * gib
    assert rows["nf4"]["peak_anon"] < 0.25 * rows["fp32"]["peak_anon"]


@needs_bnb
@pytest.mark.slow
def test_05b_nf4_matches_reference(ckpt_05b_fp16):
    from test_slow_05b import inputs_with_image

    ours, ref = load_pair(ckpt_05b_fp16, "nf4", dtype=torch.float32)
    inputs = inputs_with_image(size=(384, 384))
    text_only = {k: v[:, :12] for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    for inp in (text_only, inputs):
        with torch.inference_mode():
            a, b = ours(**inp).logits, ref(**inp).logits
        print(f"0.5B-shape nf4 logits max |diff| = {(a - b).abs().max().item():.3g}")
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert torch.equal(ours.generate(**text_only, max_new_tokens=6, do_sample=False),
                       ref.generate(**text_only, max_new_tokens=6, do_sample=False))
