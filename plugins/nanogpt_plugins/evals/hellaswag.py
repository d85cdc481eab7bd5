"""The ``hellaswag`` eval task, scored the way llm.c's ``dev/data/hellaswag.py`` does.

Each example is a context and four endings, one of them right. Every ending is
scored by the model's cross-entropy on the ending's tokens after the context
(the ending encoded with a leading space, as llm.c does for GPT-2's BPE):

- ``acc``: the ending with the lowest *summed* loss is the model's pick;
- ``acc_norm``: the ending with the lowest *mean* loss per token is the pick.

GPT-2 124M scores 29.55% ``acc_norm`` (28.59% ``acc``) on the 10,042 validation
rows this way. lm-evaluation-harness differs: it cleans the context and its
``acc_norm`` divides by the ending's length in bytes, so its numbers are not
these. Ties go to the first ending.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from nanogpt_core import (
    DataError,
    EvalResult,
    Evaluator,
    NanoGPTError,
    atomic_write_text,
    hookimpl,
    hub_rows,
    option,
    read_rows,
)

COLUMNS = ("ctx", "endings", "label")


@attrs.frozen(kw_only=True)
class HellaSwagOptions:
    """Options of the ``hellaswag`` eval task."""

    data: str | None = option(
        None,
        "A local hellaswag_val.jsonl (the original format: ctx, endings, label); "
        "default: the hub's hub_name.",
        path=True,
    )
    hub_name: str = option("Rowan/hellaswag", "The hub dataset read when data is not set.")
    split: str = option("validation", "The hub split.")


class HellaSwag:
    """Four-way sentence completion: which ending does the model find likeliest?

    Without a ``data`` file the rows come from the hub once per run: the main
    process reads them (from the on-disk cache, see :func:`hub_cache_path`, or
    the hub, then caches them), every process receives them, and later
    evaluations of the run (the ``eval`` callback) reuse them from memory.
    """

    def __init__(self, options: HellaSwagOptions) -> None:
        self.options = options
        # The hub's rows and a note about caching them, once read (see evaluate).
        self._hub: tuple[list[tuple[str, dict[str, Any]]], str | None] | None = None

    def rows(self, limit: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(where, row)`` for each example, at most ``limit``."""
        rows = self._source()
        yield from rows if limit is None else itertools.islice(rows, limit)

    def _source(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.options.data:
            path = Path(self.options.data)
            if not path.is_file():
                raise DataError(f"hellaswag: data file {path}: no such file")
            for number, row in enumerate(read_rows(path, COLUMNS), start=1):
                yield f"{path}: row {number}", row
            return
        if self._hub is None:  # one process, outside evaluate: read it here
            self._hub = self._read_hub()
        yield from self._hub[0]

    def _read_hub(self) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
        """The hub split's rows, from the cache file or the hub (then cached); and a note."""
        name, split = self.options.hub_name, self.options.split
        cache = hub_cache_path(name, split)
        if cache.is_file():
            try:
                rows = list(read_rows(cache, COLUMNS))
            except DataError as exc:
                raise DataError(f"hellaswag: {exc}; delete {cache} to read the hub again") from None
            return [(f"{cache}: row {n}", row) for n, row in enumerate(rows, start=1)], None
        rows = download(name, split)
        note = None
        if rows:  # an empty split is not worth remembering
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            try:
                atomic_write_text(cache, text)
            except NanoGPTError as exc:  # a read-only cache: score anyway, say so
                note = f"the rows were not cached ({exc}); the next run reads the hub again"
        return [(f"{name} row {n}", row) for n, row in enumerate(rows, start=1)], note

    def evaluate(self, evaluator: Evaluator) -> EvalResult:
        """Score every example's four endings; ``acc`` and ``acc_norm`` as the module says."""
        if not self.options.data and self._hub is None:
            # Once per run, on the main process; the others get the rows from it.
            self._hub = evaluator.from_main_process(self._read_hub)
        examples, labels = [], []
        for where, row in self.rows(evaluator.limit):
            context, endings, label = parse_row(row, where)
            ctx_ids = evaluator.tokenizer.encode(context)
            tails = [evaluator.tokenizer.encode(" " + e) for e in endings]
            longest = max(len(t) for t in tails)
            if longest > evaluator.block_size:
                raise DataError(
                    f"hellaswag: {where}: an ending of {longest} tokens is longer than the "
                    f"model's block_size of {evaluator.block_size}; endings are never cut, so "
                    "HellaSwag needs a model with a longer context"
                )
            examples.append([(ctx_ids, tail) for tail in tails])
            labels.append(label)
        if not examples:
            raise DataError("hellaswag: no examples to score")
        scores = evaluator.loglikelihood(examples)
        correct = correct_norm = cut = 0
        for label, endings in zip(labels, scores, strict=True):
            losses = [e.loss for e in endings]
            mean_losses = [e.mean_loss for e in endings]
            correct += min(range(len(losses)), key=losses.__getitem__) == label
            correct_norm += min(range(len(mean_losses)), key=mean_losses.__getitem__) == label
            cut += any(e.truncated for e in endings)
        n = len(examples)
        notes = []
        if cut:
            notes.append(
                f"{cut} of {n} contexts were longer than block_size "
                f"{evaluator.block_size} allows and kept their last tokens"
            )
        if not self.options.data and self._hub is not None and self._hub[1]:
            notes.append(self._hub[1])
        return EvalResult(
            {"acc": correct / n, "acc_norm": correct_norm / n}, n=n, notes=tuple(notes)
        )


def hub_cache_path(name: str, split: str) -> Path:
    """Where the hub's rows are kept after the first read: a JSON Lines file in the datasets cache.

    ``<HF_DATASETS_CACHE>/nanogpt/hellaswag/<name with / as -->-<split>.jsonl``
    (``~/.cache/huggingface/datasets`` unless ``HF_HOME`` or
    ``HF_DATASETS_CACHE`` say otherwise). Delete it to read the hub again.
    """
    import datasets

    file = f"{name.replace('/', '--')}-{split}.jsonl"
    return Path(datasets.config.HF_DATASETS_CACHE) / "nanogpt" / "hellaswag" / file


def download(name: str, split: str) -> list[dict[str, Any]]:
    """Every row of the hub dataset's split, streamed, keeping the columns scored.

    :raises DataError: the hub cannot be read (offline, an unknown name), in
        one line pointing at a local copy; or a row lacks a column.
    """
    hint = "pass a local copy with --data hellaswag_val.jsonl (or data = ... in [eval.hellaswag])"
    rows = []
    try:
        stream = hub_rows(name, None, split, hint=hint)
        for number, row in enumerate(stream, start=1):
            missing = [column for column in COLUMNS if column not in row]
            if missing:
                raise DataError(
                    f"{name} row {number} has no {missing[0]!r} field "
                    f"(it has: {', '.join(sorted(row))}); is hub_name a HellaSwag copy?"
                )
            rows.append({column: row[column] for column in COLUMNS})
    except DataError as exc:
        raise DataError(f"hellaswag: {exc}") from None
    return rows


def parse_row(row: dict[str, Any], where: str) -> tuple[str, list[str], int]:
    """Context, endings and label of one row, or a one-line error naming the row."""
    context, endings, label = row["ctx"], row["endings"], row["label"]
    if not isinstance(context, str):
        raise DataError(f"{where}: ctx is {type(context).__name__}, expected text")
    if (
        not isinstance(endings, list)
        or len(endings) < 2
        or not all(isinstance(e, str) and e for e in endings)
    ):
        raise DataError(f"{where}: endings must be a list of non-empty texts")
    # The hub's copy stores the label as a string ("0".."3").
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise DataError(f"{where}: label {label!r} is not the index of an ending")
    return context, endings, label


@hookimpl
def register_eval_tasks(register):
    """Register the ``hellaswag`` eval task."""
    register(
        "hellaswag",
        HellaSwag,
        options=HellaSwagOptions,
        description="HellaSwag sentence completion, scored as llm.c does (acc, acc_norm).",
    )
