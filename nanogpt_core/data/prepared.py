"""A prepared dataset folder: its files, reading and checking ``meta.json``, publishing it.

``gpt prepare`` leaves ``<data_dir>/<plugin>/<variant>/`` holding:

- ``train.bin`` / ``val.bin``: the token ids, uint16 or uint32;
- for examples (``"kind": "examples"``) also ``train.examples.npy`` /
  ``val.examples.npy``: int64 rows ``start, length, response_start``, one per
  example (see :mod:`nanogpt_core.data.example_preparation`);
- ``meta.json``: the tokenizer's description, the counts per split and the
  fingerprint of what was prepared, sealed with a checksum of its own (a
  hand-edited vocabulary is refused). It is written last, so a folder without a
  readable one holds no finished preparation.

Both preparers (:mod:`nanogpt_core.data.token_preparation`,
:mod:`nanogpt_core.data.example_preparation`) write their files under temporary names
and hand them to :func:`publish`; everything that reads prepared data goes
through :func:`open_prepared`, which refuses a ``meta.json`` the files contradict.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from nanogpt_core.errors import DataError
from nanogpt_core.files import atomic_write_text, fsync_dir, storage_errors, temporary_path

SPLITS = ("train", "val")
# 2: the fingerprint covers the tokenizer and the input files' identity.
FORMAT_VERSION = 2
DTYPES = ("uint16", "uint32")
# The rows of ``<split>.examples.npy``: start, length, response_start.
ROW_DTYPE = np.dtype("<i8")
# Counts an examples ``meta.json`` adds to each split's documents, characters, tokens.
SPLIT_COUNTS = ("examples", "response_tokens", "truncated", "dropped")


def examples_name(split: str) -> str:
    """``train.examples.npy`` or ``val.examples.npy``."""
    return f"{split}.examples.npy"


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits (GPT-2's 50,257 does), else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


@attrs.frozen
class PreparedData:
    """A prepared dataset folder and its (checked) ``meta.json``."""

    folder: Path
    meta: dict[str, Any]

    @property
    def dtype(self) -> np.dtype:
        """The token dtype of the ``.bin`` files."""
        return np.dtype(self.meta["dtype"])

    @property
    def tokenizer(self) -> dict[str, Any]:
        """The tokenizer description."""
        return self.meta["tokenizer"]

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary (before any padding)."""
        return int(self.meta["tokenizer"]["vocab_size"])

    def split_path(self, split: str) -> Path:
        """Path of ``train.bin`` or ``val.bin``."""
        return self.folder / f"{split}.bin"

    def tokens(self, split: str) -> int:
        """How many tokens ``split`` (``"train"`` or ``"val"``) holds."""
        return int(self.meta["splits"][split]["tokens"])

    @property
    def kind(self) -> str:
        """``"tokens"`` (a stream of documents) or ``"examples"`` (prompt/response pairs)."""
        return self.meta.get("kind", "tokens")

    @property
    def template(self) -> dict[str, Any] | None:
        """The template's description for examples; None for tokens."""
        return self.meta.get("template")

    def examples(self, split: str) -> np.ndarray:
        """The (N, 3) int64 rows ``start, length, response_start`` of ``split``, memory-mapped."""
        if self.kind != "examples":
            raise DataError(f"{self.folder} holds tokens, not examples (no {split}.examples.npy)")
        return np.load(self.folder / f"{split}.examples.npy", mmap_mode="r")


# Reading a prepared folder.


def open_prepared(folder: Path) -> PreparedData | None:
    """The prepared data in ``folder``, or None when no preparation finished there.

    :raises DataError: ``meta.json`` parses but is not what a preparation
        writes (a key missing or of the wrong type, a dtype other than
        uint16/uint32), or it contradicts the ``.bin`` files' sizes.
    """
    meta_path = Path(folder) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        # meta.json is written last: without a readable one nothing finished here.
        return None
    data = PreparedData(Path(folder), meta)
    check_meta(data)
    return data


def _meta_problem(data: PreparedData, key: str, problem: str) -> DataError:
    return DataError(
        f"{data.folder / 'meta.json'}: {key}: {problem}; prepare again with "
        f"`gpt prepare EXPERIMENT --force` or delete {data.folder}"
    )


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def meta_checksum(meta: dict[str, Any]) -> str:
    """sha256 of ``meta`` (but its ``checksum``) as canonical JSON: what a preparation sealed."""
    body = {key: value for key, value in meta.items() if key != "checksum"}
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_meta(data: PreparedData) -> None:
    """Refuse a ``meta.json`` with the wrong structure, edited since it was written, or
    one the ``.bin`` sizes contradict."""
    meta = data.meta
    if not isinstance(meta, dict):
        raise _meta_problem(data, "(top level)", "expected a JSON object")
    if meta.get("dtype") not in DTYPES:
        raise _meta_problem(data, "dtype", f"expected uint16 or uint32, got {meta.get('dtype')!r}")
    _check_tokenizer_meta(data)
    if not isinstance(meta.get("fingerprint"), str):
        raise _meta_problem(data, "fingerprint", "expected a string")
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        raise _meta_problem(data, "splits", "expected a table with 'train' and 'val'")
    for split in SPLITS:
        counts = splits.get(split)
        if not isinstance(counts, dict) or not _is_count(counts.get("tokens")):
            raise _meta_problem(
                data, f"splits.{split}.tokens", "expected a count of tokens (an integer, 0 or more)"
            )
    for split in SPLITS:
        _check_bin_size(data, split)
    kind = meta.get("kind", "tokens")
    if kind not in ("tokens", "examples"):
        raise _meta_problem(data, "kind", f'expected "tokens" or "examples", got {kind!r}')
    if kind == "examples":
        check_examples_meta(data)
    # Last, after the structure problems that name a key: a hand-edited vocabulary
    # would train (or sample) a model whose tokenizer cannot read its ids back.
    # Folders prepared before the checksum have none.
    if "checksum" in meta and meta["checksum"] != meta_checksum(meta):
        raise _meta_problem(data, "checksum", "the file was edited or damaged since it was written")


