"""The engine against the reference: every request's greedy tokens through continuous batching (chunked prefill,
preemption, prefix and vision cache hits, staggered arrivals, aborts) equal transformers' generate on that
request alone; engine logits equal transformers' forward at every decode step.

Run: .venv/bin/python -m pytest tests/test_engine.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _processing_helpers import photo
from onevision.engine import Engine, EngineConfig, SamplingParams
from onevision.engine.blocks import BlockManager, block_hashes

KW = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")


@pytest.fixture(scope="module")
def processors(tiny_ckpt):
    from transformers import AutoProcessor as RefProcessor

    from onevision import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_ckpt), RefProcessor.from_pretrained(tiny_ckpt)


def frames(n=4, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, (n, 48, 64, 3), dtype=np.uint8))


def user(*parts, text="What is shown here?"):
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def image(name):
    return {"type": "image", "image": photo(name)}


WORKLOAD = {
    "text": [user(text="Tell me a long story about a dragon and a knight.")],
    "short": [user(text="Hi")],
    "photo": [user(image("cat.jpg"))],
    "wide": [user(image("coffee.jpg"), text="Describe it.")],
    "gray": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, user(image("camera_gray.png"))],
    "two_photos": [user(image("rocket.jpg"), image("cat.jpg"), text="Compare them.")],
    "video": [user({"type": "video", "video": frames()}, text="What happens?")],
    "photo_and_video": [user(image("logo_rgba.png"), {"type": "video", "video": frames(3, 1)})],
}
LENGTHS = {"text": 40, "short": 5, "photo": 24, "wide": 12, "gray": 30, "two_photos": 20, "video": 16,
           "photo_and_video": 8}


def reference_tokens(reference_model, ref_processor, conversation, max_new):
    inputs = ref_processor.apply_chat_template(conversation, **KW)
    out = reference_model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def expected(reference_model, processors):
    return {name: reference_tokens(reference_model, processors[1], conv, LENGTHS[name])
            for name, conv in WORKLOAD.items()}


def run(engine, requests, arrivals=None, abort=None):
    """requests: {id: (inputs, params)}; arrivals: {id: step at which it is added}; abort: {id: step}.
    Returns {id: final RequestOutput} and the number of steps."""
    arrivals = arrivals or {}
    done, step = {}, 0
    pending = dict(requests)
    while pending or engine.has_unfinished():
        for rid in [r for r in pending if arrivals.get(r, 0) <= step]:
            engine.add_request(rid, *pending.pop(rid))
        for rid, at in (abort or {}).items():
            if at == step and rid in engine.requests:
                done[rid] = engine.abort(rid)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        assert step < 5000
    return done, step


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0)


def preempting_kv_memory(model) -> int:
    """KV bytes with room for ~1.5 of the workload's largest requests (float32): preemption must happen."""
    text = model.config.text_config
    return 420 * 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 4


