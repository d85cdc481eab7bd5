"""The GPT language model, as GPT-2 and nanoGPT have it.

Read top to bottom: LayerNorm, causal self-attention, MLP, a transformer block,
then the GPT that stacks them, with GPT-2's initialisation, the optimizer set-up
and text generation. Parameter names match Hugging Face's ``GPT2LMHeadModel`` one
to one (see ``hf_gpt2.py``), so weights move between the two.

Shapes in comments: B batch, T time (tokens), C channels (n_embd), nh heads,
hs head size (C // nh), V vocabulary.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    """The architecture. Defaults are GPT-2 small (124M parameters)."""

    block_size: int = 1024
    # GPT-2's 50,257 padded up to the nearest multiple of 64: the extra rows are
    # never predicted, but matrix shapes that are multiples of 64 run faster.
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    # GPT-2 has biases in Linear and LayerNorm layers; without them is a bit better and faster.
    bias: bool = True


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop just the bias)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each token sees only itself and the past."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # Query, key and value for all heads in one matrix multiply.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        is_causal = True
        if cache is not None:
            first = cache.length == 0
            k, v = cache.append(k, v)  # every key so far: (B, nh, L, hs)
            if not first:
                # One new token attends to all cached ones: nothing to mask.
                if T != 1:
                    raise ValueError("after the prompt, a KV cache takes one token at a time")
                is_causal = False
        # Flash attention on GPUs that support it; (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The feed-forward part of a block: widen 4x, GELU, project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 used the tanh approximation of GELU; keep it so HF weights match exactly.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """A transformer block: pre-LayerNorm attention and MLP, each with a residual."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class LayerCache:
    """One layer's keys and values of the tokens seen so far (incremental decoding).

    Sampling a token needs the keys and values of every earlier token; keeping
    them turns each step from a forward pass over the whole context into one
    over a single token.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys and values (B, nh, T, hs); return all of them so far."""
        B, nh, T, hs = k.shape
        if self.keys is None:
            self.keys = k.new_empty(B, nh, self.capacity, hs)
            self.values = v.new_empty(B, nh, self.capacity, hs)
        self.keys[:, :, self.length : self.length + T] = k
        self.values[:, :, self.length : self.length + T] = v
        self.length += T
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]


class KVCache:
    """A :class:`LayerCache` per block, up to ``block_size`` tokens."""

    def __init__(self, config: GPTConfig) -> None:
        self.layers = [LayerCache(config.block_size) for _ in range(config.n_layer)]

    @property
    def length(self) -> int:
        """Tokens cached so far."""
        return self.layers[0].length


class GPT(nn.Module):
    """The GPT language model."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
                "wpe": nn.Embedding(config.block_size, config.n_embd),  # learned positions
                "drop": nn.Dropout(config.dropout),
                "h": nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                "ln_f": LayerNorm(config.n_embd, bias=config.bias),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the output layer reuses the input embedding.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): each block
        # adds two of them to the residual stream, whose variance would otherwise grow.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters (the tied token embedding counts once).

        ``non_embedding`` leaves out the token and position embeddings, the count
        scaling laws use (Kaplan et al. 2020).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for ``idx`` (B, T); with ``targets``, also the mean cross-entropy.

        Targets equal to -1 take no loss (padding, prompt tokens). Without targets
        only the last position's logits are computed: that is all sampling needs.
        With a ``cache``, ``idx`` continues the tokens already cached.
        """
        _, T = idx.size()
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of length {start + T} is longer than block_size {self.config.block_size}"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = self.transformer.drop(tok_emb + pos_emb)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache.layers[i] if cache is not None else None)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, V)
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
            )
            return logits, loss
        # Keep the time dimension: (B, 1, V)
        return self.lm_head(x[:, [-1], :]), None

    def configure_optimizers(
        self,
        weight_decay: float,
        learning_rate: float,
        betas: tuple[float, float],
        device_type: str,
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices and embeddings only.

        Biases and LayerNorm gains (1-D tensors) are not decayed: shrinking them
        toward zero only hurts. The fused kernel is used on CUDA where available.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if fused else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward and backward), as in the PaLM paper appendix B."""
        cfg = self.config
        # nanoGPT's count: the token embedding is a matmul in the output layer,
        # the position embedding a lookup.
        n = self.num_params() - self.transformer.wpe.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    @torch.no_grad()
    def generate_tokens(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        vocab_limit: int | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield one new token (B, 1) at a time after the context ``idx`` (B, T).

        ``temperature = 0`` picks the most likely token; ``top_k`` and ``top_p``
        (nucleus) restrict sampling to the likeliest tokens. ``vocab_limit`` (the
        tokenizer's size) keeps the vocabulary's padding rows from being sampled.

        With ``use_cache`` each step feeds one token through a KV cache. While the
        context fits in ``block_size`` this gives exactly what recomputing the
        whole context gives. Once it is full the window slides in chunks: the
        cache restarts from the last ``block_size // 2`` tokens, so the model
        always sees at least half a window of context (``use_cache=False`` instead
        recomputes the last ``block_size`` tokens at every step, as nanoGPT does).
        """
        block_size = self.config.block_size
        cache = KVCache(self.config) if use_cache else None
        logits, _ = self(idx[:, -block_size:], cache=cache)
        for step in range(max_new_tokens):
            idx_next = self._pick(
                logits[:, -1, :], temperature, top_k, top_p, generator, vocab_limit
            )
            yield idx_next
            if step == max_new_tokens - 1:
                return
            idx = torch.cat((idx, idx_next), dim=1)
            if cache is None:
                logits, _ = self(idx[:, -block_size:])
            elif cache.length < block_size:
                logits, _ = self(idx_next, cache=cache)
            else:
                cache = KVCache(self.config)
                logits, _ = self(idx[:, -(block_size // 2) :], cache=cache)

    @staticmethod
    def _pick(
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

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **options: Any) -> torch.Tensor:
        """The context ``idx`` (B, T) followed by ``max_new_tokens`` new tokens.

        ``options`` are those of :meth:`generate_tokens`.
        """
        new = list(self.generate_tokens(idx, max_new_tokens, **options))
        return torch.cat([idx, *new], dim=1)
