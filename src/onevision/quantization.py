"""bitsandbytes 4-bit (NF4 / FP4) and 8-bit (LLM.int8()) loading, as transformers does it.

    from onevision import LlavaOnevisionForConditionalGeneration, BitsAndBytesConfig
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, quantization_config=config, device_map="auto")

Rules mirrored from transformers 5.24 (quantizers/quantizer_bnb_{4,8}bit.py, integrations/bitsandbytes.py):

* every plain `nn.Linear` becomes `bnb.nn.Linear4bit` / `bnb.nn.Linear8bitLt`: the SigLIP tower's attention and MLP,
  the projector and every Qwen2 projection. Conv2d, embeddings and norms are untouched.
* modules kept in full precision: `lm_head` by default; when `llm_int8_skip_modules` is given, exactly that list
  (the reference then drops its default `lm_head` skip too). Patterns match like the reference's
  `should_convert_module`: a name prefix up to a module boundary, a regex, or a suffix. A tied `lm_head` (the 0.5B
  checkpoints) is the input embedding and is never quantized.
* a weight is cast to the load `dtype` first (dtype="auto" reads config.json, as without quantization), then
  quantized with `Params4bit(weight, **meta_param.__dict__).to(device)` / `Int8Params(weight.cpu()).to(device)`:
  the same bitsandbytes calls, so the stored bits are the reference's. Biases and non-quantized tensors keep `dtype`.

Loading quantizes each weight as it streams out of the safetensors file, so peak memory stays near the quantized
size plus one full-precision tensor. `bitsandbytes` is an optional extra: `pip install "onevision[quant]"`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from onevision.loading import parse_dtype

INSTALL_HINT = 'pip install "onevision[quant]"  (or: pip install "bitsandbytes>=0.45")'
_MIN_BNB = (0, 45)
_QUANT_TYPES = ("fp4", "nf4")
_STORAGE_DTYPES = ("float16", "float32", "int8", "uint8", "float64", "bfloat16")


def _to_dtype(value: Any, field: str, default: torch.dtype) -> torch.dtype:
    return default if value is None else parse_dtype(value, field)


@dataclasses.dataclass
class BitsAndBytesConfig:
    """The fields and defaults of transformers' `BitsAndBytesConfig` (5.24).

    load_in_8bit / load_in_4bit: LLM.int8() or 4-bit weights (exactly one). llm_int8_threshold: outlier threshold
    of LLM.int8() (activations above it are multiplied in 16 bit). llm_int8_skip_modules: module names/patterns
    kept in full precision (default: lm_head). llm_int8_has_fp16_weight: keep 16-bit main weights (training).
    bnb_4bit_compute_dtype: dtype of the 4-bit matmuls (default float32). bnb_4bit_quant_type: "fp4" (default) or
    "nf4". bnb_4bit_use_double_quant: quantize the quantization constants too. bnb_4bit_quant_storage: storage
    dtype of packed 4-bit weights (default uint8). llm_int8_enable_fp32_cpu_offload is accepted for compatibility;
    it only matters for CPU/GPU split device maps, which onevision does not do.
    """

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: Any = None
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: Any = None

    def __post_init__(self) -> None:
        for name in ("load_in_8bit", "load_in_4bit", "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight",
                     "bnb_4bit_use_double_quant"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both True, but only one can be used at the same time")
        if isinstance(self.llm_int8_threshold, int) and not isinstance(self.llm_int8_threshold, bool):
            self.llm_int8_threshold = float(self.llm_int8_threshold)
        if not isinstance(self.llm_int8_threshold, float):
            raise TypeError(f"llm_int8_threshold must be a float, got {self.llm_int8_threshold!r}")
        if self.llm_int8_skip_modules is not None:
            if isinstance(self.llm_int8_skip_modules, tuple):
                self.llm_int8_skip_modules = list(self.llm_int8_skip_modules)
            if not isinstance(self.llm_int8_skip_modules, list) or not all(
                    isinstance(m, str) for m in self.llm_int8_skip_modules):
                raise TypeError(f"llm_int8_skip_modules must be a list of module names, got {self.llm_int8_skip_modules!r}")
        if self.bnb_4bit_quant_type not in _QUANT_TYPES:
            raise ValueError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {self.bnb_4bit_quant_type!r}")
        self.bnb_4bit_compute_dtype = _to_dtype(self.bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype", torch.float32)
        storage = self.bnb_4bit_quant_storage
        if isinstance(storage, str) and storage.removeprefix("torch.") not in _STORAGE_DTYPES:
            raise ValueError(f"bnb_4bit_quant_storage must be one of {_STORAGE_DTYPES}, got {storage!r}")
        self.bnb_4bit_quant_storage = _to_dtype(storage, "bnb_4bit_quant_storage", torch.uint8)

    # -- the reference's helpers -------------------------------------------------------------------------------
    @property
    def quant_method(self) -> str:
        return "bitsandbytes"

    def is_quantizable(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit

    def quantization_method(self) -> str | None:
        """"llm_int8", "fp4", "nf4" or None, like the reference."""
        if self.load_in_8bit:
            return "llm_int8"
        if self.load_in_4bit:
            return self.bnb_4bit_quant_type
        return None

    def to_dict(self) -> dict[str, Any]:
        """The reference's dict (dtype names as strings), which transformers' `BitsAndBytesConfig.from_dict` reads."""
        out = {"quant_method": self.quant_method, "_load_in_8bit": self.load_in_8bit,
               "_load_in_4bit": self.load_in_4bit}
        for f in dataclasses.fields(self):
            value = copy.deepcopy(getattr(self, f.name))
            out[f.name] = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        default = BitsAndBytesConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if v != default.get(k)}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> BitsAndBytesConfig:
        """Reads `to_dict` output (ours or the reference's, e.g. a config.json `quantization_config`)."""
        data = {**config, **overrides}
        method = data.pop("quant_method", "bitsandbytes")
        if str(getattr(method, "value", method)) != "bitsandbytes":
            raise ValueError(f"quantization_config has quant_method {method!r}; onevision supports only bitsandbytes")
        for private in ("_load_in_8bit", "_load_in_4bit"):
            public = private[1:]
            if private in data:
                data.setdefault(public, data[private])
                data.pop(private)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def coerce(cls, config: Any) -> BitsAndBytesConfig:
        """Ours, a dict, or any object with `to_dict()` (e.g. transformers' BitsAndBytesConfig)."""
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        if hasattr(config, "to_dict"):
            return cls.from_dict(config.to_dict())
        raise TypeError(f"quantization_config must be a onevision.BitsAndBytesConfig or a dict, got {type(config).__name__}")

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


# -- bitsandbytes -----------------------------------------------------------------------------------------------
def import_bitsandbytes():
    """The bitsandbytes module, or an ImportError that says what to install."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(f"Loading with a BitsAndBytesConfig needs the bitsandbytes package, which is not installed "
                          f"(or failed to import: {e}). Install it with: {INSTALL_HINT}") from e
    version = tuple(int(p) for p in re.findall(r"\d+", getattr(bnb, "__version__", "0"))[:2])
    if version < _MIN_BNB:
        raise ImportError(f"bitsandbytes {bnb.__version__} is too old; onevision needs >= 0.45 (CPU support). "
                          f"Upgrade with: {INSTALL_HINT}")
    return bnb


def should_convert_module(name: str, patterns: list[str] | None) -> bool:
    """transformers' rule: a pattern skips `name` if it matches from the start up to a module boundary (also as a
    regex), or is a suffix of it ("fc1" skips "...layers.3.mlp.fc1")."""
    if patterns is None:
        return True
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{key}){boundary}", name) or name.endswith(key) for key in patterns)


def modules_to_not_convert(model: nn.Module, config: BitsAndBytesConfig) -> list[str]:
    """The reference's skip list: `llm_int8_skip_modules` if given, else the output embedding (lm_head).
    A tied lm_head is the input embedding and always stays as it is."""
    skip = ["lm_head"] if config.llm_int8_skip_modules is None else list(config.llm_int8_skip_modules)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and "lm_head" not in skip:
        skip.append("lm_head")
    return skip


def _check_device(bnb, config: BitsAndBytesConfig, device: torch.device) -> None:
    supported = set(getattr(bnb, "supported_torch_devices", {"cpu", "cuda"}))
    if device.type not in supported:
        raise ValueError(f"bitsandbytes {bnb.__version__} cannot run on device {device.type!r} (it supports "
                         f"{sorted(supported)}). Pass device_map='cpu' or 'cuda', or load without quantization_config.")
    # a tiny layer through the same quantize + forward path: a backend without a kernel for this option fails here,
    # before the checkpoint is read, with the option named
    dtype = config.bnb_4bit_compute_dtype if config.load_in_4bit else torch.float16
    try:
        layer = _new_module(bnb, config, 64, 64, bias=False)
        weight = torch.linspace(-1, 1, 64 * 64, device=device, dtype=torch.float16).reshape(64, 64)
        set_quantized_weight(layer, "weight", weight, config)  # no torch.randn: leave the caller's RNG alone
        layer.to(device)(torch.linspace(-1, 1, 2 * 64, device=device, dtype=dtype).reshape(2, 64))
    except Exception as e:
        what = (f"4-bit {config.bnb_4bit_quant_type} (bnb_4bit_compute_dtype={config.bnb_4bit_compute_dtype}, "
                f"bnb_4bit_use_double_quant={config.bnb_4bit_use_double_quant}, "
                f"bnb_4bit_quant_storage={config.bnb_4bit_quant_storage})" if config.load_in_4bit else
                f"8-bit LLM.int8() (llm_int8_threshold={config.llm_int8_threshold}, "
                f"llm_int8_has_fp16_weight={config.llm_int8_has_fp16_weight})")
        other = "load_in_4bit" if config.load_in_8bit else "load_in_8bit"
        raise RuntimeError(f"bitsandbytes {bnb.__version__} cannot do {what} on {device} ({type(e).__name__}: {e}). "
                           f"Change that option, try {other} instead, use another device_map, or upgrade bitsandbytes "
                           f"({INSTALL_HINT}).") from e


def _new_module(bnb, config: BitsAndBytesConfig, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """The reference's replacement layer (replace_with_bnb_linear), built on the meta device."""
    from onevision.loading import empty_init

    with empty_init():
        if config.load_in_8bit:
            module = bnb.nn.Linear8bitLt(in_features, out_features, bias, has_fp16_weights=config.llm_int8_has_fp16_weight,
                                         threshold=config.llm_int8_threshold)
        else:
            module = bnb.nn.Linear4bit(in_features, out_features, bias, config.bnb_4bit_compute_dtype,
                                       compress_statistics=config.bnb_4bit_use_double_quant,
                                       quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage)
    module.requires_grad_(False)
    return module


