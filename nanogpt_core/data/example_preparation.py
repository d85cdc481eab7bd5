"""Instruction-tuning examples: records rendered through a template, tokenized, cut to fit.

An *example source* is a dataset source with a ``template`` attribute (the
registered name of its default template) and ``examples(split, downloads)``
yielding records, or ``split_examples(downloads)`` yielding ``(split, record)``
pairs in one pass. A record is a dict with string ``instruction``, ``input``
(may be empty) and ``output``.

Each record becomes one example: ``template.prompt(instruction, input)`` and the
``output`` are tokenized separately and the tokenizer's ``eot_id`` follows the
response. An example longer than ``block_size + 1`` tokens (a window plus its
last target) loses tokens from the front of its prompt, never from its
response; one whose response and end-of-text alone leave no room for a prompt
token is dropped. Prepared in ``<data_dir>/<plugin>/<variant>/``:

- ``train.bin`` / ``val.bin``: the token ids of every example, concatenated;
- ``train.examples.npy`` / ``val.examples.npy``: int64, shape (N, 3), one row
  per example: ``start`` (offset in tokens into the ``.bin``), ``length``
  (tokens, end-of-text included) and ``response_start`` (offset within the
  example where the response begins: the prompt's length after cutting);
- ``meta.json`` with ``"kind": "examples"``, the template's description, the
  ``block_size`` the examples were cut for, and per split ``examples``,
  ``response_tokens`` (response plus end-of-text: the tokens a loss is taken
  on), ``truncated`` and ``dropped`` besides the usual counts.

The template is chosen and made by :mod:`nanogpt_core.data.plugins`; the files
are checked and published by :mod:`nanogpt_core.data.prepared`; the folder is
locked and fingerprinted by :func:`nanogpt_core.data.preparation.prepare_dataset`, as
for documents.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import attrs
import numpy as np

from nanogpt_core.data.plugins import (
    TemplateChoice,
    TokenizerChoice,
    check_tokenizer,
    make_template,
    make_tokenizer,
    plugin_call,
    plugin_who,
    tagged_folder,
    template_choice,
)
from nanogpt_core.data.prepared import (
    FORMAT_VERSION,
    ROW_DTYPE,
    SPLIT_COUNTS,
    SPLITS,
    PreparedData,
    discard,
    examples_name,
    publish,
    token_dtype,
)
from nanogpt_core.data.tokenizers import learn_if_needed
from nanogpt_core.errors import DataError, PluginFault
from nanogpt_core.files import remove_stale_temporaries, storage_errors
from nanogpt_core.files import temporary_path as temp
from nanogpt_core.plugins.options import unstructure

if TYPE_CHECKING:
    from nanogpt_core.config.experiment import ExperimentConfig
    from nanogpt_core.plugins.registry import Plugins

FIELDS = ("instruction", "input", "output")
# The files an example preparation publishes (meta.json aside), and the
# temporaries its writers use besides them.
EXAMPLE_FILES = (*(f"{s}.bin" for s in SPLITS), *(examples_name(s) for s in SPLITS))
ROWS_FILES = tuple(f"{split}.examples.rows" for split in SPLITS)


@attrs.frozen
class ExamplePlan:
    """How one experiment's examples are made: the template and the block size they fit.

    ``template`` is :class:`~nanogpt_core.data.plugins.Contained`: a raise in any
    of its methods is one line naming it.
    """

    choice: TemplateChoice
    template: Any
    description: dict[str, Any]
    block_size: int
    default_name: str

    def prompt(self, record: dict[str, str]) -> str:
        """The template's prompt for ``record``; a fault or a non-string names the template."""
        prompt = self.template.prompt(record["instruction"], record["input"])
        if not isinstance(prompt, str):
            who = plugin_who("template", self.choice.name, self.choice.registration.plugin)
            raise PluginFault(f"{who}: prompt returned a {type(prompt).__name__}, not a string")
        return prompt

    def folder(self, folder: Path) -> Path:
        """The data folder; a ``[template]`` table other than the default adds a tag.

        As with a ``[tokenizer]`` table, the tag keeps the default preparation intact.
        """
        return tagged_folder(folder, self.choice, self.default_name)

    def fingerprint_extra(self) -> dict[str, Any]:
        """What the fingerprint covers beyond a token dataset's."""
        return {"template": self.description, "block_size": self.block_size}


def plan_examples(config: ExperimentConfig, plugins: Plugins, source: Any) -> ExamplePlan:
    """Choose and build the template for an example source."""
    choice = template_choice(config, source, plugins)
    template, description = make_template(choice)
    return ExamplePlan(choice, template, description, config.model.block_size, source.template)


# Records.


