"""Checkpoint loading: hub resolution, (sharded) safetensors, strict key mapping, dtype and device.

The model is built on the meta device and every parameter is assigned from the checkpoint, one tensor at a
time, so peak memory stays near one copy of the weights. Three weight-name layouts are accepted:

    hub (llava-hf)   language_model.model.*  language_model.lm_head.*  vision_tower.vision_model.*  ...
    transformers v5  language_model.model.*  vision_tower.*             (no vision_model)
    in-memory        model.language_model.*  model.vision_tower.*  lm_head.*
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

# (hub checkpoint prefix, in-memory prefix): the one table both directions read. Reading, the first match wins,
# so longer prefixes come first; _READ_ONLY adds the transformers v5 layout, which save_pretrained never writes.
_PREFIXES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)
_READ_ONLY = (("vision_tower.", "model.vision_tower."),)
# Tensors some checkpoints carry that the model derives itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the tensor, what was expected and what was found."""


@contextlib.contextmanager
def empty_init() -> Iterator[None]:
    """Build modules on the meta device without their random initialisation (every tensor is loaded after,
    and initialising meta tensors drags in torch's compiler stack: ~2 s of imports)."""
    classes = (nn.Linear, nn.Embedding, nn.Conv2d, nn.LayerNorm)
    saved = {cls: cls.reset_parameters for cls in classes}
    for cls in classes:
        cls.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            yield
    finally:
        for cls, method in saved.items():
            cls.reset_parameters = method


def resolve_files(path_or_repo_id: str | os.PathLike, patterns: Iterable[str], *, revision: str | None = None,
                  cache_dir: str | None = None, token: str | bool | None = None,
                  local_files_only: bool = False, force_download: bool = False) -> str:
    """A local folder holding `patterns`: the folder itself, or a hub snapshot downloaded on first use."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return str(path)
    repo_id = str(path_or_repo_id)
    if path.exists() or repo_id.startswith((".", "/", "~")) or repo_id.count("/") > 1:
        raise FileNotFoundError(f"{repo_id!r} is not a folder. Pass a local model folder or a hub repo id "
                                "such as 'llava-hf/llava-onevision-qwen2-0.5b-ov-hf'.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise ImportError("huggingface_hub is needed to download from the hub: pip install huggingface_hub") from e
    try:
        return snapshot_download(repo_id, allow_patterns=list(patterns), revision=revision, cache_dir=cache_dir,
                                 token=token, local_files_only=local_files_only, force_download=force_download)
    except Exception as e:  # network down, offline mode, unknown repo, gated repo ...
        raise OSError(
            f"Could not get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "If you are offline, download the model once elsewhere (e.g. `hf download "
            f"{repo_id}`) and pass the local folder path instead of the repo id.") from e


def checkpoint_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint folder, in index order for sharded checkpoints."""
    index = os.path.join(folder, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'; expected a safetensors index file")
        files = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are not in {folder}: {missing}. "
                                  "Download the missing shard(s) again.")
        return [os.path.join(folder, name) for name in files]
    single = os.path.join(folder, SAFE_WEIGHTS)
    if os.path.isfile(single):
        return [single]
    found = sorted(p.name for p in Path(folder).glob("*.safetensors"))
    raise CheckpointError(f"no {SAFE_WEIGHTS} or {SAFE_INDEX} in {folder} (found: {found or 'no safetensors files'}). "
                          "Only safetensors checkpoints are supported.")


def to_model_key(name: str) -> str:
    """Checkpoint tensor name (any of the three layouts) -> in-memory name. Idempotent."""
    if name.startswith(("model.", "lm_head.")):
        return name
    for old, new in _PREFIXES + _READ_ONLY:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def to_hub_key(name: str) -> str:
    """In-memory name -> the llava-hf hub layout (what `save_pretrained` writes)."""
    for old, new in _PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def open_checkpoint(file: str):
    """A memory-mapped safetensors file (a context manager), or a clear error for a corrupted one."""
    from safetensors import safe_open

    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:
        raise CheckpointError(f"cannot read {file}: {e}. The file is corrupted or truncated; download it again.") from e


def assign_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = tensor