@pytest.mark.parametrize("config", [
    dict(max_num_batched_tokens=2048, cpu_weight_packing="off"),  # whole prompts at once, reference GEMMs
    dict(max_num_batched_tokens=24, max_num_seqs=3),  # chunked prefill, few sequences at a time
    dict(max_num_batched_tokens=40, kv_cache_memory=None, block_size=8),  # preemption (sized below)
], ids=["plain", "chunked", "preempting"])
def test_mixed_workload_equals_reference(config, our_model, processors, expected):
    ours = processors[0]
    config = dict(config)
    if "kv_cache_memory" in config:
        config["kv_cache_memory"] = preempting_kv_memory(our_model)
    engine = Engine(our_model, ours, EngineConfig(**config))
    from onevision import cpu

    wanted = config.get("cpu_weight_packing", "auto") == "auto"
    assert engine.packed == (wanted and cpu._packing_works())  # both GEMM paths (cpu.py), where oneDNN has them
    requests = {name: (ours.apply_chat_template(conv, **KW), greedy(LENGTHS[name])) for name, conv in WORKLOAD.items()}
    arrivals = {name: 3 * i for i, name in enumerate(WORKLOAD)}  # staggered: join a running batch
    requests["leaver"] = (ours.apply_chat_template(WORKLOAD["photo"], **KW), greedy(200))
    done, _ = run(engine, requests, arrivals, abort={"leaver": 12})
    for name in WORKLOAD:
        assert done[name].outputs[0].token_ids == expected[name], name
        assert done[name].outputs[0].finish_reason in ("length", "stop")
    assert done["leaver"].outputs[0].finish_reason == "abort"
    assert engine.blocks.num_free == engine.blocks.num_blocks  # nothing leaked, the leaver's blocks included
    if "kv_cache_memory" in config:
        assert engine.scheduler.num_preemptions > 0


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
    """flash_attn_varlen_func's contract in plain torch (the CUDA kernel is not on this machine), to check the
    engine's plumbing of it: per sequence b, queries q[cu_q[b]:cu_q[b+1]] (total_q, H, D) attend to keys
    k[cu_k[b]:cu_k[b+1]] (total_k, H_kv, D), causally aligned to the last key; GQA by groups of query heads."""
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and cu_q.dtype == cu_k.dtype == torch.int32
    assert causal and max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        qq = q[qs:qe].transpose(0, 1)  # (H, Lq, D)
        kk = k[ks:ke].transpose(0, 1).repeat_interleave(rep, 0)
        vv = v[ks:ke].transpose(0, 1).repeat_interleave(rep, 0)
        lq, lk = qe - qs, ke - ks
        allowed = torch.arange(lq)[:, None] + (lk - lq) >= torch.arange(lk)[None, :]
        scores = (qq @ kk.transpose(1, 2) * softmax_scale).masked_fill(~allowed, float("-inf"))
        out[qs:qe] = (torch.softmax(scores, -1) @ vv).transpose(0, 1)
    return out


def test_varlen_attention_plumbing_gives_the_reference_tokens(our_model, processors, expected):
    """On CUDA the engine hands every sequence of a step to flash-attn's varlen kernel at once: the pool's keys
    gathered in (total, H_kv, D), cumulative lengths, causal alignment. With that kernel's contract computed in
    torch, the mixed workload (chunked prefill, decode, a preemption) still gives transformers' tokens."""
    ours = processors[0]
    engine = Engine(our_model, ours, EngineConfig(max_num_batched_tokens=40, block_size=8,
                                                  kv_cache_memory=preempting_kv_memory(our_model)))
    engine.runner.varlen = varlen_reference
    requests = {name: (ours.apply_chat_template(conv, **KW), greedy(LENGTHS[name])) for name, conv in WORKLOAD.items()}
    done, _ = run(engine, requests, {name: 3 * i for i, name in enumerate(WORKLOAD)})
    for name in WORKLOAD:
        assert done[name].outputs[0].token_ids == expected[name], name
    assert engine.scheduler.num_preemptions > 0


def test_logits_equal_reference_forward_at_every_step(our_model, reference_model, processors):
    ours = processors[0]
    engine = Engine(our_model, ours, EngineConfig(max_num_batched_tokens=32))
    seen = []
    engine.runner.logits_hook = lambda seqs, logits: seen.extend(
        (list(s.token_ids), logits[i].clone()) for i, s in enumerate(seqs))
    requests = {n: (ours.apply_chat_template(WORKLOAD[n], **KW), greedy(6)) for n in ("photo", "video", "text")}
    done, _ = run(engine, requests)
    media = {n: {k: v for k, v in requests[n][0].items() if k not in ("input_ids", "attention_mask")}
             for n in requests}
    checked = 0
    for tokens, logits in seen:
        name = next(n for n in requests if tokens[:requests[n][0]["input_ids"].shape[1]] ==
                    requests[n][0]["input_ids"][0].tolist())
        with torch.no_grad():
            ref = reference_model(input_ids=torch.tensor([tokens]), **media[name]).logits[0, -1].float()
        assert torch.allclose(logits, ref, atol=1e-5, rtol=0), (name, (logits - ref).abs().max())
        checked += 1
    assert checked == 18


