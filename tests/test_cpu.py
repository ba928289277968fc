"""CPU compute paths (onevision/cpu.py) and torchao weight-only int8/int4, against transformers and torchao."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onevision import cpu

torchao = pytest.importorskip("torchao")
from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: E402
from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig  # noqa: E402

NO_FP16 = {"capability": "AVX512", "bf16": True, "bf16_fast": True, "fp16": False}
FP16 = {"capability": "AVX512", "bf16": True, "bf16_fast": True, "fp16": True}
# bf16 arithmetic (avx512_bf16 / AMX) or only oneDNN's emulation of it (AVX-512 without avx512_bf16)
BF16_FAST = {"capability": "AVX512", "bf16": True, "bf16_fast": True, "fp16": False}
NO_BF16 = {"capability": "AVX512", "bf16": True, "bf16_fast": False, "fp16": False}
BRANCHES = pytest.mark.parametrize("caps", [BF16_FAST, NO_BF16], ids=["bf16-arithmetic", "no-bf16-arithmetic"])


def ids(seed=0):
    return torch.randint(0, 150000, (1, 12), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fp32_logits(tiny_ckpt, reference_model):
    with torch.no_grad():
        return reference_model(input_ids=ids()).logits


def load_ours(folder, **kw):
    from onevision import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(folder, **kw)


def load_ref(folder, **kw):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(folder, **kw).eval()


def dist(model, reference):
    with torch.no_grad():
        return (model(input_ids=ids()).logits.float() - reference).abs().max().item()


def test_probe_reports_the_running_cpu():
    caps = cpu.probe()
    assert caps["capability"] == torch.backends.cpu.get_cpu_capability()
    assert caps["fp16"] == torch.ops.mkldnn._is_mkldnn_fp16_supported()
    assert caps["bf16"] == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if torch.backends.cpu.get_cpu_capability().startswith("AVX"):  # x86: oneDNN's "bf16" may be emulation
        assert caps["bf16_fast"] == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    flags = cpu.cpu_flags()
    if flags:  # Linux: the flags /proc/cpuinfo reports agree with the probe
        assert caps["bf16_fast"] == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_fp16_kernel_choice_on_both_branches(tiny_ckpt, monkeypatch):
    assert cpu.fp16_compute_dtype(NO_FP16, "auto") == torch.float32
    assert cpu.fp16_compute_dtype(NO_FP16, "reference") == torch.float16
    assert cpu.fp16_compute_dtype(FP16, "auto") == torch.float16
    with pytest.raises(ValueError, match="compute must be one of"):
        cpu.fp16_compute_dtype(FP16, "fast")
    for caps, expect in ((NO_FP16, cpu.Fp16ViaFloat32Linear), (FP16, nn.Linear)):
        monkeypatch.setattr(cpu, "probe", lambda caps=caps: caps)
        model = load_ours(tiny_ckpt, dtype=torch.float16)
        q = model.model.language_model.layers[0].self_attn.q_proj
        assert type(q) is expect and q.weight.dtype == torch.float16  # weights stay fp16 in memory


def test_fp16_fast_path_is_as_close_to_fp32_as_transformers_fp16(tiny_ckpt, fp32_logits, monkeypatch):
    monkeypatch.setattr(cpu, "probe", lambda: NO_FP16)
    ref16 = dist(load_ref(tiny_ckpt, dtype=torch.float16), fp32_logits)
    fast = dist(load_ours(tiny_ckpt, dtype=torch.float16), fp32_logits)
    assert fast <= ref16, (fast, ref16)


def test_fp16_fast_path_decode_step_is_as_close_to_fp32_as_transformers_fp16(tiny_ckpt, reference_model, monkeypatch):
    # a prefill of 11 tokens (the fp32-compute path), then one decode step (1 row: native fp16 arithmetic)
    monkeypatch.setattr(cpu, "probe", lambda: NO_FP16)
    prompt, step = ids()[:, :11], ids()[:, 11:]

    def decode_logits(model):
        with torch.no_grad():
            past = model(input_ids=prompt, use_cache=True).past_key_values
            return model(input_ids=step, past_key_values=past, use_cache=True).logits[:, -1].float()

    fp32 = decode_logits(reference_model)
    ref16 = (decode_logits(load_ref(tiny_ckpt, dtype=torch.float16)) - fp32).abs().max().item()
    fast = (decode_logits(load_ours(tiny_ckpt, dtype=torch.float16)) - fp32).abs().max().item()
    assert 0 < fast <= ref16, (fast, ref16)


def test_fp16_reference_option_is_bit_identical_to_transformers(tiny_ckpt, monkeypatch):
    monkeypatch.setattr(cpu, "probe", lambda: NO_FP16)
    ours, ref = load_ours(tiny_ckpt, dtype=torch.float16, compute="reference"), load_ref(tiny_ckpt, dtype=torch.float16)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids()).logits, ref(input_ids=ids()).logits)


def test_bf16_logits_and_tokens_identical_to_transformers(tiny_ckpt):
    ours, ref = load_ours(tiny_ckpt, dtype=torch.bfloat16), load_ref(tiny_ckpt, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids()).logits, ref(input_ids=ids()).logits)
    kw = dict(input_ids=ids(1), max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(**kw), ref.generate(**kw, pad_token_id=0))


def _torchao_layer(weight, config):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.bfloat16)
    layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
    quantize_(layer, config)
    return layer.weight


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_packed_weights_equal_torchao_and_match_its_matmul(kind):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ours = cpu.pack_weight(w, kind, group_size=64)
    if kind == "int8":
        theirs = _torchao_layer(w, Int8WeightOnlyConfig())
        assert torch.equal(ours.qdata, theirs.qdata) and torch.equal(ours.scale, theirs.scale.reshape(-1).float())
        expect = torch.nn.functional.linear(x, theirs)  # torchao's eager path: dequantize, then matmul
        torch.testing.assert_close(ours(x), expect, rtol=2e-2, atol=2e-2)
    else:
        theirs = _torchao_layer(w, PrototypeInt4WeightOnlyConfig(group_size=64))
        assert torch.equal(ours.qdata, theirs.qdata) and torch.equal(ours.scale_and_zero, theirs.scale_and_zero)
        assert torch.equal(ours(x), torch.nn.functional.linear(x, theirs))  # the same aten kernel


def test_quant_kernel_choice_on_both_branches(monkeypatch):
    # with bf16 arithmetic: the packed kernels (bf16 activations) for every M, as before; without it: packed for
    # decode, fp32 GEMM on the dequantized weight from DEQUANT_FROM_ROWS rows (prefill)
    for kind in ("int8", "int4"):
        assert cpu.quant_plan(kind, BF16_FAST)["dequant_from_rows"] is None
        assert cpu.quant_plan(kind, NO_BF16)["dequant_from_rows"] == cpu.DEQUANT_FROM_ROWS[kind]
        assert cpu.DEQUANT_FROM_ROWS[kind] > 16  # the engine's batched decode (<= 16 sequences) stays packed
    with pytest.raises(ValueError, match="int8 or int4"):
        cpu.quant_plan("int2")
    # an int4 packing this torch lays out differently than _unpack_int4 reads keeps int4 packed everywhere
    monkeypatch.setattr(cpu, "int4_layout_known", lambda: False)
    assert cpu.quant_plan("int4", NO_BF16)["dequant_from_rows"] is None
    assert cpu.quant_plan("int8", NO_BF16)["dequant_from_rows"] == cpu.DEQUANT_FROM_ROWS["int8"]


def test_int4_layout_is_known_and_dequantize_equals_the_kernels_weight():
    assert cpu.int4_layout_known()  # torch 2.14's CPU layout: a change would show here, not as wrong numbers
    # 208 rows: three 64-row blocks and a 16-row tail, which the CPU packing lays out differently
    w = torch.randn(208, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    m = cpu.pack_weight(w, "int4", group_size=64)
    eye = torch.eye(256, dtype=torch.bfloat16)  # the kernel applied to the identity: its weight, bf16-rounded
    kernel_weight = torch._weight_int4pack_mm_for_cpu(eye, m.qdata, 64, m.scale_and_zero).t()
    assert torch.equal(m.dequantize().to(torch.bfloat16), kernel_weight)


@BRANCHES
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_linear_takes_the_chosen_path_by_rows(kind, caps, monkeypatch):
    monkeypatch.setattr(cpu, "probe", lambda: caps)
    w = torch.randn(80, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    m = cpu.pack_weight(w, kind, group_size=64)
    assert m.dequant_from_rows == cpu.quant_plan(kind, caps)["dequant_from_rows"]
    weight = m.dequantize() if kind == "int4" else m.qdata.float() * m.scale[:, None]
    monkeypatch.setitem(cpu.DEQUANT_FROM_ROWS, kind, 32)
    m = cpu.pack_weight(w, kind, group_size=64)
    for rows in (1, 8, 16, 31, 32, 64):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        if kind == "int8":
            packed = (torch._weight_int8pack_mm(x, m.qdata, m.ones) * m.scale).to(torch.bfloat16)
            dequant = (torch.nn.functional.linear(x.float(), m.qdata.float()).to(torch.bfloat16) * m.scale)
            dequant = dequant.to(torch.bfloat16)
        else:
            packed = torch._weight_int4pack_mm_for_cpu(x, m.qdata, 64, m.scale_and_zero)
            dequant = torch.nn.functional.linear(x.float(), weight).to(torch.bfloat16)
        expect = dequant if caps is NO_BF16 and rows >= 32 else packed
        assert torch.equal(m(x), expect), (rows, caps)
        # either way the product is the dequantized weight's, to bf16 rounding
        torch.testing.assert_close(m(x).float(), torch.nn.functional.linear(x.float(), weight), rtol=2e-2, atol=5e-2)


@BRANCHES
def test_int8_logits_no_further_from_fp32_than_transformers_torchao(tiny_ckpt, fp32_logits, caps, monkeypatch):
    from transformers import TorchAoConfig as RefConfig

    from onevision import TorchAoConfig

    # the 12-token prompt takes the dequantized-fp32 path on the branch without bf16 arithmetic
    monkeypatch.setitem(cpu.DEQUANT_FROM_ROWS, "int8", 8)
    monkeypatch.setattr(cpu, "probe", lambda: caps)
    ref = load_ref(tiny_ckpt, dtype=torch.bfloat16, quantization_config=RefConfig(quant_type=Int8WeightOnlyConfig()))
    ours = load_ours(tiny_ckpt, dtype=torch.bfloat16, quantization_config=TorchAoConfig(quant_type=Int8WeightOnlyConfig()))
    assert isinstance(ours.model.language_model.layers[0].mlp.up_proj, cpu.Int8Linear)
    assert ours.model.language_model.layers[0].mlp.up_proj.dequant_from_rows == (8 if caps is NO_BF16 else None)
    r = ref.model.language_model.layers[0].mlp.up_proj.weight
    o = ours.model.language_model.layers[0].mlp.up_proj
    assert torch.equal(o.qdata, r.qdata) and torch.equal(o.scale, r.scale.reshape(-1).float())
    assert dist(ours, fp32_logits) <= dist(ref, fp32_logits)


@BRANCHES
def test_int4_logits_no_further_from_fp32_than_torchao_on_the_reference(tiny_ckpt, fp32_logits, caps, monkeypatch):
    monkeypatch.setitem(cpu.DEQUANT_FROM_ROWS, "int4", 8)
    monkeypatch.setattr(cpu, "probe", lambda: caps)
    # transformers 5.24 + torchao 0.18 cannot load Int4WeightOnlyConfig on CPU (torchao's Int4Tensor needs the
    # mslk package); the oracle is torchao's CPU int4 config applied to transformers' bf16 model
    from onevision import TorchAoConfig

    config = PrototypeInt4WeightOnlyConfig(group_size=32)
    ref = load_ref(tiny_ckpt, dtype=torch.bfloat16)
    quantize_(ref, config, filter_fn=lambda m, name: isinstance(m, nn.Linear) and name != "lm_head"
              and m.in_features % 32 == 0)
    ours = load_ours(tiny_ckpt, dtype=torch.bfloat16, quantization_config=TorchAoConfig(quant_type=config))
    up = ours.model.language_model.layers[0].mlp.up_proj
    assert isinstance(up, cpu.Int4Linear) and up.dequant_from_rows == (8 if caps is NO_BF16 else None)
    assert dist(ours, fp32_logits) <= dist(ref, fp32_logits) + 1e-6


def test_fp16_reference_parity_holds_when_the_cpu_lacks_fp16(tiny_ckpt, monkeypatch):
    # the existing fp16 parity test (test_loading) passes compute="reference": it must stay bit-identical on CPUs
    # where "auto" would take the fp32-compute path
    import test_loading

    monkeypatch.setattr(cpu, "probe", lambda: NO_FP16)
    test_loading.test_half_precision_short_input(tiny_ckpt)


def test_cli_quantize_flag_builds_torchao_configs():
    from onevision.cli import build_parser
    from onevision.quantization import torchao_config_for

    for command in ("chat", "serve"):
        assert build_parser().parse_args([command, "--quantize", "int4"]).quantize == "int4"
    assert type(torchao_config_for("int8").quant_type).__name__ == "Int8WeightOnlyConfig"
    with pytest.raises(ValueError, match="must be one of"):
        torchao_config_for("int3")


@BRANCHES
def test_int8_composes_with_left_padded_batched_decode(tiny_ckpt, caps, monkeypatch):
    # the serving engine decodes several sequences per step through the same Linear modules
    from onevision import TorchAoConfig

    monkeypatch.setattr(cpu, "probe", lambda: caps)

    model = load_ours(tiny_ckpt, dtype=torch.bfloat16, quantization_config=TorchAoConfig(quant_type=Int8WeightOnlyConfig()))
    a, b = ids(2)[:, :5], ids(3)
    batch = torch.cat([torch.cat([torch.zeros(1, 7, dtype=torch.long), a], 1), b])
    mask = torch.cat([torch.cat([torch.zeros(1, 7), torch.ones(1, 5)], 1), torch.ones(1, 12)]).long()
    kw = dict(max_new_tokens=6, do_sample=False)
    together = model.generate(input_ids=batch, attention_mask=mask, **kw, pad_token_id=0)[:, -6:]
    alone = torch.cat([model.generate(input_ids=x, **kw)[:, -6:] for x in (a, b)])
    assert torch.equal(together, alone)


@BRANCHES
def test_int8_and_int4_compose_with_the_engines_batched_steps(tiny_ckpt, caps, monkeypatch):
    # staggered requests share decode steps (several rows through the packed kernels) and prompt chunks (int8's
    # dequantized path from 32 rows on the branch without bf16 arithmetic); each request's tokens equal the same
    # quantized model's generate on it alone
    from onevision import AutoProcessor, TorchAoConfig
    from onevision.engine import Engine, EngineConfig, SamplingParams

    monkeypatch.setattr(cpu, "probe", lambda: caps)
    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    for quant in (Int8WeightOnlyConfig(), PrototypeInt4WeightOnlyConfig(group_size=32)):
        model = load_ours(tiny_ckpt, dtype=torch.bfloat16, quantization_config=TorchAoConfig(quant_type=quant))
        prompts = [torch.cat([ids(s)] * k, 1) for s, k in ((4, 1), (5, 4), (6, 2))]  # 12, 48, 24 tokens
        alone = [model.generate(input_ids=p, max_new_tokens=8, do_sample=False)[0, p.shape[1]:].tolist()
                 for p in prompts]
        engine = Engine(model, processor, EngineConfig(max_num_batched_tokens=40))
        for i, p in enumerate(prompts):
            engine.add_request(str(i), {"input_ids": p}, SamplingParams(max_tokens=8, temperature=0))
            engine.step()
        done = {}
        while engine.has_unfinished():
            done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        assert [done[str(i)] for i in range(3)] == alone, type(quant).__name__


# -- oneDNN-packed float32 linears (the engine's batched GEMMs) --------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 40, bias=False))


def test_packed_linears_keep_reference_bits_outside_the_engine_and_pack_inside():
    if not cpu._packing_works():
        pytest.skip("this torch build has no oneDNN linear ops (the engine then keeps the reference GEMM)")
    model = _mlp()
    plain = [layer.weight.detach().clone() for layer in model]
    assert cpu.pack_fp32_linears(model) == 4 * (64 * 96 + 96 * 40)
    assert all(type(layer) is cpu.PackedLinear for layer in model)
    assert set(model.state_dict()) == {"0.weight", "0.bias", "1.weight"}  # the packed copies are not saved
    assert cpu.pack_fp32_linears(model) == 0  # packing twice adds nothing
    for rows in (1, 2, 3, 8, 200):
        x = torch.randn(rows, 64)
        reference = nn.functional.linear(nn.functional.linear(x, plain[0], model[0].bias), plain[1])
        assert torch.equal(model(x), reference)  # outside packed_gemms(): the reference GEMM, bit for bit
        with cpu.packed_gemms():
            inside = model(x)
            if rows >= cpu.PACKED_FROM_ROWS:  # the packed kernel, not F.linear
                h = torch.ops.mkldnn._linear_pointwise(x, model[0].packed, model[0].bias, "none", [], "")
                assert torch.equal(inside, torch.ops.mkldnn._linear_pointwise(h, model[1].packed, None, "none", [],
                                                                                ""))
            else:
                assert torch.equal(inside, reference)
        torch.testing.assert_close(inside, reference, rtol=1e-5, atol=1e-5)
    with cpu.packed_gemms(), cpu.packed_gemms(False):  # nested: the inner choice wins, then the outer returns
        assert torch.equal(model(x), reference)


def test_fused_groups_pack_siblings_into_one_gemm_inside_the_engine_only():
    """q/k/v and gate/up (the modules' FUSABLE groups) become one packed weight each; a decoder layer gives the
    reference's bits outside packed_gemms() and, inside, the concatenated GEMM's outputs (not the three linears')."""
    if not cpu._packing_works():
        pytest.skip("this torch build has no oneDNN linear ops (the engine then keeps the reference GEMM)")
    from onevision.config import Qwen2Config
    from onevision.models.qwen2 import Qwen2DecoderLayer, RotaryEmbedding, project

    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=1)
    torch.manual_seed(0)
    layer = Qwen2DecoderLayer(cfg, 0)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.2)
    attn, mlp = layer.self_attn, layer.mlp
    added = cpu.pack_fp32_linears(layer)
    assert added == 4 * sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
    assert type(attn.q_proj) is nn.Linear and type(mlp.gate_proj) is nn.Linear  # grouped, not packed one by one
    assert type(attn.o_proj) is cpu.PackedLinear and type(mlp.down_proj) is cpu.PackedLinear
    assert set(attn.__dict__) >= {"fused_qkv"} and set(mlp.__dict__) >= {"fused_gate_up"}
    assert not any("fused" in k or "packed" in k for k in layer.state_dict())
    assert cpu.pack_fp32_linears(layer) == 0 and type(attn.q_proj) is nn.Linear  # packing twice adds nothing
    rope = RotaryEmbedding(cfg)
    for rows in (2, 3, 9):
        x = torch.randn(1, rows, 64)
        cos, sin = rope(torch.arange(rows)[None], torch.float32)
        q_ref, k_ref, v_ref = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        with torch.no_grad():
            reference = layer(x, cos, sin, None, None, False)[0]
            assert torch.equal(layer(x, cos, sin, None, None, False)[0], reference)  # outside: bit for bit
            with cpu.packed_gemms():
                q, k, v = project(attn, "qkv", x)
                inside = layer(x, cos, sin, None, None, False)[0]
            if rows >= cpu.PACKED_FROM_ROWS:
                one = torch.ops.mkldnn._linear_pointwise(x, attn.__dict__["fused_qkv"].packed, bias, "none", [], "")
                assert torch.equal(torch.cat([q, k, v], -1), one)
                torch.testing.assert_close(one, nn.functional.linear(x, fused, bias), rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(q, q_ref) and torch.equal(k, k_ref) and torch.equal(v, v_ref)
                assert torch.equal(inside, reference)
            torch.testing.assert_close(inside, reference, rtol=1e-5, atol=1e-5)


def test_packing_respects_its_budget_and_a_torch_without_onednn(monkeypatch):
    model = _mlp()
    assert cpu.pack_fp32_linears(model, budget=1000) == 0 and all(type(m) is nn.Linear for m in model)
    # (the budget fits: packing happens where oneDNN has the ops)
    assert (cpu.pack_fp32_linears(_mlp(), budget=10**6) > 0) == cpu._packing_works()
    monkeypatch.setattr(cpu, "_packing_works", lambda: False)  # the ops missing or failing: nothing packed
    assert cpu.pack_fp32_linears(model) == 0 and all(type(m) is nn.Linear for m in model)
    half = _mlp().half()
    monkeypatch.undo()
    assert cpu.pack_fp32_linears(half) == 0  # float32 only


def test_fp16_fast_path_keeps_native_fp16_for_decode_rows():
    # decode-sized calls are memory-bound: fp16 arithmetic (transformers' bits); prefill-sized calls go via fp32
    torch.manual_seed(0)
    layer = nn.Linear(64, 48).half()
    fast = nn.Linear(64, 48).half()
    fast.load_state_dict(layer.state_dict())
    fast.__class__ = cpu.Fp16ViaFloat32Linear
    for rows in (1, cpu.NATIVE_FP16_MAX_ROWS):
        x = torch.randn(rows, 64).half()
        assert torch.equal(fast(x), layer(x))
    x = torch.randn(cpu.NATIVE_FP16_MAX_ROWS + 1, 64).half()
    via_fp32 = nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float()).half()
    assert torch.equal(fast(x), via_fp32)
