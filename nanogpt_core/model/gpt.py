"""The GPT language model: GPT-2 as nanoGPT has it, plus a few modern options.

Read top to bottom: the normalisation layers, rotary position embeddings,
causal self-attention, the MLP variants, a transformer block, then the GPT that
stacks the blocks, with GPT-2's initialisation, FLOP counting and text
generation (the optimizer is a plugin). The shape of the model is
``GPTConfig`` (``config.py``); the KV cache that generation fills is in
``kv_cache.py``, and how the next token is chosen from the logits in
``next_token.py``. With GPT-2's options (the defaults, with ``bias = true``) the model is
GPT-2 exactly, and parameter names match Hugging Face's ``GPT2LMHeadModel`` one
to one (see ``hf_gpt2.py``); ``rope`` + ``rmsnorm`` + ``swiglu`` without biases is
Llama's architecture (see ``hf_llama.py``).

Shapes in comments: B batch, T time (tokens), C channels (n_embd), nh heads,
hs head size (C // nh), V vocabulary, H the MLP's hidden width.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from nanogpt_core.model.config import RMS_NORM_EPS, GPTConfig, mlp_hidden_size
from nanogpt_core.model.kv_cache import KVCache, LayerCache
from nanogpt_core.model.next_token import pick_next_token


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop just the bias)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def make_norm(config: GPTConfig) -> nn.Module:
    """The block's normalisation: LayerNorm, or RMSNorm (which never has a bias)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=RMS_NORM_EPS)
    return LayerNorm(config.n_embd, bias=config.bias)


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation of each position (T,) for every channel pair: cos and sin, (T, hs).

    Computed in float32 for the exact positions given, so a KV cache can go on
    counting past ``block_size``.
    """
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]  # (T, hs/2)
    # Channel i pairs with channel i + hs/2 (Hugging Face Llama's layout, not
    # interleaved pairs), so exported q/k weights need no permutation.
    angles = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys (B, nh, T, hs) by their positions' angles."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)


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
        head_size = config.n_embd // config.n_head
        # One gain per channel of a head, shared by the heads (as OLMo 2 and Qwen 3).
        self.q_norm = nn.RMSNorm(head_size, eps=RMS_NORM_EPS) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(head_size, eps=RMS_NORM_EPS) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerCache | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.q_norm is not None:
            # CUDA autocast runs rms_norm in float32: back to the compute dtype (v's), so
            # the KV cache and attention get one dtype. Without autocast a no-op.
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        if rope is not None:
            # Rotated before caching: a cached key keeps the rotation of its own position.
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        is_causal = mask is None
        if cache is not None:
            first = cache.length == 0
            k, v = cache.append(k, v)  # every cached key: (B, nh, L, hs)
            if not first:
                # One new token attends to all cached ones: nothing to mask. Several new
                # tokens need a mask saying which (the serving engine's batch_cache.py).
                if T != 1 and mask is None:
                    raise ValueError("after the prompt, a KV cache takes one token at a time")
                is_causal = False
        # Flash attention on GPUs that support it; (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The feed-forward part of a block: widen to H, a nonlinearity, project back.

    ``gelu`` and ``relu2`` are ``c_proj(act(c_fc(x)))``; ``swiglu`` is
    ``c_proj(silu(c_gate(x)) * c_fc(x))``: ``c_gate`` is Llama's ``gate_proj``,
    ``c_fc`` its ``up_proj`` and ``c_proj`` its ``down_proj``.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = mlp_hidden_size(config)
        self.kind = config.mlp
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_gate = (
            nn.Linear(config.n_embd, hidden, bias=config.bias) if config.mlp == "swiglu" else None
        )
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, H)
        if self.kind == "gelu":
            # GPT-2 used the tanh approximation of GELU; keep it so HF weights match exactly.
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.silu(self.c_gate(x)) * h
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """A transformer block: pre-norm attention and MLP, each with a residual."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerCache | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, rope, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The GPT language model."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("vocab_size: a model needs its vocabulary size; set it in GPTConfig")
        self.config = config.shape()
        modules: dict[str, nn.Module] = {
            "wte": nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        }
        if config.position == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # learned positions
        modules["drop"] = nn.Dropout(config.dropout)
        modules["h"] = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        modules["ln_f"] = make_norm(config)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying (Press & Wolf 2017): the output layer reuses the input embedding.
            self.transformer.wte.weight = self.lm_head.weight
        if config.position == "rope":
            # Not a weight: recomputed from the config, so not in the state dict.
            head_size = config.n_embd // config.n_head
            exponents = torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size
            self.register_buffer(
                "rope_inv_freq", 1.0 / (config.rope_base**exponents), persistent=False
            )
        # Recompute each block in the backward pass instead of keeping its activations
        # (training only; the trainer sets it from [train] activation_checkpointing).
        self.activation_checkpointing = False
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
        """Number of parameters (a tied token embedding counts once).

        ``non_embedding`` leaves out the token and position embeddings, the count
        scaling laws use (Kaplan et al. 2020); an untied output layer stays in.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
        return n

    @property
    def receptive_field(self) -> int:
        """How many tokens back the last position's output can depend on.

        Within ``block_size`` that is the context. With RoPE a longer sequence is
        attended in sliding windows of ``block_size`` tokens in every layer, so
        each layer looks ``block_size - 1`` tokens further back.
        """
        if self.config.position == "learned":
            return self.config.block_size
        return self.config.n_layer * (self.config.block_size - 1) + 1

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """With ``targets``, ``(None, loss)``: the mean cross-entropy; else the logits.

        Targets equal to -1 take no loss (padding, prompt tokens). Without targets
        only the last position's logits are computed, ``(logits (B, 1, V), None)``:
        that is all sampling needs. The logits of every position are
        ``head_logits(hidden(idx))``.
        With a ``cache``, ``idx`` continues the tokens already cached.

        With learned positions T (plus the cached tokens) is at most
        ``block_size``. With RoPE a sequence may be longer: each token then
        attends to the ``block_size`` latest tokens (itself included), which is
        what the KV cache computes past ``block_size`` too.
        """
        x = self.hidden(idx, cache)
        if targets is not None:
            logits = self.head_logits(x)  # (B, T, V)
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
            )
            # No logits back: nobody training reads them, and returning them keeps a
            # (B, T, V) tensor alive that Accelerate's mixed-precision wrapper would
            # also copy to fp32 (2.5 GB for GPT-2 small at B=12). Whoever needs
            # them calls head_logits(hidden(idx)).
            return None, loss
        # Keep the time dimension: (B, 1, V)
        return self.head_logits(x[:, [-1], :]), None

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final hidden states (B, T, C), after ``ln_f``: what the output layer reads.

        :meth:`forward` is ``head_logits(hidden(idx))``; scoring that needs the
        logits of a few positions only (evaluation) selects them first.
        """
        _, T = idx.size()
        block_size = self.config.block_size
        start = cache.length if cache is not None else 0
        if self.config.position == "learned" and start + T > block_size:
            raise ValueError(
                f"sequence of length {start + T} is longer than block_size {block_size}"
            )
        if cache is not None and block_size < T:
            raise ValueError(f"a KV cache takes at most block_size {block_size} tokens at once")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.position == "learned":
            x = x + self.transformer.wpe(pos)  # (T, C), broadcast over B
        else:
            rope = rotary_cos_sin(pos, self.rope_inv_freq)
        mask = None
        if cache is None and block_size < T:
            # Sliding windows: query i sees keys i - block_size + 1 .. i. (T, T)
            i = torch.arange(T, device=idx.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - block_size)
        x = self.transformer.drop(x)
        # Training only: a KV cache would be appended to twice, and without
        # gradients there is no backward pass to recompute for.
        training = self.training and cache is None and torch.is_grad_enabled()
        recompute = self.activation_checkpointing and training
        for i, block in enumerate(self.transformer.h):
            if recompute:
                # Only x is kept; the backward pass reruns the block, with the dropout
                # masks of the first run (the random state is restored): same gradients.
                x = checkpoint(block, x, None, rope, mask, use_reentrant=False)
            else:
                x = block(x, cache.layers[i] if cache is not None else None, rope, mask)
        return self.transformer.ln_f(x)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of hidden states from :meth:`hidden`: the output layer and softcap."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward and backward), as in the PaLM paper appendix B."""
        cfg = self.config
        # nanoGPT's count: 6 FLOPs per weight that multiplies (the norms' gains
        # are counted too, a rounding error). Lookups cost none: the position
        # embedding, and the token embedding when the output layer is not tied
        # to it (tied, it is the output layer's matmul).
        n = self.num_params()
        if "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        if not cfg.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
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
        A context longer than ``block_size`` keeps its last ``block_size`` tokens.

        With ``use_cache`` each step feeds one token through a KV cache; see
        :meth:`next_logits` for what happens once the context outgrows
        ``block_size`` and what ``use_cache=False`` recomputes instead.
        """
        idx = idx[:, -self.config.block_size :]
        cache = KVCache(self.config) if use_cache else None
        logits, _ = self(idx, cache=cache)
        for step in range(max_new_tokens):
            idx_next = pick_next_token(
                logits[:, -1, :], temperature, top_k, top_p, generator, vocab_limit
            )
            yield idx_next
            if step == max_new_tokens - 1:
                return
            idx = torch.cat((idx, idx_next), dim=1)
            logits, cache = self.next_logits(idx, cache)

    def next_logits(
        self, idx: torch.Tensor, cache: KVCache | None
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Logits (B, 1, V) after the context ``idx`` (B, T), whose last token is new.

        With a ``cache`` holding every token of ``idx`` but the last, that token
        is fed alone; returns the cache to go on with. While the context fits in
        ``block_size`` this gives exactly what recomputing it gives. Past it:

        - learned positions: the window slides in chunks: the cache restarts
          from the last ``block_size // 2`` tokens, so the model always sees at
          least half a window; without a cache the last ``block_size`` tokens
          are recomputed at every step, as nanoGPT does.
        - RoPE: attention depends only on relative positions, so the cache
          slides one token at a time (the oldest key leaves as a new one comes)
          and every layer attends to the ``block_size`` latest tokens; without a
          cache the same sliding-window attention is recomputed over the last
          :attr:`receptive_field` tokens, all that the output depends on.
        """
        block_size = self.config.block_size
        if cache is None:
            return self(idx[:, -self.receptive_field :])[0], None
        if self.config.position == "rope" or cache.length < block_size:
            return self(idx[:, -1:], cache=cache)[0], cache
        cache = KVCache(self.config)
        return self(idx[:, -(block_size // 2) :], cache=cache)[0], cache

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **options: Any) -> torch.Tensor:
        """The context ``idx`` (B, T) followed by ``max_new_tokens`` new tokens.

        ``options`` are those of :meth:`generate_tokens`.
        """
        new = list(self.generate_tokens(idx, max_new_tokens, **options))
        return torch.cat([idx, *new], dim=1)
