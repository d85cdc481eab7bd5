"""A KV cache of many rows, each at its own position: what continuous batching decodes with.

``kv_cache.py`` caches one sequence (or a batch of sequences of one length).
Serving mixes requests of every length, so here each row (a slot of the cache)
has its own length and position: a decode step feeds one token per row, writes
each row's key and value at that row's place, and masks away the places a
shorter row has not filled. Prompts are prefilled into a spare slot in chunks,
then copied to the slot the row decodes from.

Positions work for both kinds. Learned positions are looked up per row
(``wpe`` of each row's own position); RoPE rotates each row's query and key by
its own angle, and past ``block_size`` a row's slots are a ring buffer (slot
``position % block_size``), as :class:`~nanogpt_core.model.kv_cache.LayerCache`
does for one sequence: attention does not depend on the order of the keys.

Bytes: every cached token holds a key and a value of ``n_embd`` numbers in
each layer, ``2 * n_layer * n_embd * bytes`` per row and token
(:func:`kv_bytes_per_token`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nanogpt_core.model.gpt import rotary_cos_sin

if TYPE_CHECKING:
    from nanogpt_core.model.config import GPTConfig
    from nanogpt_core.model.gpt import GPT


def kv_bytes_per_token(config: GPTConfig, dtype: torch.dtype) -> int:
    """Bytes one row's KV cache takes per token: a key and a value per layer."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layer * config.n_embd * element


class BatchKVCache:
    """Keys and values (slots, nh, block_size, hs) per layer; each slot is one row."""

    def __init__(
        self, config: GPTConfig, slots: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        head_size = config.n_embd // config.n_head
        shape = (slots, config.n_head, config.block_size, head_size)
        self.block_size = config.block_size
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)
        ]

    def copy_slot(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` places of slot ``source`` to slot ``target``."""
        if source == target:
            return
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]

    def prefill_view(self, layer: int, slot: int, start: int) -> PrefillView:
        """Layer ``layer`` of one row whose first ``start`` places are filled."""
        return PrefillView(self, layer, slot, start)

    def decode_view(
        self, layer: int, rows: torch.Tensor, write: torch.Tensor, span: int
    ) -> DecodeView:
        """Layer ``layer`` of slots ``rows`` (``arange(B)``), each writing at its ``write`` (B,)."""
        return DecodeView(self, layer, rows, write, span)


class PrefillView:
    """What attention sees of one row being prefilled: its cached places, then the chunk."""

    def __init__(self, cache: BatchKVCache, layer: int, slot: int, start: int) -> None:
        self.cache, self.layer, self.slot, self.length = cache, layer, slot, start

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a chunk's keys and values (1, nh, T, hs); return the row's (1, nh, start+T, hs)."""
        end = self.length + k.size(2)
        keys, values = self.cache.keys[self.layer], self.cache.values[self.layer]
        keys[self.slot : self.slot + 1, :, self.length : end] = k
        values[self.slot : self.slot + 1, :, self.length : end] = v
        return keys[self.slot : self.slot + 1, :, :end], values[self.slot : self.slot + 1, :, :end]


class DecodeView:
    """What attention sees of the decoding rows: slots ``0..rows-1``, places ``0..span-1``."""

    length = 1  # never "first": the prompt is cached, one new token per row

    def __init__(
        self, cache: BatchKVCache, layer: int, rows: torch.Tensor, write: torch.Tensor, span: int
    ) -> None:
        self.cache, self.layer, self.rows, self.write, self.span = cache, layer, rows, write, span

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's new key and value (rows, nh, 1, hs) at its own place."""
        keys, values = self.cache.keys[self.layer], self.cache.values[self.layer]
        # Index tensors on the first and third dimensions: (B, nh, hs) places, no mask.
        keys[self.rows, :, self.write] = k[:, :, 0]
        values[self.rows, :, self.write] = v[:, :, 0]
        count = self.rows.numel()
        return keys[:count, :, : self.span], values[:count, :, : self.span]


def prefill_mask(start: int, length: int, device: torch.device | str) -> torch.Tensor | None:
    """Which places each of a chunk's queries sees (1, 1, T, start+T); None for a first chunk.

    A first chunk is plain causal attention, as an unbatched prompt gets.
    """
    if start == 0:
        return None
    query = torch.arange(start, start + length, device=device)[:, None]
    key = torch.arange(start + length, device=device)[None, :]
    return (key <= query)[None, None]


def decode_mask(filled: torch.Tensor, span: int) -> torch.Tensor:
    """Which of ``span`` places each row's new token sees (rows, 1, 1, span): its filled ones."""
    places = torch.arange(span, device=filled.device)
    return (places[None, :] < filled[:, None])[:, None, None, :]


def forward_rows(
    model: GPT,
    idx: torch.Tensor,
    positions: torch.Tensor,
    views: list[PrefillView] | list[DecodeView],
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """The last position's logits (B, V) of tokens ``idx`` (B, T) at ``positions`` (B, T).

    The steps of ``GPT.hidden`` and ``GPT.head_logits`` with a position per row
    and token instead of one shared range, and a cache view per layer.
    """
    transformer = model.transformer
    x = transformer.wte(idx)  # (B, T, C)
    rope = None
    if model.config.position == "learned":
        x = x + transformer.wpe(positions)  # (B, T, C)
    else:
        cos, sin = rotary_cos_sin(positions.reshape(-1), model.rope_inv_freq)  # (B*T, hs)
        B, T = idx.shape
        rope = (cos.view(B, 1, T, -1), sin.view(B, 1, T, -1))  # broadcast over heads
    x = transformer.drop(x)
    for block, view in zip(transformer.h, views, strict=True):
        x = block(x, view, rope, mask)
    x = transformer.ln_f(x)
    return model.head_logits(x[:, -1, :])  # (B, V)
