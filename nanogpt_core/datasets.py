"""Turning a dataset plugin's documents into ``train.bin``, ``val.bin`` and ``meta.json``.

A dataset plugin only says *what* the documents are (a :class:`DatasetSource`);
this module tokenizes them, streams the tokens to disk and publishes the result
atomically under ``<data_dir>/<plugin>/<variant>/``. ``meta.json`` is written
last and carries a fingerprint of the options, so a folder is either a complete,
matching preparation or is prepared again.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import numpy as np

from nanogpt_core.errors import DataError
from nanogpt_core.files import (
    atomic_write_text,
    fsync_dir,
    remove_stale_temporaries,
    temporary_path,
)
from nanogpt_core.options import unstructure
from nanogpt_core.tokenizers import GPT2_EOT, CharTokenizer, GPT2Tokenizer, Tokenizer, gpt2_encoding

if TYPE_CHECKING:
    from nanogpt_core.config import ExperimentConfig
    from nanogpt_core.plugins import Plugins

SPLITS = ("train", "val")
END_OF_TEXT = "<|endoftext|>"
FORMAT_VERSION = 1
# Documents are tokenized in batches of about this many characters: large enough
# to keep worker processes busy, small enough to bound memory.
BATCH_CHARS = 500_000


class DatasetSource(Protocol):
    """What a dataset plugin's factory returns.

    Attributes:
        variant: the folder under ``<data_dir>/<plugin>/`` (e.g. ``"tiny-char"``);
            options that change the tokens but not the variant are caught by the
            fingerprint.
        tokenizer: ``"char"`` or ``"gpt2"``.
        description: one line about the source, recorded in ``meta.json``.
    """

    variant: str
    tokenizer: str
    description: str

    def documents(self, split: str, downloads: Path) -> Iterable[str]:
        """Yield the documents of ``split`` (``"train"`` or ``"val"``), in order.

        :param downloads: a folder the plugin may cache downloads in.

        A source that decides the split while reading (holding out documents by
        hash, say) may also define ``split_documents(downloads)`` yielding
        ``(split, document)`` pairs in one pass; it is then used instead.
        """


@attrs.frozen
class PreparedData:
    """A prepared dataset folder and its ``meta.json``."""

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


def fingerprint(plugin: str, options: Any) -> str:
    """A hash of everything that decides the prepared tokens."""
    payload = {"format": FORMAT_VERSION, "plugin": plugin, "options": unstructure(options)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits (GPT-2's 50,257 does), else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def open_prepared(folder: Path) -> PreparedData | None:
    """The prepared data in ``folder``, or None when it is missing or incomplete."""
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    data = PreparedData(folder, meta)
    for split in SPLITS:
        path = data.split_path(split)
        expected = meta["splits"][split]["tokens"] * data.dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            return None
    return data


def source_for(config: ExperimentConfig, plugins: Plugins) -> DatasetSource:
    """Instantiate the experiment's dataset plugin."""
    registration = plugins.datasets()[config.dataset.plugin]
    return registration.factory(config.dataset.options)


def prepare_dataset(
    config: ExperimentConfig, plugins: Plugins, *, data_dir: Path, force: bool = False
) -> PreparedData:
    """Prepare the experiment's dataset unless an up-to-date preparation exists."""
    plugin = config.dataset.plugin
    source = source_for(config, plugins)
    folder = Path(data_dir) / plugin / source.variant
    wanted = fingerprint(plugin, config.dataset.options)
    existing = open_prepared(folder)
    if existing and existing.meta.get("fingerprint") == wanted and not force:
        return existing
    return write_prepared(
        source,
        folder,
        plugin=plugin,
        fingerprint_=wanted,
        options=unstructure(config.dataset.options),
        downloads=Path(data_dir) / plugin / "downloads",
    )


def split_stream(source: DatasetSource, downloads: Path) -> Iterator[tuple[str, str]]:
    """``(split, document)`` pairs: one pass when the source offers it, else train then val."""
    one_pass = getattr(source, "split_documents", None)
    if one_pass is not None:
        yield from one_pass(downloads)
        return
    for split in SPLITS:
        for document in source.documents(split, downloads):
            yield split, document


def _char_vocabulary(source: DatasetSource, downloads: Path) -> CharTokenizer:
    chars: set[str] = set()
    for _, document in split_stream(source, downloads):
        chars.update(document)
    return CharTokenizer(chars)


Batch = tuple[str, list[str]]