def _cpu_packable(in_features: int, out_features: int, blocksize: int = 64) -> bool:
    return in_features % blocksize == 0 and out_features % 32 == 0


def replace_linear_layers(model: nn.Module, config: BitsAndBytesConfig, skip: list[str]) -> list[str]:
    """Swap every plain nn.Linear not matched by `skip` for its bitsandbytes layer; returns the swapped names."""
    bnb = import_bitsandbytes()
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not should_convert_module(name, skip):
            continue
        new = _new_module(bnb, config, module.in_features, module.out_features, module.bias is not None)
        if config.load_in_4bit and not _cpu_packable(module.in_features, module.out_features):
            # bitsandbytes' AVX512-BF16 CPU kernel repacks weights on the first forward and needs
            # in_features % 64 == 0 and out_features % 32 == 0; otherwise (e.g. SigLIP's fc2, 4304 inputs) it
            # crashes (the reference does). Such layers take bitsandbytes' generic CPU path instead.
            new.support_avx512bf16_for_cpu = False
        model.set_submodule(name, new)
        replaced.append(name)
    return replaced


def set_quantized_weight(module: nn.Module, attr: str, tensor: torch.Tensor, config: BitsAndBytesConfig) -> None:
    """Quantize `tensor` into `module.<attr>` with the reference's calls (Bnb4bitQuantize / Bnb8bitQuantize)."""
    import bitsandbytes as bnb

    old = module._parameters[attr]
    if isinstance(module, bnb.nn.Linear4bit):
        new = bnb.nn.Params4bit(tensor, requires_grad=False, **old.__dict__).to(tensor.device)
    else:
        kwargs = dict(old.__dict__)
        kwargs.pop("SCB", None)
        new = bnb.nn.Int8Params(tensor.to("cpu"), requires_grad=False, **kwargs).to(tensor.device)
    module._parameters[attr] = new


