"""The ``alpaca`` dataset: Stanford Alpaca's instruction/input/output records, as examples.

``source = "hub"`` streams ``hub_name`` (``tatsu-lab/alpaca`` or
``yahma/alpaca-cleaned``, both one ``train`` split with columns
``instruction``, ``input`` and ``output``). ``source = "local"`` reads
``train_files`` (and ``val_files`` when given): a JSON array like
``alpaca_data.json``, JSON Lines, or Parquet. Without ``val_files``, every
record whose seeded hash falls under ``val_fraction`` is held out, so the split
does not depend on file order. ``max_examples`` keeps the first records and
stops reading there, so a quick demo streams only the start of the hub's split.

The source yields records; the core renders each through the template,
tokenizes it and cuts it to the block size (:mod:`nanogpt_core.data.example_preparation`). A bad
record (a field missing or not text, an empty output) stops preparation with
one line naming the file and the record, counted from 1 (JSON Lines: the line).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from nanogpt_core import (
    DataError,
    OptionValueError,
    expand_files,
    hookimpl,
    hub_rows,
    one_of,
    option,
    positive,
    read_rows,
)
from nanogpt_plugins.datasets.sizes import text_size

FIELDS = ("instruction", "input", "output")
SUFFIXES = (".json", ".jsonl", ".parquet")
# Records on the hub: tatsu-lab/alpaca is alpaca_data.json's 52,002; yahma's
# cleaned copy has 51,760 (its dataset viewer's row count).
HUB_RECORDS = {"tatsu-lab/alpaca": 52_002, "yahma/alpaca-cleaned": 51_760}
# Measured on shared/data's 2,500 records (alpaca_data.json's first), with the
# gpt2 tokenizer and the alpaca template: an example (prompt, output and
# <|endoftext|>) is 107.1 tokens on average: its three fields, 328.7 bytes at
# 4.71 bytes a token, and 37.4 tokens of the template's own text and the
# end-of-text (31 without an input, 46 with one, which 43 % have). A record
# takes 414 bytes in alpaca_data.json's layout (indented JSON) and 370 as a JSON line.
TOKENS_PER_EXAMPLE = 107.1
FIELD_BYTES_PER_TOKEN = 4.71
TEMPLATE_TOKENS = 37.4
RECORD_BYTES = {".json": 414, ".jsonl": 370}


class EmptyOutput(DataError):
    """A record whose output is empty or only whitespace."""


def _val_fraction(_instance, attribute, value: float) -> None:
    if not 0 < value < 1:
        raise OptionValueError(attribute.name, f"must be between 0 and 1, got {value}")


@attrs.frozen(kw_only=True)
class AlpacaOptions:
    """Options of the ``alpaca`` dataset."""

    source: str = option(
        "hub",
        '"hub" (hub_name, streamed) or "local" (train_files).',
        validator=one_of("hub", "local"),
    )
    hub_name: str = option(
        "tatsu-lab/alpaca", 'The hub dataset: "tatsu-lab/alpaca" or "yahma/alpaca-cleaned".'
    )
    train_files: list[str] = option(
        doc="Local files or globs: a JSON array (alpaca_data.json), .jsonl or .parquet.",
        factory=list,
        path=True,
    )
    val_files: list[str] = option(
        doc="Local validation files or globs (default: hold out val_fraction of the records).",
        factory=list,
        path=True,
    )
    val_fraction: float = option(
        0.02,
        "Share of records held out for validation when there are no val_files.",
        validator=_val_fraction,
    )
    seed: int = option(1337, "Seed of the held-out split.")
    tokenizer: str = option("gpt2", "A registered tokenizer with an end-of-text token.")
    template: str = option("alpaca", "The registered template the records are rendered with.")
    skip_empty_output: bool = option(
        False,
        "Leave out records whose output is empty (tatsu-lab/alpaca has some) instead of "
        "stopping at the first.",
    )
    max_examples: int | None = option(
        None,
        "Stop after this many records of hub_name or train_files, the first ones, before "
        "val_fraction is held out of them: a quick demo streams only the start of the hub's "
        "split (val_files are read whole).",
        validator=positive,
    )

    def __attrs_post_init__(self) -> None:
        if self.source == "local" and not self.train_files:
            raise OptionValueError(
                "train_files", 'source = "local" needs train_files (paths or globs)'
            )


def held_out(record: dict[str, str], seed: int, fraction: float) -> bool:
    """Whether a record belongs to the held-out validation set (stable, order-free)."""
    content = json.dumps([record[f] for f in FIELDS], ensure_ascii=False)
    digest = hashlib.blake2b(f"{seed}:{content}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def check_record(row: Any, where: str) -> dict[str, str]:
    """The record's three fields, or one line saying what is wrong with it and where.

    An empty output is an :class:`EmptyOutput` (a :class:`DataError`), which
    ``skip_empty_output`` turns into leaving the record out.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with {', '.join(FIELDS)}")
    for field in FIELDS:
        if field not in row:
            have = ", ".join(sorted(row)) or "none"
            raise DataError(f"{where}: has no {field!r} field (it has: {have})")
        if not isinstance(row[field], str):
            raise DataError(f"{where}: {field!r} is {type(row[field]).__name__}, expected text")
    if not row["output"].strip():
        raise EmptyOutput(
            f"{where}: 'output' is empty; every record needs a response "
            "(or set skip_empty_output = true to leave such records out)"
        )
    return {field: row[field] for field in FIELDS}


