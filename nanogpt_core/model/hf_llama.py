"""Writing our GPT as Hugging Face's ``LlamaForCausalLM`` (for ``gpt export``).

With ``position = "rope"``, ``norm = "rmsnorm"``, ``mlp = "swiglu"``, no biases,
no qk-norm and no logit soft-capping our model computes exactly what Llama
does: our RoPE rotates channel i with channel i + hs/2 as Hugging Face's
``rotate_half`` does, so weights map without permuting. The only reshaping is
splitting our fused query/key/value matrix into ``q_proj``, ``k_proj`` and
``v_proj``; every head has its own keys and values (``num_key_value_heads =
n_head``). Writing needs only torch, not ``transformers``.
"""

from __future__ import annotations

from typing import Any

import torch

from nanogpt_core.model.gpt import GPT, RMS_NORM_EPS, GPTConfig, mlp_hidden_size
from nanogpt_core.plugins.options import show

# What LlamaForCausalLM computes, among our architecture options.
LLAMA_OPTIONS: dict[str, Any] = {
    "position": "rope",
    "norm": "rmsnorm",
    "mlp": "swiglu",
    "bias": False,
    "qk_norm": False,
    "logit_softcap": None,
}
# Our names within a block -> Llama's within a decoder layer (c_attn is split apart).
LAYER_NAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.c_gate.weight": "mlp.gate_proj.weight",
    "mlp.c_fc.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}


def llama_mismatches(config: GPTConfig) -> list[str]:
    """Our options that Llama has no place for, as ``key = value``; empty for a Llama."""
    return [
        f"{key} = {show(getattr(config, key))}"
        for key, wanted in LLAMA_OPTIONS.items()
        if getattr(config, key) != wanted
    ]


def to_llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The weights of ``model`` under ``LlamaForCausalLM``'s names, each its own tensor.

    A tied output layer is left out: transformers ties it on load.
    """
    config = model.config
    ours = {key: value.detach() for key, value in model.state_dict().items()}
    state = {
        "model.embed_tokens.weight": ours.pop("transformer.wte.weight"),
        "model.norm.weight": ours.pop("transformer.ln_f.weight"),
    }
    lm_head = ours.pop("lm_head.weight")
    if not config.tie_embeddings:
        state["lm_head.weight"] = lm_head
    for i in range(config.n_layer):
        block, layer = f"transformer.h.{i}.", f"model.layers.{i}."
        # Rows of c_attn are the queries, then the keys, then the values: (3 C, C).
        q, k, v = ours.pop(block + "attn.c_attn.weight").split(config.n_embd, dim=0)
        state[layer + "self_attn.q_proj.weight"] = q
        state[layer + "self_attn.k_proj.weight"] = k
        state[layer + "self_attn.v_proj.weight"] = v
        for name, theirs in LAYER_NAMES.items():
            state[layer + theirs] = ours.pop(block + name)
    # A weight we did not map would be silently lost in the export.
    assert not ours, f"weights without a Llama name: {sorted(ours)}"
    return {key: value.clone().contiguous() for key, value in state.items()}


def llama_config_dict(config: GPTConfig) -> dict[str, Any]:
    """A ``LlamaConfig`` as a dict (for ``config.json``) describing ``config``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": mlp_hidden_size(config),
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,
        "head_dim": config.n_embd // config.n_head,
        "hidden_act": "silu",
        # Llama's RoPE has no hard limit; this is the context the model was trained on.
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": config.rope_base,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
    }
