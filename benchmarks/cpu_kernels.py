"""Kernel rates on this CPU: dense GEMM (M=2048) and GEMV (M=1) per dtype, int8pack/int4pack with bf16 activations.

    PYTHONPATH=src python benchmarks/cpu_kernels.py
Prints GFLOP/s (GEMM) and weight GB/s (GEMV, weights rotated past the L3), the CPU flags and the load average.
"""
from __future__ import annotations

import os
import time

import torch

from onevision import cpu


def best(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    caps = cpu.probe()
    print(f"cpu: {caps}  flags: {' '.join(cpu.cpu_flags())}  load: {os.getloadavg()}  threads: {torch.get_num_threads()}")
    n, k, m = 4864, 896, 2048
    copies = 24  # 24 x 896x4864 fp32 = 418 MB > L3
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = torch.randn(n, k).to(dtype)
        x = torch.randn(m, k).to(dtype)
        t = best(lambda: torch.nn.functional.linear(x, w), 3)
        ws = [torch.randn(n, k).to(dtype) for _ in range(copies)]
        v = torch.randn(1, k).to(dtype)
        tv = best(lambda: [torch.nn.functional.linear(v, wi) for wi in ws], 3) / copies
        print(f"{str(dtype):15s} GEMM {2 * m * n * k / t / 1e9:7.0f} GFLOP/s   GEMV {n * k * w.element_size() / tv / 1e9:6.1f} GB/s")
    w = torch.randn(n, k)
    wp = torch.ops.mkldnn._reorder_linear_weight(w, m)
    x = torch.randn(m, k)
    t = best(lambda: torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], ""), 3)
    print(f"fp32 oneDNN prepacked GEMM {2 * m * n * k / t / 1e9:7.0f} GFLOP/s")
    for name in ("int8", "int4"):
        packs = [cpu.pack_weight(torch.randn(n, k, dtype=torch.bfloat16), name) for _ in range(copies)]
        xb = torch.randn(m, k, dtype=torch.bfloat16)
        vb = torch.randn(1, k, dtype=torch.bfloat16)
        t = best(lambda: cpu.packed_matmul(xb, packs[0]), 3)
        tv = best(lambda: [cpu.packed_matmul(vb, p) for p in packs], 3) / copies
        nbytes = n * k * (1 if name == "int8" else 0.5)
        print(f"{name}pack bf16 act  GEMM {2 * m * n * k / t / 1e9:7.0f} GFLOP/s   GEMV {nbytes / tv / 1e9:6.1f} GB/s (weight bytes)")
    big = torch.ones(256 * 1024**2)
    t = best(lambda: big.sum(), 5)
    print(f"DRAM read (sum over 1 GiB) {big.numel() * 4 / t / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
