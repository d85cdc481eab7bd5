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

from nanogpt_core import (
    DataError,
    OptionValueError,
    expand_files,
    gpt2_encoding,
    hookimpl,
    hub_rows,
    one_of,
    option,
    positive,
    read_rows,
)

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
        doc="Local parquet/jsonl files or globs with FineWeb-Edu's columns.",
        factory=list,
        path=True,
    )
    val_files: list[str] = option(
        doc="Local validation files (default: hold out val_tokens of the stream).",
        factory=list,
        path=True,
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
        1_000_000,
        "GPT-2 tokens of whole documents held out for validation (unless val_files).",
        validator=positive,
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
            self._encoder = gpt2_encoding()
        return len(self._encoder.encode_ordinary(text)) + 1

    def split_documents(self, downloads: Path) -> Iterator[tuple[str, str]]:
        """``(split, text)`` in one pass: held-out documents first, then training ones."""
        opts = self.options
        held_out = 0 if opts.val_files else opts.val_tokens
        seen = 0
        counts = {"train": 0, "val": 0}
        for text, tokens in self._documents(opts.train_files, "train_files"):
            split = "val" if seen < held_out else "train"
            seen += tokens
            if (
                split == "train"
                and opts.max_tokens is not None
                and seen - held_out > opts.max_tokens
            ):
                if counts["train"] == 0:
                    raise DataError(
                        f"dataset.max_tokens: {opts.max_tokens:,} is less than the first "
                        f"training document ({tokens:,} tokens); raise it"
                    )
                break
            counts[split] += 1
            yield split, text
        if opts.val_files:
            for text, _ in self._documents(opts.val_files, "val_files"):
                counts["val"] += 1
                yield "val", text
        self._explain_empty(counts)

    def _explain_empty(self, counts: dict[str, int]) -> None:
        """Say why a split came out empty, in terms of the options that decided it."""
        opts = self.options
        where = "dataset.train_files" if opts.source == "local" else f"{HUB_NAME} ({opts.subset})"
        if counts["train"] + (0 if opts.val_files else counts["val"]) == 0:
            filters = [
                f"{name} = {value}"
                for name, value in (
                    ("fraction", opts.fraction),
                    ("min_int_score", opts.min_int_score),
                )
                if value is not None
            ]
            because = f" with {' and '.join(filters)}" if filters else ""
            raise DataError(f"{where}: no document with text was kept{because}")
        if counts["train"] == 0 and not opts.val_files:
            raise DataError(
                f"dataset.val_tokens: all {counts['val']:,} documents went to validation: "
                f"val_tokens = {opts.val_tokens:,}; lower it (or give val_files)"
            )
        if counts["val"] == 0 and opts.val_files:
            raise DataError("dataset.val_files: no document with text in them")

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
