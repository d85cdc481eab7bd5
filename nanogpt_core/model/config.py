"""The shape of a GPT: every option that decides its weights and what they compute.

:class:`GPTConfig` is the one description of a model's shape. The experiment
file's ``[model]`` table is this class plus where the first weights come from
(``ModelConfig`` in :mod:`nanogpt_core.config.experiment` adds ``init_from``);
:class:`~nanogpt_core.model.gpt.GPT` is built from it; a checkpoint's
``model_args`` are its fields; export maps them to a Hugging Face config. So a
new model option is a field here, the model code that uses it, and (where one
exists) its Hugging Face mapping: the experiment table, its docs, checkpoints
and resume checks follow from the field. Kept apart from the model so that what
only needs the shape (the memory estimate, checkpoints, export) reads it
without importing torch.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import attrs

from nanogpt_core.plugins.options import (
    OptionValueError,
    fraction,
    one_of,
    option,
    positive,
)

POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")
# Llama's (and transformers' LlamaConfig's) default; exported as rms_norm_eps.
RMS_NORM_EPS = 1e-6
# RoPE's base when rope_theta is left out (RoFormer's, Llama 2's).
DEFAULT_ROPE_THETA = 10000.0


@attrs.frozen(kw_only=True)
class GPTConfig:
    """The GPT architecture: the ``[model]`` table's shape options.

    Defaults are GPT-2 small's shape (124M parameters) without biases, as
    experiments default to; ``vocab_size`` left out is the prepared data's,
    padded, and must be set before a model is built.
    """

    n_layer: int = option(12, "Number of transformer blocks.", validator=positive)
    n_head: int = option(12, "Attention heads per block; must divide n_embd.", validator=positive)
    n_embd: int = option(768, "Width of the residual stream.", validator=positive)
    block_size: int = option(1024, "Context length in tokens.", validator=positive)
    dropout: float = option(
        0.0, "Dropout probability; 0 for pre-training, 0.1+ for fine-tuning.", validator=fraction
    )
    bias: bool = option(
        False,
        "Bias in Linear and LayerNorm layers (GPT-2 has them; without is a bit better and faster).",
    )
    # "learned": a learned vector per position is added to the tokens (GPT-2).
    # "rope": queries and keys are rotated by their position (RoFormer, Su et al.
    # 2021; Llama), so attention depends on relative positions only.
    position: str = option(
        "learned",
        'Positions: "learned" (a learned vector per position, GPT-2) or "rope" (rotary '
        "embeddings of queries and keys, Llama; no position weights).",
        validator=one_of(*POSITIONS),
    )
    # Pair i of a head rotates at theta ** (-2i / head_size) radians per position.
    rope_theta: float | None = option(
        None,
        f"RoPE base frequency; {DEFAULT_ROPE_THETA} when left out. Only with "
        'position = "rope" (ignored, with a warning, otherwise).',
        validator=positive,
    )
    # RMSNorm: scale only, no centring, no bias (Zhang & Sennrich 2019).
    norm: str = option(
        "layernorm",
        '"layernorm" (GPT-2) or "rmsnorm" (scale only, never a bias; Llama).',
        validator=one_of(*NORMS),
    )
    # SwiGLU: Shazeer 2020, Llama. ReLU squared: So et al. 2021 (Primer).
    mlp: str = option(
        "gelu",
        '"gelu" (GPT-2, 4x wide), "swiglu" (Llama; 8/3x wide, rounded up to a multiple '
        'of 64, for the same parameters) or "relu2" (ReLU squared, 4x wide).',
        validator=one_of(*MLPS),
    )
    # Keeps the attention logits from growing large (Dehghani et al. 2023; modded-nanogpt).
    qk_norm: bool = option(
        False, "RMSNorm of each head's queries and keys before attention (steadier training)."
    )
    # Press & Wolf 2017, as GPT-2 does.
    tie_embeddings: bool = option(
        True, "The output layer reuses the token embedding (GPT-2); false gives it its own."
    )
    logit_softcap: float | None = option(
        None,
        "Squash the output logits into (-cap, cap) with cap * tanh(logits / cap) (Gemma 2 "
        "uses 30); none by default.",
        validator=positive,
    )
    # GPT-2's 50,257 is padded up to 50,304, a multiple of 64: the extra rows are
    # never predicted, but matrix shapes that are multiples of 64 run faster.
    vocab_size: int | None = option(
        None,
        "Vocabulary size. Default: the prepared data's, padded up to a multiple of 64 for speed.",
        validator=positive,
    )

    def __attrs_post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise OptionValueError(
                "n_embd", f"{self.n_embd} is not divisible by n_head = {self.n_head}"
            )
        head_size = self.n_embd // self.n_head
        if self.position == "rope" and head_size % 2:
            raise OptionValueError(
                "position",
                f'"rope" rotates pairs of channels and needs an even head size, but n_embd / '
                f"n_head = {self.n_embd} / {self.n_head} = {head_size}",
            )

    @property
    def rope_base(self) -> float:
        """The RoPE base the model uses: ``rope_theta``, or its default when left out."""
        return DEFAULT_ROPE_THETA if self.rope_theta is None else self.rope_theta

    def shape(self, vocab_size: int | None = None) -> GPTConfig:
        """Only the shape (a subclass's other fields dropped), ``vocab_size`` filled in when unset.

        :param vocab_size: the vocabulary to use when this config leaves it out.
        """
        values = {field.name: getattr(self, field.name) for field in attrs.fields(GPTConfig)}
        if values["vocab_size"] is None:
            values["vocab_size"] = vocab_size
        return GPTConfig(**values)


def shape_differences(
    ours: GPTConfig, theirs: GPTConfig, *, ignore: Collection[str] = ("dropout",)
) -> list[tuple[str, Any, Any]]:
    """The options in which two shapes compute differently: ``(name, ours, theirs)`` each.

    ``rope_theta`` counts by the base the model uses (left out is
    ``DEFAULT_ROPE_THETA``), and only with RoPE positions: learned positions
    never use it. Dropout is left out by default: it changes training, not
    what the weights compute.
    """
    found = []
    for field in attrs.fields(GPTConfig):
        name = field.name
        if name in ignore:
            continue
        mine, other = getattr(ours, name), getattr(theirs, name)
        if name == "rope_theta":
            if ours.position != "rope" or theirs.position != "rope":
                continue
            mine, other = ours.rope_base, theirs.rope_base
        if mine != other:
            found.append((name, mine, other))
    return found


def mlp_hidden_size(config: GPTConfig) -> int:
    """H, the MLP's hidden width: 4 C, as GPT-2.

    SwiGLU has three matrices instead of two, so it gets 2/3 of that, rounded up
    to a multiple of 64 for fast matrix shapes: about the same parameter count
    (2048 for C = 768, exactly; Llama does the same).
    """
    if config.mlp != "swiglu":
        return 4 * config.n_embd
    return -(-(8 * config.n_embd) // (3 * 64)) * 64
