"""Exporting a checkpoint as a Hugging Face ``transformers`` folder.

The folder holds ``config.json`` and ``model.safetensors`` that
``GPT2LMHeadModel.from_pretrained`` loads with logits equal to ours (a model
with GPT-2's architecture options, ``hf_gpt2.py``), or ``LlamaForCausalLM``'s
(``rope`` + ``rmsnorm`` + ``swiglu`` without biases, ``hf_llama.py``); any other
model is refused before anything is written. Beside them goes the
tokenizer rebuilt from the checkpoint's description: a tokenizer plugin with an
``export_hf`` method writes Hugging Face's files (GPT-2's ``vocab.json`` and
``merges.txt``; a ``tokenizer.json`` for the ``huggingface`` tokenizer) so
``AutoTokenizer.from_pretrained`` works too; any other keeps its description in
``nanogpt_tokenizer.json``. A fine-tuned checkpoint's template goes into the
tokenizer files as a Jinja ``chat_template`` (``tokenizer_config.json``, where
``transformers`` reads it), so ``apply_chat_template`` asks questions exactly as
``gpt chat`` does. It is built in a temporary folder beside the target and
renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanogpt_core.data.tokenizers import Tokenizer, tokenizer_from_description
from nanogpt_core.errors import NanoGPTError, PluginFault
from nanogpt_core.files import temporary_path
from nanogpt_core.generate.sampling import checkpoint_template, contained_from_description
from nanogpt_core.train.checkpoints import load_checkpoint

if TYPE_CHECKING:
    from nanogpt_core.model.gpt import GPT, GPTConfig
    from nanogpt_core.plugins.registry import Plugins

TOKENIZER_CONFIG = "tokenizer_config.json"
# Where the chat template goes when there is no tokenizer_config.json (char models):
# the file name transformers itself writes a chat template to.
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def export_hf(ckpt: Path, out: Path, plugins: Plugins | None = None) -> list[str]:
    """Write the checkpoint at ``ckpt`` to the new folder ``out``; returns the files written.

    :param plugins: where the checkpoint's template is looked up; the installed
        plugins when None.
    """
    from safetensors.torch import save_file

    from nanogpt_core.model.gpt import GPT, GPTConfig

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NanoGPTError(f"--out {out}: exists and is not an empty folder; choose a new folder")
    checkpoint = load_checkpoint(ckpt)
    config = GPTConfig(**checkpoint["model_args"])
    weights_and_config = _hf_format(ckpt, config)
    model = GPT(config)
    model.load_state_dict(checkpoint["model"])
    description = checkpoint["tokenizer"]
    tokenizer = tokenizer_from_description(description)
    template = checkpoint_template(Path(ckpt), checkpoint)
    # Rebuilt before anything is written, so a template that is not installed fails early.
    chat_template = (
        None
        if template is None
        else contained_from_description("template", template, plugins).chat_template()
    )

    state, hf_config = weights_and_config(model)
    hf_config["bos_token_id"] = hf_config["eos_token_id"] = tokenizer.eot_id

    staging = temporary_path(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        _write_tokenizer(staging, tokenizer, description, config.block_size)
        if chat_template is not None:
            _write_chat_template(staging, chat_template)
        written = sorted(p.name for p in staging.iterdir())
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def _hf_format(
    ckpt: Path, config: GPTConfig
) -> Callable[[GPT], tuple[dict[str, Any], dict[str, Any]]]:
    """How to write this architecture for transformers, or a one-line refusal.

    Returns a function from the model to its weights and ``config.json``.
    """
    from nanogpt_core.model import hf_gpt2, hf_llama

    unlike_gpt2 = hf_gpt2.gpt2_mismatches(config)
    unlike_llama = hf_llama.llama_mismatches(config)
    if not unlike_gpt2:
        return _gpt2_format
    if not unlike_llama:
        return _llama_format
    # Learned positions exist only in GPT-2, RoPE only in Llama: that one is the closest.
    closest, unlike = (
        ("GPT2LMHeadModel", unlike_gpt2)
        if config.position == "learned"
        else ("LlamaForCausalLM", unlike_llama)
    )
    raise NanoGPTError(
        f"--ckpt {ckpt}: model.{', model.'.join(unlike)} "
        f"{'has' if len(unlike) == 1 else 'have'} no equivalent in transformers' "
        f"{closest}; gpt export writes GPT-2's options as GPT2LMHeadModel and position = "
        '"rope", norm = "rmsnorm", mlp = "swiglu", bias = false, qk_norm = false and no '
        "logit_softcap as LlamaForCausalLM"
    )


def _gpt2_format(model: GPT) -> tuple[dict[str, Any], dict[str, Any]]:
    from nanogpt_core.model.hf_gpt2 import hf_config_dict, to_hf_state_dict

    state = to_hf_state_dict(model)
    if model.config.tie_embeddings:
        # The output layer is the token embedding; transformers re-ties it on load.
        state.pop("lm_head.weight")
    return state, hf_config_dict(model.config)


def _llama_format(model: GPT) -> tuple[dict[str, Any], dict[str, Any]]:
    from nanogpt_core.model.hf_llama import llama_config_dict, to_llama_state_dict

    return to_llama_state_dict(model), llama_config_dict(model.config)


def _write_tokenizer(
    folder: Path, tokenizer: Tokenizer, description: dict[str, Any], block_size: int
) -> None:
    """Hugging Face tokenizer files where the tokenizer can write them, else its description."""
    export = getattr(tokenizer, "export_hf", None)
    if export is None:
        # transformers has no such tokenizer (char): keep ours so the vocabulary is not lost.
        (folder / "nanogpt_tokenizer.json").write_text(
            json.dumps(description, ensure_ascii=False) + "\n"
        )
        return
    try:
        export(folder, model_max_length=block_size)
    except NanoGPTError:
        raise
    except Exception as exc:
        raise PluginFault(
            f"tokenizer {description['kind']!r} failed in export_hf: {type(exc).__name__}: {exc}"
        ) from exc


def _write_chat_template(folder: Path, chat_template: str) -> None:
    """Put the chat template into ``tokenizer_config.json``, or beside the tokenizer without one."""
    config_path = folder / TOKENIZER_CONFIG
    if not config_path.exists():
        (folder / CHAT_TEMPLATE_FILE).write_text(chat_template)
        return
    config = json.loads(config_path.read_text())
    config["chat_template"] = chat_template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
