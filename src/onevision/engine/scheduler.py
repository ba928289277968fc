"""Which sequences run in the next step, and how many tokens each (see the design note in engine/__init__.py).

Each step has a token budget. Running sequences that decode (one token each) are served first, so a long
prompt arriving never freezes the streams already running; then running prefills continue in chunks; then
waiting sequences are admitted in arrival order while the budget, max_num_seqs and free KV blocks allow.
A waiting sequence is admitted once its media are encoded (encoder.py works on them a slice per step).
When a running sequence needs a block and none is free, the most recently admitted running sequence is
preempted: its blocks are released (they stay in the prefix cache) and it goes back to the front of the queue,
to be recomputed from its tokens so far (prompt + generated), which leaves its answer unchanged.
"""

from __future__ import annotations

import collections

from onevision.engine.blocks import BlockManager, block_hashes
from onevision.engine.sequence import RUNNING, WAITING, Sequence


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 prefix_caching: bool = True, ready=lambda seq: True):
        self.blocks, self.max_num_seqs, self.budget = blocks, max_num_seqs, max_num_batched_tokens
        self.prefix_caching, self.ready = prefix_caching, ready  # ready(seq): its media are encoded
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queries = self.prefix_hits = 0  # tokens looked up / found in the prefix cache

    def add(self, seq: Sequence) -> None:
        seq.status = WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """A finished or aborted sequence leaves; its blocks go back to the pool (and stay in the prefix cache)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.blocks)
        seq.blocks = []

    # ------------------------------------------------------------------ one step
    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.budget
        out: list[tuple[Sequence, int]] = []
        preempted = False
        decoding = [s for s in self.running if len(s.token_ids) - s.num_computed == 1]
        prefilling = [s for s in self.running if len(s.token_ids) - s.num_computed > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status != RUNNING:  # preempted earlier in this loop
                continue
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            while not self._grow(seq, seq.num_computed + n):
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                out = [(s, k) for s, k in out if s is not victim]
                if victim is seq:
                    break
            if seq.status == RUNNING:
                out.append((seq, n))
            budget = self.budget - sum(k for _, k in out)
        # waiting sequences whose media are encoded, in arrival order (one still being encoded is passed by)
        for seq in [s for s in self.waiting if self.ready(s)]:
            if budget <= 0 or preempted or len(self.running) >= self.max_num_seqs:
                break
            if not seq.blocks:
                self._reuse_prefix(seq)
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + n):
                self.blocks.release(seq.blocks)  # keep the queue order; the hit is looked up again next time
                seq.blocks, seq.num_computed = [], 0
                break
            self.waiting.remove(seq)
            if not seq.admitted:  # prefix-cache statistics count each request's prompt once
                seq.admitted, seq.num_cached = True, seq.num_computed
                self.prefix_queries += len(seq.token_ids)
                self.prefix_hits += seq.num_computed
            seq.status = RUNNING
            self.running.append(seq)
            out.append((seq, n))
            budget -= n
        return out

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.registered, seq.status = [], 0, 0, WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ------------------------------------------------------------------ blocks
    def _grow(self, seq: Sequence, tokens: int) -> bool:
        need = self.blocks.blocks_needed(tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.blocks.num_free:
            return False
        seq.blocks += self.blocks.allocate(need)
        return True

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Take the cached blocks that hold this sequence's leading tokens (never its last token: its logits are
        needed)."""
        bs = self.blocks.block_size
        usable = (len(seq.token_ids) - 1) // bs
        hit = []
        if self.prefix_caching:
            self.extend_hashes(seq, usable)
            hit = self.blocks.lookup(seq.hashes[:usable])
        self.blocks.take(hit)
        seq.blocks, seq.num_computed, seq.registered = list(hit), len(hit) * bs, len(hit)

    def extend_hashes(self, seq: Sequence, full_blocks: int) -> None:
        if len(seq.hashes) < full_blocks:
            bs = self.blocks.block_size
            parent = seq.hashes[-1] if seq.hashes else b""
            seq.hashes += block_hashes(seq.token_ids[:full_blocks * bs], seq.item_spans(), bs, len(seq.hashes), parent)

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: make the blocks this sequence has filled findable by later requests."""
        if not self.prefix_caching:
            return
        full = seq.num_computed // self.blocks.block_size
        self.extend_hashes(seq, full)
        for b in range(seq.registered, full):
            self.blocks.register(seq.blocks[b], seq.hashes[b])
        seq.registered = max(seq.registered, full)


__all__ = ["Scheduler"]
