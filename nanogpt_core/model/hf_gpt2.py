"""Moving weights between our GPT and Hugging Face's ``GPT2LMHeadModel``.

Parameter names match one to one. The only twist is that Hugging Face stores its
four big projections as ``Conv1D`` modules, whose weights are the transpose of a
``Linear``'s. Reading a folder needs only ``safetensors`` (or torch for
``pytorch_model.bin``), not ``transformers``. Only a model with GPT-2's
architecture options (the defaults; tied or untied embeddings) moves this way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nanogpt_core.errors import NanoGPTError
from nanogpt_core.model.gpt import GPT, GPTConfig
from nanogpt_core.plugins.options import show

# Hugging Face's Conv1D weights are (in, out); ours are Linear (out, in).
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers some transformers versions keep in the state dict: causal masks, not weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


# What GPT2LMHeadModel computes, among our architecture options.
GPT2_OPTIONS: dict[str, Any] = {
    "position": "learned",
    "norm": "layernorm",
    "mlp": "gelu",
    "qk_norm": False,
    "logit_softcap": None,
}


def gpt2_mismatches(config: GPTConfig) -> list[str]:
    """Our options that GPT-2 has no place for, as ``key = value``; empty for a GPT-2."""
    return [
        f"{key} = {show(getattr(config, key))}"
        for key, wanted in GPT2_OPTIONS.items()
        if getattr(config, key) != wanted
    ]


def from_hf_state_dict(model: GPT, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy a ``GPT2LMHeadModel`` state dict into ``model`` (shapes must match).

    A checkpoint with a longer context than ``model`` is cropped to its block size.
    """
    ours = model.state_dict()
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith(IGNORED_SUFFIXES)}
    hf_state.setdefault("lm_head.weight", hf_state["transformer.wte.weight"])
    missing = sorted(set(ours) - set(hf_state))
    extra = sorted(set(hf_state) - set(ours))
    if missing or extra:
        raise NanoGPTError(
            f"weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]} "
            "(GPT-2 checkpoints have biases: set model.bias = true)"
        )
    with torch.no_grad():
        for key, target in ours.items():
            source = hf_state[key]
            if key.endswith(TRANSPOSED):
                source = source.t()
            if key == "transformer.wpe.weight":
                source = source[: target.shape[0]]
            if source.shape != target.shape:
                raise NanoGPTError(
                    f"{key}: shape {tuple(source.shape)} does not fit {tuple(target.shape)}"
                )
            target.copy_(source)


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The weights of ``model`` under ``GPT2LMHeadModel``'s names and layouts.

    Biases our model leaves out (``bias = false``) become zeros, which is exactly
    what a layer without bias computes.
    """
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone()
        state[key] = value.t().contiguous() if key.endswith(TRANSPOSED) else value
    if not model.config.bias:
        for name, module in model.named_modules():
            if name.endswith(("c_attn", "c_proj", "c_fc", "ln_1", "ln_2", "ln_f")):
                state[f"{name}.bias"] = torch.zeros(module.weight.shape[0])
    return state


def hf_config_dict(config: GPTConfig) -> dict[str, Any]:
    """A ``GPT2Config`` as a dict (for ``config.json``) describing ``config``."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": config.tie_embeddings,
    }


def read_hf_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and the weights of a local Hugging Face GPT-2 folder."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise NanoGPTError(
            f"model.init_from: {folder}: no config.json (expected a Hugging Face GPT-2 folder)"
        )
    hf_config = json.loads(config_path.read_text())
    if hf_config.get("model_type") != "gpt2":
        raise NanoGPTError(
            f"model.init_from: {folder}: model_type is {hf_config.get('model_type')!r}, expected 'gpt2'"
        )
    safetensors_path = folder / "model.safetensors"
    bin_path = folder / "pytorch_model.bin"
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        state = load_file(str(safetensors_path))
    elif bin_path.is_file():
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise NanoGPTError(f"model.init_from: {folder}: no model.safetensors or pytorch_model.bin")
    # transformers saves without the "transformer." prefix when the base model is saved alone.
    if "wte.weight" in state:
        state = {f"transformer.{k}": v for k, v in state.items()}
    return hf_config, state


def config_from_hf(hf_config: dict[str, Any], dropout: float = 0.0) -> GPTConfig:
    """Our :class:`GPTConfig` for a Hugging Face GPT-2 ``config.json``."""
    return GPTConfig(
        block_size=hf_config["n_positions"],
        vocab_size=hf_config["vocab_size"],
        n_layer=hf_config["n_layer"],
        n_head=hf_config["n_head"],
        n_embd=hf_config["n_embd"],
        dropout=dropout,
        bias=True,
        tie_embeddings=hf_config.get("tie_word_embeddings", True),
    )
