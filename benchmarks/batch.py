"""`onevision batch` next to a sequential loop of transformers' generate on the same requests, and the same job
on a local Ray cluster with 1 and 2 engine replicas: requests/s and generated tokens/s.

    .venv/bin/python benchmarks/batch.py --size tiny            # seconds
    .venv/bin/python benchmarks/batch.py --size 0.5b            # real 0.5B shapes, random weights (minutes)
    .venv/bin/python benchmarks/batch.py --size both --requests 64 --image-share 0.5

The requests (64 by default) mix text prompts of several lengths with image prompts (small images, base64 data
URIs), all greedy with max_tokens new tokens, so every answer can be checked against transformers' (reported as
"same answers"). The local run gets an engine already loaded; the Ray runs include starting the actors and loading
a model in each (what a user waits for). Ray's CPUs are logical here (the machine may have fewer cores).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, checkpoint, default_cache

MEDIA = ROOT / "tests" / "fixtures" / "media"


def request_lines(count: int, image_share: float, image_size: int, max_tokens: int) -> list[tuple[str, dict, list]]:
    """(custom_id, body, PIL images) for `count` requests; every 1/image_share-th one has an image."""
    import base64

    from PIL import Image

    names = ["cat.jpg", "rocket.jpg", "coffee.jpg", "camera_gray.png", "logo_rgba.png"]
    images = []
    for name in names:
        image = Image.open(MEDIA / name).convert("RGB")
        image.thumbnail((image_size, image_size))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        images.append((image, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()))
    every = max(1, round(1 / image_share)) if image_share > 0 else 0
    out = []
    for i in range(count):
        text = f"Request {i}: describe " + "the sea, the sky and the hills, " * (1 + i % 6)
        if every and i % every == 0:
            image, uri = images[i % len(images)]
            content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": text}]
            pil = [image]
        else:
            content, pil = [{"type": "text", "text": text}], []
        body = {"model": "bench", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "temperature": 0}
        out.append((f"req-{i:03d}", body, pil))
    return out


def transformers_loop(folder: Path, requests: list, max_tokens: int) -> tuple[float, int, dict]:
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    texts, tokens = {}, 0
    start = time.perf_counter()
    for custom_id, body, images in requests:
        content = [{"type": "image"} if c["type"] == "image_url" else c for c in body["messages"][0]["content"]]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(text=prompt, images=[images] if images else None, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_tokens)
        new = out[0, inputs["input_ids"].shape[1]:]
        tokens += len(new)
        texts[custom_id] = processor.tokenizer.decode(new, skip_special_tokens=True)
    return time.perf_counter() - start, tokens, texts


def answers(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["error"] is None:
            out[record["custom_id"]] = record["response"]["body"]["choices"][0]["message"]["content"]
    return out


def bench(size: str, args) -> list[tuple]:
    from onevision.batch import load_engine, run
    from onevision.server.app import ServerConfig

    folder = checkpoint(size, default_cache(), torch.float32)
    requests = request_lines(args.requests, args.image_share, args.image_size, args.max_tokens)
    work = Path(tempfile.mkdtemp(prefix="onevision-batch-bench-"))
    source = work / "requests.jsonl"
    source.write_text("".join(json.dumps({"custom_id": c, "method": "POST", "url": "/v1/chat/completions",
                                          "body": b}) + "\n" for c, b, _ in requests))
    config = ServerConfig(model_name=None)
    engine_kwargs = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                     "kv_cache_memory": args.kv_cache_mib << 20}
    rows = []
    print(f"[{size}] transformers loop ...", flush=True)
    seconds, tokens, reference = transformers_loop(folder, requests, args.max_tokens)
    rows.append((size, "transformers generate, sequential", seconds, None, tokens, len(requests)))
    print(f"[{size}] onevision batch ...", flush=True)
    engine = load_engine(str(folder), dtype="float32", device="cpu", **engine_kwargs)
    summary = run(str(source), str(work / "local.jsonl"), engine=engine, config=config, progress=False)
    same = sum(answers(work / "local.jsonl").get(k) == v for k, v in reference.items())
    rows.append((size, "onevision batch", summary.seconds, summary.first_record_seconds, summary.completion_tokens,
                 same))
    del engine
    if args.ray:
        import ray

        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        try:
            for replicas in (1, 2):
                print(f"[{size}] onevision batch --ray, {replicas} replica(s) ...", flush=True)
                out = work / f"ray{replicas}.jsonl"
                start = time.perf_counter()
                summary = run(str(source), str(out), model=str(folder), config=config, dtype="float32",
                              progress=False, ray=True, ray_replicas=replicas,
                              ray_num_cpus=max(1.0, (args.ray_cpus - 1) / replicas), ray_prepare_cpus=0.5,
                              ray_batch_size=args.ray_batch_size, engine_kwargs=engine_kwargs)
                seconds = time.perf_counter() - start
                same = sum(answers(out).get(k) == v for k, v in reference.items())
                rows.append((size, f"onevision batch --ray, {replicas} replica(s)", seconds,
                             summary.first_record_seconds, summary.completion_tokens, same))
        finally:
            ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "0.5b", "both"], default="tiny")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--image-share", type=float, default=0.5, help="share of requests with an image")
    parser.add_argument("--image-size", type=int, default=96, help="longest image side in pixels")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache per engine in MiB")
    parser.add_argument("--no-ray", dest="ray", action="store_false")
    parser.add_argument("--ray-cpus", type=int, default=3, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--ray-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for size in (["tiny", "0.5b"] if args.size == "both" else [args.size]):
        rows += bench(size, args)
    print(f"\n{args.requests} requests ({args.image_share:.0%} with a {args.image_size}px image), greedy, max_tokens "
          f"{args.max_tokens}; {torch.get_num_threads()} torch threads; requests/s and generated tokens/s over wall "
          "time")
    print("| size | run | seconds | first record at s | requests/s | tokens/s | same answers as transformers |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for size, name, seconds, first, tokens, same in rows:
        first = "" if first is None else f"{first:.1f}"
        print(f"| {size} | {name} | {seconds:.1f} | {first} | {args.requests / seconds:.2f} | "
              f"{tokens / seconds:.1f} | {same}/{args.requests} |")


if __name__ == "__main__":
    main()
