"""CPU compute paths: probe the CPU once, choose per dtype, swap nn.Linear layers after loading.

The model's forward structure is untouched: only `nn.Linear` modules are replaced (by `Fp16ViaFloat32Linear`,
`PackedLinear`, `Int8Linear`, `Int4Linear`), so the same Qwen2/SigLIP modules serve single requests and batched
decode.

* float32 and bfloat16: plain `F.linear` (oneDNN/MKL already run bf16 at the bf16 GEMM rate where the CPU has
  bf16 arithmetic); bit-identical to transformers.
* float16 on a CPU without fast fp16 arithmetic (`torch.ops.mkldnn._is_mkldnn_fp16_supported()` False): fp16 GEMMs
  fall back to a slow loop (~20 GFLOP/s), so weights stay fp16 in memory and each Linear computes in float32,
  rounding its output back to fp16. `compute="reference"` keeps transformers' native fp16 numerics.
* float32 in the serving engine: every Linear also keeps a oneDNN-packed weight (`PackedLinear`; q/k/v and
  gate/up one concatenated weight each, `PackedGroup`), used for 3+ rows inside the engine's steps
  (`packed_gemms`), where MKL's sgemm is slow on the few rows of batched decode.
* int8 / int4 weight-only (torchao configs, see quantization.py): packed once. Which kernel a call takes depends on
  the CPU (`quant_plan`) and on the rows it multiplies (M: 1..16 in decode, the prompt length in prefill):
  - `torch._weight_int8pack_mm` / `torch._weight_int4pack_mm_for_cpu` with bf16 activations for every M on a CPU
    with bf16 arithmetic (avx512_bf16 or AMX), and for decode (M < DEQUANT_FROM_ROWS) everywhere: their
    AVX-512/AVX2 tinygemm kernels exist for bf16 activations only (fp32 activations take a scalar loop, 3-25x
    slower, benchmarks/cpu_kernels.py) and need no bf16 arithmetic (bf16 -> fp32 by shifts, fp32 FMAs).
  - On a CPU without bf16 arithmetic, prefill (M >= DEQUANT_FROM_ROWS) dequantizes the weight to fp32 per call
    and runs fp32 `F.linear` (MKL/oneDNN fp32 GEMM): the tinygemm kernels run at ~50-70 GFLOP/s there against
    ~130 for fp32 GEMM, and the dequantization is cheap next to a many-row GEMM. Both accumulate in fp32 and
    round the product where the packed kernel does, so the two paths differ only in summation order.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import threading

import torch
import torch.nn.functional as F
from torch import nn

COMPUTE_MODES = ("auto", "reference")
_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
          "amx_bf16", "amx_int8", "amx_fp16")


# On a CPU without bf16 arithmetic, int8/int4 linears multiplying at least this many rows dequantize to fp32.
# Measured (benchmarks/cpu_kernels.py, 896->4864, AVX-512 Xeon without avx512_bf16): int8's dequantization costs
# ~2.5 ms, and fp32 GEMM beats the packed kernel from ~40 rows; int4's unpacking costs ~12 ms, so fp32 GEMM
# (~0.055 ms a row against the packed kernel's ~0.12) wins from ~180 rows (the engine's 256-token prompt chunks
# and the vision tower's 729-row patches take it). The engine's batched decode (up to 16
# sequences a step) stays on the packed kernels either way.
DEQUANT_FROM_ROWS = {"int8": 32, "int4": 192}


def _bf16_arithmetic() -> bool:
    """Native bf16 dot products (avx512_bf16, or AMX tiles, which come with amx_bf16). oneDNN reports bf16 as
    "supported" on any AVX-512 CPU, where it is emulated at ~1/4 of the fp32 GEMM rate; off x86 keep its word."""
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        c = torch.cpu
        return bool(getattr(c, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(c, "_is_amx_tile_supported", lambda: False)())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def probe() -> dict[str, object]:
    """What this CPU offers, as PyTorch reports it at run time (cached: one probe per process). "bf16": oneDNN
    runs bf16 (perhaps emulated); "bf16_fast": the CPU has bf16 arithmetic."""
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "bf16_fast": _bf16_arithmetic(),
            "fp16": bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())}


def quant_plan(kind: str, caps: dict[str, object] | None = None) -> dict[str, object]:
    """Kernel choice of the int8/int4 linears on this CPU: `dequant_from_rows` is the row count from which a call
    dequantizes to fp32 and runs fp32 F.linear (None: always the packed kernel with bf16 activations)."""
    if kind not in ("int8", "int4"):
        raise ValueError(f"kind must be int8 or int4, got {kind!r}")
    caps = probe() if caps is None else caps
    packed = f"_weight_{kind}pack_mm{'_for_cpu' if kind == 'int4' else ''}, bf16 activations"
    if caps.get("bf16_fast", caps["bf16"]) or (kind == "int4" and not int4_layout_known()):
        return {"decode": packed, "prefill": packed, "dequant_from_rows": None}
    return {"decode": packed, "prefill": "dequantize to fp32, F.linear",
            "dequant_from_rows": DEQUANT_FROM_ROWS[kind]}


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


NATIVE_FP16_MAX_ROWS = 4  # decode-sized calls keep fp16 arithmetic (below)


class Fp16ViaFloat32Linear(nn.Linear):
    """fp16 weights in memory, fp32 arithmetic: y = fp16(x.float() @ W.float().T + b.float()) for calls of more
    than NATIVE_FP16_MAX_ROWS rows. Decode-sized calls (1-4 rows) are memory-bound: the native fp16 GEMV reads half
    the bytes and converts nothing, so they keep transformers' own fp16 arithmetic (bit for bit). Measured on a
    2-core AVX-512 Xeon without fp16 arithmetic, Qwen2-0.5B's 24 layers of linears: 1 row 49 ms native against
    192 via fp32, 2 rows 73 / 142, 4 rows 134 / 176; prefill-sized calls take the fp32 path (~10x faster)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= NATIVE_FP16_MAX_ROWS * self.in_features:
            return F.linear(x, self.weight, self.bias)
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