def test_prefix_and_vision_cache_hits_give_the_cold_tokens(our_model, processors, reference_model):
    ours, ref = processors
    first = [user(image("cat.jpg"), text="What is this?")]
    engine = Engine(our_model, ours, EngineConfig())
    out1, _ = run(engine, {"t1": (ours.apply_chat_template(first, **KW), greedy(12))})
    answer = out1["t1"].outputs[0].text
    out1_tiles = engine.encoder.encoded_tiles
    # the client re-sends the whole conversation, its image included (a second image would switch the
    # checkpoint to multi-image mode, which changes every image's features: a different prefix by design)
    second = first + [{"role": "assistant", "content": [{"type": "text", "text": answer}]},
                      user(text="And what colour is it?")]
    inputs = ours.apply_chat_template(second, **KW)
    out2, _ = run(engine, {"t2": (inputs, greedy(10))})
    t2 = out2["t2"]
    assert t2.num_cached_tokens >= len(out1["t1"].prompt_token_ids) // 16 * 16 > 0
    assert engine.encoder.encoded_tiles == out1_tiles  # the re-sent image was not encoded again
    assert t2.outputs[0].token_ids == reference_tokens(reference_model, ref, second, 10)
    cold = Engine(our_model, ours, EngineConfig(enable_prefix_caching=False, vision_cache_memory=0))
    out3, _ = run(cold, {"t2": (inputs, greedy(10))})
    assert out3["t2"].num_cached_tokens == 0 and cold.vision_cache.hits == 0
    assert out3["t2"].outputs[0].token_ids == t2.outputs[0].token_ids


def test_seeded_sampling_alone_equals_batched_and_reference(our_model, reference_model, processors):
    ours, ref = processors
    conv = WORKLOAD["photo"]
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=20, top_p=0.95, seed=1234)
    alone, _ = run(Engine(our_model, ours), {"a": (ours.apply_chat_template(conv, **KW), params)})
    others = {f"o{i}": (ours.apply_chat_template(WORKLOAD["text"], **KW),
                        SamplingParams(max_tokens=20, temperature=1.0, seed=i)) for i in range(3)}
    batched, _ = run(Engine(our_model, ours), {**others, "a": (ours.apply_chat_template(conv, **KW), params)},
                     arrivals={"a": 2})
    assert alone["a"].outputs[0].token_ids == batched["a"].outputs[0].token_ids
    inputs = ref.apply_chat_template(conv, **KW)
    torch.manual_seed(1234)
    out = reference_model.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20, top_p=0.95)
    assert alone["a"].outputs[0].token_ids == out[0, inputs["input_ids"].shape[1]:].tolist()


def test_n_completions_share_one_prefill(our_model, processors):
    ours = processors[0]
    engine = Engine(our_model, ours, EngineConfig(max_num_batched_tokens=4096))
    inputs = ours.apply_chat_template(WORKLOAD["photo"], **KW)
    prompt = inputs["input_ids"].shape[1]
    computed = []
    engine.runner.logits_hook = lambda seqs, logits: computed.append(len(seqs))
    done, steps = run(engine, {"n": (inputs, SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7))})
    outs = done["n"].outputs
    assert [o.index for o in outs] == [0, 1, 2] and all(len(o.token_ids) == 8 for o in outs)
    assert computed[0] == 1 and computed[1] == 3  # one prefill row, then three decoding rows
    assert len({tuple(o.token_ids) for o in outs}) > 1
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert done["n"].prompt_token_ids == inputs["input_ids"][0].tolist() and prompt > 16


