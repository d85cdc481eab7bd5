"""Reading documents for dataset plugins: local files and the Hugging Face hub.

Every reader streams: a text file is read line by line, JSON Lines one row at a
time, Parquet one record batch at a time, the hub through ``datasets``'
streaming mode. So preparing a corpus far larger than memory holds is fine.
Problems (a missing file, a column that is not there, bytes that are not UTF-8)
are one-line :class:`DataError` messages naming the file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import socket
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from nanogpt_core.errors import DataError

END_OF_TEXT = "<|endoftext|>"
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def expand_files(patterns: Sequence[str], option: str) -> list[Path]:
    """Paths and globs in the order given (each glob sorted); none may match nothing."""
    if not patterns:
        raise DataError(f"{option}: no files given; list paths or globs")
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matches:
            raise DataError(f"{option}: {pattern}: no such file")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                raise DataError(
                    f"{option}: {path}: is a folder; list files or use a glob like {path}/*.parquet"
                )
            if path.suffix not in SUFFIXES:
                raise DataError(
                    f"{option}: {path}: unsupported file type {path.suffix or '(none)'}; "
                    f"expected one of {', '.join(SUFFIXES)}"
                )
            files.append(path)
    return files


def read_rows(path: Path, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Rows of a .jsonl, .json or .parquet file, with at least ``columns``."""
    if path.suffix == ".parquet":
        yield from _parquet_rows(path, columns)
    elif path.suffix == ".jsonl":
        yield from _jsonl_rows(path, columns)
    elif path.suffix == ".json":
        yield from _json_rows(path, columns)
    else:
        raise DataError(
            f"{path}: rows come from .jsonl, .json or .parquet files, not {path.suffix}"
        )


def read_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one file: ``<|endoftext|>``-separated text, or rows' ``text_field``."""
    if path.suffix == ".txt":
        yield from _endoftext_documents(path)
        return
    for row in read_rows(path, [text_field]):
        yield row[text_field]


def _check_columns(path: Path, row: dict[str, Any], columns: Sequence[str], where: str) -> None:
    """Every column is present, and the first (the text) holds a string."""
    missing = [c for c in columns if c not in row]
    if missing:
        have = ", ".join(sorted(row)) or "none"
        hint = "; set text_field to one of them" if missing[0] == columns[0] else ""
        raise DataError(f"{path}: {where} has no {missing[0]!r} field (it has: {have}){hint}")
    for column in columns:
        if column == columns[0] and not isinstance(row[column], str):
            raise DataError(
                f"{path}: {where}: {column!r} is {type(row[column]).__name__}, expected text"
            )


def _open_text(path: Path) -> Any:
    try:
        return path.open(encoding="utf-8", newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None


def _decoding(path: Path, lines: Any) -> Iterator[tuple[int, str]]:
    """Number the lines of a text file, turning bad bytes into a one-line error."""
    try:
        yield from enumerate(lines, 1)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _endoftext_documents(path: Path) -> Iterator[str]:
    """TinyStories' txt format: stories separated by lines holding ``<|endoftext|>``."""
    story: list[str] = []
    with _open_text(path) as handle:
        for _, line in _decoding(path, handle):
            if line.strip() == END_OF_TEXT:
                text = "".join(story).strip()
                if text:
                    yield text
                story = []
            else:
                story.append(line)
    text = "".join(story).strip()
    if text:
        yield text


def _jsonl_rows(path: Path, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    with _open_text(path) as handle:
        for number, line in _decoding(path, handle):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number}: expected a JSON object per line")
            _check_columns(path, row, columns, f"line {number}")
            yield row


def _json_rows(path: Path, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    """A JSON document: a list of rows, a list of strings, or {"key": [such a list]}."""
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
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: expected a JSON list of rows, or an object holding exactly one list"
            )
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows")
    for number, row in enumerate(data):
        if isinstance(row, str) and len(columns) == 1:
            row = {columns[0]: row}
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {number}: expected an object or a string")
        _check_columns(path, row, columns, f"item {number}")
        yield row


def _parquet_rows(path: Path, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for damaged files
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        hint = "; set text_field to one of them" if missing[0] == columns[0] else ""
        raise DataError(f"{path}: has no {missing[0]!r} column (it has: {', '.join(names)}){hint}")
    for batch in parquet.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


HUB_HINT = 'use source = "local" with downloaded files'


def hub_rows(
    name: str, subset: str | None, split: str, *, hint: str = HUB_HINT
) -> Iterator[dict[str, Any]]:
    """Rows of a Hugging Face hub dataset, streamed (nothing is downloaded whole).

    Offline, this fails at once in one line ending with ``hint``: the hub's
    host is looked up first, and the hub client's own retry warnings (five
    "Name or service not known" lines over 20 seconds) are kept from the user.
    """
    problem = hub_unreachable()
    if problem:
        raise DataError(f"could not read {name} from the Hugging Face hub ({problem}); {hint}")
    import datasets

    try:
        with quiet_hub_retries():
            stream = datasets.load_dataset(name, subset, split=split, streaming=True)
            yield from stream
    except Exception as exc:  # offline, unknown name, gated: all end the same way
        raise DataError(
            f"could not read {name} from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); {hint}"
        ) from None


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached at all, or None when its host resolves.

    ``HF_HUB_OFFLINE`` is left to the hub client (it may serve a cached copy).
    """
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return None
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    host = urllib.parse.urlparse(endpoint).hostname
    if not host:
        return f"HF_ENDPOINT {endpoint!r} names no host"
    try:
        socket.getaddrinfo(host, None)
    except OSError as exc:
        return f"{host} cannot be resolved: {exc.strerror or exc}; offline?"
    return None


@contextlib.contextmanager
def quiet_hub_retries() -> Iterator[None]:
    """Keep the hub client's retry warnings from the user while inside; the failure is ours to say."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
