"""KV block allocation with refcounts and the prefix cache (hash of a full block -> block id).

A block's hash chains the previous block's hash, the block's token ids and, for every image or video whose
placeholders overlap it, (content hash of the item, item start - block start): placeholder ids are the same for
every image, so the item hash is what tells two images apart. Only full blocks are hashed. A freed block keeps
its hash and stays findable until the allocator hands it out again (least recently freed first), so a finished
conversation's KV is reused by its next turn for as long as memory allows.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence


def block_hash(parent: bytes, tokens: Sequence[int], extras: Sequence[tuple[bytes, int]]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens))
    for item_hash, offset in extras:
        h.update(item_hash)
        h.update(int(offset).to_bytes(8, "little", signed=True))
    return h.digest()


def block_hashes(tokens: Sequence[int], items: Sequence[tuple[int, int, bytes]], block_size: int,
                 start: int = 0, parent: bytes = b"") -> list[bytes]:
    """Hashes of the full blocks of `tokens` from block `start` on; items: (start, length, hash) per media item."""
    out = []
    for b in range(start, len(tokens) // block_size):
        lo, hi = b * block_size, (b + 1) * block_size
        extras = [(h, s - lo) for s, n, h in items if s < hi and s + n > lo]
        parent = block_hash(parent, tokens[lo:hi], extras)
        out.append(parent)
    return out


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self.free: collections.OrderedDict[int, None] = collections.OrderedDict((i, None) for i in range(num_blocks))
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The longest run of leading blocks already in the cache."""
        hit = []
        for h in hashes:
            block = self.by_hash.get(h)
            if block is None:
                break
            hit.append(block)
        return hit

    def take(self, blocks: Sequence[int]) -> None:
        """Reference cached blocks (a prefix hit)."""
        for b in blocks:
            if self.refs[b] == 0:
                del self.free[b]
            self.refs[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks, or None (nothing taken) when fewer are free."""
        if n > len(self.free):
            return None
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)  # least recently freed first: recent prefixes live longest
            old = self.hash_of.pop(b, None)
            if old is not None and self.by_hash.get(old) == b:
                del self.by_hash[old]
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; blocks nobody holds become free but stay findable by hash. The last
        block of a sequence is released first, so the allocator reuses suffixes before shared prefixes."""
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free[b] = None

    def forget_hashes(self) -> None:
        """Nothing is findable any more (the KV was computed with weights that have changed since)."""
        self.by_hash.clear()
        self.hash_of.clear()

    def register(self, block: int, h: bytes) -> None:
        """A block became full: make it findable (the first block to hold a prefix keeps it)."""
        if h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h] = block
            self.hash_of[block] = h


__all__ = ["BlockManager", "block_hash", "block_hashes"]