def test_n_completions_wait_for_memory_instead_of_failing(our_model, processors, reference_model):
    """With too few free blocks to copy the prompt's partly filled last block (a request admitted beside it took
    them), the other completions wait and recompute it, as vLLM runs each of n: same tokens as with room to fork,
    no error, nothing leaked."""
    ours, ref = processors
    text = our_model.config.text_config
    per_block = 2 * text.num_hidden_layers * 16 * text.num_key_value_heads * text.head_dim * 4
    x = ours.apply_chat_template([user(text="Tell me a story about a dragon")], **KW)  # 14 tokens: one partial block
    y = ours.apply_chat_template(WORKLOAD["text"], **KW)
    assert x["input_ids"].shape[1] % 16
    params = SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=1)
    roomy, _ = run(Engine(our_model, ours), {"x": (x, params)})
    engine = Engine(our_model, ours, EngineConfig(block_size=16, kv_cache_memory=4 * per_block))
    waited = []
    engine.runner.logits_hook = lambda seqs, logits: waited.extend(s.index for s in seqs if s.index > 0)
    done, _ = run(engine, {"x": (x, params), "y": (y, greedy(20))})
    assert waited  # a completion computed its own prompt tail instead of forking
    assert [o.token_ids for o in done["x"].outputs] == [o.token_ids for o in roomy["x"].outputs]
    assert done["y"].outputs[0].token_ids == reference_tokens(reference_model, ref, WORKLOAD["text"], 20)
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.scheduler.running


def test_abort_releases_the_text_held_back_for_a_stop_string(our_model, processors):
    ours = processors[0]
    engine = Engine(our_model, ours)
    engine.add_request("a", ours.apply_chat_template(WORKLOAD["text"], **KW),
                       SamplingParams(max_tokens=30, temperature=0, stop=["zzzz"]))
    deltas = "".join(out.outputs[0].delta for _ in range(5) for out in engine.step())
    final = engine.abort("a")
    deltas += final.outputs[0].delta
    assert final.outputs[0].finish_reason == "abort" and final.outputs[0].text and deltas == final.outputs[0].text


def test_flat_image_list_is_read_as_the_processor_marked_it(our_model, reference_model, processors):
    """processor(images=[a, b]) with one prompt: batch_num_images [1, 1], every image anyres (the reference's
    reading), not multi-image mode."""
    ours, ref = processors
    prompt = ref.apply_chat_template([user({"type": "image"}, {"type": "image"}, text="Both?")],
                                     add_generation_prompt=True)
    images = [photo("cat.jpg"), photo("coffee.jpg")]
    inputs = ours(text=prompt, images=images, return_tensors="pt")
    assert inputs["batch_num_images"].tolist() == [1, 1]
    want = reference_model.generate(**ref(text=prompt, images=images, return_tensors="pt"), max_new_tokens=6,
                                    do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    done, _ = run(Engine(our_model, ours), {"a": (inputs, greedy(6))})
    assert done["a"].outputs[0].token_ids == want


def test_a_vision_pass_that_fails_midway_is_redone_not_resumed(our_model, processors, expected):
    """An error (or Ctrl-C) inside the vision tower mid-pass: the image is encoded again from its pixels, and
    neither the cache nor a later request sees features from a half-run pass."""
    ours = processors[0]
    engine = Engine(our_model, ours)
    inputs = ours.apply_chat_template(WORKLOAD["photo"], **KW)
    layer = our_model.model.vision_tower.encoder.layers[1]
    handle = layer.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("simulated out of memory")))
    engine.add_request("a", inputs, greedy(LENGTHS["photo"]))
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            engine.step()
    finally:
        handle.remove()
    engine.abort("a")
    assert not engine.encoder.busy  # the half-run pass is dropped with its request
    done, _ = run(engine, {"b": (inputs, greedy(LENGTHS["photo"])), "c": (inputs, greedy(LENGTHS["photo"]))},
                  arrivals={"c": 40})
    assert done["b"].outputs[0].token_ids == done["c"].outputs[0].token_ids == expected["photo"]