def example_stream(source: Any, downloads: Path, who: str) -> Iterator[tuple[str, dict[str, str]]]:
    """``(split, record)`` pairs, checked: one pass when the source offers it, else train then val."""
    one_pass = getattr(source, "split_examples", None)
    numbers = dict.fromkeys(SPLITS, 0)
    if one_pass is not None:
        pairs: Any = _guarded(lambda: one_pass(downloads), who, "split_examples")
    else:
        pairs = (
            (split, record)
            for split in SPLITS
            for record in _guarded(lambda s=split: source.examples(s, downloads), who, "examples")
        )
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and pair[0] in SPLITS):
            raise PluginFault(
                f"{who} yielded {pair!r:.60}; split_examples must yield (split, record) with "
                'split "train" or "val"'
            )
        numbers[pair[0]] += 1
        yield pair[0], check_record(pair[1], who, f"{pair[0]} example {numbers[pair[0]]}")


def _guarded(make: Any, who: str, method: str) -> Iterator[Any]:
    """Iterate what a source method returns, reporting its exceptions as one line."""
    with plugin_call(who, method):
        yield from make()


def check_record(record: Any, who: str, where: str) -> dict[str, str]:
    """A record with string ``instruction``, ``input`` and a non-empty ``output``.

    Sources should check their records themselves, naming file and record; this
    is the core's guard for those that do not.
    """
    if not isinstance(record, dict):
        raise PluginFault(
            f"{who}: {where} is a {type(record).__name__}; examples must be dicts with "
            "'instruction', 'input' and 'output'"
        )
    for field in FIELDS:
        if not isinstance(record.get(field), str):
            got = "missing" if field not in record else type(record[field]).__name__
            raise DataError(f"{who}: {where}: {field!r} is {got}, expected text")
    if not record["output"].strip():
        raise DataError(f"{who}: {where}: 'output' is empty; every example needs a response")
    return record


# Cutting to the block size.


def cut_to_block(
    prompt: list[int], response: list[int], block_size: int
) -> tuple[list[int], int] | None:
    """The example's ids and response start, cut to ``block_size + 1`` tokens; None to drop it.

    ``response`` already ends with the end-of-text id. A window of ``block_size``
    inputs predicts ``block_size`` targets, so ``block_size + 1`` tokens fit.
    The prompt loses its *first* tokens: the instruction's end and the
    ``### Response:`` marker are what the answer follows from.
    """
    room = block_size + 1 - len(response)
    if room < 1:
        return None
    kept = prompt[-room:] if len(prompt) > room else prompt
    return kept + response, len(kept)


# Writing.


class ExampleWriter:
    """Streams one split's examples to a temporary ``.bin`` and a temporary rows file."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, stack: Any) -> None:
        self.split = split
        self.dtype = dtype
        self.tokens: BinaryIO = stack.enter_context(temp(folder / f"{split}.bin").open("wb"))
        self.rows_path = temp(folder / f"{split}.examples.rows")
        self.rows: BinaryIO = stack.enter_context(self.rows_path.open("wb"))
        self.offset = 0
        self.count = 0

    def add(self, ids: list[int], response_start: int) -> None:
        """Append one example's tokens and its row."""
        # file.write, not ndarray.tofile: tofile loses the errno of a full disk.
        self.tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        row = np.array([self.offset, len(ids), response_start], dtype=ROW_DTYPE)
        self.rows.write(row.tobytes())
        self.offset += len(ids)
        self.count += 1

    def finish(self, folder: Path) -> None:
        """Flush the tokens and turn the rows into ``<split>.examples.npy`` (still temporary)."""
        for handle in (self.tokens, self.rows):
            handle.flush()
            os.fsync(handle.fileno())
        self.rows.close()
        header = {"descr": ROW_DTYPE.str, "fortran_order": False, "shape": (self.count, 3)}
        with temp(folder / examples_name(self.split)).open("wb") as out:
            np.lib.format.write_array_header_1_0(out, header)
            with self.rows_path.open("rb") as rows:
                shutil.copyfileobj(rows, out)
            out.flush()
            os.fsync(out.fileno())
        self.rows_path.unlink()


def _new_counts() -> dict[str, dict[str, int]]:
    keys = ("documents", "characters", "tokens", *SPLIT_COUNTS)
    return {split: dict.fromkeys(keys, 0) for split in SPLITS}


