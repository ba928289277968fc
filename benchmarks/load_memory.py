"""Peak memory and time of loading a checkpoint: onevision next to transformers, each in a fresh process
(peak RSS cannot be reset between two loads in one process on every kernel), printed side by side.

    .venv/bin/python benchmarks/load_memory.py --size 0.5b --dtype float16    # the hub's dtype
    .venv/bin/python benchmarks/load_memory.py --size 0.5b --dtype float32

The checkpoint (random weights, built by transformers, hub layout) is cached in $ONEVISION_BENCH_CACHE.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from common import checkpoint, default_cache

CHILD = r"""
import json, sys, time, torch
which, folder, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
if which == "onevision":
    from onevision import LlavaOnevisionForConditionalGeneration as M
else:
    from transformers import LlavaOnevisionForConditionalGeneration as M
import_rss = rss("VmRSS:")
t = time.perf_counter()
model = M.from_pretrained(folder, dtype=dtype)
seconds = time.perf_counter() - t
with torch.no_grad():  # touch every page: memory-mapped weights count once they are resident
    for p in model.parameters():
        p.view(-1)[::512].sum()
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps(dict(load_s=seconds, peak_mb=rss("VmHWM:") - import_rss, rss_mb=rss("VmRSS:") - import_rss,
                      weights_mb=weights)))
"""


def measure(which: str, folder: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(folder), dtype], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "0.5b"], default="0.5b")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    folder = checkpoint(args.size, default_cache(), getattr(torch, args.dtype))
    rows = {name: measure(name, folder, args.dtype) for name in ("onevision", "transformers")}
    print(f"\nloading the {args.size} checkpoint as {args.dtype} on CPU (memory above the interpreter + imports)")
    print(f"{'':14}{'load s':>9}{'weights MB':>12}{'peak MB':>10}{'peak/weights':>14}{'after MB':>10}")
    for name, r in rows.items():
        print(f"{name:14}{r['load_s']:9.2f}{r['weights_mb']:12.0f}{r['peak_mb']:10.0f}"
              f"{r['peak_mb'] / r['weights_mb']:14.2f}{r['rss_mb']:10.0f}")
    ours, theirs = rows["onevision"], rows["transformers"]
    print(f"ratio transformers/onevision: load time {theirs['load_s'] / ours['load_s']:.2f}x, "
          f"peak memory {theirs['peak_mb'] / ours['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