# -- threads ------------------------------------------------------------------------------------------------------
# libgomp (PyTorch's OpenMP) keeps its workers spinning between parallel regions only while the process has no more
# OpenMP threads than CPUs. Every thread that starts parallel regions gets a worker pool of its own, so a model that
# computes on one thread after another thread has run parallel regions too (loading on the main thread) makes the
# pools sleep between regions, and the engine's thousands of small regions per step then wait on wake-ups: decode
# steps measured 25-30% slower on a 2-core Xeon. (Lowering helper threads with torch.set_num_threads(1) is worse:
# the server's decode got 1.6x slower, so media threads keep torch's default.)
def reserve_threads_for_engine() -> int:
    """For a process whose model computes on a thread of its own (`onevision serve`), called before anything else
    runs torch: the calling thread keeps one intra-op thread from now on, and the returned count (the process's
    default) is for the engine's thread (AsyncEngine(threads=...))."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


# -- the engine's float32 GEMMs -----------------------------------------------------------------------------------
PACK_ROWS_HINT = 32  # oneDNN packs for this many rows: the best of 1..256 over 1..256-row calls (below)
PACKED_FROM_ROWS = 3  # fewer rows keep the reference GEMM on the plain weight: bit-identical, and faster there
_state = threading.local()


@contextlib.contextmanager
def packed_gemms(enabled: bool = True):
    """Within this block (this thread only), PackedLinear layers multiply 3+ rows with their packed weight; outside
    it they are plain nn.Linear, so a packed model keeps the reference GEMM's bits for everything but the engine."""
    before = getattr(_state, "packed", False)
    _state.packed = enabled
    try:
        yield
    finally:
        _state.packed = before


