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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from nanogpt_core import (
    DataError,
    EvalResult,
    Evaluator,
    hookimpl,
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
    """Four-way sentence completion: which ending does the model find likeliest?"""

    def __init__(self, options: HellaSwagOptions) -> None:
        self.options = options

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
        name = self.options.hub_name
        try:
            import datasets

            stream = datasets.load_dataset(name, split=self.options.split, streaming=True)
            for number, row in enumerate(stream, start=1):
                yield f"{name} row {number}", row
        except Exception as exc:  # offline, unknown name, gated: all end the same way
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise DataError(
                f"hellaswag: could not read {name} from the Hugging Face hub "
                f"({type(exc).__name__}: {first}); pass a local copy with --data "
                "hellaswag_val.jsonl (or data = ... in [eval.hellaswag])"
            ) from None

    def evaluate(self, evaluator: Evaluator) -> EvalResult:
        """Score every example's four endings; ``acc`` and ``acc_norm`` as the module says."""
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
        notes = ()
        if cut:
            notes = (
                f"{cut} of {n} contexts were longer than block_size "
                f"{evaluator.block_size} allows and kept their last tokens",
            )
        return EvalResult({"acc": correct / n, "acc_norm": correct_norm / n}, n=n, notes=notes)


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
