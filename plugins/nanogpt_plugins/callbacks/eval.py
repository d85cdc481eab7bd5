"""The ``eval`` callback: run eval tasks during training and log their scores.

Every ``every_steps`` steps, every ``every_epochs`` epochs and after the last
step it runs its ``tasks`` (options from the experiment's ``[eval.<task>]``
tables) on the model being trained and logs ``eval/<task>/<metric>`` through
``state.log_metrics``: one line in ``metrics.jsonl``, and every sink that logs
metrics (TensorBoard, W&B) gets it. On other steps it does nothing but compare
two integers. Runs on every process (the work is split between them); only the
main process's log is written.
"""

from __future__ import annotations

from typing import Any

import attrs

from nanogpt_core import (
    Callback,
    EvalSuite,
    Evaluator,
    OptionValueError,
    TrainerState,
    eval_metrics,
    hookimpl,
    option,
    positive,
    tokenizer_from_description,
)


def _tasks(_instance: Any, attribute: attrs.Attribute, value: list[str]) -> None:
    if not value:
        raise OptionValueError(attribute.name, "name at least one eval task")
    if len(set(value)) != len(value):
        raise OptionValueError(attribute.name, f"{value!r} names a task twice")


@attrs.frozen(kw_only=True)
class EvalOptions:
    """Options of the ``eval`` callback."""

    tasks: list[str] = option(
        doc="Eval tasks to run (their options come from [eval.<task>] tables).",
        validator=_tasks,
    )
    every_steps: int | None = option(
        None, "Also evaluate every this many steps.", validator=positive
    )
    every_epochs: int | None = option(
        None, "Also evaluate every this many epochs.", validator=positive
    )
    limit: int | None = option(
        None, "Score at most this many examples per task (all by default).", validator=positive
    )
    batch_size: int = option(8, "Examples per forward pass.", validator=positive)


class EvalCallback(Callback):
    """Runs eval tasks at chosen steps and epochs, and after the last step."""

    def __init__(self, options: EvalOptions) -> None:
        # Unknown task names fail here, before any data is prepared.
        EvalSuite.check_names(options.tasks, "callbacks.eval.tasks")
        self.options = options
        self.suite: EvalSuite | None = None
        self.tokenizer: Any = None
        self.last_step: int | None = None

    def on_train_start(self, state: TrainerState) -> None:
        """Make the tasks with the experiment's ``[eval.<task>]`` options."""
        self.suite = EvalSuite.build(self.options.tasks, state.config.eval)
        self.tokenizer = tokenizer_from_description(state.tokenizer)

    def on_step_end(self, state: TrainerState) -> None:
        """Evaluate every ``every_steps`` steps and after the last step."""
        every = self.options.every_steps
        if (every and state.step % every == 0) or state.step == state.total_steps:
            self._evaluate(state)

    def on_epoch_end(self, state: TrainerState) -> None:
        """Evaluate every ``every_epochs`` epochs."""
        every = self.options.every_epochs
        if every and state.epoch % every == 0:
            self._evaluate(state)

    def _evaluate(self, state: TrainerState) -> None:
        if self.suite is None or self.last_step == state.step:
            return
        self.last_step = state.step
        evaluator = Evaluator(
            model=state.model,
            tokenizer=self.tokenizer,
            accelerator=state.accelerator,
            batch_size=self.options.batch_size,
            limit=self.options.limit,
            experiment=state.config,
            data=state.data,
        )
        state.log_metrics(eval_metrics(self.suite.run(evaluator)))


@hookimpl
def register_callbacks(register):
    """Register the ``eval`` callback."""
    register(
        "eval",
        EvalCallback,
        options=EvalOptions,
        description="Run eval tasks (HellaSwag, val_loss) during training and log their scores.",
    )