def _document_batches(
    stream: Iterable[tuple[str, str]], counts: dict[str, dict[str, int]]
) -> Iterator[Batch]:
    """Group each split's documents into batches of about BATCH_CHARS characters."""
    pending: dict[str, list[str]] = {split: [] for split in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for split, document in stream:
        if not isinstance(document, str):
            raise DataError(f"a document is {type(document).__name__}, expected text")
        counts[split]["documents"] += 1
        counts[split]["characters"] += len(document)
        pending[split].append(document)
        sizes[split] += len(document)
        if sizes[split] >= BATCH_CHARS:
            yield split, pending[split]
            pending[split], sizes[split] = [], 0
    for split in SPLITS:
        if pending[split]:
            yield split, pending[split]


def encode_gpt2_batch(texts: list[str]) -> np.ndarray:
    """GPT-2 ids of ``texts``, each followed by ``<|endoftext|>`` (runs in worker processes)."""
    encoding = gpt2_encoding()
    if any(END_OF_TEXT in text for text in texts):
        # Literal "<|endoftext|>" inside a document is text, not a separator.
        parts = [np.array([*encoding.encode_ordinary(t), GPT2_EOT], dtype=np.uint16) for t in texts]
        return np.concatenate(parts)
    # One call for the whole batch: tiktoken splits at the special token first, so
    # this equals encoding each document on its own and appending <|endoftext|>.
    joined = END_OF_TEXT.join(texts) + END_OF_TEXT
    return np.array(encoding.encode(joined, allowed_special={END_OF_TEXT}), dtype=np.uint16)


def _encode_batches(
    tokenizer: Tokenizer, stream: Iterable[tuple[str, str]], counts: dict[str, dict[str, int]]
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(split, token ids)`` a batch at a time, each split's batches in order."""
    batches = _document_batches(stream, counts)
    if not isinstance(tokenizer, GPT2Tokenizer):
        for split, batch in batches:
            yield split, np.asarray(tokenizer.encode("".join(batch)), dtype=np.int64)
        return
    first = next(batches, None)
    second = next(batches, None) if first is not None else None
    if second is None:  # small input: worker processes would cost more than they save
        if first is not None:
            yield first[0], encode_gpt2_batch(first[1])
        return
    # tiktoken holds the GIL for most of its work, so threads do not scale: use
    # processes, keeping only a few batches in flight so memory stays bounded.
    workers = max(1, os.cpu_count() or 1)
    # fork where there is one: spawn would re-import the caller's __main__.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: deque[tuple[str, Future[np.ndarray]]] = deque()
        for split, batch in itertools.chain([first, second], batches):
            pending.append((split, pool.submit(encode_gpt2_batch, batch)))
            if len(pending) >= 4 * workers:
                done_split, future = pending.popleft()
                yield done_split, future.result()
        while pending:
            done_split, future = pending.popleft()
            yield done_split, future.result()


def write_prepared(
    source: DatasetSource,
    folder: Path,
    *,
    plugin: str,
    fingerprint_: str,
    options: dict[str, Any],
    downloads: Path,
) -> PreparedData:
    """Tokenize ``source`` into ``folder``, publishing the files only when all are done."""
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    downloads.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    if source.tokenizer == "char":
        tokenizer: Tokenizer = _char_vocabulary(source, downloads)
    elif source.tokenizer == "gpt2":
        tokenizer = GPT2Tokenizer()
    else:
        raise DataError(f"dataset {plugin!r}: unknown tokenizer {source.tokenizer!r}")
    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    counts = {split: {"documents": 0, "characters": 0, "tokens": 0} for split in SPLITS}
    temporaries = {split: temporary_path(folder / f"{split}.bin") for split in SPLITS}
    try:
        with contextlib.ExitStack() as stack:
            outs = {split: stack.enter_context(temporaries[split].open("wb")) for split in SPLITS}
            bar = stack.enter_context(
                tqdm(desc=f"preparing {plugin}", unit=" docs", delay=2, leave=False, disable=None)
            )
            for split, ids in _encode_batches(tokenizer, split_stream(source, downloads), counts):
                ids.astype(dtype).tofile(outs[split])
                counts[split]["tokens"] += len(ids)
                bar.update(sum(c["documents"] for c in counts.values()) - bar.n)
                bar.set_postfix(train=counts["train"]["tokens"], val=counts["val"]["tokens"])
            for out in outs.values():
                out.flush()
                os.fsync(out.fileno())
        for split in SPLITS:
            if counts[split]["tokens"] == 0:
                raise DataError(f"dataset {plugin!r}: the {split} split is empty (no text found)")
        # Publish: drop the old meta first so a crash mid-way never pairs old meta
        # with new tokens; meta.json, written last, is the mark of a complete folder.
        (folder / "meta.json").unlink(missing_ok=True)
        for split, temp in temporaries.items():
            os.replace(temp, folder / f"{split}.bin")
        fsync_dir(folder)
    finally:
        for temp in temporaries.values():
            temp.unlink(missing_ok=True)
    meta = {
        "format": FORMAT_VERSION,
        "plugin": plugin,
        "variant": source.variant,
        "description": source.description,
        "fingerprint": fingerprint_,
        "options": options,
        "tokenizer": tokenizer.description(),
        "dtype": dtype.name,
        "splits": counts,
    }
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return PreparedData(folder, meta)
