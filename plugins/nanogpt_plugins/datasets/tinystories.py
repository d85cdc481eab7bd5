"""The ``tinystories`` dataset: short stories a small model learns fast.

``source = "hub"`` streams ``roneneldan/TinyStories`` with ``datasets`` (its own
``train`` and ``validation`` splits). ``source = "local"`` reads
``train_files`` (and ``val_files`` when given): the original
``TinyStoriesV2-GPT4-*.txt`` form (stories separated by ``<|endoftext|>``
lines) or json/jsonl/parquet rows with a text field. Without a validation
source, whole stories are held out: every story whose seeded hash falls under
``val_fraction``, so the split does not depend on file order.

``max_documents`` and ``max_val_documents`` keep the first stories of each
split and stop reading there: a quick demo streams the start of the hub's 2.1
million stories, not all of them.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

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
    read_texts,
    tokens_from_text_bytes,
)
from nanogpt_plugins.datasets.sizes import files_size

HUB_NAME = "roneneldan/TinyStories"
# The hub's splits, from the dataset card's dataset_info (as the datasets
# library recorded it for the parquet at revision 691b0d9): train 2,119,719
# stories in 1,911,420,483 bytes; dataset_size 1,930,726,793, so validation
# 21,990 stories in 19,306,310 bytes. Arrow counts a 4-byte offset per story.
HUB_SPLITS = {"train": (2_119_719, 1_911_420_483), "val": (21_990, 19_306_310)}
# A story's mean size on the hub, (1,911,420,483 - 4 x 2,119,719) / 2,119,719:
# to count the stories of local files that do not say (all but parquet).
MEAN_STORY_BYTES = 898


def _val_fraction(_instance, attribute, value: float) -> None:
    if not 0 < value < 1:
        raise OptionValueError(attribute.name, f"must be between 0 and 1, got {value}")


@attrs.frozen(kw_only=True)
class TinyStoriesOptions:
    """Options of the ``tinystories`` dataset."""

    source: str = option(
        "hub",
        '"hub" (roneneldan/TinyStories, streamed) or "local" (train_files).',
        validator=one_of("hub", "local"),
    )
    train_files: list[str] = option(
        doc="Local files or globs: .txt (<|endoftext|>-separated), .jsonl, .json, .parquet.",
        factory=list,
        path=True,
    )
    val_files: list[str] = option(
        doc="Local validation files or globs (default: hold out val_fraction of train_files).",
        factory=list,
        path=True,
    )
    text_field: str = option("text", "The field holding a story in json/jsonl/parquet rows.")
    val_fraction: float = option(
        0.05,
        "Share of stories held out for validation when there are no val_files.",
        validator=_val_fraction,
    )
    tokenizer: str = option(
        "gpt2",
        '"gpt2" (BPE, as TinyStories models use), "char", or any registered tokenizer.',
    )
    seed: int = option(1337, "Seed of the held-out split.")
    max_documents: int | None = option(
        None,
        "Stop after this many training stories, the first ones: a quick demo "
        "streams only the start of the hub's split.",
        validator=positive,
    )
    max_val_documents: int | None = option(
        None, "Stop after this many validation stories, the first ones.", validator=positive
    )

    def __attrs_post_init__(self) -> None:
        if self.source == "local" and not self.train_files:
            raise OptionValueError(
                "train_files", 'source = "local" needs train_files (paths or globs)'
            )


def held_out(text: str, seed: int, fraction: float) -> bool:
    """Whether a document belongs to the held-out validation set (stable, order-free)."""
    digest = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def first(stories: Iterable[str], limit: int | None) -> Iterator[str]:
    """The first ``limit`` stories (all without a limit); reading stops at the last one kept."""
    return itertools.islice(stories, limit)


class TinyStoriesSource:
    """TinyStories from the hub or from local files."""

    def __init__(self, options: TinyStoriesOptions) -> None:
        self.options = options
        self.tokenizer = options.tokenizer
        # A capped preparation gets a folder of its own, so a quick demo and the
        # full run never prepare over each other.
        caps = "".join(
            f"-{tag}{limit}"
            for tag, limit in (("first", options.max_documents), ("val", options.max_val_documents))
            if limit is not None
        )
        self.variant = f"{options.source}-{options.tokenizer}{caps}"
        where = (
            f"TinyStories from the Hugging Face hub ({HUB_NAME})"
            if options.source == "hub"
            else "TinyStories from local files: "
            + ", ".join(options.train_files + options.val_files)
        )
        limits = [
            f"the first {limit:,} {which} stories"
            for which, limit in (
                ("training", options.max_documents),
                ("validation", options.max_val_documents),
            )
            if limit is not None
        ]
        self.description = where + (f" ({' and '.join(limits)})" if limits else "")

    def split_documents(self, downloads: Path) -> Iterator[tuple[str, str]]:
        """``(split, story)`` pairs, reading each source file once, and no further than the caps."""
        opts = self.options
        if opts.source == "hub" or opts.val_files:
            for split, limit in (("train", opts.max_documents), ("val", opts.max_val_documents)):
                yield from ((split, text) for text in first(self._stories(split), limit))
            return
        counts = {"train": 0, "val": 0}
        for text in self._stories("train"):
            split = "val" if held_out(text, opts.seed, opts.val_fraction) else "train"
            if split == "train" and counts["train"] == opts.max_documents:
                break  # enough training stories: read no further
            if split == "val" and counts["val"] == opts.max_val_documents:
                continue
            counts[split] += 1
            yield split, text
        self._explain_empty(counts)

    def _stories(self, split: str) -> Iterator[str]:
        """The non-empty stories of the hub's ``split``, or of train_files / val_files."""
        opts = self.options
        if opts.source == "hub":
            hub_split = "train" if split == "train" else "validation"
            for row in hub_rows(HUB_NAME, None, hub_split):
                text = row[opts.text_field].strip()
                if text:
                    yield text
            return
        patterns, name = (
            (opts.train_files, "train_files") if split == "train" else (opts.val_files, "val_files")
        )
        for path in expand_files(patterns, f"dataset.{name}"):
            yield from (text for text in read_texts(path, opts.text_field) if text.strip())

    def _explain_empty(self, counts: dict[str, int]) -> None:
        """Say why holding out by val_fraction left a split empty."""
        total, fraction = counts["train"] + counts["val"], self.options.val_fraction
        if total == 0:
            return  # no stories at all: the core says the train split is empty
        if counts["train"] == 0:
            raise DataError(
                f"dataset.val_fraction: all {total:,} stories went to validation: "
                f"val_fraction = {fraction}; lower it, or give val_files"
            )
        if counts["val"] == 0:
            more = " (or max_documents)" if self.options.max_documents is not None else ""
            raise DataError(
                f"dataset.val_fraction: none of the {total:,} stories went to validation: "
                f"val_fraction = {fraction} is too small to hold any; raise it{more}, "
                "or give val_files"
            )

    def token_estimate(self, tokenizer: str) -> dict[str, int] | None:
        """Tokens of each split, from the hub's published sizes or the local files' sizes.

        Text bytes become tokens by :func:`nanogpt_core.tokens_from_text_bytes`
        (None for a tokenizer it has no figure for), plus an end-of-text per
        story with ``"gpt2"``. Without ``val_files`` a local corpus is split by
        ``val_fraction``; ``max_documents`` and ``max_val_documents`` cap the
        stories (counted from Parquet footers, else at 898 bytes a story, the
        hub's mean). Within a few percent of the prepared counts for English
        stories; the files are never read.
        """
        if tokens_from_text_bytes(0, tokenizer) is None:
            return None
        opts = self.options
        if opts.source == "hub" or opts.val_files:
            train, val = self._stories_size("train"), self._stories_size("val")
        else:
            total_bytes, total_stories = self._stories_size("train")
            share = opts.val_fraction
            train = (total_bytes * (1 - share), total_stories * (1 - share))
            val = (total_bytes * share, total_stories * share)
            if opts.max_documents is not None and train[1] > opts.max_documents:
                # Reading stops at the last training story kept, so the held-out
                # stories are those met on the way.
                kept = opts.max_documents / train[1]
                train, val = _scaled(train, kept), _scaled(val, kept)
        train = _capped(train, opts.max_documents)
        val = _capped(val, opts.max_val_documents)
        end = 1 if tokenizer == "gpt2" else 0  # gpt2 ends each story with <|endoftext|>
        return {
            split: (tokens_from_text_bytes(round(size), tokenizer) or 0) + end * round(stories)
            for split, (size, stories) in (("train", train), ("val", val))
        }

    def _stories_size(self, split: str) -> tuple[float, float]:
        """(bytes of text, stories) of the hub's split, or of train_files / val_files."""
        opts = self.options
        if opts.source == "hub":  # its own validation split, as _stories reads
            stories, size = HUB_SPLITS[split]
            return size - 4 * stories, stories
        patterns, name = (
            (opts.train_files, "train_files") if split == "train" else (opts.val_files, "val_files")
        )
        size = files_size(expand_files(patterns, f"dataset.{name}"), opts.text_field)
        stories = size.rows if size.rows is not None else size.bytes / MEAN_STORY_BYTES
        return size.bytes, stories

    def documents(self, split: str, downloads: Path) -> Iterator[str]:
        """Stories of ``split``: the source's validation split, or held-out stories."""
        return (text for which, text in self.split_documents(downloads) if which == split)


def _scaled(size: tuple[float, float], share: float) -> tuple[float, float]:
    return size[0] * share, size[1] * share


def _capped(size: tuple[float, float], limit: int | None) -> tuple[float, float]:
    """(bytes, stories) of the first ``limit`` stories, at the mean size."""
    if limit is None or size[1] <= limit:
        return size
    return _scaled(size, limit / size[1])


@hookimpl
def register_datasets(register):
    """Register the ``tinystories`` dataset."""
    register(
        "tinystories",
        TinyStoriesSource,
        options=TinyStoriesOptions,
        description="TinyStories from the hub or local txt/json/jsonl/parquet files.",
    )