def _malloc_trim():
    """glibc's malloc_trim, or None. Quantizing frees each full-precision weight and its temporaries between the
    small quantized tensors that stay, and glibc's growing mmap threshold puts those blocks on the heap, where
    the holes are kept: without a trim after each weight, an 8-bit 0.5B load peaks at ~2.6 GB instead of ~0.7 GB."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # musl and other libcs: nothing to do
        return None


def prepare_quantized_loading(model: nn.Module, quantization_config: Any, dtype: torch.dtype,
                              device: torch.device | str) -> Callable[[nn.Module, str, torch.Tensor], None]:
    """Swap the meta model's linear layers for bitsandbytes ones; return the per-tensor setter for load_checkpoint
    that quantizes each linear weight as it arrives (everything else is assigned as usual). Call its `finish()`
    after load_checkpoint."""
    config = BitsAndBytesConfig.coerce(quantization_config)
    if not config.is_quantizable():
        raise ValueError("quantization_config sets neither load_in_4bit nor load_in_8bit; set one of them to True "
                         "(or pass no quantization_config)")
    bnb = import_bitsandbytes()
    device = torch.device(device)
    _check_device(bnb, config, device)
    skip = modules_to_not_convert(model, config)
    replaced = replace_linear_layers(model, config, skip)
    target = bnb.nn.Linear8bitLt if config.load_in_8bit else bnb.nn.Linear4bit

    model.quantization_config = config
    model.is_quantized = True
    model.is_loaded_in_4bit = config.load_in_4bit
    model.is_loaded_in_8bit = config.load_in_8bit
    model.quantized_modules = replaced
    model.modules_to_not_convert = skip

    return _QuantizingSetter(target, config, device)


class _QuantizingSetter:
    """`set_tensor` for load_checkpoint: quantizes each linear weight as it arrives, everything else is assigned.

    On CPU the quantization kernels are mostly single-threaded, so up to `workers` weights are quantized at once in
    a thread pool (the bits do not depend on it); `finish()` waits for them. Each full-precision weight is dropped
    as soon as it is quantized, and glibc is asked to return the freed memory (see _malloc_trim)."""

    def __init__(self, target: type, config: BitsAndBytesConfig, device: torch.device):
        import os
        from concurrent.futures import ThreadPoolExecutor

        self.target, self.config = target, config
        self.trim = _malloc_trim()
        self.workers = min(4, os.cpu_count() or 1) if device.type == "cpu" else 0
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="onevision-quantize") if self.workers > 1 else None
        self.pending: list = []

    def _quantize(self, module: nn.Module, attr: str, tensor: torch.Tensor) -> None:
        set_quantized_weight(module, attr, tensor, self.config)
        del tensor
        if self.trim is not None:
            self.trim(0)

    def __call__(self, model: nn.Module, name: str, tensor: torch.Tensor) -> None:
        from onevision.loading import assign_tensor

        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if attr != "weight" or not isinstance(module, self.target):
            assign_tensor(model, name, tensor)
        elif self.pool is None:
            self._quantize(module, attr, tensor)
        else:
            if len(self.pending) >= self.workers:  # bound the full-precision weights in flight
                self.pending.pop(0).result()
            self.pending.append(self.pool.submit(self._quantize, module, attr, tensor))

    def finish(self) -> None:
        """Wait for the weights still being quantized (re-raising the first error)."""
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pending = []
            if self.pool is not None:
                self.pool.shutdown(wait=True)


def quantized_footprint(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, counting packed 4-bit data and quantization statistics."""
    total, seen = 0, set()

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta" and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            add(state.absmax)
            add(getattr(state, "code", None))
            if getattr(state, "state2", None) is not None:
                add(state.state2.absmax)
                add(state.state2.code)
        add(getattr(t, "SCB", None))
    for m in model.modules():
        add(getattr(getattr(m, "state", None), "SCB", None))
    return total


