"""Scaled dot-product attention in the three flavours the reference offers: sdpa (default), eager, flash_attention_2.

The SDPA call pattern follows the reference exactly (SPEC §5.7), because it decides which kernel runs and so
the last bits of the result: no mask -> `is_causal` + `enable_gqa`; a mask and one query -> queries packed as
(B, kv_heads, n_rep, D); otherwise K/V repeated to every query head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def check_implementation(name: str | None) -> str:
    """Validate `attn_implementation`; flash_attention_2 needs the flash-attn package and CUDA."""
    name = name or "sdpa"
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {IMPLEMENTATIONS}, got {name!r}")
    if name == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            raise ImportError("attn_implementation='flash_attention_2' needs the flash-attn package "
                              "(pip install flash-attn) and a CUDA GPU; use attn_implementation='sdpa' instead.") from e
    return name


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # (B, H_kv, S, D) -> (B, H_kv * n_rep, S, D)
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
         scale: float) -> torch.Tensor:
    """q (B, H, Q, D), k/v (B, H_kv, K, D), mask bool (B, 1, Q, K) True = attend or None -> (B, H, Q, D)."""
    n_rep = q.shape[1] // k.shape[1]
    q_len = q.shape[2]
    kwargs = {}
    packed = False
    if n_rep > 1:
        if mask is None and k.shape[-1] <= 256:
            kwargs["enable_gqa"] = True
        elif q_len == 1:
            b, h, _, d = q.shape
            q = q.reshape(b, h // n_rep, n_rep, d)  # one query per head -> n_rep "queries" per kv head
            packed = True
        else:
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    is_causal = causal and q_len > 1 and mask is None
    if is_causal and k.shape[2] > q_len:
        k, v = k[:, :, :q_len], v[:, :, :q_len]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal, **kwargs)
    if packed:
        out = out.reshape(out.shape[0], -1, 1, out.shape[-1])
    return out


def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax(QK^T) V with the weights returned (for output_attentions). Softmax in float32."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is None and causal and q.shape[2] > 1:
        q_len, k_len = q.shape[2], k.shape[2]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)[None, None]
    if mask is not None:
        scores = scores + torch.zeros_like(mask, dtype=scores.dtype).masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v), weights


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
          scale: float) -> torch.Tensor:
    """flash-attn 2 on CUDA (fp16/bf16). Padding masks are not supported on this path: left-padded batches need sdpa."""
    from flash_attn import flash_attn_func

    if not q.is_cuda:
        raise ValueError(f"attn_implementation='flash_attention_2' runs on CUDA only, but the model is on {q.device}; "
                         "move it to a GPU or use attn_implementation='sdpa'.")
    if mask is not None and not _is_plain_causal(mask):
        raise ValueError("attn_implementation='flash_attention_2' runs unpadded inputs only; use "
                         "attn_implementation='sdpa' for padded batches.")
    # flash-attn wants (B, S, H, D); it handles GQA and lower-right causal alignment itself.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                          causal=causal and q.shape[2] > 1)
    return out.transpose(1, 2)


def _is_plain_causal(mask: torch.Tensor) -> bool:
    q_len, k_len = mask.shape[-2:]
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril(k_len - q_len)
    return bool((mask == causal).all())


def attend(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
           scale: float, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch; returns (out (B, H, Q, D), weights or None). need_weights forces the eager path."""
    if need_weights or impl == "eager":
        out, weights = eager(q, k, v, mask, causal, scale)
        return out, weights if need_weights else None
    if impl == "flash_attention_2":
        return flash(q, k, v, mask, causal, scale), None
    return sdpa(q, k, v, mask, causal, scale), None