class PackedLinear(nn.Linear):
    """A float32 Linear that also holds its weight reordered once by oneDNN into its blocked GEMM layout, used by
    the engine's batched steps (inside `packed_gemms()`). Measured on a 2-core AVX-512 Xeon, Qwen2-0.5B's 24
    layers of linears, weights streamed from DRAM (ms per pass over the layers; one process, same load):

        rows                   1    2    4    8   16   64  256
        F.linear (reference)  46   53   86  115  123  295  692   MKL sgemm on the (out, in) weight
        oneDNN packed         54   56   63   73   89  220  635   _reorder_linear_weight(w, 32), _linear_pointwise

    and the engine's whole decode step (with lm_head): 1 sequence 80 ms either way (rows < PACKED_FROM_ROWS take
    F.linear); 8 sequences 127 ms against 215. Packed products differ from the reference's by summation order
    only (~1e-6 relative). The plain weight stays (tied embeddings, state_dict, one-row calls): packing costs a
    second copy of every linear's weight, so the engine packs only when that fits its memory rule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _packed_call(x, self.in_features):
            return F.linear(x, self.weight, self.bias)
        if self.packed_from != weight_key(self.weight):  # the weight changed since (load_state_dict, ...)
            self.pack()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def pack(self) -> None:
        with torch.no_grad():
            self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(),
                                                                                   PACK_ROWS_HINT), persistent=False)
        self.packed_from = weight_key(self.weight)


class PackedGroup:
    """Sibling float32 linears that read the same input (a module's `FUSABLE` group: q/k/v, gate/up) packed as one
    oneDNN weight, their rows concatenated: inside the engine's steps one GEMM computes all of them (one weight
    stream and one call instead of three; 8-row decode over Qwen2-0.5B's linears 72.6 -> 68.9 ms), elsewhere
    `__call__` returns None and the module calls its linears one by one (the reference GEMM, bit for bit). Kept
    in the module's __dict__, not as a submodule: no state_dict entries, no second registration of the weights."""

    def __init__(self, linears: list[nn.Linear]):
        self.linears = linears
        self.in_features = linears[0].in_features
        self.sizes = [m.out_features for m in linears]
        self.pack()

    def pack(self) -> None:
        linears = self.linears
        with torch.no_grad():
            weight = torch.cat([m.weight.detach() for m in linears])  # (sum of out, in)
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
            self.bias = None if all(m.bias is None for m in linears) else torch.cat(
                [m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])
        self.packed_from = self._key()

    def _key(self) -> tuple:
        return tuple(weight_key(p) for m in self.linears for p in (m.weight, m.bias))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        if not _packed_call(x, self.in_features):
            return None
        if self.packed_from != self._key():  # a member's weight or bias changed since
            self.pack()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "").split(self.sizes, -1)


def weight_key(t: torch.Tensor | None) -> tuple[int, int] | None:
    """Which values a copy or a cache was made from (packed weights here, the engine's caches): the tensor's
    storage and its version counter (bumped by every in-place write: load_state_dict, copy_, optimizer steps; an
    inference-mode tensor has none, and cannot be written outside inference mode)."""
    if t is None:
        return None
    return (t.data_ptr(), -1 if t.is_inference() else t._version)


def _packed_call(x: torch.Tensor, in_features: int) -> bool:
    """Inside packed_gemms() and with PACKED_FROM_ROWS+ rows: the packed kernel's call."""
    return getattr(_state, "packed", False) and x.numel() >= PACKED_FROM_ROWS * in_features


@functools.cache
def _packing_works() -> bool:
    try:
        layer = nn.Linear(8, 4)
        x = torch.randn(4, 8)
        packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), PACK_ROWS_HINT)
        return bool(torch.allclose(torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], ""),
                                   layer(x), atol=1e-5))
    except (AttributeError, RuntimeError):  # a torch without these ops, or without oneDNN
        return False


def has_packed_weights(model: nn.Module) -> bool:
    """Whether pack_fp32_linears gave `model` packed copies (now or before): a PackedLinear or a PackedGroup."""
    return any(isinstance(m, PackedLinear) or any(isinstance(v, PackedGroup) for v in vars(m).values())
               for m in model.modules())


def _is_fp32_cpu_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"


