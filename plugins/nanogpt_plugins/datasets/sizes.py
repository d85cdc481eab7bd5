"""What local data files hold, without reading their text: for the datasets' token estimates.

A text, JSON or JSON Lines file's size is its text plus a little markup (JSON's
keys and quotes, the ``<|endoftext|>`` lines between TinyStories' stories), a
few percent. A Parquet file's size says little (it is compressed), but its
footer has the uncompressed size of each column and the number of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs

from nanogpt_core import DataError

# Parquet stores a 4-byte length before each string value.
PARQUET_LENGTH_BYTES = 4


@attrs.frozen
class TextSize:
    """The bytes of text in some files, and their rows where the files say (Parquet)."""

    bytes: int
    rows: int | None

    def __add__(self, other: TextSize) -> TextSize:
        rows = None if self.rows is None or other.rows is None else self.rows + other.rows
        return TextSize(self.bytes + other.bytes, rows)


def text_size(path: Path, columns: Sequence[str], text_field: bool = False) -> TextSize:
    """The text in one local file: its size, or for Parquet the ``columns``' uncompressed size.

    Parquet's row count is exact; other files' is unknown (None). A missing or
    damaged file, or a Parquet file without one of ``columns``, is one line
    naming it, as reading it would be; ``text_field`` when the first column is
    named by that option (the line then says to set it).
    """
    if path.suffix != ".parquet":
        try:
            return TextSize(path.stat().st_size, None)
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for damaged files
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:  # as reading it would say
        hint = "; set text_field to one of them" if text_field and missing[0] == columns[0] else ""
        raise DataError(f"{path}: has no {missing[0]!r} column (it has: {', '.join(names)}){hint}")
    footer = parquet.metadata
    size = 0
    for index in range(footer.num_row_groups):
        group = footer.row_group(index)
        for column in range(group.num_columns):
            chunk = group.column(column)
            if chunk.path_in_schema in columns:
                size += chunk.total_uncompressed_size
    rows = footer.num_rows
    return TextSize(max(0, size - PARQUET_LENGTH_BYTES * rows * len(columns)), rows)


def files_size(paths: Sequence[Path], text_field: str) -> TextSize:
    """The text in several local files, the column ``text_field`` of Parquet ones."""
    total = TextSize(0, 0)
    for path in paths:
        total = total + text_size(path, [text_field], text_field=True)
    return total
