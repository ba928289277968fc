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


class PagedKVCache:
    """The engine's KV pool: per layer one (H_kv, num_blocks * block_size, D) tensor for keys and one for values,
    allocated once. A token's slot is block_id * block_size + offset; sequences own blocks through a block table
    (engine/blocks.py), so rows of any length share one pool and blocks can be shared by several sequences. Heads
    first: a gather of a sequence's slots is already the (H_kv, context, D) layout attention multiplies."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_kv_heads, num_blocks * block_size, head_dim)
        # empty, not zeros: a page of the pool costs memory only once a block on it is first written, and only
        # written slots are ever read (padding reads repeat a sequence's own first slot)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's keys and values in every layer (a forked sequence's partly filled last block)."""
        bs = self.block_size
        for buffers in (self.keys, self.values):
            for t in buffers:
                t[:, dst * bs:(dst + 1) * bs] = t[:, src * bs:(src + 1) * bs]


class PagedBatch:
    """One engine step over a flat batch of N new tokens from several sequences (passed as the model's `cache`).

    slots (N,): where each new token's K/V is written. segments: per sequence (q_start, q_len, gather) where the
    sequence's new queries are q[q_start:q_start+q_len] and it attends to the keys read from the pool at
    `gather` (context,) slots: its earlier tokens, then the new ones, causally. Decoding sequences (one query
    each) attend together in two batched matmuls over their keys padded to the longest; prompt chunks one SDPA
    call each."""

    def __init__(self, cache: PagedKVCache, slots: torch.Tensor, segments: list[tuple[int, int, torch.Tensor]],
                 varlen=None):
        self.cache, self.slots, self.segments = cache, slots, segments
        self.length = 0  # the model's KVCache interface: positions come from the caller
        self.varlen = varlen  # flash-attn's flash_attn_varlen_func on CUDA (fp16/bf16), else SDPA
        device = slots.device
        if varlen is not None:
            lengths_q = [0] + [q_len for _, q_len, _ in segments]
            lengths_k = [0] + [g.shape[0] for _, _, g in segments]
            self.cu_q = torch.tensor(lengths_q, device=device).cumsum(0).to(torch.int32)
            self.cu_k = torch.tensor(lengths_k, device=device).cumsum(0).to(torch.int32)
            self.max_q, self.max_k = max(lengths_q), max(lengths_k)
            self.gather_all = torch.cat([g for _, _, g in segments])
            return
        decode = [(start, g) for start, q_len, g in segments if q_len == 1]
        self.chunks = [seg for seg in segments if seg[1] > 1]
        self.decode_rows = None
        if len(decode) > 1:
            width = max(g.shape[0] for _, g in decode)
            index = torch.empty(len(decode), width, dtype=torch.long, device=device)
            for i, (_, g) in enumerate(decode):
                index[i, :g.shape[0]] = g
                index[i, g.shape[0]:] = g[0]  # padding: a slot this sequence wrote (finite), masked out below
            lengths = torch.tensor([g.shape[0] for _, g in decode], device=device)
            starts = [start for start, _ in decode]
            # all rows decode, in order (the common step): q and the output need no gather or scatter
            self.decode_rows = None if starts == list(range(len(segments))) else torch.tensor(starts, device=device)
            self.decode_index = index.flatten()  # (B * width,) pool slots, row by row
            padding = torch.arange(width, device=device)[None] >= lengths[:, None]  # (B, width)
            self.decode_bias = torch.zeros(len(decode), 1, width, device=device).masked_fill_(padding[:, None],
                                                                                             float("-inf"))
            self.decoding = True
        else:
            self.chunks, self.decoding = segments, False

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, H_kv, N, D) new tokens -> (1, H, N, D); stores k/v in the pool first."""
        from onevision.models.attention import sdpa

        keys, values = self.cache.keys[layer], self.cache.values[layer]  # (H_kv, slots, D)
        keys[:, self.slots] = k[0]
        values[:, self.slots] = v[0]
        if self.varlen is not None:  # one kernel for every sequence; causal aligned to each one's last key
            kk = keys.transpose(0, 1)[self.gather_all]  # (total keys, H_kv, D), contiguous as flash-attn wants
            vv = values.transpose(0, 1)[self.gather_all]
            out = self.varlen(q[0].transpose(0, 1), kk, vv, self.cu_q, self.cu_k, self.max_q, self.max_k,
                              softmax_scale=scale, causal=True)
            return out.transpose(0, 1)[None]
        if not self.chunks and not self.decoding:
            return q  # nothing scheduled
        out = None
        if self.decoding:
            rows = self._decode(q, keys, values, scale)  # (H, B, D)
            if self.decode_rows is None and not self.chunks:
                return rows[None]
            out = torch.empty_like(q)
            out[0, :, self.decode_rows if self.decode_rows is not None else slice(0, rows.shape[1])] = rows
        elif len(self.chunks) > 1:
            out = torch.empty_like(q)
        for start, q_len, gather in self.chunks:
            ctx = gather.shape[0]
            kk, vv = keys.index_select(1, gather)[None], values.index_select(1, gather)[None]  # (1, H_kv, ctx, D)
            qq = q[:, :, start:start + q_len]
            if q_len == 1 or q_len == ctx:  # one query sees everything; a fresh prompt is plain causal
                mask = None
            else:  # a chunk after cached tokens: query i sees keys up to ctx - q_len + i
                mask = (torch.arange(q_len, device=q.device)[:, None] + (ctx - q_len)
                        >= torch.arange(ctx, device=q.device)[None, :])[None, None]
            result = sdpa(qq, kk, vv, mask, True, scale)
            if out is None:
                return result
            out[:, :, start:start + q_len] = result
        return out

    def _decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """One query per sequence against its padded keys: two batched matmuls, which beat SDPA's dispatch (and its
        threads) at this size. Returns (H, B, D)."""
        h_kv, d = keys.shape[0], keys.shape[-1]
        b, width = self.decode_bias.shape[0], self.decode_bias.shape[-1]
        qq = q[0] if self.decode_rows is None else q[0, :, self.decode_rows]  # (H, B, D)
        qq = qq.reshape(h_kv, -1, b, d).transpose(1, 2).reshape(h_kv * b, -1, d)  # (H_kv * B, rep, D)
        # index_select, not keys[:, index]: advanced indexing on dim 1 took 6x longer (CPU, 8 rows)
        kk = keys.index_select(1, self.decode_index).view(h_kv * b, width, d)  # (H_kv * B, width, D)
        vv = values.index_select(1, self.decode_index).view(h_kv * b, width, d)
        scores = torch.bmm(qq, kk.transpose(1, 2)).float() * scale  # (H_kv * B, rep, width)
        scores = (scores.view(h_kv, b, -1, width) + self.decode_bias).view(h_kv * b, -1, width)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        rows = torch.bmm(probs, vv)  # (H_kv * B, rep, D)
        return rows.view(h_kv, b, -1, d).transpose(1, 2).reshape(-1, b, d)  # (H, B, D)

    def advance(self) -> None:
        pass
