"""Peak memory of loading a 0.5B-shaped LLaVA-OneVision checkpoint: fp32, fp16, bitsandbytes 8-bit and 4-bit (nf4),
onevision next to transformers. Random weights at the real llava-onevision-qwen2-0.5b-ov shapes (SPEC §1: SigLIP
26x1152, Qwen2 24x896, vocab 152000, tied embeddings, fp16 on disk), built once with transformers.

Every load runs in a fresh subprocess; this process samples the child's /proc/<pid>/status every 2 ms:

  peak anon   max RssAnon: the process's own memory (what quantizing while streaming keeps small)
  peak RSS    VmHWM: RssAnon + RssFile, i.e. also the resident pages of the memory-mapped safetensors file (page cache that the kernel
              can drop; both loaders map the whole 1.8 GB file)
  after load  RssAnon once from_pretrained has returned
  weights     bytes of the model's tensors (packed 4-bit data and quantization statistics included)

All figures are above the child's memory after `import torch, <library>, bitsandbytes` ("base": its RssAnon then).

    python benchmarks/quantized_memory.py [--folder /tmp/ov-0.5b-random] [--modes fp32,fp16,int8,nf4] [--impls ours,reference]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

MODES = {  # name -> (from_pretrained kwargs as source text, quantization config kwargs or None)
    "fp32": ("dtype=torch.float32", None),
    "fp16": ("dtype='auto'", None),
    "int8": ("", dict(load_in_8bit=True)),
    "nf4": ("", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float16")),
}


def config_dict() -> dict:
    return dict(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                           hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=152000, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
                         rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645),
        image_token_index=151646, video_token_index=151647, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True,
        image_grid_pinpoints=[[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)],
    )


BUILD = """
import json, sys, torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
torch.manual_seed(0)
with torch.device("meta"):
    model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**json.loads(sys.argv[2])))
model = model.to_empty(device="cpu")
model.tie_weights()
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
model = model.half()
model.config.dtype = torch.float16
model.save_pretrained(sys.argv[1])
print(sum(p.numel() for p in model.parameters()))
"""

CHILD = """
import gc, json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads({threads})
impl, folder = {impl!r}, {folder!r}
if impl == "ours":
    from onevision import LlavaOnevisionForConditionalGeneration as Model, BitsAndBytesConfig as Config
else:
    from transformers import LlavaOnevisionForConditionalGeneration as Model, BitsAndBytesConfig as Config
    from transformers.utils import logging
    logging.set_verbosity_error(); logging.disable_progress_bar()
quant = {quant!r}
if quant is not None:
    import bitsandbytes  # noqa: F401  (in the base figure, like torch)

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {{k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "RssAnon", "RssFile")}}

gc.collect()
base = status()
print("READY", flush=True)
sys.stdin.readline()
t = time.perf_counter()
kwargs = dict({kwargs})
if quant is not None:
    kwargs["quantization_config"] = Config(**quant)
model = Model.from_pretrained(folder, device_map="cpu", **kwargs)
seconds = time.perf_counter() - t
gc.collect()
after = status()
from onevision.quantization import quantized_footprint
print("RESULT " + json.dumps(dict(base=base, after=after, seconds=seconds, weights=quantized_footprint(model))), flush=True)
"""


def build(folder: Path) -> None:
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        return
    t = time.perf_counter()
    print(f"building the 0.5B-shaped random checkpoint in {folder} ...", file=sys.stderr, flush=True)
    out = subprocess.run([sys.executable, "-c", BUILD, str(folder), json.dumps(config_dict())], check=True,
                         capture_output=True, text=True)
    print(f"  {int(out.stdout.split()[-1]) / 1e6:.0f}M parameters, {time.perf_counter() - t:.0f} s", file=sys.stderr)


def measure(impl: str, mode: str, folder: Path, threads: int) -> dict:
    kwargs, quant = MODES[mode]
    code = CHILD.format(impl=impl, folder=str(folder), quant=quant, kwargs=kwargs, threads=threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    line = child.stdout.readline()
    if not line.startswith("READY"):
        raise RuntimeError(f"{impl} {mode}: {line}{child.stderr.read()}")
    peak_anon = 0
    proc = f"/proc/{child.pid}/status"
    child.stdin.write("\n")
    child.stdin.flush()
    while child.poll() is None:
        try:
            with open(proc) as f:
                for field in f:
                    if field.startswith("RssAnon:"):
                        peak_anon = max(peak_anon, int(field.split()[1]) * 1024)
                        break
        except (FileNotFoundError, ProcessLookupError, ValueError):
            break
        time.sleep(0.002)
    out, err = child.communicate()
    result = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if child.returncode != 0 or not result:
        raise RuntimeError(f"{impl} {mode} failed:\n{err[-3000:]}")
    r = json.loads(result[0][len("RESULT "):])
    base = r["base"]["RssAnon"]
    return dict(impl=impl, mode=mode, seconds=r["seconds"], base=base, peak_anon=max(peak_anon, r["after"]["RssAnon"]) - base,
                peak_rss=r["after"]["VmHWM"] - base - r["base"]["RssFile"], after=r["after"]["RssAnon"] - base, weights=r["weights"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default="/tmp/ov-0.5b-random", type=Path)
    parser.add_argument("--modes", default="fp32,fp16,int8,nf4")
    parser.add_argument("--impls", default="ours,reference")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    build(args.folder)
    rows = []
    gib = 2**30
    print(f"{'impl':<10} {'mode':<5} {'load s':>7} {'peak anon GiB':>14} {'peak RSS GiB':>13} {'after GiB':>10} "
          f"{'weights GiB':>12} {'base GiB':>9}")
    for mode in args.modes.split(","):
        for impl in args.impls.split(","):
            r = measure(impl, mode, args.folder, args.threads)
            rows.append(r)
            print(f"{impl:<10} {mode:<5} {r['seconds']:>7.1f} {r['peak_anon'] / gib:>14.2f} {r['peak_rss'] / gib:>13.2f} "
                  f"{r['after'] / gib:>10.2f} {r['weights'] / gib:>12.2f} {r['base'] / gib:>9.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(textwrap.dedent("""
        peak anon: max RssAnon during from_pretrained; peak RSS: VmHWM (adds the mapped safetensors pages);
        after: RssAnon once loaded; all above the post-import base. int8/nf4 load with dtype='auto' (fp16 here)
        for the unquantized tensors, like the model doc's call; nf4 uses bnb_4bit_compute_dtype=float16."""))


if __name__ == "__main__":
    main()
