"""The ``char`` tokenizer: one token per character, over the corpus's own characters.

It is the one built-in tokenizer that needs the corpus: preparation calls
:meth:`CharTokenizer.learn` with every document first, and the vocabulary (the
sorted characters) then travels in ``meta.json`` and every checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from nanogpt_core import (
    NanoGPTError,
    Tokenizer,
    UnknownCharacterError,
    hookimpl,
)


@attrs.frozen(kw_only=True)
class CharOptions:
    """The ``char`` tokenizer takes no options: its vocabulary is learned from the text."""


class CharTokenizer(Tokenizer):
    """One token per character, over a vocabulary taken from the training text."""

    eot_id = None

    def __init__(self, options: CharOptions | None = None, *, chars: Iterable[str] = ()) -> None:
        self._set_chars(chars)

    def _set_chars(self, chars: Iterable[str]) -> None:
        self.chars = sorted(set(chars))
        self.vocab_size = len(self.chars)
        self._stoi = {c: i for i, c in enumerate(self.chars)}

    def learn(self, documents: Iterable[str]) -> None:
        """Take the vocabulary from the documents: every character that occurs in them."""
        chars: set[str] = set()
        for document in documents:
            chars.update(document)
        self._set_chars(chars)

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

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> CharTokenizer:
        """The tokenizer whose vocabulary ``description["chars"]`` holds."""
        chars = description.get("chars")
        if not isinstance(chars, str) or len(set(chars)) != description.get("vocab_size"):
            raise NanoGPTError(
                "char tokenizer description: 'chars' must hold vocab_size distinct characters"
            )
        return cls(chars=chars)


@hookimpl
def register_tokenizers(register):
    """Register the ``char`` tokenizer."""
    register(
        "char",
        CharTokenizer,
        options=CharOptions,
        description="One token per character; the vocabulary is the corpus's characters.",
    )
