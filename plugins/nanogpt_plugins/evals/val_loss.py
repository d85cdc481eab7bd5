"""The ``val_loss`` eval task: the loss on an experiment's prepared splits.

The batches are the fixed ones a one-process run of the experiment evaluates
(``train.eval_batches`` batches of ``train.batch_size``, seeded by the
experiment's seed), so for the same weights the value equals that run's logged
``val_loss`` and ``train_loss``. Needs ``--experiment`` with ``gpt eval``.
"""

from __future__ import annotations

import attrs

from nanogpt_core import EvalResult, Evaluator, OptionValueError, hookimpl, option, positive

SPLITS = ("val", "train")


def _splits(_instance, attribute, value: list[str]) -> None:
    unknown = [s for s in value if s not in SPLITS]
    if unknown or not value:
        raise OptionValueError(
            attribute.name, f"{value!r}: list one or both of {', '.join(map(repr, SPLITS))}"
        )


@attrs.frozen(kw_only=True)
class ValLossOptions:
    """Options of the ``val_loss`` eval task."""

    splits: list[str] = option(
        doc='The splits to score: "val", "train" or both.',
        factory=lambda: list(SPLITS),
        validator=_splits,
    )
    batches: int | None = option(
        None,
        "Batches per split (default: the experiment's train.eval_batches).",
        validator=positive,
    )


class ValLoss:
    """Mean loss over the experiment's fixed evaluation batches, per split."""

    def __init__(self, options: ValLossOptions) -> None:
        self.options = options

    def evaluate(self, evaluator: Evaluator) -> EvalResult:
        """``val_loss`` and ``train_loss`` (those in ``splits``)."""
        measured = {
            split: evaluator.split_loss(split, self.options.batches)
            for split in self.options.splits
        }
        metrics = {f"{split}_loss": m.loss for split, m in measured.items()}
        return EvalResult(metrics, n=measured[self.options.splits[0]].sequences)


@hookimpl
def register_eval_tasks(register):
    """Register the ``val_loss`` eval task."""
    register(
        "val_loss",
        ValLoss,
        options=ValLossOptions,
        description="Loss on the experiment's prepared val (and train) split, fixed batches.",
    )
