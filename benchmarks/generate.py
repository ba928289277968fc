"""Our generate() next to transformers' on the same checkpoint, in one run: load time, time to first token,
decode tokens/s (timed token by token through a streamer), peak memory, and the ratios.

    .venv/bin/python benchmarks/generate.py --size tiny          # seconds, CPU
    .venv/bin/python benchmarks/generate.py --size 0.5b          # real 0.5B shapes, random weights
    .venv/bin/python benchmarks/generate.py --size 0.5b --device cuda --dtype float16

Greedy decoding of an image prompt (one 640x480-equivalent anyres image) with max_new_tokens new tokens.
Both implementations produce the same tokens (checked here too).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from common import Timer, checkpoint, default_cache, peak_mb, reset_peak


def image_inputs(folder, device, dtype):
    from transformers import AutoProcessor
    from PIL import Image
    import numpy as np

    processor = AutoProcessor.from_pretrained(folder)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}


class TimingStreamer:
    """Records when each new token arrives (both generate()s hand every token to streamer.put)."""

    def __init__(self):
        self.start, self.times, self.prompt_seen = time.perf_counter(), [], False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def run(name, load, inputs, device, new_tokens, repeats):
    gc.collect()
    reset_peak()
    with Timer(device) as t_load:
        model = load()
    load_peak = peak_mb(device)
    best = None
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
        for _ in range(repeats):
            streamer = TimingStreamer()
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                 streamer=streamer)
            ttft = streamer.times[0] - streamer.start
            decode_tps = (len(streamer.times) - 1) / (streamer.times[-1] - streamer.times[0])
            if best is None or ttft + 1 / decode_tps < best[0] + 1 / best[1]:
                best = (ttft, decode_tps)
    run_peak = peak_mb(device)
    del model
    gc.collect()
    return dict(name=name, load_s=t_load.seconds, ttft_s=best[0], decode_tps=best[1], load_peak_mb=load_peak,
                run_peak_mb=run_peak, tokens=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "0.5b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    folder = checkpoint(args.size, default_cache(), dtype)
    inputs = image_inputs(folder, device, dtype)

    from transformers import LlavaOnevisionForConditionalGeneration as Theirs

    from onevision import LlavaOnevisionForConditionalGeneration as Ours

    results = [
        run("onevision", lambda: Ours.from_pretrained(folder, dtype=dtype, device_map=device), inputs, device,
            args.new_tokens, args.repeats),
        run("transformers", lambda: Theirs.from_pretrained(folder, dtype=dtype, device_map=device).eval(), inputs,
            device, args.new_tokens, args.repeats),
    ]
    ours, theirs = results
    same = torch.equal(ours.pop("tokens").cpu(), theirs.pop("tokens").cpu())
    print(f"\n{args.size} checkpoint, {args.dtype} on {device} ({torch.get_num_threads()} threads), prompt "
          f"{inputs['input_ids'].shape[1]} tokens, {args.new_tokens} new tokens; identical tokens: {same}")
    print(f"{'':14}{'load s':>9}{'TTFT s':>9}{'decode tok/s':>14}{'load peak MB':>14}{'run peak MB':>13}")
    for r in results:
        print(f"{r['name']:14}{r['load_s']:9.2f}{r['ttft_s']:9.3f}{r['decode_tps']:14.1f}"
              f"{r['load_peak_mb']:14.0f}{r['run_peak_mb']:13.0f}")
    print(f"{'speed-up':14}{theirs['load_s'] / ours['load_s']:8.2f}x{theirs['ttft_s'] / ours['ttft_s']:8.2f}x"
          f"{ours['decode_tps'] / theirs['decode_tps']:13.2f}x   (transformers / onevision time; decode ours / theirs)")
    if device.type == "cpu":
        print("note: CPU peak memory is process RSS, reset before each load; the second load reuses freed pages.")


if __name__ == "__main__":
    main()
