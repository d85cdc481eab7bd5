"""Sampling every row of a batch in one vectorised step: what ``gpt serve`` decodes with.

Each row of a batch has its own temperature, top-k, top-p and generator.
Sampling them one row at a time (``pick_next_token`` per row, then ``int()``)
reads the device twice per row and token; here the settings are tensors (one
value per row), the cuts are ``sort`` + ``masked_fill``/``scatter`` (no
boolean-mask assignment, so no data-dependent shapes), and the new tokens come
back in one transfer per step.

The draw is the one ``torch.multinomial`` makes for a single sample: the
index of the largest ``probs / E`` with ``E`` i.i.d. Exponential(1) noise
(``argmax`` of that is a sample from ``probs``; ATen's multinomial does exactly
this for ``num_samples = 1``). Each sampled row draws its noise from its own
generator (``exponential_`` on that row, with no read back), then one
``argmax`` over the batch picks every token. So for the same generators the
tokens equal those of ``pick_next_token`` row by row, bit for bit (tested on
the CPU), and seeded outputs are those of ``gpt sample``; what is gone is
multinomial's check of its input, which read the device: a row whose
probabilities are not finite is reported in the same transfer as the tokens
(:attr:`Draw.bad`), so only that row fails.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from torch.nn import functional as F


@attrs.frozen
class RowSettings:
    """One row's sampling: temperature (0 is greedy), top-k and top-p (None: off), generator."""

    temperature: float
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None


@attrs.frozen
class Draw:
    """The tokens of one step, on the host, and which rows had no valid distribution."""

    tokens: list[int]
    bad: list[bool]
    on_device: torch.Tensor  # (B,) the same tokens, to feed the next step


class BatchSampler:
    """The settings of a batch's rows as tensors, built once per batch composition.

    ``settings`` changes only when a row joins or leaves; building the tensors
    then (not every step) keeps the host-to-device copies off the decode loop.
    """

    def __init__(self, settings: Sequence[RowSettings], device: torch.device | str) -> None:
        self.settings = list(settings)
        temps = [s.temperature for s in self.settings]
        self.greedy = torch.tensor([t == 0 for t in temps], device=device)  # (B,)
        self.all_greedy = all(t == 0 for t in temps)
        # Greedy rows divide by 1: their sampled branch is computed and discarded.
        self.temperature = torch.tensor(
            [[t if t != 0 else 1.0] for t in temps], dtype=torch.float32, device=device
        )  # (B, 1)
        self.any_top_k = any(s.top_k is not None for s in self.settings)
        self.top_k = torch.tensor(
            [s.top_k if s.top_k is not None else 2**62 for s in self.settings], device=device
        )  # (B,); clamped to V when used
        self.any_top_p = any(s.top_p is not None and s.top_p < 1.0 for s in self.settings)
        # Rows without a nucleus cut get +inf: "cumulative probability > inf" is never true,
        # where 1.0 could be (float rounding of the cumulative sum).
        self.top_p = torch.tensor(
            [[s.top_p if s.top_p is not None and s.top_p < 1.0 else float("inf")]
             for s in self.settings],
            dtype=torch.float32,
            device=device,
        )  # fmt: skip

    def sample(self, logits: torch.Tensor, vocab_limit: int | None) -> Draw:
        """The next token of every row from the last position's logits (B, V)."""
        tokens, bad = self.sample_on_device(logits, vocab_limit)
        both = torch.stack((tokens, bad.long())).tolist()  # the one transfer of the step
        return Draw(both[0], [bool(b) for b in both[1]], tokens)

    def sample_on_device(
        self, logits: torch.Tensor, vocab_limit: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B,) and a flag (B,) for rows whose probabilities are not finite."""
        logits = logits.float()
        if vocab_limit is not None and vocab_limit < logits.size(-1):
            logits = logits.clone()
            logits[:, vocab_limit:] = -float("inf")  # a slice: a view, not a boolean mask
        greedy_tokens = torch.argmax(logits, dim=-1)  # (B,)
        greedy_bad = torch.isnan(logits).any(dim=-1)
        if self.all_greedy:
            return greedy_tokens, greedy_bad
        probs = self._probs(logits / self.temperature)
        noise = torch.ones_like(probs)
        for b, s in enumerate(self.settings):
            if s.temperature != 0:
                # The same draw torch.multinomial makes for one sample, from this row's generator.
                noise[b].exponential_(1, generator=s.generator)
        sampled = torch.argmax(probs / noise, dim=-1)  # (B,)
        sampled_bad = ~torch.isfinite(probs).all(dim=-1) | ~(probs.sum(dim=-1) > 0)
        bad = torch.where(self.greedy, greedy_bad, sampled_bad)
        return torch.where(self.greedy, greedy_tokens, sampled), bad

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax after each row's top-k cut, then each row's top-p cut (B, V)."""
        vocab = logits.size(-1)
        if self.any_top_k:
            ordered = torch.sort(logits, dim=-1, descending=True).values
            k = self.top_k.clamp(max=vocab) - 1  # (B,)
            kth = ordered.gather(-1, k[:, None])  # (B, 1): the k-th largest logit
            logits = logits.masked_fill(logits < kth, -float("inf"))
        probs = F.softmax(logits, dim=-1)
        if self.any_top_p:
            # Keep the smallest set of likeliest tokens whose probability reaches top_p.
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > self.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return probs
