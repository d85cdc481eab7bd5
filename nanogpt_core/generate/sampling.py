"""Sampling text from a checkpoint: what ``gpt sample`` does.

The tokenizer travels inside every checkpoint (the char vocabulary included),
so sampling needs neither the data folder nor the experiment file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from nanogpt_core.data.plugins import Contained, plugin_who
from nanogpt_core.data.tokenizers import Tokenizer
from nanogpt_core.errors import NanoGPTError, PluginFault
from nanogpt_core.train.checkpoints import CheckpointError, load_checkpoint

if TYPE_CHECKING:
    from nanogpt_core.plugins.registry import Plugins


@attrs.frozen
class LoadedModel:
    """A model ready to sample from, with its tokenizer and the checkpoint's step.

    ``template`` is the description of the prompt template the model was
    fine-tuned with (what ``gpt chat`` asks through), or None for a pre-trained
    model and for checkpoints older than templates.
    """

    model: Any
    tokenizer: Tokenizer  # held as Contained: a raise in it names its plugin
    step: int
    device: Any
    template: dict[str, Any] | None = None


def pick_device(name: str) -> Any:
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``, as a torch device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise NanoGPTError('--device cuda: no CUDA device is available; use "auto" or "cpu"')
    return torch.device(name)


def contained_from_description(
    kind: str, description: dict[str, Any], plugins: Plugins | None = None
) -> Any:
    """A tokenizer or template rebuilt from its description, whose method calls name its plugin.

    :param plugins: where ``kind`` is looked up; the installed plugins when None.
    """
    from nanogpt_core.plugins.rebuild import rebuild_from_description
    from nanogpt_core.plugins.registry import load_plugins

    plugins = plugins or load_plugins()
    made = rebuild_from_description(kind, description, plugins)
    name = description["kind"]  # rebuild_from_description found it
    return Contained(made, plugin_who(kind, name, plugins.registry(kind)[name].plugin))


def load_model(path: Path, device: str = "auto", plugins: Plugins | None = None) -> LoadedModel:
    """Rebuild the model and tokenizer a checkpoint describes.

    :param plugins: where the tokenizer is looked up; the installed plugins when None.
    """
    from nanogpt_core.model.gpt import GPT, GPTConfig

    checkpoint = load_checkpoint(path)
    try:
        config = GPTConfig(**checkpoint["model_args"])
        model = GPT(config)
        model.load_state_dict(checkpoint["model"])
    except (TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: the weights do not fit the model it describes ({first})"
        ) from None
    target = pick_device(device)
    model.to(target).eval()
    return LoadedModel(
        model,
        contained_from_description("tokenizer", checkpoint["tokenizer"], plugins),
        int(checkpoint["step"]),
        target,
        template=checkpoint_template(path, checkpoint),
    )


def checkpoint_template(path: Path, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The template description a checkpoint carries; None when it has none (or predates them)."""
    template = checkpoint.get("template")
    if template is not None and not isinstance(template, dict):
        raise CheckpointError(
            f"{path}: template is {type(template).__name__}, expected a table or nothing"
        )
    return template


def encode_prompt(loaded: LoadedModel, prompt: str | None) -> tuple[list[int], int]:
    """Prompt ids (start of text when empty) and how many leading ids were dropped to fit."""
    tokenizer = loaded.tokenizer
    if prompt:
        try:
            ids = tokenizer.encode(prompt)
        except PluginFault:
            raise
        except NanoGPTError as exc:
            raise NanoGPTError(f"prompt: {exc}") from None
    else:
        ids = tokenizer.start_ids()
    block_size = loaded.model.config.block_size
    dropped = max(0, len(ids) - block_size)
    return ids[dropped:], dropped


def stream_sample(
    loaded: LoadedModel,
    ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: Any,
) -> Iterator[str]:
    """Yield decoded text piece by piece; stop at end-of-text for BPE models."""
    for _ids, text in stream_pieces(
        loaded,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
    ):
        yield text


def stream_pieces(
    loaded: LoadedModel,
    ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: Any,
) -> Iterator[tuple[list[int], str]]:
    """Yield ``(new token ids, their text)`` as generated; stop at end-of-text.

    The end-of-text token itself is never yielded. The ids let a caller (``gpt
    chat``) keep the exact tokens of an answer rather than re-encoding its text.
    """
    import torch

    tokenizer = loaded.tokenizer
    context = torch.tensor([ids], dtype=torch.long, device=loaded.device)
    pending: list[int] = []
    for token in loaded.model.generate_tokens(
        context,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        vocab_limit=tokenizer.vocab_size,
    ):
        token_id = int(token[0, 0])
        if tokenizer.eot_id is not None and token_id == tokenizer.eot_id:
            break
        pending.append(token_id)
        text = tokenizer.decode(pending)
        # A BPE token can end inside a multi-byte character: wait for the rest.
        if not text.endswith("\ufffd"):
            yield pending, text
            pending = []
    if pending:
        yield pending, tokenizer.decode(pending)