def test_weights_changed_after_packing_are_used(tiny_ckpt, processors):
    """The engine's packed copies of float32 linears follow later writes to the weights (load_state_dict), and so
    do its prefix and vision caches: the answers equal transformers' on the same new weights."""
    from transformers import LlavaOnevisionForConditionalGeneration as Reference

    from onevision import LlavaOnevisionForConditionalGeneration, cpu

    if not cpu._packing_works():
        pytest.skip("this torch has no oneDNN packed linear")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32)
    ours = processors[0]
    inputs = ours.apply_chat_template(WORKLOAD["text"], **KW)
    requests = {f"r{i}": (inputs, greedy(8)) for i in range(4)}  # 4 rows a step: the packed GEMMs
    engine = Engine(model, ours)
    assert engine.packed
    before, _ = run(engine, requests)
    generator = torch.Generator().manual_seed(3)
    new_weights = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                   for k, v in model.state_dict().items()}
    model.load_state_dict(new_weights)
    reference = Reference.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    reference.load_state_dict(new_weights)  # the same names: the checkpoint's
    with torch.no_grad():
        want = reference.generate(**processors[1].apply_chat_template(WORKLOAD["text"], **KW), max_new_tokens=8,
                                  do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    assert want != before["r0"].outputs[0].token_ids
    for eng in (engine, Engine(model, ours)):  # the engine built before, and a new one on the same model
        done, _ = run(eng, {k: (v[0], v[1]) for k, v in requests.items()})
        assert all(out.outputs[0].token_ids == want for out in done.values())


def test_llm_without_sampling_params_runs_the_checkpoint_generation_config(tiny_ckpt, tmp_path):
    """vLLM's LLM reads generation_config.json; so does transformers' generate: same tokens."""
    import json
    import shutil

    from transformers import AutoProcessor as RefProcessor
    from transformers import LlavaOnevisionForConditionalGeneration as Reference

    from onevision import LLM

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.3}))
    conv = WORKLOAD["text"]
    inputs = RefProcessor.from_pretrained(folder).apply_chat_template(conv, **KW)
    with torch.no_grad():
        out = Reference.from_pretrained(folder, dtype=torch.float32).eval().generate(**inputs, max_new_tokens=16)
    llm = LLM(folder, dtype="float32")
    assert llm.get_default_sampling_params().repetition_penalty == 1.3
    assert llm.chat([], use_tqdm=False) == []  # no conversations, no outputs
    got = llm.chat(conv, use_tqdm=False)[0].outputs[0].token_ids
    assert got == out[0, inputs["input_ids"].shape[1]:].tolist()


def test_stop_strings_min_tokens_and_eos(our_model, processors, reference_model):
    ours, ref = processors
    conv = WORKLOAD["text"]
    inputs = ours.apply_chat_template(conv, **KW)
    full = reference_tokens(reference_model, ref, conv, 30)
    text = ours.decode(full, skip_special_tokens=True)
    stop = text[10:13]
    done, _ = run(Engine(our_model, ours), {"s": (inputs, SamplingParams(max_tokens=30, temperature=0, stop=[stop]))})
    out = done["s"].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]
    assert out.token_ids == full[:len(out.token_ids)]
    eos = full[5]  # pretend the 6th token is the eos: the row ends there, unless min_tokens says otherwise
    done, _ = run(Engine(our_model, ours), {
        "e": (inputs, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[eos])),
        "m": (inputs, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[eos], min_tokens=8))})
    assert done["e"].outputs[0].token_ids == full[:6] and done["e"].outputs[0].stop_reason == eos
    assert len(done["m"].outputs[0].token_ids) == 8 and eos not in done["m"].outputs[0].token_ids[:8]


