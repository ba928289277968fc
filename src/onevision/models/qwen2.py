"""Qwen2 decoder: RMSNorm, rotary embeddings (theta from config), grouped-query attention with q/k/v bias, SwiGLU.

Reference: transformers Qwen2Model. Numerics follow it: RMSNorm and RoPE cos/sin in float32 then cast back,
softmax in float32 (eager), the reference's SDPA call pattern (attention.py) and mask rules (`causal_mask`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from onevision.config import Qwen2Config
from onevision.models.cache import KVCache, PagedBatch
from onevision.models.attention import attend


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        rope_type = cfg.rope_parameters.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported (LLaVA-OneVision's Qwen2 uses 'default')")
        self.dim, self.theta = cfg.head_dim, cfg.rope_theta
        # computed on the CPU even under a meta-device context (meta arithmetic drags in torch's compiler)
        self.register_buffer("inv_freq", self.compute_inv_freq("cpu"), persistent=False)

    def compute_inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        return 1.0 / (self.theta**exponents)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, S) -> cos, sin (B, S, D) in `dtype`, computed in float32
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def project(module: nn.Module, group: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The outputs of the linears `module.FUSABLE[group]` on x: one call each (the reference), or one GEMM over their
    concatenated weights where a CPU backend fused them for the engine's batched steps (cpu.PackedGroup in
    module.__dict__["fused_" + group]; it returns None for calls it does not take)."""
    fused = module.__dict__.get("fused_" + group)
    if fused is not None and (out := fused(x)) is not None:
        return out
    return tuple(getattr(module, name)(x) for name in module.FUSABLE[group])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Qwen2Attention(nn.Module):
    FUSABLE = {"qkv": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, cfg: Qwen2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.impl = "sdpa"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, s, _ = x.shape
        # (B, S, C) -> (B, heads, S, head_dim)
        q, k, v = project(self, "qkv", x)
        q = q.view(b, s, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, s, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if isinstance(cache, PagedBatch):  # the engine's flat batch of several sequences
            out = cache.attend(self.layer_idx, q, k, v, self.head_dim**-0.5)
            return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), None
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out, weights = attend(self.impl, q, k, v, mask, True, self.head_dim**-0.5, need_weights)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), weights


class Qwen2MLP(nn.Module):
    FUSABLE = {"gate_up": ("gate_proj", "up_proj")}

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"Qwen2 hidden_act {cfg.hidden_act!r} is not supported; expected 'silu'")
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(self, "gate_up", x)
        return self.down_proj(F.silu(gate) * up)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen2Attention(cfg, layer_idx)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, need_weights):
        h, weights = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, need_weights)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), weights


def causal_mask(attention_mask: torch.Tensor | None, q_len: int, past: int, kv_len: int) -> torch.Tensor | None:
    """Boolean (B, 1, Q, K) mask, True = attend, or None when SDPA's own causal flag is exact (reference rules):
    no padding and (one query or no cache), or an empty cache whose only masked keys lie in the future."""
    padding = None if attention_mask is None else attention_mask[:, :kv_len].bool()
    if (q_len == 1 or kv_len == q_len) and (padding is None or bool(padding.all())):
        return None
    if past == 0 and (padding is None or (bool(padding[:, :q_len].all()) and not bool(padding[:, q_len:].any()))):
        return None
    device = attention_mask.device if attention_mask is not None else None
    mask = (torch.arange(q_len, device=device)[:, None] + past >= torch.arange(kv_len, device=device)[None, :])
    mask = mask[None, None]
    if padding is not None:
        mask = mask & padding[:, None, None, :]
    return mask


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        if any(t != "full_attention" for t in cfg.layer_types):
            raise ValueError("sliding-window attention layers are not supported (no LLaVA-OneVision checkpoint uses "
                             f"them); got layer_types={sorted(set(cfg.layer_types))}. Set use_sliding_window=false.")
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)

    def make_cache(self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, capacity, dtype, device)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | PagedBatch | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False):
        """inputs_embeds (B, S, C), attention_mask (B, past + S) -> (last hidden (B, S, C), hidden states, attentions).
        With a PagedBatch (the engine): B = 1, S = every sequence's new tokens, per-token position_ids (1, S)."""
        b, s, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=inputs_embeds.device)[None].expand(b, -1)
        if attention_mask is not None and attention_mask.shape != (b, past + s):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, cached + new "
                             f"tokens) = {(b, past + s)}")
        mask = causal_mask(attention_mask, s, past, past + s)
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        hidden_states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for layer in self.layers:
            x, weights = layer(x, cos, sin, mask, cache, output_attentions)
            if hidden_states is not None:
                hidden_states.append(x)
            if attentions is not None:
                attentions.append(weights)
        if cache is not None:
            cache.advance()
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states[-1] = x
        return x, hidden_states, attentions
