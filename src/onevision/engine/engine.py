"""The engine: owns the model, the KV pool, the caches and the scheduler, and advances every request one step
at a time. Not thread-safe: one thread drives it (AsyncEngine runs it on its own thread for the server)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import numbers
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from onevision import cpu
from onevision.engine.blocks import BlockManager
from onevision.engine.encoder import VisionEncoder
from onevision.engine.metrics import Metrics
from onevision.engine.params import CompletionOutput, RequestOutput, SamplingParams, default_sampling_params
from onevision.engine.runner import ModelRunner, argmax_rows, sample
from onevision.engine.scheduler import Scheduler
from onevision.engine.sequence import FINISHED, RUNNING, Sequence, media_items
from onevision.engine.vision_cache import VisionCache
from onevision.generation.streaming import TextTracker
from onevision.models.cache import PagedKVCache

log = logging.getLogger("onevision.engine")
GiB = 1 << 30


@dataclass
class EngineConfig:
    max_num_seqs: int = 16  # sequences decoding together
    max_num_batched_tokens: int | None = None  # new tokens per step (decodes first, then prompt chunks);
    # None: 256 on CPU (a step stays short, so running streams stay smooth), 2048 on CUDA
    kv_cache_memory: int | None = None  # bytes for the KV pool; None: a share of free memory, at most what
    # max_num_seqs full contexts hold (default_kv_memory)
    vision_cache_memory: int = 512 << 20  # bytes of projected vision features kept by content hash
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None: the model's context
    cpu_weight_packing: str = "auto"  # "auto": on CPU, float32 linears keep a oneDNN-packed copy for the batched
    # GEMMs of 3+ rows (1.5x faster decode at 8 sequences, cpu.PackedLinear) when max_num_seqs > 1 and the copies
    # take at most a quarter of the available memory; "off": never

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if (value is not None or name != "max_num_batched_tokens") and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if self.cpu_weight_packing not in ("auto", "off"):
            raise ValueError(f"cpu_weight_packing must be 'auto' or 'off', got {self.cpu_weight_packing!r}")
        if self.vision_cache_memory < 0:
            raise ValueError(f"vision_cache_memory must be >= 0 bytes, got {self.vision_cache_memory}")


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 8 * GiB


def default_kv_memory(device: torch.device, most: int | None = None) -> int:
    """What vLLM does, scaled for a laptop: on CUDA 80% of the free memory after loading; on CPU a quarter of the
    available memory, at most 4 GiB (vLLM's CPU default), at least 64 MiB; and never more than `most` bytes (the
    engine passes what max_num_seqs full contexts hold: more only reserves address space, and six engines of a
    tiny test model once made one 24 GiB mapping that a fork of their process could not copy)."""
    free = available_memory(device)
    share = max(int(free * 0.8) if device.type == "cuda" else min(free // 4, 4 * GiB), 64 << 20)
    return share if most is None else min(share, most)


def weights_key(model) -> tuple:
    """Changes whenever a parameter is written in place or replaced (1.4 ms for the 0.5B model's 716 tensors: the
    engine looks when a request arrives at an idle engine)."""
    return tuple(cpu.weight_key(p) for p in model.parameters())


class Engine:
    def __init__(self, model, processor, config: EngineConfig | None = None):
        self.model, self.processor = model, processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        config = dataclasses.replace(config or EngineConfig())
        if config.max_num_batched_tokens is None:
            config.max_num_batched_tokens = 2048 if model.device.type == "cuda" else 256
        self.config = config
        self.packed = False  # the model's float32 linears multiply batches with oneDNN-packed copies of their weights
        if config.cpu_weight_packing == "auto" and model.device.type == "cpu" and config.max_num_seqs > 1:
            if added := cpu.pack_fp32_linears(model, budget=available_memory(model.device) // 4):
                log.info("CPU: float32 linears packed by oneDNN for batched steps (+%.0f MiB)", added / 2**20)
            self.packed = cpu.has_packed_weights(model)
        text = model.config.text_config
        self.max_model_len = min(config.max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        runner_dtype = ModelRunner.compute_dtype(model)
        per_block = PagedKVCache.bytes_per_block(text.num_hidden_layers, config.block_size, text.num_key_value_heads,
                                                 text.head_dim, runner_dtype)
        full_contexts = config.max_num_seqs * -(-self.max_model_len // config.block_size) * per_block
        memory = config.kv_cache_memory or default_kv_memory(model.device, most=full_contexts)
        num_blocks = memory // per_block
        if num_blocks < 2:
            raise ValueError(f"kv_cache_memory={memory} bytes holds {num_blocks} KV blocks of {per_block} bytes "
                             f"({config.block_size} tokens); give it at least {2 * per_block} bytes")
        self.kv = PagedKVCache(text.num_hidden_layers, num_blocks, config.block_size, text.num_key_value_heads,
                               text.head_dim, runner_dtype, model.device)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.vision_cache = VisionCache(config.vision_cache_memory)
        self.encoder = VisionEncoder(model, self.vision_cache, runner_dtype)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_prefix_caching,
                                   ready=lambda seq: all(self.encoder.ready(m) for m in seq.items))
        self.runner = ModelRunner(model, self.kv)
        gen = getattr(model, "generation_config", None)
        self.eos_ids = gen.eos_ids() if gen is not None else []
        self.requests: dict[str, list[Sequence]] = {}
        self._ids = itertools.count()
        self.metrics = Metrics()
        self.weights = weights_key(model)
        log.info("KV cache: %d blocks of %d tokens (%.0f MiB, %d tokens)", num_blocks, config.block_size,
                 num_blocks * per_block / 2**20, num_blocks * config.block_size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: Any = "auto", device: str = "cpu",
                        quantize: str | None = None, processor: Any = None, **config: Any) -> Engine:
        """Load a checkpoint folder or hub id (quantize: "int8" / "int4" weight-only, CPU) and its processor."""
        from onevision import AutoProcessor, LlavaOnevisionForConditionalGeneration, quantization

        kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device}
        if quantize:
            kwargs["quantization_config"] = quantization.torchao_config_for(quantize)
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, **kwargs)
        return cls(model, processor or AutoProcessor.from_pretrained(path), EngineConfig(**config))

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str | None, inputs: Any, params: SamplingParams | None = None) -> str:
        """Queue one sample (as the processor returns it: input_ids (1, S) and its media tensors)."""
        params = params or default_sampling_params(self.model.generation_config)
        if not self.requests and (weights := weights_key(self.model)) != self.weights:
            # written while the engine was idle (load_state_dict, a training step): what the caches hold is stale
            log.info("the model's weights changed: prefix and vision caches dropped")
            self.weights = weights
            self.blocks.forget_hashes()
            self.vision_cache.clear()
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = inputs["input_ids"]
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and isinstance(ids[0], list):
            if len(ids) != 1:
                raise ValueError(f"add_request takes one sample, got input_ids for {len(ids)}; add each separately")
            ids = ids[0]
        if not ids:
            raise ValueError("the prompt is empty (no input_ids)")
        vocab = self.model.get_input_embeddings().num_embeddings
        bad = [t for t in ids if not isinstance(t, numbers.Integral) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"input_ids must be token ids in [0, {vocab}) (the model's vocabulary), got {bad[0]!r}")
        ids = [int(t) for t in ids]
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room or room <= 0:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                             f"of {self.max_model_len} tokens; shorten the prompt or lower max_tokens")
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if len(ids) + max_tokens > capacity:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) needs more KV cache than the "
                             f"engine holds ({capacity} tokens); raise kv_cache_memory or lower max_tokens")
        items = media_items(self.model.config, inputs, ids)
        seq = Sequence(request_id, 0, params, ids, len(ids), items, self._tracker(params, max_tokens),
                       self._generator(params.seed), max_tokens=max_tokens)
        self.requests[request_id] = [seq]
        self.encoder.request(items)
        self.scheduler.add(seq)
        with self.metrics.lock:
            self.metrics.prompt_tokens += len(ids)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its memory; returns its last output (finish_reason "abort")."""
        seqs = self.requests.pop(request_id, None)
        if seqs is None:
            return None
        self.encoder.forget(seqs[0].items)
        for seq in seqs:
            if not seq.finished:
                seq.delta += seq.tracker.cancel("abort")  # the text a stop string could still have claimed
                self._finish(seq)
        with self.metrics.lock:
            self.metrics.count_finish("abort")
        return self._output(request_id, seqs, finished=True)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ one step
    def step(self) -> list[RequestOutput]:
        if self.encoder.busy:  # while streams decode, a slice of the vision work per step; else all of it
            decoding = sum(len(s.token_ids) - s.num_computed == 1 for s in self.scheduler.running)
            with cpu.packed_gemms(self.packed):
                self.encoder.step(max(1, self.config.max_num_batched_tokens - decoding) if decoding else None)
        scheduled = self.scheduler.schedule()
        if not scheduled:
            if self.scheduler.waiting and not self.scheduler.running and not self.encoder.busy:
                seq = self.scheduler.waiting[0]
                raise RuntimeError(f"request {seq.request_id} cannot be scheduled: it needs more KV blocks than "
                                   f"are free ({self.blocks.num_free}); raise kv_cache_memory")
            return []
        with cpu.packed_gemms(self.packed):
            sampled, logits = self.runner.execute(scheduled)
        for seq, _ in scheduled:
            self.scheduler.register_full_blocks(seq)
        now = time.monotonic()
        touched: dict[str, None] = {}
        m = self.metrics
        argmax = argmax_rows(logits) if sampled else []  # one call for every row (greedy takes it)
        with m.lock:
            for i, seq in enumerate(sampled):
                if seq.finished:  # aborted meanwhile
                    continue
                family = [seq]
                if seq.params.n > 1 and seq.num_generated == 0 and seq.index == 0:
                    family += self._fork(seq)
                for s in family:
                    token = sample(s, logits[i], self.eos_ids, argmax[i])
                    s.token_ids.append(token)
                    if s.first_token is None:
                        s.first_token = now
                        m.ttft.observe(now - s.arrival)
                    else:
                        m.itl.observe(now - s.last_token)
                    s.last_token = now
                    m.generation_tokens += 1
                    delta, reason = s.tracker.push(token)
                    s.delta += delta
                    if reason is not None:
                        self._finish(s)
                    touched[s.request_id] = None
        outputs = []
        for request_id in touched:
            seqs = self.requests[request_id]
            done = all(s.finished for s in seqs) and len(seqs) == seqs[0].params.n
            outputs.append(self._output(request_id, seqs, finished=done))
            if done:
                del self.requests[request_id]
                with m.lock:
                    m.count_finish(seqs[0].tracker.finish_reason or "stop")
                    m.e2e.observe(now - seqs[0].arrival)
        return outputs

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """n completions share the prompt's KV: full blocks by reference, the partly filled last block copied.
        Returns the children that run now. A child that finds no free block for its copy (or no room under
        max_num_seqs) waits at the head of the queue as a prompt of its own, as vLLM runs every one of n: it finds
        the full blocks in the prefix cache, recomputes the rest and samples its first token then."""
        running, queued = [], []
        bs = self.blocks.block_size
        partial = parent.num_computed % bs
        for i in range(1, parent.params.n):
            seed = None if parent.params.seed is None else parent.params.seed + i
            child = Sequence(parent.request_id, i, parent.params, list(parent.token_ids), parent.prompt_len,
                             parent.items, self._tracker(parent.params, parent.max_tokens), self._generator(seed),
                             arrival=parent.arrival, admitted=True, num_cached=parent.num_cached,
                             max_tokens=parent.max_tokens)
            room = len(self.scheduler.running) < self.config.max_num_seqs
            fresh = self.blocks.allocate(1) if room and partial else None
            if not room or (partial and fresh is None):
                queued.append(child)
                continue
            child.blocks = list(parent.blocks)
            if partial:
                self.kv.copy_block(child.blocks[-1], fresh[0])
                self.blocks.take(child.blocks[:-1])
                child.blocks[-1] = fresh[0]
            else:
                self.blocks.take(child.blocks)
            child.status, child.num_computed, child.registered = RUNNING, parent.num_computed, parent.registered
            child.hashes = list(parent.hashes)
            self.scheduler.running.append(child)
            running.append(child)
        self.scheduler.waiting.extendleft(reversed(queued))
        self.requests[parent.request_id] += running + queued
        return running

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        seq.status = FINISHED

    def _output(self, request_id: str, seqs: list[Sequence], finished: bool) -> RequestOutput:
        outs = []
        for s in seqs:
            t = s.tracker
            outs.append(CompletionOutput(s.index, t.text[:t.sent], list(t.token_ids), t.finish_reason, t.stop_reason,
                                         s.delta))
            s.delta = ""
        first = seqs[0]
        return RequestOutput(request_id, first.token_ids[:first.prompt_len], outs, finished, first.num_cached,
                             {"arrival": first.arrival, "first_token": first.first_token})

    def _tracker(self, params: SamplingParams, max_tokens: int) -> TextTracker:
        return TextTracker(self.tokenizer, eos_ids=self.eos_ids, stop_token_ids=params.stop_token_ids,
                           stop=params.stop, max_tokens=max_tokens, min_tokens=params.min_tokens,
                           ignore_eos=params.ignore_eos, skip_special_tokens=params.skip_special_tokens)

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.model.device).manual_seed(int(seed) % 2**63)

    # ------------------------------------------------------------------ state
    def snapshot(self) -> dict[str, Any]:
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "kv_usage": self.blocks.usage,
                "running_requests": len({seq.request_id for seq in s.running}),  # n > 1: one request, n rows
                "kv_blocks": self.blocks.num_blocks, "preemptions": s.num_preemptions,
                "prefix_queries": s.prefix_queries, "prefix_hits": s.prefix_hits,
                "vision_queries": self.vision_cache.queries, "vision_hits": self.vision_cache.hits,
                "vision_bytes": self.vision_cache.bytes}


__all__ = ["Engine", "EngineConfig", "default_kv_memory"]