def _check_tokenizer_meta(data: PreparedData) -> None:
    """The tokenizer table names a tokenizer and a vocabulary the dtype can hold."""
    meta = data.meta
    tokenizer = meta.get("tokenizer")
    if not isinstance(tokenizer, dict):
        raise _meta_problem(data, "tokenizer", "expected a table with 'kind' and 'vocab_size'")
    if not isinstance(tokenizer.get("kind"), str) or not tokenizer["kind"]:
        raise _meta_problem(data, "tokenizer.kind", "expected a tokenizer name")
    vocab = tokenizer.get("vocab_size")
    if type(vocab) is not int or vocab <= 0:
        raise _meta_problem(
            data, "tokenizer.vocab_size", f"expected a positive integer, got {vocab!r}"
        )
    if np.iinfo(np.dtype(meta["dtype"])).max < vocab - 1:
        raise _meta_problem(
            data, "dtype", f"{meta['dtype']} cannot hold the ids of a {vocab:,}-token vocabulary"
        )


def _check_bin_size(data: PreparedData, split: str) -> None:
    path = data.split_path(split)
    expected = data.tokens(split) * data.dtype.itemsize
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _meta_problem(
            data,
            f"splits.{split}.tokens",
            f"says {data.tokens(split):,} tokens but {path} is missing",
        ) from None
    if size != expected:
        raise _meta_problem(
            data,
            f"splits.{split}.tokens",
            f"{data.tokens(split):,} {data.dtype.name} tokens are {expected:,} bytes, "
            f"but {path} has {size:,}",
        )


def check_examples_meta(data: PreparedData) -> None:
    """The keys an examples ``meta.json`` adds, and the ``.npy`` files against its counts."""
    meta = data.meta
    template = meta.get("template")
    if not isinstance(template, dict) or not isinstance(template.get("kind"), str):
        raise _meta_problem(data, "template", "expected a template description with a 'kind'")
    block_size = meta.get("block_size")
    if type(block_size) is not int or block_size <= 0:
        raise _meta_problem(data, "block_size", f"expected a positive integer, got {block_size!r}")
    for split in SPLITS:
        counts = meta["splits"][split]
        for key in SPLIT_COUNTS:
            if not _is_count(counts.get(key)):
                raise _meta_problem(
                    data, f"splits.{split}.{key}", "expected a count (an integer, 0 or more)"
                )
        _check_rows(data, split)


def _check_rows(data: PreparedData, split: str) -> None:
    path = data.folder / examples_name(split)
    key = f"splits.{split}.examples"
    expected = data.meta["splits"][split]["examples"]
    try:
        rows = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise _meta_problem(
            data, key, f"says {expected:,} examples but {path} is missing"
        ) from None
    except ValueError as exc:
        raise _meta_problem(data, key, f"{path} is not a readable .npy file ({exc})") from None
    if rows.dtype != ROW_DTYPE or rows.shape != (expected, 3):
        raise _meta_problem(
            data,
            key,
            f"expected {expected:,} int64 rows of 3 in {path}, got {rows.dtype} {rows.shape}",
        )
    if expected and not _rows_fit(rows, data.tokens(split)):
        raise _meta_problem(
            data, key, f"{path} has rows outside {data.split_path(split).name}'s tokens"
        )


def _rows_fit(rows: np.ndarray, tokens: int) -> bool:
    start, length, response = rows[:, 0], rows[:, 1], rows[:, 2]
    return bool(
        (start >= 0).all()
        and (response >= 1).all()
        and (response < length).all()
        and (start + length <= tokens).all()
    )


# Publishing a prepared folder.


def discard(folder: Path, names: Iterable[str]) -> None:
    """Remove this process's temporaries of ``names`` in ``folder``."""
    for name in names:
        temporary_path(folder / name).unlink(missing_ok=True)


def publish(folder: Path, names: Iterable[str], meta: dict[str, Any]) -> PreparedData:
    """Rename the finished temporaries of ``names`` into place, then seal them with ``meta.json``.

    The old meta goes first so a crash mid-way never pairs old meta with new
    files. Whatever happens, this process's temporaries of ``names`` are gone after.
    """
    names = list(names)
    try:
        with storage_errors(folder):
            (folder / "meta.json").unlink(missing_ok=True)
            for name in names:
                os.replace(temporary_path(folder / name), folder / name)
            fsync_dir(folder)
    finally:
        discard(folder, names)
    sealed = {**meta, "checksum": meta_checksum(meta)}
    atomic_write_text(folder / "meta.json", json.dumps(sealed, indent=2, ensure_ascii=False) + "\n")
    return PreparedData(folder, sealed)