# -- torchao weight-only int8 / int4 (CPU decode) -----------------------------------------------------------------
TORCHAO_HINT = 'pip install "onevision[cpu]"  (or: pip install "torchao>=0.18")'


@dataclasses.dataclass
class TorchAoConfig:
    """transformers' `TorchAoConfig(quant_type=..., modules_to_not_convert=...)`, for torchao's weight-only configs:
    `Int8WeightOnlyConfig()` and `Int4WeightOnlyConfig(group_size=...)` (or torchao's prototype CPU int4 config).
    Layers named in modules_to_not_convert, and the (tied) lm_head, stay in the load dtype."""

    quant_type: Any
    modules_to_not_convert: list[str] | None = None

    @property
    def quant_method(self) -> str:
        return "torchao"


def is_torchao_config(config: Any) -> bool:
    method = getattr(config, "quant_method", None)
    return str(getattr(method, "value", method)) == "torchao" or (isinstance(config, dict) and config.get("quant_method") == "torchao")


def torchao_kind(quant_type: Any) -> tuple[str, int]:
    """torchao config object -> ("int8" | "int4", group_size)."""
    name = type(quant_type).__name__
    if name == "Int8WeightOnlyConfig":
        if getattr(quant_type, "group_size", None) is not None:
            raise ValueError(f"Int8WeightOnlyConfig(group_size={quant_type.group_size}) is not supported on CPU; "
                             "use the default per-channel Int8WeightOnlyConfig()")
        return "int8", 0
    if name in ("Int4WeightOnlyConfig", "PrototypeInt4WeightOnlyConfig"):
        return "int4", int(quant_type.group_size)
    raise ValueError(f"quantization_config=TorchAoConfig(quant_type=...) supports Int8WeightOnlyConfig() and "
                     f"Int4WeightOnlyConfig(group_size=...), got {name}")


