"""Choosing the next token from the last position's logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def pick_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
    vocab_limit: int | None,
) -> torch.Tensor:
    """Choose the next token (B, 1) from the last position's logits (B, V)."""
    logits = logits.float()
    if vocab_limit is not None:
        logits[:, vocab_limit:] = -float("inf")
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # Keep the smallest set of likeliest tokens whose probability reaches top_p.
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator)