def test_bad_requests_are_refused_with_a_reason(our_model, processors):
    ours = processors[0]
    engine = Engine(our_model, ours, EngineConfig(kv_cache_memory=1 << 20))
    inputs = ours.apply_chat_template(WORKLOAD["photo"], **KW)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.add_request("a", inputs, SamplingParams(max_tokens=10**6))
    with pytest.raises(ValueError, match="more KV cache than the engine holds"):
        engine.add_request("b", inputs, SamplingParams(max_tokens=3000))
    broken = dict(inputs)
    broken["input_ids"] = inputs["input_ids"][:, 5:]  # lost some placeholders
    with pytest.raises(ValueError, match="placeholder tokens"):
        engine.add_request("c", broken, SamplingParams())
    with pytest.raises(ValueError, match=r"token ids in \[0, 152000\).*got 152000"):
        engine.add_request("d", {"input_ids": [[1, 2, 152000]]}, SamplingParams())
    with pytest.raises(ValueError, match="n=2 with greedy"):
        SamplingParams(n=2, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    assert not engine.has_unfinished()


# --------------------------------------------------------------------------- pure pieces, plain ints
def test_default_kv_pool_holds_at_most_max_num_seqs_full_contexts(our_model, processors):
    # a share of free memory would give the tiny model millions of token slots (4 GiB of address space per engine)
    engine = Engine(our_model, processors[0], EngineConfig(max_num_seqs=3))
    context = our_model.config.text_config.max_position_embeddings
    assert engine.blocks.num_blocks == 3 * -(-context // engine.blocks.block_size)
    explicit = Engine(our_model, processors[0], EngineConfig(max_num_seqs=3, kv_cache_memory=64 << 20))
    assert explicit.blocks.num_blocks > engine.blocks.num_blocks  # an explicit size is taken as given


def test_argmax_rows_is_torch_argmax_ties_and_all():
    from onevision.engine.runner import argmax_rows

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 64 * 40, generator=g)
    logits[1, 100] = logits[1, 2000] = 50.0  # a tie across chunks: the first wins
    logits[2, 70] = logits[2, 71] = 50.0  # a tie inside a chunk
    logits[3] = float("-inf")
    logits[3, 2559] = 0.0  # the last column
    logits[4] = 0.0  # all equal: column 0
    logits[5, 1234] = float("nan")  # torch.argmax takes a NaN as the maximum
    logits[6, 64] = 1e30
    assert argmax_rows(logits) == logits.argmax(-1).tolist() == [logits[0].argmax().item(), 100, 70, 2559, 0, 1234,
                                                                 64]
    odd = torch.randn(3, 1001, generator=g)  # not a multiple of 64: torch.argmax itself
    assert argmax_rows(odd) == odd.argmax(-1).tolist()


def test_block_hashes_separate_images_and_chain_prefixes():
    tokens = [1, 2, 3, 4, 9, 9, 9, 9, 5, 6]
    a = block_hashes(tokens, [(4, 4, b"image-a")], 4)
    b = block_hashes(tokens, [(4, 4, b"image-b")], 4)
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]  # same placeholders, other image: other block
    c = block_hashes([7] + tokens[1:], [(4, 4, b"image-a")], 4)
    assert c[1] != a[1]  # a block's hash depends on everything before it


def test_block_manager_reuses_freed_prefixes_lru():
    bm = BlockManager(4, 16)
    first = bm.allocate(2)
    bm.register(first[0], b"h0")
    bm.register(first[1], b"h1")
    bm.release(first)
    assert bm.num_free == 4 and bm.lookup([b"h0", b"h1", b"h2"]) == first
    bm.take(first[:1])  # a prefix hit takes the cached block back out of the free list
    assert bm.num_free == 3
    fresh = bm.allocate(3)  # evicts the other cached block, whose hash is forgotten
    assert fresh is not None and first[1] in fresh and bm.lookup([b"h0", b"h1"]) == first[:1]
    assert bm.allocate(1) is None


