"""The model a run trains: its architecture and its first weights.

The architecture is the experiment's ``[model]`` plus the prepared data's
vocabulary (padded, as nanoGPT does). The weights are fresh, or with
``model.init_from`` those of another run's checkpoint or of a Hugging Face
GPT-2 folder, after checking that they fit. This is where a run *starts*; a run
that continues from its own ``last.pth`` is resumed by ``checkpointing.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanogpt_core.errors import NanoGPTError
from nanogpt_core.model.config import GPTConfig, shape_differences
from nanogpt_core.model.gpt import GPT
from nanogpt_core.plugins.options import show
from nanogpt_core.train.checkpoints import load_checkpoint
from nanogpt_core.train.resume import tokenizer_difference

if TYPE_CHECKING:
    from nanogpt_core.config.experiment import ExperimentConfig
    from nanogpt_core.data.prepared import PreparedData


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """``vocab_size`` rounded up to a multiple of 64, as nanoGPT does for speed."""
    return ((vocab_size + multiple - 1) // multiple) * multiple


def model_config_for(config: ExperimentConfig, data: PreparedData) -> GPTConfig:
    """The model's architecture: the experiment's ``[model]`` plus the data's vocabulary."""
    vocab_size = config.model.vocab_size or padded_vocab_size(data.vocab_size)
    if vocab_size < data.vocab_size:
        raise NanoGPTError(
            f"model.vocab_size = {vocab_size} is smaller than the data's vocabulary of "
            f"{data.vocab_size}; remove it to use the data's (padded)"
        )
    return config.model.shape(vocab_size)


def build_model(
    model_config: GPTConfig,
    init_from: str | None,
    tokenizer: Mapping[str, Any],
    echo: Callable[[str], None],
) -> GPT:
    """A new model (on the CPU), with ``init_from``'s weights when it names any.

    :param init_from: a toolkit checkpoint file or a Hugging Face GPT-2 folder, or None.
    :param tokenizer: the data's tokenizer description (a checkpoint's must match it).
    :param echo: prints a line on the main process.
    :raises NanoGPTError: ``init_from``'s weights do not fit this model or data.
    """
    model = GPT(model_config)
    if init_from:
        if Path(init_from).is_file():
            _init_from_checkpoint(model, Path(init_from), dict(tokenizer), echo)
        else:
            _init_from_hf(model, init_from)
    total = model.num_params()
    non_embedding = model.num_params(non_embedding=True)
    echo(f"model: {total / 1e6:.2f}M parameters ({non_embedding / 1e6:.2f}M non-embedding)")
    return model


def _init_from_checkpoint(
    model: GPT, path: Path, tokenizer: dict[str, Any], echo: Callable[[str], None]
) -> None:
    """Weights only (a fresh optimizer), after checking shape and tokenizer."""
    checkpoint = load_checkpoint(path)
    ours, theirs = model.config, GPTConfig(**checkpoint["model_args"])
    # Everything that shapes the weights or what they compute; load_checkpoint
    # gave an older checkpoint the defaults of options it predates. A different
    # context length is fine, within what learned positions were trained for.
    differences = [
        f"model.{key} = {show(mine)} but {path} has {show(other)}"
        for key, mine, other in shape_differences(ours, theirs, ignore=("dropout", "block_size"))
    ]
    # Learned positions have no weights past the trained context; RoPE has none at all.
    if ours.position == "learned" and ours.block_size > theirs.block_size:
        differences.append(
            f"model.block_size = {ours.block_size} is longer than the "
            f"{theirs.block_size} {path} was trained with"
        )
    difference = tokenizer_difference(checkpoint["tokenizer"], tokenizer)
    if difference:
        differences.append(f"{difference} (the dataset's tokenizer must be the checkpoint's)")
    if differences:
        raise NanoGPTError("model.init_from: " + "; ".join(differences))
    weights = dict(checkpoint["model"])
    if "transformer.wpe.weight" in weights:
        # A shorter context keeps the first positions, as with a Hugging Face folder.
        wpe = weights["transformer.wpe.weight"]
        weights["transformer.wpe.weight"] = wpe[: ours.block_size]
    model.load_state_dict(weights)
    echo(f"model.init_from: weights of step {checkpoint['step']} of {path}")


def _init_from_hf(model: GPT, folder: str) -> None:
    """A Hugging Face GPT-2 folder's weights, after checking that its shape is this model's."""
    from nanogpt_core.model.hf_gpt2 import (
        config_from_hf,
        from_hf_state_dict,
        gpt2_mismatches,
        read_hf_folder,
    )

    ours = model.config
    unlike_gpt2 = gpt2_mismatches(ours)
    if unlike_gpt2:
        raise NanoGPTError(
            f"model.init_from: {folder}: a Hugging Face folder starts only a GPT-2, and "
            f"{', '.join('model.' + m for m in unlike_gpt2)} "
            f"{'has' if len(unlike_gpt2) == 1 else 'have'} no place in GPT-2; "
            "use GPT-2's options (the defaults) or start from a toolkit checkpoint"
        )
    hf_config, state = read_hf_folder(folder)
    theirs = config_from_hf(hf_config)
    differences = [
        f"model.{key} = {getattr(ours, key)} but {folder} has {getattr(theirs, key)}"
        for key in ("n_layer", "n_head", "n_embd", "bias", "tie_embeddings")
        if getattr(ours, key) != getattr(theirs, key)
    ]
    if ours.block_size > theirs.block_size:
        differences.append(f"model.block_size {ours.block_size} > {theirs.block_size}")
    if ours.vocab_size != theirs.vocab_size:
        differences.append(
            f"model.vocab_size = {ours.vocab_size} but {folder} has {theirs.vocab_size}"
        )
    if differences:
        raise NanoGPTError("model.init_from: " + "; ".join(differences))
    from_hf_state_dict(model, state)
