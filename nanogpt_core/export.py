"""Exporting a checkpoint as a Hugging Face ``transformers`` GPT-2 folder.

The folder holds ``config.json`` and ``model.safetensors`` that
``GPT2LMHeadModel.from_pretrained`` loads with logits equal to ours, and the
tokenizer rebuilt from the checkpoint's description: a tokenizer plugin with an
``export_hf`` method writes Hugging Face's files (GPT-2's ``vocab.json`` and
``merges.txt``; a ``tokenizer.json`` for the ``huggingface`` tokenizer) so
``AutoTokenizer.from_pretrained`` works too; any other keeps its description in
``nanogpt_tokenizer.json``. It is built in a temporary folder beside the target
and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from nanogpt_core.checkpoints import load_checkpoint
from nanogpt_core.errors import NanoGPTError, PluginFault
from nanogpt_core.files import temporary_path
from nanogpt_core.tokenizers import Tokenizer, tokenizer_from_description


def export_hf(ckpt: Path, out: Path) -> list[str]:
    """Write the checkpoint at ``ckpt`` to the new folder ``out``; returns the files written."""
    from safetensors.torch import save_file

    from nanogpt_core.hf_gpt2 import hf_config_dict, to_hf_state_dict
    from nanogpt_core.model import GPT, GPTConfig

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NanoGPTError(f"--out {out}: exists and is not an empty folder; choose a new folder")
    checkpoint = load_checkpoint(ckpt)
    config = GPTConfig(**checkpoint["model_args"])
    model = GPT(config)
    model.load_state_dict(checkpoint["model"])
    description = checkpoint["tokenizer"]
    tokenizer = tokenizer_from_description(description)

    state = to_hf_state_dict(model)
    # The output layer is tied to the token embedding; transformers re-ties it on load.
    state.pop("lm_head.weight")
    hf_config = hf_config_dict(config)
    hf_config["bos_token_id"] = hf_config["eos_token_id"] = tokenizer.eot_id

    staging = temporary_path(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        _write_tokenizer(staging, tokenizer, description, config.block_size)
        written = sorted(p.name for p in staging.iterdir())
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


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