def test_chat_session_keeps_the_conversation_in_the_engine(tiny_ckpt, our_model, processors, reference_model):
    """`onevision chat`'s session: the second turn reuses the first turn's KV and image, and both answers equal
    transformers' greedy answers for the same conversations."""
    import io

    from onevision.cli import ChatSession, build_parser

    ours, ref = processors
    args = build_parser().parse_args(["chat", "--model", str(tiny_ckpt), "--max-new-tokens", "10"])
    session = ChatSession(our_model, ours, args)
    session.pending.append(("image", photo("cat.jpg")))
    out = io.StringIO()
    first = session.ask("What is this?", out)
    conv = [user(image("cat.jpg"), text="What is this?")]
    assert first == ref.decode(reference_tokens(reference_model, ref, conv, 10),
                                                                skip_special_tokens=True)
    tiles = session.engine.encoder.encoded_tiles
    second = session.ask("Tell me more.", out)
    conv += [{"role": "assistant", "content": [{"type": "text", "text": first}]}, user(text="Tell me more.")]
    assert second == ref.decode(reference_tokens(reference_model, ref, conv, 10), skip_special_tokens=True)
    assert session.engine.encoder.encoded_tiles == tiles  # the image was not encoded again
    assert session.engine.scheduler.prefix_hits >= 160  # the first turn's prompt (163 tokens) came from the cache


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt, on purpose
def test_chat_ctrl_c_dropped_inside_a_step_still_stops_the_answer(tiny_ckpt, our_model, processors,
                                                                  reference_model):
    """Python raises KeyboardInterrupt between any two bytecodes; one that lands in a finalizer is printed as
    "Exception ignored" and dropped (main: the chat answer then ran to its end). The session's loop also checks
    for Ctrl-C between steps: the answer stops, the cut turn is not kept, and the next turn equals transformers."""
    import io
    import signal

    from onevision.cli import ChatSession, build_parser

    class Finalizer:
        def __del__(self):  # Ctrl-C arriving here: the handler's KeyboardInterrupt is dropped by Python
            signal.raise_signal(signal.SIGINT)

    ours, ref = processors
    args = build_parser().parse_args(["chat", "--model", str(tiny_ckpt), "--max-new-tokens", "30"])
    session = ChatSession(our_model, ours, args)
    steps = []

    def step(original=session.engine.step):
        steps.append(original())
        if len(steps) == 3:
            Finalizer()  # collected at once, inside the step
        return steps[-1]

    session.engine.step = step
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        session.ask("Tell me a long story.", out)
    assert len(steps) == 3 and not session.engine.requests and session.messages == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    del session.engine.step  # the engine's own step again
    answer = session.ask("What is shown here?", out)
    assert answer == ref.decode(reference_tokens(reference_model, ref, [user(text="What is shown here?")], 30),
                                skip_special_tokens=True)


def test_precomputed_vision_features_give_the_reference_logits(our_model, reference_model, processors):
    """The vision stage on its own: encode_images / encode_videos outputs passed to forward and generate."""
    ours = processors[0]
    conv = [user(image("cat.jpg"), {"type": "video", "video": frames(3, 2)})]
    inputs = ours.apply_chat_template(conv, **KW)
    with torch.no_grad():
        ref = reference_model(**inputs).logits
        images = our_model.model.encode_images(inputs["pixel_values"], inputs["image_sizes"],
                                               inputs.get("batch_num_images"))
        videos = our_model.model.encode_videos(inputs["pixel_values_videos"])
        ours_logits = our_model(input_ids=inputs["input_ids"], image_features=images, video_features=videos).logits
    assert torch.equal(ours_logits, ref)
    ids = our_model.generate(input_ids=inputs["input_ids"], image_features=images, video_features=videos,
                             max_new_tokens=6, do_sample=False)
    assert torch.equal(ids, reference_model.generate(**inputs, max_new_tokens=6, do_sample=False))


def test_async_engine_computes_with_the_threads_it_was_given(our_model, processors, reference_model):
    # `onevision serve` keeps one intra-op thread on its main thread and gives the process's count to the engine
    # thread (cpu.reserve_threads_for_engine): the engine thread must set it, not inherit torch's default
    import threading

    from onevision.engine import AsyncEngine

    ours = processors[0]
    conv = [user(text="Hi there")]
    inputs = ours.apply_chat_template(conv, **KW)
    before = torch.get_num_threads()
    for threads in (1, None):
        engine = Engine(our_model, ours)
        seen = []
        engine.runner.logits_hook = lambda seqs, logits: seen.append(torch.get_num_threads())
        runner = AsyncEngine(engine, threads=threads)
        done = threading.Event()
        outputs = []
        runner.add("r", inputs, greedy(6), lambda out: (outputs.append(out), out.finished and done.set()))
        assert done.wait(60)
        runner.shutdown()
        assert seen and set(seen) == {threads or before}
        assert outputs[-1].outputs[0].token_ids == reference_tokens(reference_model, processors[1], conv, 6)
    assert torch.get_num_threads() == before  # the caller's own setting is untouched
