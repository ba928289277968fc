"""Logits processing and token choice, in the reference's order and arithmetic (transformers 5.24):

    repetition_penalty -> min_new_tokens (eos banned) -> [sampling only] temperature -> top_k -> top_p -> min_p

All functions take float32 scores (B, V) and return new tensors; -inf marks removed tokens.
"""

from __future__ import annotations

import torch


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Every id in `seen` (B, L) (prompt, placeholders and padding included): s<0 -> s*p, else s/p."""
    score = torch.gather(scores, 1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter(1, seen, score)


def ban_tokens(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Set the scores of `ids` (1-D) to -inf (min_new_tokens not reached yet: eos is not allowed)."""
    banned = torch.isin(torch.arange(scores.shape[-1], device=scores.device), ids)
    return torch.where(banned, -float("inf"), scores)


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, -float("inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass exceeds p (at least one)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one (the top token always stays)."""
    probs = torch.softmax(scores, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
    return scores.masked_fill(remove, -float("inf"))


def process(scores: torch.Tensor, seen: torch.Tensor, *, repetition: float = 1.0, ban: torch.Tensor | None = None,
            do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
            min_p: float | None = None) -> torch.Tensor:
    if repetition != 1.0:
        scores = repetition_penalty(scores, seen, repetition)
    if ban is not None:
        scores = ban_tokens(scores, ban)
    if do_sample:
        if temperature != 1.0:
            scores = scores / temperature
        if top_k:
            scores = top_k_filter(scores, top_k)
        if top_p < 1.0:
            scores = top_p_filter(scores, top_p)
        if min_p is not None:
            scores = min_p_filter(scores, min_p)
    return scores


def choose(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) float32 scores -> (B,) token ids: argmax, or a draw from softmax(scores) like the reference."""
    if not do_sample:
        return torch.argmax(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
