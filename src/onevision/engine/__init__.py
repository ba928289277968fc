"""onevision's serving engine: continuous batching with a paged KV cache, a prefix cache and a vision cache.

Design (one page)
-----------------
Requests. `Engine.add_request(id, inputs, SamplingParams)` takes one sample as the processor returns it. Its media
become `MediaItem`s (sequence.py): the placeholder run each image or video fills, its processed tiles, and a
content hash (blake2b of the tiles, the image size, multi-image vs anyres vs video mode, feature layer, select
strategy, aspect ratio and pinpoints). A request with n > 1 runs as one sequence until its prompt is prefilled,
then forks into n sequences sharing the prompt's KV blocks (the partly filled last block is copied). A child that
finds no free block (or no room under max_num_seqs) waits at the head of the queue as a prompt of its own, as
vLLM runs each of n: the prefix cache gives it the full blocks and it recomputes the rest.

Queues and steps (scheduler.py). `waiting` (arrival order) and `running`. Every `step()` has a token budget
(`max_num_batched_tokens`): running sequences that decode take one token each first, so streams keep flowing
while a new prompt is prefilled; running prefills continue in chunks with what is left; then waiting sequences
are admitted while the budget, `max_num_seqs` and the free KV blocks allow. One forward runs every scheduled
token of every sequence as one flat batch (runner.py): linear layers see (N, C); attention reads each sequence's
own keys (models/cache.py `PagedBatch`): the decoding sequences together in two batched matmuls over their keys
padded to the longest, each prompt chunk in one SDPA call; on CUDA one flash-attn varlen call for all.

KV cache (models/cache.py, blocks.py). Paged: a pool of `block_size`-token blocks per layer, (H_kv, slots, D)
for keys and for values, sized once from `kv_cache_memory` (default: a share of free memory), never reallocated.
A sequence owns a block table; a token's slot is block * block_size + offset. Paging rather than one slot per
sequence because admission is bounded by the tokens actually held, blocks can be shared (prefix cache, n
completions), and freeing is O(blocks).
Preemption: when a running sequence needs a block and none is free, the most recently admitted running
sequence gives its blocks back and returns to the head of `waiting`; it is later recomputed from its tokens
so far (prompt + generated), which leaves its answer unchanged (a seeded generator keeps its state).

Prefix cache (blocks.py). Each full block is hashed as blake2b(parent hash, its token ids, and for every media
item overlapping it: (item hash, item start - block start)). Placeholder ids are the same for every image, so
the item hash is what separates two images. On admission the leading blocks whose hashes are cached are taken
by reference (never the last prompt token: its logits are needed). Finished sequences release their blocks but
the blocks stay findable until the allocator reuses them, least recently freed first: a conversation's next
turn finds its previous turn's prompt and answer and computes only the new tokens.

Vision cache (vision_cache.py). Projected, packed features per media item, keyed by the item hash, LRU by
bytes (`vision_cache_memory`). Features are computed when a step first reaches an item's placeholders, so a
re-sent image, or a request recomputed after preemption, is not encoded again.

Finishing (generation/streaming.py `TextTracker`). One object per sequence decides eos / stop token / stop
string / length / abort and releases text incrementally (O(1) decode per token, text that could still become a
stop string held back). The server, the CLI, `LLM` and `onevision batch` all read `RequestOutput`s from here.

Threads. `Engine` is driven by one thread. `AsyncEngine` (async_engine.py) runs it on a background thread for
the server, taking requests and aborts through a queue, with the intra-op thread count it is given (`onevision
serve` leaves its main thread one, so the engine thread is the only OpenMP pool: see cpu.py); `LLM` (llm.py) and
the CLI's chat drive it inline.

CPU GEMMs. On CPU in float32 the engine gives every linear a oneDNN-packed copy of its weight and uses it for
calls of 3+ rows inside its steps (cpu.PackedLinear, `cpu_weight_packing`; q/k/v and gate/up as one weight
each, cpu.PackedGroup): MKL runs the 8-16-row GEMMs of batched decode at a third of its rate. Outside the
engine's steps the model keeps the reference GEMM.
"""

from onevision.engine.engine import Engine, EngineConfig
from onevision.engine.params import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["CompletionOutput", "Engine", "EngineConfig", "LLM", "RequestOutput", "SamplingParams"]


def __getattr__(name):
    if name == "LLM":
        from onevision.engine.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from onevision.engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(name)
