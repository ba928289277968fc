"""Pre-allocated KV cache.

One buffer pair per layer, (B, H_kv, capacity, D), written in place. `update` returns views of the filled
prefix, so attention sees exactly the keys a growing cache would hold (same kernels and masks as the reference's
dynamic cache, hence the same bits) without any per-step allocation. `generate` sizes the cache to
prompt + max_new_tokens up front; a plain forward(use_cache=True) makes one that fits and grows it on demand.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0  # tokens already stored (same for every row; padding is masked, not skipped)
        self._pending = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, H_kv, Q, D) after the cached prefix; return (B, H_kv, length + Q, D) views."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            self._grow(end)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self._pending = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self) -> None:
        """Called once per forward, after every layer has written its new tokens."""
        self.length = max(self.length, self._pending)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (a negative int, the reference's convention)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_empty((*old.shape[:2], new_cap, old.shape[3]))
                new[:, :, :self.length] = old[:, :, :self.length]
                buffers[i] = new

    def repeat_interleave(self, n: int) -> None:
        """Expand every row n times (num_return_sequences sharing one prefill)."""
        self.keys = [k.repeat_interleave(n, dim=0) for k in self.keys]
        self.values = [v.repeat_interleave(n, dim=0) for v in self.values]

    def __len__(self) -> int:
        return len(self.keys)
