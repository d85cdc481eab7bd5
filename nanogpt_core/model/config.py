"""The shape of a GPT: every option that decides its weights and what they compute.

Kept apart from the model so that what only needs the shape (the memory
estimate, checkpoints' descriptions, export) reads it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")
# Llama's (and transformers' LlamaConfig's) default; exported as rms_norm_eps.
RMS_NORM_EPS = 1e-6


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
    # "learned": a learned vector per position is added to the tokens (GPT-2).
    # "rope": queries and keys are rotated by their position (RoFormer, Su et al.
    # 2021; Llama), so attention depends on relative positions only.
    position: str = "learned"
    # RoPE's base: pair i of a head rotates at rope_theta ** (-2i / hs) radians per position.
    rope_theta: float = 10000.0
    # "layernorm" (GPT-2) or "rmsnorm": scale only, no centring, no bias (Zhang & Sennrich 2019).
    norm: str = "layernorm"
    # "gelu" (GPT-2), "swiglu" (Shazeer 2020; Llama) or "relu2", ReLU squared (So et al. 2021).
    mlp: str = "gelu"
    # RMSNorm of each head's queries and keys before attention, which keeps the
    # attention logits from growing large (Dehghani et al. 2023; modded-nanogpt).
    qk_norm: bool = False
    # The output layer reuses the token embedding (Press & Wolf 2017), as GPT-2 does.
    tie_embeddings: bool = True
    # Squash the output logits smoothly into (-cap, cap): cap * tanh(logits / cap) (Gemma 2).
    logit_softcap: float | None = None

    def __post_init__(self) -> None:
        for name, choices in (("position", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} = {getattr(self, name)!r}: expected one of {choices}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd = {self.n_embd} is not divisible by n_head = {self.n_head}")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("RoPE rotates pairs of channels: the head size must be even")


def mlp_hidden_size(config: GPTConfig) -> int:
    """H, the MLP's hidden width: 4 C, as GPT-2.

    SwiGLU has three matrices instead of two, so it gets 2/3 of that, rounded up
    to a multiple of 64 for fast matrix shapes: about the same parameter count
    (2048 for C = 768, exactly; Llama does the same).
    """
    if config.mlp != "swiglu":
        return 4 * config.n_embd
    return -(-(8 * config.n_embd) // (3 * 64)) * 64
