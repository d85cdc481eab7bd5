"""The ``fineweb`` dataset: FineWeb-Edu, educational web pages, GPT-2 tokens.

``source = "hub"`` streams ``HuggingFaceFW/fineweb-edu`` (``subset``, default
``sample-10BT``) with ``datasets``; ``source = "local"`` reads parquet or jsonl
files with FineWeb-Edu's columns (text, id, dump, url, file_path, language,
language_score, token_count, score, int_score). ``min_int_score`` keeps pages
the classifier rated at least that educational; ``fraction`` keeps a seeded,
order-independent random share of documents; ``max_tokens`` caps the training
tokens. Validation is a held-out set of whole documents: the first ones of the
stream until ``val_tokens``, or ``val_files``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from nanogpt_core import hookimpl, option
from nanogpt_core.documents import expand_files, hub_rows, read_rows
from nanogpt_core.errors import DataError
from nanogpt_core.options import OptionValueError, one_of, positive

HUB_NAME = "HuggingFaceFW/fineweb-edu"


def _fraction(_instance, attribute, value: float | None) -> None:
    if value is not None and not 0 < value <= 1:
        raise OptionValueError(attribute.name, f"must be in (0, 1], got {value}")


def _score(_instance, attribute, value: int | None) -> None:
    if value is not None and not 0 <= value <= 5:
        raise OptionValueError(
            attribute.name, f"must be between 0 and 5 (FineWeb-Edu's int_score), got {value}"
        )


@attrs.frozen(kw_only=True)
class FineWebOptions:
    """Options of the ``fineweb`` dataset."""

    source: str = option(
        "hub",
        '"hub" (HuggingFaceFW/fineweb-edu, streamed) or "local" (train_files).',
        validator=one_of("hub", "local"),
    )
    subset: str = option("sample-10BT", 'The hub configuration to stream (source = "hub").')
    train_files: list[str] = option(
        doc="Local parquet/jsonl files or globs with FineWeb-Edu's columns.", factory=list
    )
    val_files: list[str] = option(
        doc="Local validation files (default: hold out val_tokens of the stream).", factory=list
    )
    text_field: str = option("text", "The column holding the page text.")
    fraction: float | None = option(
        None, "Keep this seeded random share of documents (e.g. 0.01 for 1%).", validator=_fraction
    )
    max_tokens: int | None = option(
        None, "Stop after this many training tokens.", validator=positive
    )
    min_int_score: int | None = option(
        None, "Keep pages with int_score at least this (0-5).", validator=_score
    )
    val_tokens: int = option(
        1_000_000, "Tokens of whole documents held out for validation.", validator=positive
    )
    seed: int = option(1337, "Seed of the random document sample.")

    def __attrs_post_init__(self) -> None:
        if self.source == "local" and not self.train_files:
            raise OptionValueError(
                "train_files", 'source = "local" needs train_files (paths or globs)'
            )


def sampled(row: dict[str, Any], text: str, seed: int, fraction: float | None) -> bool:
    """Whether a document is in the seeded sample; keyed by its id, so file order does not matter."""
    if fraction is None or fraction >= 1:
        return True
    key = row.get("id") or text
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


class FineWebSource:
    """FineWeb-Edu documents, filtered and sampled."""

    tokenizer = "gpt2"

    def __init__(self, options: FineWebOptions) -> None:
        self.options = options
        self.variant = f"hub-{options.subset}" if options.source == "hub" else "local"
        self.description = (
            f"FineWeb-Edu from the Hugging Face hub ({HUB_NAME}, {options.subset})"
            if options.source == "hub"
            else "FineWeb-Edu rows from local files: "
            + ", ".join(options.train_files + options.val_files)
        )
        self._encoder: Any = None

    def _columns(self) -> list[str]:
        columns = [self.options.text_field]
        if self.options.min_int_score is not None:
            columns.append("int_score")
        return columns

    def _rows(self, patterns: list[str], option_name: str) -> Iterator[dict[str, Any]]:
        if self.options.source == "hub" and option_name == "train_files":
            for row in hub_rows(HUB_NAME, self.options.subset, "train"):
                missing = [c for c in self._columns() if c not in row]
                if missing:
                    raise DataError(f"{HUB_NAME}: rows have no {missing[0]!r} field")
                yield row
            return
        for path in expand_files(patterns, f"dataset.{option_name}"):
            yield from read_rows(path, self._columns())

    def _documents(self, patterns: list[str], option_name: str) -> Iterator[tuple[str, int]]:
        """(text, GPT-2 token count) of the documents that pass the filters."""
        opts = self.options
        for row in self._rows(patterns, option_name):
            text = row[opts.text_field]
            if not text or not text.strip():
                continue
            if opts.min_int_score is not None and (
                row["int_score"] is None or row["int_score"] < opts.min_int_score
            ):
                continue
            if not sampled(row, text, opts.seed, opts.fraction):
                continue
            yield text, self._token_count(row, text)

    def _token_count(self, row: dict[str, Any], text: str) -> int:
        count = row.get("token_count")
        if isinstance(count, int) and count > 0:
            return count + 1  # and the <|endoftext|> that follows it
        if self._encoder is None:
            from nanogpt_core.tokenizers import GPT2Tokenizer

            self._encoder = GPT2Tokenizer()
        return len(self._encoder.encode(text)) + 1

    def split_documents(self, downloads: Path) -> Iterator[tuple[str, str]]:
        """``(split, text)`` in one pass: held-out documents first, then training ones."""
        opts = self.options
        held_out = 0 if opts.val_files else opts.val_tokens
        seen = 0
        for text, tokens in self._documents(opts.train_files, "train_files"):
            if seen < held_out:
                seen += tokens
                yield "val", text
                continue
            seen += tokens
            if opts.max_tokens is not None and seen - held_out > opts.max_tokens:
                break
            yield "train", text
        if opts.val_files:
            for text, _ in self._documents(opts.val_files, "val_files"):
                yield "val", text

    def documents(self, split: str, downloads: Path) -> Iterator[str]:
        """Held-out documents for ``val``; the rest (up to ``max_tokens``) for ``train``."""
        return (text for which, text in self.split_documents(downloads) if which == split)


@hookimpl
def register_datasets(register):
    """Register the ``fineweb`` dataset."""
    register(
        "fineweb",
        FineWebSource,
        options=FineWebOptions,
        description="FineWeb-Edu from the hub or local parquet/jsonl, sampled and filtered.",
    )
