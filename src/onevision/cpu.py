"""What this CPU does fast: the one place that decides dtype advice for CPUs."""

from __future__ import annotations

import functools


@functools.cache
def fp16_is_slow() -> bool:
    """True when this CPU has no fast float16 arithmetic (oneDNN has no fp16 kernels for it: AVX512-FP16/AMX-FP16)."""
    import torch

    try:
        return not torch.ops.mkldnn._is_mkldnn_fp16_supported()
    except (AttributeError, RuntimeError):
        return True
