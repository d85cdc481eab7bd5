"""Seeded samples of Parquet row groups, read through any fsspec file system.

A Parquet file is a sequence of row groups (datatrove, which wrote FineWeb-Edu,
makes one of every 1,000 pages by default) followed by a footer that says where
each group's column chunks lie. So a share of a corpus can be read without the
rest: read every file's footer once (:func:`scan`), pick row groups
(:func:`choose`), then read only those groups' chunks of the columns wanted
(:func:`read`). Over the Hugging Face hub's ``HfFileSystem`` each chunk is one
HTTP range request (pyarrow merges two across a gap under 8 KB); over a local
file system it is one ``read``; the code is the same.

Files are opened with ``cache_type="none"``, so the bytes fetched are the
chunks pyarrow asks for and no more: fsspec's default read-ahead would fetch
5 MB past each read (other columns, the next groups), more than a chunk holds.

The choice is keyed by each file's name relative to the corpus root and the
group's index, never by listing order, so the same files listed in any order
(or copied to another folder, or read from the hub instead of a local copy)
give the same sample.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from nanogpt_core import DataError

# No read-ahead: see the module docstring.
OPEN_OPTIONS: dict[str, Any] = {"cache_type": "none"}


@attrs.frozen
class RowGroup:
    """One row group: where it is, and how many rows and bytes it holds.

    ``name`` is the file's path relative to the corpus root (the sample's key);
    ``path`` is where the file system finds it; ``bytes`` is the compressed size
    of the chunks of the columns that will be read.
    """

    name: str
    path: str
    index: int
    rows: int
    bytes: int

    def key(self, seed: int) -> int:
        """A seeded 64-bit hash of (name, index): the group's place in the sample order."""
        digest = hashlib.blake2b(f"{seed}:{self.name}:{self.index}".encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "big")


@attrs.frozen
class Scan:
    """Every row group of some files, the files' footers, and the columns to read."""

    groups: list[RowGroup]
    footers: dict[str, Any]
    columns: list[str]


def local_files(paths: Sequence[Path]) -> list[tuple[str, str]]:
    """``(path, name relative to the files' common folder)``, each file once.

    Names, not paths, key the sample: a copy in another folder, or of the hub's
    files (named as on the hub), gives the same sample.
    """
    resolved = list(dict.fromkeys(p.resolve() for p in paths))
    root = Path(os.path.commonpath([p.parent for p in resolved]))
    return [(str(p), p.relative_to(root).as_posix()) for p in resolved]


def scan(
    fs: Any, files: Sequence[tuple[str, str]], required: Sequence[str], optional: Sequence[str]
) -> Scan:
    """Read the footer of each ``(path, name)`` file: its row groups and columns.

    Every column in ``required`` must be in every file (the first is the text,
    named in the message with a hint); those of ``optional`` are read where all
    files have them. The footers are kept, so reading a group later costs no
    second footer read.
    """
    import pyarrow.parquet as pq

    footers: dict[str, Any] = {}
    names: dict[str, list[str]] = {}
    for path, _ in files:
        with _readable(path), fs.open(path, "rb", **OPEN_OPTIONS) as handle:
            parquet = pq.ParquetFile(handle)
            footers[path] = parquet.metadata
            names[path] = parquet.schema_arrow.names
        missing = [c for c in required if c not in names[path]]
        if missing:
            hint = "; set text_field to one of them" if missing[0] == required[0] else ""
            raise DataError(
                f"{path}: has no {missing[0]!r} column (it has: {', '.join(names[path])}){hint}"
            )
    columns = [*required, *(c for c in optional if all(c in n for n in names.values()))]
    groups = []
    for path, name in files:
        footer = footers[path]
        for index in range(footer.num_row_groups):
            group = footer.row_group(index)
            wanted = [
                group.column(i).total_compressed_size
                for i in range(group.num_columns)
                if group.column(i).path_in_schema in columns
            ]
            groups.append(RowGroup(name, path, index, group.num_rows, sum(wanted)))
    return Scan(groups, footers, columns)


def choose(groups: Sequence[RowGroup], fraction: float, seed: int) -> list[RowGroup]:
    """The row groups of a seeded sample of ``fraction`` of the rows, in sample order.

    Groups are sorted by their seeded hash and taken until their rows reach
    ``fraction`` of all rows: the sample hits the share to within one group
    (where keeping each group with probability ``fraction`` would miss it by the
    binomial spread, about 10 % at 100 groups), a larger fraction keeps every
    group of a smaller one, and at least one group is always kept.
    """
    ordered = sorted(
        (g for g in groups if g.rows > 0), key=lambda g: (g.key(seed), g.name, g.index)
    )
    target = fraction * sum(g.rows for g in ordered)
    chosen: list[RowGroup] = []
    rows = 0
    for group in ordered:
        if rows >= target:
            break
        chosen.append(group)
        rows += group.rows
    return chosen


def choice_digest(groups: Sequence[RowGroup]) -> str:
    """A short hash of the chosen (name, index) pairs, to name a sample in messages."""
    text = "\n".join(f"{g.name}:{g.index}" for g in groups)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def read(fs: Any, scanned: Scan, groups: Sequence[RowGroup]) -> Iterator[dict[str, Any]]:
    """The rows of ``groups``, in that order, with only the scanned columns."""
    import pyarrow.parquet as pq

    for group in groups:
        with _readable(group.path), fs.open(group.path, "rb", **OPEN_OPTIONS) as handle:
            parquet = pq.ParquetFile(handle, metadata=scanned.footers[group.path])
            table = parquet.read_row_group(group.index, columns=scanned.columns)
        yield from table.to_pylist()


@contextlib.contextmanager
def _readable(path: str) -> Iterator[None]:
    """Turn a missing or damaged Parquet file into one line naming it.

    Other errors (a network failure under the hub's file system) pass through
    for the caller to word.
    """
    import pyarrow as pa

    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
