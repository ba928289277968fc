"""Per-kernel rates on this CPU, side by side in one run: every linear path onevision can take, at decode sizes
(M = 1..16 rows: one sequence, or the engine's batched decode) and at a prefill size (M = 512).

    PYTHONPATH=src python benchmarks/cpu_kernels.py [--ms 1,2,4,8,16,512] [--shape 896x4864] [--threads N]

Rows: fp32 / bf16 `F.linear`; int8 weight-only through `_weight_int8pack_mm` with bf16 or fp32 activations, or
dequantized per call to fp32 / bf16 then `F.linear`; int4 (g128) through `_weight_int4pack_mm_for_cpu` with bf16
or fp32 activations, or dequantized per call to fp32; and onevision's Int8Linear / Int4Linear as cpu.py set them
up on this CPU (bf16 activations in, as in a bf16 model). Each cell is the best of a few repeats of one call in microseconds, weights rotated through
more than twice the L3 so that decode sizes read them from DRAM; the last line gives GFLOP/s at the largest M and
the weight GB/s at M=1. Prints the CPU flags, onevision's probe, what cpu.py chooses, and the load average.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from onevision import cpu


def l3_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            s = f.read().strip()
        return int(s[:-1]) * {"K": 1 << 10, "M": 1 << 20}[s[-1]]
    except (OSError, KeyError, ValueError):
        return 64 << 20


CLOCK = time.perf_counter


def timed(fn, args_list, reps: int) -> float:
    """Best over `reps` passes of the mean time per call over args_list (a rotation of weight copies)."""
    fn(*args_list[0])
    best = float("inf")
    for _ in range(reps):
        t = CLOCK()
        for a in args_list:
            fn(*a)
        best = min(best, (CLOCK() - t) / len(args_list))
    return best


def variants(n: int, k: int, copies: int):
    """name -> (fn(x, w), x dtype, [weights...], weight bytes). Weights are quantized by torchao (cpu.pack_weight)."""
    g = torch.Generator().manual_seed(0)
    dense = [torch.randn(n, k, generator=g) for _ in range(copies)]
    out = {"fp32 F.linear": (F.linear, torch.float32, dense, 4),
           "bf16 F.linear": (F.linear, torch.bfloat16, [w.bfloat16() for w in dense], 2)}
    i8 = [cpu.pack_weight(w.bfloat16(), "int8") for w in dense]
    i8w = [(m.qdata, m.scale) for m in i8]
    ones16 = torch.ones(n, dtype=torch.bfloat16)
    out["int8pack bf16-act"] = (lambda x, w: torch._weight_int8pack_mm(x, w[0], ones16) * w[1], torch.bfloat16, i8w, 1)
    out["int8pack fp32-act"] = (lambda x, w: torch._weight_int8pack_mm(x, w[0], w[1]), torch.float32, i8w, 1)
    out["int8 deq->fp32 F.linear"] = (lambda x, w: F.linear(x, w[0].float()) * w[1], torch.float32, i8w, 1)
    out["int8 deq->bf16 F.linear"] = (lambda x, w: F.linear(x, w[0].bfloat16()) * w[1], torch.bfloat16, i8w, 1)
    i4 = [cpu.pack_weight(w.bfloat16(), "int4") for w in dense]
    i4w = [(m.qdata, m.scale_and_zero) for m in i4]
    out["int4pack bf16-act"] = (lambda x, w: torch._weight_int4pack_mm_for_cpu(x, w[0], 128, w[1]), torch.bfloat16,
                                i4w, 0.5)
    i4d = [(m, None) for m in i4]
    out["int4 deq->fp32 F.linear"] = (lambda x, w: F.linear(x, w[0].dequantize()), torch.float32, i4d, 0.5)
    i4w32 = [(q, sz.float()) for q, sz in i4w]  # the kernel wants the scales in the activation dtype
    out["int4pack fp32-act"] = (lambda x, w: torch._weight_int4pack_mm_for_cpu(x, w[0], 128, w[1]), torch.float32,
                                i4w32, 0.5)
    # what onevision runs: the modules as cpu.py set them up on this CPU (packed or dequantized, by rows)
    out["onevision Int8Linear"] = (lambda x, w: w[0](x), torch.bfloat16, [(m, None) for m in i8], 1)
    out["onevision Int4Linear"] = (lambda x, w: w[0](x), torch.bfloat16, i4d, 0.5)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", default="1,2,4,8,16,64,512")
    parser.add_argument("--shape", default="896x4864", help="K x N of the linear (Qwen2-0.5B's up_proj by default)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU time, which other processes' load does not stretch (use with "
                             "--threads 1: with more threads it also counts OpenMP spin-waits)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    ms = [int(m) for m in args.ms.split(",")]
    k, n = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    print(f"CPU flags: {' '.join(cpu.cpu_flags())}  probe: {cpu.probe()}  threads: {torch.get_num_threads()}  "
          f"L3: {l3_bytes() >> 20} MiB")
    if hasattr(cpu, "quant_plan"):
        print(f"cpu.py chooses: int8 -> {cpu.quant_plan('int8')}; int4 -> {cpu.quant_plan('int4')}")
    print(f"load average before: {os.getloadavg()}")
    rotate = 2 * l3_bytes()
    copies = max(2, -(-rotate // (n * k * 4)))  # fp32 copies: the int8/int4 copies are the same weights packed
    table = variants(n, k, copies)
    head = " | ".join(f"M={m}" for m in ms)
    print(f"\nlinear {k}->{n}, µs per call ({args.clock} clock; weights rotated over {copies} copies; fp32 {copies * n * k * 4 >> 20} MiB)")
    print(f"| kernel | {head} | GFLOP/s at M={ms[-1]} | GB/s at M={ms[0]} |")
    print("|---|" + "---|" * (len(ms) + 2))
    for name, (fn, xdtype, ws, bpe) in table.items():
        cells = []
        for m in ms:
            x = torch.randn(m, k).to(xdtype)
            # the slow scalar paths take milliseconds a call: fewer copies, as DRAM is not their limit
            first = timed(fn, [(x, ws[0])], 1)
            use = ws if first < 2e-3 else ws[:2]
            reps = args.reps if first < 0.2 else 1
            cells.append(timed(fn, [(x, w) for w in use], reps))
        gflops = 2 * ms[-1] * n * k / cells[-1] / 1e9
        gbs = n * k * bpe / cells[0] / 1e9
        print(f"| {name} | " + " | ".join(f"{c * 1e6:.0f}" for c in cells) + f" | {gflops:.0f} | {gbs:.1f} |",
              flush=True)
    big = torch.ones(256 * 1024**2)
    t = timed(lambda: big.sum(), [()], 5)
    print(f"\nDRAM read (sum over 1 GiB) {big.numel() * 4 / t / 1e9:.1f} GB/s; load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
