"""Preparing a stream of documents: tokenized into ``train.bin`` and ``val.bin``.

The source's documents are read twice: once for a tokenizer that learns its
vocabulary from the corpus (``char``), then to encode them
(:mod:`nanogpt_core.data.document_encoding`). The tokens stream into temporary files
beside their final names and are published only when both splits are complete
(:func:`nanogpt_core.data.prepared.publish`), so a kill at any moment leaves
the previous preparation or none, never half of one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nanogpt_core.data.document_encoding import encode_batches
from nanogpt_core.data.plugins import (
    DatasetSource,
    TokenizerChoice,
    check_tokenizer,
    make_tokenizer,
    plugin_call,
    plugin_who,
)
from nanogpt_core.data.prepared import (
    FORMAT_VERSION,
    SPLITS,
    PreparedData,
    discard,
    publish,
    token_dtype,
)
from nanogpt_core.data.tokenizers import learn_if_needed
from nanogpt_core.errors import DataError, PluginFault
from nanogpt_core.files import remove_stale_temporaries, storage_errors, temporary_path
from nanogpt_core.plugins.options import unstructure

# The files a token preparation publishes (meta.json aside).
TOKEN_FILES = tuple(f"{split}.bin" for split in SPLITS)


def split_stream(
    source: DatasetSource, downloads: Path, who: str = "dataset source"
) -> Iterator[tuple[str, str]]:
    """``(split, document)`` pairs: one pass when the source offers it, else train then val.

    What the source raises (other than a :class:`DataError`) becomes one
    :class:`PluginFault` line naming ``who`` and the method.
    """
    one_pass = getattr(source, "split_documents", None)
    if one_pass is not None:
        with plugin_call(who, "split_documents"):
            for pair in one_pass(downloads):
                yield _checked_pair(pair, who)
        return
    for split in SPLITS:
        with plugin_call(who, "documents"):
            for document in source.documents(split, downloads):
                yield _checked_pair((split, document), who)


def _checked_pair(pair: Any, who: str) -> tuple[str, str]:
    if not (isinstance(pair, tuple) and len(pair) == 2 and pair[0] in SPLITS):
        raise PluginFault(
            f"{who} yielded {pair!r:.60}; split_documents must yield (split, text) with split "
            '"train" or "val"'
        )
    if not isinstance(pair[1], str):
        raise PluginFault(
            f"{who} yielded a {type(pair[1]).__name__} document; documents must be text"
        )
    return pair


def write_tokens(
    source: DatasetSource,
    folder: Path,
    *,
    plugin: str,
    fingerprint_: str,
    options: dict[str, Any],
    downloads: Path,
    tokenizer: TokenizerChoice,
    who: str | None = None,
    inputs: list[dict[str, Any]] | None = None,
) -> PreparedData:
    """Tokenize ``source`` into ``folder``, publishing the files only when all are done.

    :param who: how messages name the dataset plugin (``dataset plugin 'x'``).
    :param inputs: the input files' identities, recorded in ``meta.json``.
    """
    who = who or plugin_who("dataset", plugin, plugin)
    tokenizer_who = plugin_who("tokenizer", tokenizer.name, tokenizer.registration.plugin)
    with storage_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        downloads.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    encoder = make_tokenizer(tokenizer)
    with plugin_call(tokenizer_who, "learn"):
        learn_if_needed(encoder, (doc for _, doc in split_stream(source, downloads, who)))
    description = check_tokenizer(encoder, tokenizer)
    dtype = np.dtype(token_dtype(encoder.vocab_size))
    counts = {split: {"documents": 0, "characters": 0, "tokens": 0} for split in SPLITS}
    batches = encode_batches(encoder, split_stream(source, downloads, who), counts, tokenizer_who)
    with storage_errors(folder):
        _write_splits(folder, batches, counts, dtype, encoder.vocab_size, tokenizer_who)
    for split in SPLITS:
        if counts[split]["tokens"] == 0:
            discard(folder, TOKEN_FILES)
            raise DataError(f"dataset {plugin!r}: the {split} split is empty (no text found)")
    meta = {
        "format": FORMAT_VERSION,
        "plugin": plugin,
        "variant": source.variant,
        "description": source.description,
        "fingerprint": fingerprint_,
        "options": options,
        "tokenizer_options": {"name": tokenizer.name, **unstructure(tokenizer.options)},
        "inputs": inputs or [],
        "tokenizer": description,
        "dtype": dtype.name,
        "splits": counts,
    }
    return publish(folder, TOKEN_FILES, meta)


def _write_splits(
    folder: Path,
    batches: Iterator[tuple[str, np.ndarray]],
    counts: dict[str, dict[str, int]],
    dtype: np.dtype,
    vocab_size: int,
    tokenizer_who: str,
) -> None:
    """Stream the batches into temporary ``.bin`` files (renamed by :func:`publish`)."""
    from tqdm import tqdm

    temporaries = {split: temporary_path(folder / f"{split}.bin") for split in SPLITS}
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.closing(batches))
            # The bar before the files: a Ctrl-C the moment they appear then never
            # lands inside tqdm's constructor (whose half-built object complains on exit).
            bar = stack.enter_context(
                tqdm(desc="preparing", unit=" docs", delay=2, leave=False, disable=None)
            )
            outs = {split: stack.enter_context(temporaries[split].open("wb")) for split in SPLITS}
            for split, ids in batches:
                if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                    raise PluginFault(
                        f"{tokenizer_who} produced id {int(ids.max())} outside its "
                        f"vocabulary of {vocab_size:,}"
                    )
                # file.write, not ndarray.tofile: tofile loses the errno of a full disk.
                outs[split].write(ids.astype(dtype).tobytes())
                counts[split]["tokens"] += len(ids)
                bar.update(sum(c["documents"] for c in counts.values()) - bar.n)
                bar.set_postfix(train=counts["train"]["tokens"], val=counts["val"]["tokens"])
            for out in outs.values():
                out.flush()
                os.fsync(out.fileno())
    except BaseException:
        discard(folder, TOKEN_FILES)
        raise