def check_suffix(path: Path) -> None:
    """Refuse, in one line, a file whose type holds no alpaca records."""
    if path.suffix not in SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {path.suffix or '(none)'}; alpaca records come "
            f"from {', '.join(SUFFIXES)} files"
        )


def file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for each row of one local file, ``where`` naming file and record."""
    check_suffix(path)
    if path.suffix == ".json":
        yield from _json_rows(path)
    elif path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
    else:
        # No columns asked for: the fields are checked here, with the record's number.
        for number, row in enumerate(read_rows(path, []), 1):
            yield f"{path}: record {number}", row


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """One record per line; blank lines are skipped, errors name the line."""
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
                yield f"{path}: line {number}", row
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON array of records, as ``alpaca_data.json`` is."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got a {type(data).__name__}")
    for number, row in enumerate(data, 1):
        yield f"{path}: record {number}", row


class AlpacaSource:
    """Alpaca records from the hub or from local files."""

    def __init__(self, options: AlpacaOptions) -> None:
        self.options = options
        self.tokenizer = options.tokenizer
        self.template = options.template
        hub = "hub-" + options.hub_name.replace("/", "--")
        where = hub if options.source == "hub" else "local"
        # A capped preparation gets a folder of its own, so a quick demo and the
        # full run never prepare over each other.
        first = "" if options.max_examples is None else f"-first{options.max_examples}"
        self.variant = f"{where}-{options.tokenizer}{first}"
        self.description = (
            f"Alpaca from the Hugging Face hub ({options.hub_name})"
            if options.source == "hub"
            else "Alpaca from local files: " + ", ".join(options.train_files + options.val_files)
        ) + ("" if options.max_examples is None else f" (the first {options.max_examples:,})")

    def split_examples(self, downloads: Path) -> Iterator[tuple[str, dict[str, str]]]:
        """``(split, record)`` pairs, reading each source once."""
        opts = self.options
        if opts.source == "local" and opts.val_files:
            yield from (("train", record) for record in self._train_records())
            yield from (("val", record) for record in self._val_records())
            return
        counts = {"train": 0, "val": 0}
        for record in self._train_records():
            split = "val" if held_out(record, opts.seed, opts.val_fraction) else "train"
            counts[split] += 1
            yield split, record
        self._explain_empty(counts)

    def _train_records(self) -> Iterator[dict[str, str]]:
        """The checked records of hub_name or train_files, the first max_examples of them."""
        opts = self.options
        if opts.source == "hub":
            # Both hub datasets have a single train split; validation is held out.
            rows = hub_rows(opts.hub_name, None, "train")
            where = ((f"{opts.hub_name} (hub): row {n}", row) for n, row in enumerate(rows, 1))
        else:
            where = self._file_rows(opts.train_files, "train_files")
        return self._checked(where, opts.max_examples)

    def _val_records(self) -> Iterator[dict[str, str]]:
        """The checked records of val_files, all of them."""
        return self._checked(self._file_rows(self.options.val_files, "val_files"))

    @staticmethod
    def _file_rows(patterns: list[str], name: str) -> Iterator[tuple[str, Any]]:
        """``(where, row)`` of every file the patterns of option ``name`` match, in order."""
        for path in expand_files(patterns, f"dataset.{name}"):
            yield from file_rows(path)

    def _checked(
        self, rows: Iterator[tuple[str, Any]], limit: int | None = None
    ) -> Iterator[dict[str, str]]:
        """Checked records, at most ``limit`` of them: no row is asked for after the last.

        With skip_empty_output, records without a response are left out (counted on stderr).
        """
        skipped = kept = 0
        for where, row in rows:
            try:
                record = check_record(row, where)
            except EmptyOutput:
                if not self.options.skip_empty_output:
                    raise
                skipped += 1
                continue
            yield record
            kept += 1
            if kept == limit:
                break
        if skipped:
            print(
                f"alpaca: left out {skipped:,} records with an empty output (skip_empty_output)",
                file=sys.stderr,
                flush=True,
            )

    def _explain_empty(self, counts: dict[str, int]) -> None:
        """Say why holding out by val_fraction left a split empty."""
        total, fraction = counts["train"] + counts["val"], self.options.val_fraction
        if total == 0:
            return  # no records at all: the core says the train split is empty
        if counts["train"] == 0:
            raise DataError(
                f"dataset.val_fraction: all {total:,} records went to validation: "
                f"val_fraction = {fraction}; lower it, or give val_files"
            )
        if counts["val"] == 0:
            raise DataError(
                f"dataset.val_fraction: none of the {total:,} records went to validation: "
                f"val_fraction = {fraction} is too small to hold any; raise it, or give val_files"
            )

    def token_estimate(self, tokenizer: str) -> dict[str, int] | None:
        """Tokens and examples of each split, from record counts and file sizes.

        Keys ``train`` and ``val`` are the examples' tokens (prompt, output and
        end-of-text), ``train_examples`` and ``val_examples`` their number.
        Records are the hub dataset's published count, a Parquet footer's rows,
        or a JSON file's size at Alpaca's mean record size; tokens are Alpaca's
        mean example per record, or for Parquet the fields' uncompressed bytes
        at Alpaca's bytes per token plus the template's text. ``max_examples``
        and ``val_fraction`` (or ``val_files``) split them as preparation does.
        None unless the tokenizer is ``gpt2`` and the template ``alpaca`` (the
        figures are theirs) and, on the hub, for a dataset without a known
        count. Examples longer than the block size are counted whole.
        """
        opts = self.options
        if tokenizer != "gpt2" or opts.template != "alpaca":
            return None
        if opts.source == "hub":
            records = HUB_RECORDS.get(opts.hub_name)
            if records is None:
                return None
            train = (records * TOKENS_PER_EXAMPLE, float(records))
        else:
            train = _files_estimate(opts.train_files, "train_files")
        if opts.max_examples is not None and train[1] > opts.max_examples:
            share = opts.max_examples / train[1]
            train = (train[0] * share, float(opts.max_examples))
        if opts.source == "local" and opts.val_files:
            val = _files_estimate(opts.val_files, "val_files")
        else:
            held = opts.val_fraction
            val = (train[0] * held, train[1] * held)
            train = (train[0] * (1 - held), train[1] * (1 - held))
        return {
            "train": round(train[0]),
            "val": round(val[0]),
            "train_examples": round(train[1]),
            "val_examples": round(val[1]),
        }

    def examples(self, split: str, downloads: Path) -> Iterator[dict[str, str]]:
        """Records of ``split``: ``val_files``, or the held-out records."""
        return (record for which, record in self.split_examples(downloads) if which == split)


def _files_estimate(patterns: list[str], name: str) -> tuple[float, float]:
    """(tokens, records) of the files the patterns of option ``name`` match, unread."""
    tokens = records = 0.0
    for path in expand_files(patterns, f"dataset.{name}"):
        check_suffix(path)
        size = text_size(path, FIELDS)
        if size.rows is not None:  # Parquet: its rows, and its fields' bytes
            rows = float(size.rows)
            tokens += size.bytes / FIELD_BYTES_PER_TOKEN + rows * TEMPLATE_TOKENS
        else:
            rows = size.bytes / RECORD_BYTES[path.suffix]
            tokens += rows * TOKENS_PER_EXAMPLE
        records += rows
    return tokens, records


@hookimpl
def register_datasets(register):
    """Register the ``alpaca`` dataset."""
    register(
        "alpaca",
        AlpacaSource,
        options=AlpacaOptions,
        description="Stanford Alpaca instruction/response records, from the hub or local files.",
    )