def pack_fp32_linears(model: nn.Module, budget: int | None = None) -> int:
    """Give the float32 CPU linears their oneDNN-packed copies, if those fit in `budget` bytes (None: no limit):
    each module's FUSABLE groups ({"qkv": ("q_proj", "k_proj", "v_proj")}, see models/qwen2.py) one PackedGroup
    (module.__dict__["fused_qkv"]), every other Linear a PackedLinear. Returns the bytes added (0: nothing packed;
    what was packed before is kept)."""
    groups = []  # (module, name, linears)
    grouped: set[int] = set()
    for module in model.modules():
        for name, members in getattr(module, "FUSABLE", {}).items():
            linears = [getattr(module, member, None) for member in members]
            if "fused_" + name in module.__dict__:  # packed before
                grouped.update(id(m) for m in linears)
            elif all(_is_fp32_cpu_linear(m) for m in linears):
                groups.append((module, name, linears))
                grouped.update(id(m) for m in linears)
    linears = [m for m in model.modules() if _is_fp32_cpu_linear(m) and id(m) not in grouped]
    need = 4 * (sum(m.weight.numel() for m in linears) + sum(m.weight.numel() for _, _, g in groups for m in g))
    if not need or (budget is not None and need > budget) or not _packing_works():
        return 0
    for module, name, members in groups:
        module.__dict__["fused_" + name] = PackedGroup(members)
    for module in linears:
        module.__class__ = PackedLinear
        module.pack()
    return need


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
        self.dequant_from_rows = quant_plan("int8")["dequant_from_rows"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., K) -> (..., N)
        x2 = x.reshape(-1, self.in_features)
        if self.dequant_from_rows is not None and x2.shape[0] >= self.dequant_from_rows:
            # many rows on a CPU without bf16 arithmetic: fp32 GEMM on the int8 values (see module doc). The
            # product is rounded to the activations' dtype before the fp32 scale, as the packed kernel rounds it,
            # so prefill and decode round at the same points
            y = F.linear(x2.float(), self.qdata.float()).to(x.dtype) * self.scale
        else:
            # the kernel is vectorised for bf16 activations only. Like torchao's eager path, the bf16 product is
            # scaled in float32 (a bf16-rounded scale inside the kernel would add error)
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qdata, self.ones) * self.scale
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
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
        self.dequant_from_rows = quant_plan("int4")["dequant_from_rows"]

    def dequantize(self) -> torch.Tensor:
        """The (N, K) fp32 weight the kernel multiplies by: (q - 8) * scale + zero per group of K."""
        return dequantize_int4(self.qdata, self.scale_and_zero, self.group_size, self.out_features,
                               self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.dequant_from_rows is not None and x2.shape[0] >= self.dequant_from_rows:
            y = F.linear(x2.float(), self.dequantize())  # many rows on a CPU without bf16 arithmetic
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.qdata, self.group_size,
                                                  self.scale_and_zero)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


_INT4_BLOCK_N = 64


def _unpack_int4(qdata: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """(N, K/2) uint8 from `_convert_weight_to_int4pack_for_cpu` -> (N, K) uint8 values 0..15. The CPU layout:
    blocks of 64 output rows, in each of which every k has 32 bytes whose low nibbles are rows 0..31 and high
    nibbles rows 32..63; the last N % 64 rows pack pairwise (low nibble even row, high nibble odd row) per k.
    Checked at run time by `int4_layout_known`."""
    full = n // _INT4_BLOCK_N * _INT4_BLOCK_N
    b = qdata[:full].reshape(-1, k, _INT4_BLOCK_N // 2)
    rows = torch.cat([b & 15, b >> 4], 2).permute(0, 2, 1).reshape(full, k)
    if full == n:
        return rows
    t = qdata[full:].reshape(k, (n - full) // 2)
    return torch.cat([rows, torch.stack([t & 15, t >> 4], 2).reshape(k, n - full).t()])


def dequantize_int4(qdata: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, n: int,
                    k: int) -> torch.Tensor:
    """(q - 8) * scale + zero per group of K, as fp32 (N, K). In place on one fp32 buffer: broadcasting
    out-of-place ops over the groups cost ~2x as much."""
    sz = scale_and_zero.float().transpose(0, 1)  # (N, K/g, 2)
    scale = sz[..., :1]
    out = torch.empty(n, k // group_size, group_size)
    out.copy_(_unpack_int4(qdata, n, k).reshape(n, k // group_size, group_size))
    return out.sub_(8).mul_(scale).add_(sz[..., 1:]).reshape(n, k)


@functools.cache
def int4_layout_known() -> bool:
    """Whether this torch build packs int4 for the CPU in the layout `_unpack_int4` reads (one small check per
    process; where it does not, int4 stays on the packed kernel for every M)."""
    try:
        w = torch.randint(0, 16, (2 * _INT4_BLOCK_N + 16, 64), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(0))
        packed = torch._convert_weight_to_int4pack_for_cpu(w, 1)
        return packed.shape == (w.shape[0], 32) and torch.equal(_unpack_int4(packed, *w.shape).int(), w)
    except (RuntimeError, AttributeError):
        return False


def pack_weight(weight: torch.Tensor, kind: str, group_size: int = 128) -> nn.Module:
    """A (N, K) weight -> its Int8Linear / Int4Linear, quantized by torchao (so the bits are torchao's)."""
    from onevision.quantization import torchao_quantize_linear

    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return torchao_quantize_linear(layer, kind, group_size)


def packed_matmul(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return module(x)