def torchao_config_for(name: str) -> TorchAoConfig:
    """--quantize int8|int4 -> the TorchAoConfig transformers users would write."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    table = {"int8": Int8WeightOnlyConfig, "int4": Int4WeightOnlyConfig}
    if name not in table:
        raise ValueError(f"--quantize must be one of {sorted(table)}, got {name!r}")
    return TorchAoConfig(quant_type=table[name]())


def import_torchao():
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_
    except ImportError as e:
        raise ImportError(f"quantization_config=TorchAoConfig(...) needs torchao, which is not installed ({e}). "
                          f"Install it with: {TORCHAO_HINT}") from e
    return quantize_


def torchao_quantize_linear(layer: nn.Linear, kind: str, group_size: int = 128) -> nn.Module:
    """One nn.Linear -> Int8Linear / Int4Linear holding the tensors torchao's quantize_ makes for it."""
    from onevision.cpu import Int4Linear, Int8Linear

    quantize_ = import_torchao()
    bias = None if layer.bias is None else layer.bias.detach()
    tmp = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    tmp.weight = nn.Parameter(layer.weight.detach().to(torch.bfloat16), requires_grad=False)
    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        quantize_(tmp, Int8WeightOnlyConfig())
        return Int8Linear(tmp.weight.qdata, tmp.weight.scale, bias)
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    quantize_(tmp, PrototypeInt4WeightOnlyConfig(group_size=group_size))
    return Int4Linear(tmp.weight.qdata, tmp.weight.scale_and_zero, group_size, layer.in_features,
                      layer.out_features, bias)


def quantize_torchao(model: nn.Module, config: Any) -> list[str]:
    """Replace the loaded model's nn.Linear layers by packed int8/int4 ones (skipping the lm_head and
    modules_to_not_convert; int4 also skips layers whose in_features is not a multiple of the group size, which
    the kernel cannot take). Returns the quantized names."""
    quant_type = config["quant_type"] if isinstance(config, dict) else config.quant_type
    kind, group = torchao_kind(quant_type)
    given = config.get("modules_to_not_convert") if isinstance(config, dict) else config.modules_to_not_convert
    skip = list(given or []) + ["lm_head"]
    done = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not should_convert_module(name, skip):
            continue
        if kind == "int4" and module.in_features % group:
            continue
        model.set_submodule(name, torchao_quantize_linear(module, kind, group))
        done.append(name)
    model.quantization_config, model.is_quantized, model.quantized_modules = config, True, done
    return done
