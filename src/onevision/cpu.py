"""CPU compute paths: probe the CPU once, choose per dtype, swap nn.Linear layers after loading.

The model's forward structure is untouched: only `nn.Linear` modules are replaced (by `Fp16ViaFloat32Linear`,
`Int8Linear`, `Int4Linear`), so the same Qwen2/SigLIP modules serve single requests and batched decode.

* float32 and bfloat16: plain `F.linear` (oneDNN/MKL already run bf16 at the bf16 GEMM rate where the CPU has
  bf16 arithmetic); bit-identical to transformers.
* float16 on a CPU without fast fp16 arithmetic (`torch.ops.mkldnn._is_mkldnn_fp16_supported()` False): fp16 GEMMs
  fall back to a slow loop (~20 GFLOP/s), so weights stay fp16 in memory and each Linear computes in float32,
  rounding its output back to fp16. `compute="reference"` keeps transformers' native fp16 numerics.
* int8 / int4 weight-only (torchao configs, see quantization.py): packed once, run through
  `torch._weight_int8pack_mm` / `torch._weight_int4pack_mm_for_cpu` with bf16 activations, the only activation
  dtype with vectorised CPU kernels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

COMPUTE_MODES = ("auto", "reference")
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


@functools.cache
def probe() -> dict[str, object]:
    """What this CPU offers, as PyTorch reports it at run time (cached: one probe per process)."""
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "fp16": bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())}


def fp16_is_slow() -> bool:
    """True when this CPU has no fast float16 arithmetic (drives the one-time fp16-on-CPU warning)."""
    return not probe()["fp16"]


def cpu_flags() -> list[str]:
    """The ISA flags that matter here, from /proc/cpuinfo (empty off Linux): for benchmark logs."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return []
    present = set(line.split())
    return [f for f in _FLAGS if f in present]


def fp16_compute_dtype(caps: dict[str, object], compute: str) -> torch.dtype:
    """Dtype the float16 linears compute in: native fp16 where the CPU has it (or compute="reference"), else fp32
    (closer to the fp32 result than fp16 arithmetic is, and at the fp32 GEMM rate instead of the fp16 loop's)."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
    return torch.float16 if compute == "reference" or caps["fp16"] else torch.float32


class Fp16ViaFloat32Linear(nn.Linear):
    """fp16 weights in memory, fp32 arithmetic: y = fp16(x.float() @ W.float().T + b.float())."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    model.set_submodule(name, new)


def apply_compute_paths(model: nn.Module, compute: str = "auto", caps: dict[str, object] | None = None) -> list[str]:
    """After loading on CPU: give float16 linears the fp32-compute path when the CPU lacks fp16 arithmetic.
    Returns the names of the swapped modules (none for fp32/bf16, or with compute="reference")."""
    caps = probe() if caps is None else caps
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module.weight.dtype != torch.float16 or module.weight.device.type != "cpu":
            continue
        if fp16_compute_dtype(caps, compute) == torch.float16:
            continue
        module.__class__ = Fp16ViaFloat32Linear  # same parameters, new forward
        swapped.append(name)
    return swapped


# -- weight-only int8 / int4 ------------------------------------------------------------------------------------
class Int8Linear(nn.Module):
    """Per-output-channel symmetric int8 weight (torchao's Int8WeightOnlyConfig bits) -> _weight_int8pack_mm."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qdata.shape
        self.register_buffer("qdata", qdata)  # (N, K) int8
        self.register_buffer("scale", scale.reshape(-1).float())  # (N,) float32, torchao's scale
        self.register_buffer("ones", torch.ones(self.out_features, dtype=torch.bfloat16), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., K) -> (..., N); the kernel is vectorised for bf16 activations only. Like torchao's eager path,
        # the bf16 product is scaled in float32 (a bf16-rounded scale inside the kernel would add error)
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.qdata, self.ones)
        y = (y * self.scale).reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """Grouped asymmetric int4 weight in the CPU tinygemm layout (torchao's Int4OpaqueTensor) ->
    _weight_int4pack_mm_for_cpu."""

    def __init__(self, qdata: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, in_features: int,
                 out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qdata", qdata)  # (N, K/2) uint8, packed
        self.register_buffer("scale_and_zero", scale_and_zero)  # (K/g, N, 2) bf16
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16), self.qdata,
                                              self.group_size, self.scale_and_zero)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


def pack_weight(weight: torch.Tensor, kind: str, group_size: int = 128) -> nn.Module:
    """A (N, K) weight -> its Int8Linear / Int4Linear, quantized by torchao (so the bits are torchao's)."""
    from onevision.quantization import torchao_quantize_linear

    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return torchao_quantize_linear(layer, kind, group_size)


def packed_matmul(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return module(x)