def write_examples(
    source: Any,
    folder: Path,
    *,
    plan: ExamplePlan,
    plugin: str,
    fingerprint_: str,
    options: dict[str, Any],
    downloads: Path,
    tokenizer: TokenizerChoice,
    who: str | None = None,
    inputs: list[dict[str, Any]] | None = None,
) -> PreparedData:
    """Render, tokenize and cut ``source``'s examples into ``folder``, published atomically."""
    who = who or plugin_who("dataset", plugin, plugin)
    tokenizer_who = plugin_who("tokenizer", tokenizer.name, tokenizer.registration.plugin)
    with storage_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        downloads.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    encoder = make_tokenizer(tokenizer)
    with plugin_call(tokenizer_who, "learn"):
        learn_if_needed(encoder, _texts(plan, example_stream(source, downloads, who)))
    description = check_tokenizer(encoder, tokenizer)
    eot = getattr(encoder, "eot_id", None)
    if eot is None:
        raise DataError(
            f"tokenizer {tokenizer.name!r} has no end-of-text token, and examples need one "
            'to end each response: use tokenizer = "gpt2", or a [tokenizer] whose eos_token is set'
        )
    counts = _new_counts()
    dtype = np.dtype(token_dtype(encoder.vocab_size))
    stream = example_stream(source, downloads, who)
    try:
        with storage_errors(folder):
            _write_splits(folder, stream, counts, plan, encoder, dtype, tokenizer_who)
        _check_not_empty(plugin, counts, plan.block_size)
    except BaseException:
        discard(folder, EXAMPLE_FILES + ROWS_FILES)
        raise
    _report_cuts(who, counts, plan.block_size)
    meta = {
        "format": FORMAT_VERSION,
        "kind": "examples",
        "plugin": plugin,
        "variant": source.variant,
        "description": source.description,
        "fingerprint": fingerprint_,
        "options": options,
        "tokenizer_options": {"name": tokenizer.name, **unstructure(tokenizer.options)},
        "template_options": {"name": plan.choice.name, **unstructure(plan.choice.options)},
        "inputs": inputs or [],
        "tokenizer": description,
        "template": plan.description,
        "block_size": plan.block_size,
        "dtype": dtype.name,
        "splits": counts,
    }
    return publish(folder, EXAMPLE_FILES, meta)


def _texts(plan: ExamplePlan, stream: Iterator[tuple[str, dict[str, str]]]) -> Iterator[str]:
    """Every prompt and response, for tokenizers that learn their vocabulary from the corpus."""
    for _, record in stream:
        yield plan.prompt(record)
        yield record["output"]


def _write_splits(
    folder: Path,
    stream: Iterator[tuple[str, dict[str, str]]],
    counts: dict[str, dict[str, int]],
    plan: ExamplePlan,
    encoder: Any,
    dtype: np.dtype,
    tokenizer_who: str,
) -> None:
    from tqdm import tqdm

    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.closing(stream))
        # The bar before the files, as in token_preparation._write_splits.
        bar = stack.enter_context(
            tqdm(desc="preparing", unit=" examples", delay=2, leave=False, disable=None)
        )
        writers = {s: ExampleWriter(folder, s, dtype, stack) for s in SPLITS}
        for split, record in stream:
            prompt = plan.prompt(record)
            with plugin_call(tokenizer_who, "encode"):
                prompt_ids = list(encoder.encode(prompt))
                response_ids = [*encoder.encode(record["output"]), encoder.eot_id]
            _check_ids(prompt_ids + response_ids, encoder.vocab_size, tokenizer_who)
            _add(writers[split], counts[split], prompt_ids, response_ids, plan.block_size)
            counts[split]["characters"] += len(prompt) + len(record["output"])
            bar.update(1)
        for writer in writers.values():
            writer.finish(folder)


def _add(
    writer: ExampleWriter,
    counts: dict[str, int],
    prompt_ids: list[int],
    response_ids: list[int],
    block_size: int,
) -> None:
    counts["documents"] += 1
    fitted = cut_to_block(prompt_ids, response_ids, block_size)
    if fitted is None:
        counts["dropped"] += 1
        return
    ids, response_start = fitted
    counts["truncated"] += response_start < len(prompt_ids)
    writer.add(ids, response_start)
    counts["examples"] += 1
    counts["tokens"] += len(ids)
    counts["response_tokens"] += len(ids) - response_start


def _check_ids(ids: list[int], vocab_size: int, who: str) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise PluginFault(f"{who} produced id {bad[0]} outside its vocabulary of {vocab_size:,}")


def _check_not_empty(plugin: str, counts: dict[str, dict[str, int]], block_size: int) -> None:
    for split in SPLITS:
        split_counts = counts[split]
        if split_counts["examples"]:
            continue
        if split_counts["dropped"]:
            raise DataError(
                f"dataset {plugin!r}: all {split_counts['dropped']:,} {split} examples were "
                f"dropped: their responses alone do not fit model.block_size = {block_size}; "
                "raise it"
            )
        raise DataError(f"dataset {plugin!r}: the {split} split is empty (no examples found)")


def _report_cuts(who: str, counts: dict[str, dict[str, int]], block_size: int) -> None:
    """One line when examples were truncated or dropped to fit the block size."""
    if not any(counts[s]["truncated"] or counts[s]["dropped"] for s in SPLITS):
        return
    parts = "; ".join(
        f"{s} {counts[s]['truncated']:,} truncated, {counts[s]['dropped']:,} dropped"
        for s in SPLITS
    )
    print(
        f"{who}: cut to model.block_size = {block_size}: {parts} (prompts lose their first "
        "tokens; an example whose response does not fit is dropped)",
        file=sys.stderr,
        flush=True,
    )
