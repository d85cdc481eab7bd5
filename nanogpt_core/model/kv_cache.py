"""The KV cache: each layer's keys and values of the tokens generated so far."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from nanogpt_core.model.config import GPTConfig


class LayerCache:
    """One layer's keys and values of the last ``capacity`` tokens (incremental decoding).

    Sampling a token needs the keys and values of every earlier token; keeping
    them turns each step from a forward pass over the whole context into one
    over a single token. Once full, each new token overwrites the oldest (a
    ring buffer): attention of one query over a set of keys does not depend on
    their order, and RoPE keys carry their positions with them.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0  # tokens seen, which may exceed the capacity
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys and values (B, nh, T, hs); return all those cached."""
        B, nh, T, hs = k.shape
        if self.keys is None:
            self.keys = k.new_empty(B, nh, self.capacity, hs)
            self.values = v.new_empty(B, nh, self.capacity, hs)
        if self.length + T <= self.capacity:
            self.keys[:, :, self.length : self.length + T] = k
            self.values[:, :, self.length : self.length + T] = v
            self.length += T
            return self.keys[:, :, : self.length], self.values[:, :, : self.length]
        if T != 1:
            raise ValueError("a full KV cache takes one token at a time")
        slot = self.length % self.capacity  # the oldest token's place
        self.keys[:, :, slot : slot + 1] = k
        self.values[:, :, slot : slot + 1] = v
        self.length += 1
        return self.keys, self.values


class KVCache:
    """A :class:`LayerCache` per block, each of ``block_size`` tokens."""

    def __init__(self, config: GPTConfig) -> None:
        self.layers = [LayerCache(config.block_size) for _ in range(config.n_layer)]

    @property
    def length(self) -> int:
        """Tokens seen so far (with RoPE this goes on past ``block_size``)."""
        return self.layers[0].length
