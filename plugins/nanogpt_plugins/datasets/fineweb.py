"""The ``fineweb`` dataset: FineWeb-Edu, educational web pages, GPT-2 tokens.

``source = "hub"`` reads ``HuggingFaceFW/fineweb-edu`` (``subset``, default
``sample-10BT``) at a pinned commit (``revision``) through ``huggingface_hub``'s
``HfFileSystem``, which reads by HTTP ranges; ``source = "local"`` reads parquet
or jsonl files with FineWeb-Edu's columns (text, id, dump, url, file_path,
language, language_score, token_count, score, int_score).

Parquet, the hub's and local files alike, is read by row group with the same
code (:mod:`nanogpt_plugins.datasets.row_groups`): with ``fraction`` set, a
seeded set of row groups holding that share of the rows is chosen from the
files' footers, by a hash of (file name, group index) so file order does not
matter, and only those groups' ``text`` (plus ``token_count``, and
``int_score`` when filtering) are read; without it every group is read in file
order. JSON Lines has no row groups: it is read whole and ``fraction`` keeps
documents by a seeded hash of their id. ``min_int_score`` keeps pages the
classifier rated at least that educational; ``max_tokens`` caps the training
tokens (reading stops there). Validation is a held-out set of whole documents:
the first ones read until ``val_tokens``, or ``val_files``.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from nanogpt_core import (
    DataError,
    OptionValueError,
    expand_files,
    gpt2_encoding,
    hookimpl,
    hub_unreachable,
    one_of,
    option,
    positive,
    quiet_hub_retries,
    read_rows,
)
from nanogpt_plugins.datasets import fineweb_estimate, row_groups

HUB_NAME = "HuggingFaceFW/fineweb-edu"
# The commit read by default: its sample/10BT holds 14 parquet files, 9,672,101
# rows and 28,518,193,415 bytes. A commit, not a branch, so the same options
# always give the same sample (a branch moves when the dataset is updated).
HUB_REVISION = "87f09149ef4734204d70ed1d046ddc9ca3f2b8f9"
HUB_HINT = 'use source = "local" with downloaded files'
# FineWeb-Edu's configurations: all dumps, the random samples, one dump.
SUBSET = re.compile(r"default|sample-\d+BT|CC-MAIN-\d{4}-\d{2}")


def _fraction(_instance, attribute, value: float | None) -> None:
    if value is not None and not 0 < value <= 1:
        raise OptionValueError(attribute.name, f"must be in (0, 1], got {value}")


def _score(_instance, attribute, value: int | None) -> None:
    if value is not None and not 0 <= value <= 5:
        raise OptionValueError(
            attribute.name, f"must be between 0 and 5 (FineWeb-Edu's int_score), got {value}"
        )


def _subset(_instance, attribute, value: str) -> None:
    if not SUBSET.fullmatch(value):
        raise OptionValueError(
            attribute.name,
            f'expected "sample-10BT", "sample-100BT", "sample-350BT", "default" or one dump '
            f'such as "CC-MAIN-2024-10", got {value!r}',
        )


def _revision(_instance, attribute, value: str) -> None:
    if not re.fullmatch(r"[0-9a-f]{40}", value):
        raise OptionValueError(
            attribute.name,
            f"expected a commit of {HUB_NAME} (40 hex digits, from the dataset's history "
            f"on the hub), so the same options always give the same sample; got {value!r}",
        )


@attrs.frozen(kw_only=True)
class FineWebOptions:
    """Options of the ``fineweb`` dataset."""

    source: str = option(
        "hub",
        '"hub" (HuggingFaceFW/fineweb-edu, read by HTTP ranges) or "local" (train_files).',
        validator=one_of("hub", "local"),
    )
    subset: str = option(
        "sample-10BT",
        'The hub configuration (source = "hub"): sample-10BT/-100BT/-350BT, default, or a dump.',
        validator=_subset,
    )
    revision: str = option(
        HUB_REVISION,
        'The hub commit read (source = "hub"); part of the data fingerprint.',
        validator=_revision,
    )
    train_files: list[str] = option(
        doc="Local parquet/jsonl files or globs with FineWeb-Edu's columns.",
        factory=list,
        path=True,
    )
    val_files: list[str] = option(
        doc="Local validation files (default: hold out val_tokens of the documents read).",
        factory=list,
        path=True,
    )
    text_field: str = option("text", "The column holding the page text.")
    fraction: float | None = option(
        None,
        "Read only a seeded random share of the row groups (parquet) or documents "
        "(jsonl), e.g. 0.01 for 1%.",
        validator=_fraction,
    )
    max_tokens: int | None = option(
        None, "Stop reading after this many training tokens.", validator=positive
    )
    min_int_score: int | None = option(
        None, "Keep pages with int_score at least this (0-5).", validator=_score
    )
    val_tokens: int = option(
        1_000_000,
        "GPT-2 tokens of whole documents held out for validation (unless val_files).",
        validator=positive,
    )
    seed: int = option(1337, "Seed of the random sample.")

    def __attrs_post_init__(self) -> None:
        if self.source == "local" and not self.train_files:
            raise OptionValueError(
                "train_files", 'source = "local" needs train_files (paths or globs)'
            )


def sampled(row: dict[str, Any], text: str, seed: int, fraction: float | None) -> bool:
    """Whether a JSON Lines document is in the seeded sample; keyed by its id, not file order."""
    if fraction is None or fraction >= 1:
        return True
    key = row.get("id") or text
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def filesystem(source: str) -> Any:
    """The fsspec file system parquet is read through: the hub's ``HfFileSystem``, or the disk.

    Offline, the hub fails here at once, in one line (the host is looked up
    first). Tests put a stand-in file system in its place.
    """
    if source == "hub":
        problem = hub_unreachable()
        if problem:
            raise DataError(
                f"could not read {HUB_NAME} from the Hugging Face hub ({problem}); {HUB_HINT}"
            )
        from huggingface_hub import HfFileSystem

        return HfFileSystem()
    import fsspec

    return fsspec.filesystem("file")


def subset_path(subset: str) -> str:
    """The folder of a FineWeb-Edu configuration in the repository (as its README maps them)."""
    if subset == "default":
        return "data"
    if subset.startswith("sample-"):
        return "sample/" + subset.removeprefix("sample-")
    return f"data/{subset}"


def hub_files(fs: Any, root: str) -> list[tuple[str, str]]:
    """``(path, name relative to root)`` of the parquet files under ``root``, sorted."""
    base = fs._strip_protocol(root).rstrip("/")
    paths = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    return [(p, p[len(base) :].lstrip("/")) for p in paths if p.startswith(base + "/")]


class FineWebSource:
    """FineWeb-Edu documents, filtered and sampled."""

    tokenizer = "gpt2"

    def __init__(self, options: FineWebOptions) -> None:
        self.options = options
        self.variant = f"hub-{options.subset}" if options.source == "hub" else "local"
        sample = (
            f", a {options.fraction:g} sample (seed {options.seed})"
            if options.fraction is not None
            else ""
        )
        self.description = (
            f"FineWeb-Edu from the Hugging Face hub ({HUB_NAME}@{options.revision[:12]}, "
            f"{options.subset}){sample}"
            if options.source == "hub"
            else "FineWeb-Edu rows from local files: "
            + ", ".join(options.train_files + options.val_files)
            + sample
        )
        self._encoder: Any = None

    def _columns(self) -> list[str]:
        columns = [self.options.text_field]
        if self.options.min_int_score is not None:
            columns.append("int_score")
        return columns

    def _rows(self, patterns: list[str], option_name: str) -> Iterator[dict[str, Any]]:
        """The rows of the sample: chosen row groups of parquet, sampled documents of jsonl."""
        opts = self.options
        if opts.source == "hub" and option_name == "train_files":
            yield from self._hub_rows()
            return
        files = expand_files(patterns, f"dataset.{option_name}")
        if all(path.suffix == ".parquet" for path in files):
            fs = filesystem("local")
            yield from self._parquet_rows(
                fs, row_groups.local_files(files), f"dataset.{option_name}"
            )
            return
        for path in files:
            for row in read_rows(path, self._columns()):
                if sampled(row, row[opts.text_field], opts.seed, opts.fraction):
                    yield row

    def _hub_rows(self) -> Iterator[dict[str, Any]]:
        """The subset's parquet at ``revision``, through the hub's file system."""
        opts = self.options
        where = f"{HUB_NAME}@{opts.revision[:7]} {subset_path(opts.subset)}"
        fs = filesystem("hub")
        try:
            with quiet_hub_retries():
                files = hub_files(
                    fs, f"datasets/{HUB_NAME}@{opts.revision}/{subset_path(opts.subset)}"
                )
                if not files:
                    raise DataError(
                        f"{where}: no parquet files at revision {opts.revision}; "
                        "check dataset.subset and dataset.revision"
                    )
                yield from self._parquet_rows(fs, files, where)
        except DataError:
            raise
        except Exception as exc:  # offline mid-way, unknown revision, gated: one line
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise DataError(
                f"could not read {where} from the Hugging Face hub "
                f"({type(exc).__name__}: {first}); {HUB_HINT}"
            ) from None

    def _parquet_rows(
        self, fs: Any, files: list[tuple[str, str]], where: str
    ) -> Iterator[dict[str, Any]]:
        """Every row group in file order, or the seeded ``fraction`` of them in sample order."""
        opts = self.options
        scanned = row_groups.scan(fs, files, self._columns(), ["token_count"])
        groups = scanned.groups
        if opts.fraction is not None:
            groups = row_groups.choose(groups, opts.fraction, opts.seed)
            _announce(where, scanned.groups, groups)
        yield from row_groups.read(fs, scanned, groups)

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

    def token_estimate(self, tokenizer: str) -> dict[str, int] | None:
        """GPT-2 tokens of each split: published counts on the hub, footers and token_count locally.

        See :func:`nanogpt_plugins.datasets.fineweb_estimate.estimate`; an upper
        bound when ``min_int_score`` is above 3, FineWeb-Edu's own floor.
        """
        return fineweb_estimate.estimate(self.options, tokenizer, filesystem("local"))

    def documents(self, split: str, downloads: Path) -> Iterator[str]:
        """Held-out documents for ``val``; the rest (up to ``max_tokens``) for ``train``."""
        return (text for which, text in self.split_documents(downloads) if which == split)


def _announce(
    where: str, every: Sequence[row_groups.RowGroup], chosen: Sequence[row_groups.RowGroup]
) -> None:
    """Say on stderr how much of the corpus the sample reads, before reading it."""
    rows = sum(g.rows for g in every) or 1
    mb = sum(g.bytes for g in chosen) / 1e6
    print(
        f"fineweb: reading {len(chosen):,} of {len(every):,} row groups of {where} "
        f"({sum(g.rows for g in chosen) / rows:.2%} of {rows:,} rows, {mb:,.1f} of "
        f"{sum(g.bytes for g in every) / 1e6:,.1f} MB; sample {row_groups.choice_digest(chosen)})",
        file=sys.stderr,
        flush=True,
    )


@hookimpl
def register_datasets(register):
    """Register the ``fineweb`` dataset."""
    register(
        "fineweb",
        FineWebSource,
        options=FineWebOptions,
        description="FineWeb-Edu from the hub or local parquet/jsonl, sampled and filtered.",
    )