def load_checkpoint(model: nn.Module, folder: str, dtype: torch.dtype | None, device: torch.device | str,
                    skip: Iterable[str] = (), set_tensor: Callable[[nn.Module, str, torch.Tensor], None] | None = None,
                    ) -> None:
    """Assign every tensor of the checkpoint in `folder` to the (meta) model. Strict: a missing or unexpected
    tensor, or a shape mismatch, is an error that names the tensor and both shapes. `set_tensor` (default:
    plain assignment) lets a quantizer take each weight as it streams in."""
    set_tensor = set_tensor or assign_tensor
    skip = set(skip)
    persistent = set(model.state_dict(keep_vars=True)) - skip
    expected = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()] if name in persistent}
    seen: dict[str, str] = {}
    unexpected: list[str] = []

    def read(handle, raw: str, file: str) -> torch.Tensor:
        try:
            tensor = handle.get_tensor(raw)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {raw!r} from {file}: {e}. The file is corrupted; "
                                  "download it again.") from e
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        return tensor.to(device=device, dtype=cast)

    def assign(item: tuple[str, concurrent.futures.Future]) -> None:
        set_tensor(model, item[0], item[1].result())

    # Reading (page faults on the memory map) and casting run in a few threads, a bounded number of tensors
    # ahead; tensors are assigned in checkpoint order on this thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for file in checkpoint_files(folder):
            with open_checkpoint(file) as handle:
                pending: collections.deque = collections.deque()
                try:
                    for raw in handle.keys():
                        if raw.endswith(_IGNORED_SUFFIXES):
                            continue
                        name = to_model_key(raw)
                        if name in skip and name not in expected:
                            continue
                        target = expected.get(name)
                        if target is None:
                            unexpected.append(raw)
                            continue
                        if name in seen:
                            raise CheckpointError(f"tensor {name!r} appears twice (as {seen[name]!r} and {raw!r} in {file})")
                        seen[name] = raw
                        shape = tuple(handle.get_slice(raw).get_shape())
                        if shape != tuple(target.shape):
                            raise CheckpointError(f"tensor {raw!r} in {file} has shape {shape}, but the model expects "
                                                  f"{tuple(target.shape)} for {name!r}. The checkpoint does not match "
                                                  "its config.json.")
                        pending.append((name, pool.submit(read, handle, raw, file)))
                        if len(pending) > 8:
                            assign(pending.popleft())
                    while pending:
                        assign(pending.popleft())
                finally:  # no read may outlive the open file, also when a check above raises
                    concurrent.futures.wait([future for _, future in pending])
    missing = sorted(set(expected) - set(seen))
    if unexpected or missing:
        raise CheckpointError(
            f"checkpoint in {folder} does not match the model: missing {len(missing)} tensor(s) {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {len(unexpected)} tensor(s) {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}.")


def checkpoint_dtype(folder: str) -> torch.dtype:
    """The dtype of the first floating tensor of the checkpoint (what dtype="auto" falls back to)."""
    table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    for file in checkpoint_files(folder):
        with open_checkpoint(file) as handle:
            for raw in handle.keys():
                if handle.get_slice(raw).get_dtype() in table:
                    return table[handle.get_slice(raw).get_dtype()]
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, config_dtype: str | None, folder: str | None) -> torch.dtype:
    """dtype argument of from_pretrained -> torch.dtype. "auto" (the default) reads the config, then the weights."""
    if dtype is None or dtype == "auto":
        if config_dtype:
            return resolve_dtype(config_dtype, None, None)
        return checkpoint_dtype(folder) if folder else torch.get_default_dtype()
    return parse_dtype(dtype, "dtype", "'auto'")


def parse_dtype(value: str | torch.dtype, field: str, also: str = "") -> torch.dtype:
    """A torch.dtype or its name ("float16", "torch.bfloat16") -> torch.dtype; `also` names other accepted values
    for the error message."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, value.removeprefix("torch."))
    accepted = f"a torch.dtype, {also} or a dtype name like 'float16'" if also else \
        "a torch.dtype or a dtype name like 'float16'"
    raise ValueError(f"{field} must be {accepted}, got {value!r}")


def resolve_device(device_map: str | int | torch.device | dict | None) -> torch.device:
    """device_map of from_pretrained -> one device. "auto" picks CUDA, then MPS, then CPU."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(f"device_map spreading the model over several devices ({sorted(map(str, devices))}) "
                             "is not supported; pass one device such as 'cuda' or 'cpu', or 'auto'.")
        return resolve_device(devices.pop())
    if device_map == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device_map must be 'auto', 'cpu', 'cuda', 'cuda:N', an int or a torch.device, "
                         f"got {device_map!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(cuda_unavailable_message(f"device_map={device_map!r}", "device_map='cpu'"))
    return device


_log = logging.getLogger("onevision")
_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Log `message` as a warning the first time it is seen in this process (transformers' warning_once)."""
    if message not in _warned:
        _warned.add(message)
        _log.warning(message)


def warn_if_slow_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """One warning when a model is loaded in float16 on a CPU without fast float16 arithmetic."""
    from onevision import cpu

    if dtype == torch.float16 and device.type == "cpu" and cpu.fp16_is_slow():
        warn_once("Loading in float16 on a CPU without fast float16 arithmetic: prefill and generation are several "
                  "times slower than in float32. Use dtype=torch.bfloat16 if the CPU has avx512_bf16/AMX, else "
                  "dtype=torch.float32 (see the README's 'CPU and GPU' section).")


def cuda_unavailable_message(asked: str, instead: str) -> str:
    """Why CUDA cannot be used here and what to do (`asked`: what the user passed; `instead`: the CPU spelling)."""
    if torch.version.cuda:  # a CUDA build without a usable GPU/driver: installing CUDA would not help
        why = (f"this PyTorch (a CUDA {torch.version.cuda} build) sees no GPU "
               "(no NVIDIA GPU, driver or CUDA_VISIBLE_DEVICES?)")
        return f"{asked} asks for CUDA, but {why}. Use {instead}."
    return (f"{asked} asks for CUDA, but this PyTorch is a CPU-only build. Use {instead}, "
            "or install a CUDA build of PyTorch on a machine with an NVIDIA GPU.")


def save_checkpoint(state: dict[str, torch.Tensor], folder: str, max_shard_size: int = 5 * 1024**3) -> None:
    """Write `state` (in-memory names) in the hub layout: one file, or shards plus an index."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {to_hub_key(k): v.detach().contiguous().cpu() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in Path(folder).glob("model*.safetensors*"):
        stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, SAFE_WEIGHTS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, SAFE_INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
