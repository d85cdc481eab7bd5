"""The ``wandb`` callback: the run's scalars, experiment and samples in Weights & Biases.

It logs what the ``tensorboard`` callback logs, under the same names: every
numeric value of every line of ``metrics.jsonl`` at that line's step (taken
from ``on_metrics``), the resolved experiment as the W&B run's config, and the
text other callbacks share through ``state.add_text`` (``fixed_prompts``) as a
table of ``(step, tag, text)`` rows, whatever the order of the callbacks. The
W&B run's id is kept in the checkpoint (this callback's state), so a resumed
nanogpt run continues the same W&B run. Main process only. Needs the optional
extra: ``pip install 'nanogpt[wandb]'``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from nanogpt_core import (
    Callback,
    NanoGPTError,
    OptionValueError,
    TrainerState,
    hookimpl,
    metric_scalars,
    one_of,
    option,
)

MISSING = "the wandb callback needs the wandb package: pip install 'nanogpt[wandb]'"
# What W&B records as the run's exit code for each way a nanogpt run ends.
EXIT_CODES = {"completed": 0, "interrupted": 130, "failed": 1}
TEXT_COLUMNS = ["step", "tag", "text"]


def _tags(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not all(isinstance(tag, str) and tag for tag in value):
        raise OptionValueError(attribute.name, f"expected non-empty strings, got {value!r}")


@attrs.frozen(kw_only=True)
class WandbOptions:
    """Options of the ``wandb`` callback."""

    project: str = option("nanogpt", "The W&B project.")
    entity: str | None = option(None, "The W&B team or user (default: your default entity).")
    name: str | None = option(None, "The W&B run's display name (default: the run's name).")
    mode: str = option(
        "online",
        '"online", "offline" (write locally; `wandb sync` uploads later) or "disabled".',
        validator=one_of("online", "offline", "disabled"),
    )
    tags: list[str] = option(doc="Tags of the W&B run.", factory=list, validator=_tags)
    dir: str | None = option(
        None,
        "Where W&B writes its wandb/ folder (default: results/<name>/).",
        path=True,
    )


class WandbCallback(Callback):
    """Mirrors the run's metrics, experiment and samples into a W&B run."""

    def __init__(self, options: WandbOptions) -> None:
        self.options = options
        self.run: Any = None
        self.run_id: str | None = None
        self.rows: list[list[Any]] = []  # every (step, tag, text) so far, resumes included
        self.texts_seen = 0

    def state_dict(self) -> dict[str, Any]:
        """The W&B run's id and the text rows logged so far."""
        return {"run_id": self.run_id, "rows": [list(row) for row in self.rows]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the W&B run of the checkpoint."""
        self.run_id = state.get("run_id")
        self.rows = [list(row) for row in state.get("rows", [])]

    def on_train_start(self, state: TrainerState) -> None:
        """Start the W&B run, or resume the checkpoint's, with the experiment as its config."""
        if not state.is_main_process:
            return
        import wandb

        folder = Path(self.options.dir) if self.options.dir else state.paths.root
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=self.options.project,
                entity=self.options.entity,
                name=self.options.name or state.paths.name,
                mode=self.options.mode,
                tags=list(self.options.tags) or None,
                dir=str(folder),
                config=state.config.to_dict(),
                id=self.run_id,
                resume="allow",
            )
        except wandb.errors.Error as exc:
            raise NanoGPTError(f'wandb: {exc} (or set mode = "offline")') from exc
        self.run_id = self.run.id
        self.texts_seen = len(state.texts)

    def on_metrics(self, state: TrainerState, record: Mapping[str, Any]) -> None:
        """Log every numeric value of a ``metrics.jsonl`` line at its step."""
        if self.run is None:
            return
        self.run.log(metric_scalars(record), step=record["step"])
        self._log_texts(state)

    def on_step_end(self, state: TrainerState) -> None:
        """Log text that arrived since the last call."""
        self._log_texts(state)

    def on_epoch_end(self, state: TrainerState) -> None:
        """Log text that arrived since the last call."""
        self._log_texts(state)

    def on_train_end(self, state: TrainerState) -> None:
        """Log the remaining text and finish the W&B run with the run's exit code."""
        if self.run is None:
            return
        self._log_texts(state)
        self.run.finish(exit_code=EXIT_CODES.get(state.status, 1))
        self.run = None

    def _log_texts(self, state: TrainerState) -> None:
        """The whole table again with the new rows: a logged W&B table cannot grow."""
        if self.run is None or len(state.texts) == self.texts_seen:
            return
        import wandb

        self.rows += [[step, tag, text] for step, tag, text in state.texts[self.texts_seen :]]
        self.texts_seen = len(state.texts)
        table = wandb.Table(columns=TEXT_COLUMNS, data=[list(row) for row in self.rows])
        self.run.log({"samples": table}, step=state.step)


def make_wandb_callback(options: WandbOptions) -> WandbCallback:
    """The callback, after checking (before training starts) that wandb is installed."""
    try:
        import wandb  # noqa: F401
    except ImportError as exc:
        if exc.name not in (None, "wandb"):  # installed, but one of its own imports fails
            raise NanoGPTError(f"{MISSING} (importing it failed: {exc})") from exc
        raise NanoGPTError(MISSING) from None
    return WandbCallback(options)


@hookimpl
def register_callbacks(register):
    """Register the ``wandb`` callback."""
    register(
        "wandb",
        make_wandb_callback,
        options=WandbOptions,
        description="Log metrics, the experiment and samples to Weights & Biases.",
    )
