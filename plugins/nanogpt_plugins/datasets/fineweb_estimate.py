"""The ``fineweb`` dataset's token estimate: published counts, Parquet footers, one small column.

FineWeb-Edu counts its tokens with GPT-2's tokenizer, so only ``"gpt2"`` is
estimated. On the hub nothing is read: the subset's published count times
``fraction``. Local Parquet is scanned as preparation scans it (footers only,
:func:`~nanogpt_plugins.datasets.row_groups.scan`), the same row groups are
chosen, and of those only the ``token_count`` column is read (about 1 % of a
row group's bytes), so the documents are walked through the held-out split and
``max_tokens`` exactly as :meth:`FineWebSource.split_documents` walks them.
Files without that column, and JSON Lines, are estimated from their sizes.

``min_int_score`` is not applied (that would need a second column): above 3,
FineWeb-Edu's own floor, the estimate is an upper bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from nanogpt_core import expand_files, tokens_from_text_bytes
from nanogpt_plugins.datasets import row_groups
from nanogpt_plugins.datasets.sizes import PARQUET_LENGTH_BYTES, files_size

if TYPE_CHECKING:
    from nanogpt_plugins.datasets.fineweb import FineWebOptions

# GPT-2 tokens of FineWeb-Edu's configurations, from its dataset card
# (huggingface.co/datasets/HuggingFaceFW/fineweb-edu): the whole dataset
# ("default") 1.3T; the random samples about 10B, 100B and 350B. The card gives
# no count for a single dump (CC-MAIN-...), so those are not estimated.
PUBLISHED_TOKENS = {
    "default": 1_300_000_000_000,
    "sample-10BT": 10_000_000_000,
    "sample-100BT": 100_000_000_000,
    "sample-350BT": 350_000_000_000,
}


def estimate(options: FineWebOptions, tokenizer: str, fs: Any) -> dict[str, int] | None:
    """GPT-2 tokens of each split, ``{"train": n, "val": m}``; None for another tokenizer.

    ``fs`` is the local file system Parquet is read through. Each document
    counts its ``<|endoftext|>`` where documents are counted (``token_count``);
    published counts leave it out (about 0.1 % of FineWeb-Edu's pages' tokens).
    """
    if tokenizer != "gpt2":
        return None
    held = 0 if options.val_files else options.val_tokens
    if options.source == "hub":
        published = PUBLISHED_TOKENS.get(options.subset)
        if published is None:
            return None
        counts = _split_total(round(published * (options.fraction or 1)), held, options.max_tokens)
    else:
        sample = _sample(options, options.train_files, "train_files", fs)
        counts = (
            _split_total(sample, held, options.max_tokens)
            if isinstance(sample, int)
            else _split_stream(sample, held, options.max_tokens)
        )
    if options.val_files:
        sample = _sample(options, options.val_files, "val_files", fs)
        counts["val"] = sample if isinstance(sample, int) else sum(sample)
    return counts


def _split_total(total: int, held: int, max_tokens: int | None) -> dict[str, int]:
    """Split a total the way documents are split: ``held`` first, the rest up to ``max_tokens``."""
    val = min(held, total)
    train = total - val
    return {"train": train if max_tokens is None else min(train, max_tokens), "val": val}


def _split_stream(tokens: Iterable[int], held: int, max_tokens: int | None) -> dict[str, int]:
    """Walk documents' token counts as ``split_documents`` walks the documents.

    Stops at the first training document past ``max_tokens``, so no more of the
    column is read than preparation would read of the text.
    """
    counts = {"train": 0, "val": 0}
    seen = 0
    for count in tokens:
        split = "val" if seen < held else "train"
        seen += count
        if split == "train" and max_tokens is not None and seen - held > max_tokens:
            break
        counts[split] += count
    return counts


def _sample(
    options: FineWebOptions, patterns: list[str], name: str, fs: Any
) -> Iterator[int] | int:
    """Tokens of each document of the sample (with its end-of-text), in reading order.

    Where documents are not counted (no ``token_count``, JSON Lines), the total
    instead: the text's bytes in tokens, plus an end-of-text per row where the
    footers count the rows.
    """
    files = expand_files(patterns, f"dataset.{name}")
    share = options.fraction or 1
    if all(path.suffix == ".parquet" for path in files):
        scanned = row_groups.scan(
            fs, row_groups.local_files(files), [options.text_field], ["token_count"]
        )
        groups = scanned.groups
        if options.fraction is not None:
            groups = row_groups.choose(groups, options.fraction, options.seed)
        if "token_count" in scanned.columns:
            return _counted(fs, scanned, groups)
        size, rows = _text_bytes(scanned, groups, options.text_field), sum(g.rows for g in groups)
        share = 1.0  # the chosen groups are the sample
    else:
        total = files_size(files, options.text_field)
        size, rows = total.bytes, total.rows or 0
    return (tokens_from_text_bytes(round(size * share), "gpt2") or 0) + round(rows * share)


def _counted(fs: Any, scanned: row_groups.Scan, groups: list[row_groups.RowGroup]) -> Iterator[int]:
    """``token_count + 1`` of each row of ``groups``, reading that column only.

    A row without a count (null, as a page the plugin encodes itself has) counts
    as the mean of those with one.
    """
    column = row_groups.Scan(scanned.groups, scanned.footers, ["token_count"])
    known = total = 0
    missing = 0
    for row in row_groups.read(fs, column, groups):
        count = row["token_count"]
        if isinstance(count, int) and count > 0:
            known, total = known + 1, total + count
            yield count + 1
        else:
            missing += 1
    if missing and known:
        yield missing * (round(total / known) + 1)


def _text_bytes(
    scanned: row_groups.Scan, groups: Iterable[row_groups.RowGroup], text_field: str
) -> int:
    """The uncompressed bytes of the text column in ``groups``, from the footers."""
    size = 0
    for group in groups:
        meta = scanned.footers[group.path].row_group(group.index)
        for index in range(meta.num_columns):
            if meta.column(index).path_in_schema == text_field:
                size += meta.column(index).total_uncompressed_size
        size -= PARQUET_LENGTH_BYTES * group.rows
    return max(0, size)
