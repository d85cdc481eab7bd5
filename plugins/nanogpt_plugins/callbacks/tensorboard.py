"""The ``tensorboard`` callback: scalars, hyperparameters and text samples.

Writes every numeric value of every line of ``metrics.jsonl`` as a scalar
(``train/loss``, ``val/loss``, ``lr``, ``grad_norm``, ``tokens_per_sec``,
``mfu``, and under its own name anything else, such as a callback's
``eval/hellaswag/acc_norm``), the experiment as hyperparameters at the start,
and the text other callbacks share through ``state.add_text`` (whatever their
order). Watch with ``tensorboard --logdir results``. Main process only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from nanogpt_core import Callback, TrainerState, hookimpl, metric_scalars, option, positive


@attrs.frozen(kw_only=True)
class TensorBoardOptions:
    """Options of the ``tensorboard`` callback."""

    log_dir: str | None = option(None, "Where event files go (default: results/<name>/logs).")
    flush_secs: int = option(30, "Flush events to disk at least this often.", validator=positive)


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The experiment as ``{"train.learning_rate": 0.0006, ...}`` with TensorBoard-friendly values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is not None:
            flat[name] = json.dumps(value)
    return flat


class TensorBoardCallback(Callback):
    """Mirrors the run's metrics and samples into TensorBoard event files."""

    def __init__(self, options: TensorBoardOptions) -> None:
        self.options = options
        self.writer: Any = None
        self.texts_written = 0

    def on_train_start(self, state: TrainerState) -> None:
        """Open the event writer (dropping events past a resumed step) and log the experiment."""
        if not state.is_main_process:
            return
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(self.options.log_dir) if self.options.log_dir else state.paths.logs
        # purge_step hides events a killed run wrote after the step we resume from.
        self.writer = SummaryWriter(
            str(log_dir),
            flush_secs=self.options.flush_secs,
            purge_step=state.step + 1 if state.step else None,
        )
        config = state.config.to_dict()
        self.writer.add_text(
            "config", "```\n" + json.dumps(config, indent=2) + "\n```", global_step=state.step
        )
        if state.step == 0:
            self.writer.add_hparams(flat_hparams(config), {}, run_name=".")
        self.texts_written = len(state.texts)

    def on_metrics(self, state: TrainerState, record: Mapping[str, Any]) -> None:
        """Write every numeric value of a ``metrics.jsonl`` line as a scalar."""
        if self.writer is None:
            return
        for tag, value in metric_scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])

    def on_step_end(self, state: TrainerState) -> None:
        """Write text that arrived at this step."""
        self._write_texts(state)

    def on_epoch_end(self, state: TrainerState) -> None:
        """Write text samples that arrived since the last call."""
        self._write_texts(state)

    def on_train_end(self, state: TrainerState) -> None:
        """Write remaining text and close the event files."""
        if self.writer is None:
            return
        self._write_texts(state)
        self.writer.close()
        self.writer = None

    def _write_texts(self, state: TrainerState) -> None:
        if self.writer is None:
            return
        for step, tag, text in state.texts[self.texts_written :]:
            self.writer.add_text(tag, text, global_step=step)
        self.texts_written = len(state.texts)


@hookimpl
def register_callbacks(register):
    """Register the ``tensorboard`` callback."""
    register(
        "tensorboard",
        TensorBoardCallback,
        options=TensorBoardOptions,
        description="Log metrics, hyperparameters and samples to TensorBoard.",
    )
