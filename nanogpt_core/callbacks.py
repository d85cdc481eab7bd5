"""The callback protocol and the state object the trainer shares with callbacks.

A callback plugin registers a factory that returns a :class:`Callback`. The
trainer calls the callbacks an experiment enables, in the order the experiment
lists them, at each point of a run's life. Callbacks see the run only through the
:class:`TrainerState` they are handed; they never reach into the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from nanogpt_core.config import ExperimentConfig


@attrs.frozen
class RunPaths:
    """Where a run keeps its files: ``results/<name>/`` and what lies under it."""

    root: Path

    @property
    def config(self) -> Path:
        """The resolved experiment, written at run start."""
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        """One JSON line per logged step."""
        return self.root / "metrics.jsonl"

    @property
    def done(self) -> Path:
        """Written when a run finishes, with its final metrics (``gpt batch`` skips done runs)."""
        return self.root / "done"

    @property
    def checkpoints(self) -> Path:
        """Folder for ``last.pth`` and per-epoch checkpoints."""
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        """Folder for TensorBoard event files."""
        return self.root / "logs"

    @property
    def samples(self) -> Path:
        """Folder for text samples."""
        return self.root / "samples"


@attrs.define
class TrainerState:
    """What a callback may read (and, for ``model``, use) at each hook.

    Attributes:
        config: the resolved experiment.
        paths: the run's folders and files.
        step: optimizer steps completed so far.
        epoch: the current epoch, counted from 1.
        total_steps: ``epochs * steps_per_epoch``.
        model: the unwrapped model (no DDP or compile wrapper).
        optimizer: the optimizer.
        accelerator: the ``accelerate.Accelerator`` driving the run.
        metrics: the latest metrics (``train_loss``, ``val_loss``, ``lr``, ...).
        record: the line written to ``metrics.jsonl`` at this step, or None on
            steps that log nothing.
        texts: text produced during the run, as ``(step, tag, text)``, appended
            by callbacks such as ``fixed_prompts`` for others (``tensorboard``)
            to log.
        tokenizer: the tokenizer's description from the prepared data's meta.
        is_main_process: whether this process writes files.
        status: ``"running"``, then ``"completed"``, ``"interrupted"`` (SIGTERM or
            Ctrl-C; safe to save) or ``"failed"`` (do not save) in ``on_train_end``.
        snapshot: returns everything a resumed run needs (model, optimizer, step,
            sampler and RNG states of every process, callbacks' states); call it
            on every process, since it gathers from all of them.
        restore: continues from what ``snapshot`` returned (in ``on_train_start``).
    """

    config: ExperimentConfig
    paths: RunPaths
    step: int = 0
    epoch: int = 1
    total_steps: int = 0
    model: Any = None
    optimizer: Any = None
    accelerator: Any = None
    metrics: dict[str, Any] = attrs.field(factory=dict)
    record: dict[str, Any] | None = None
    texts: list[tuple[int, str, str]] = attrs.field(factory=list)
    tokenizer: dict[str, Any] = attrs.field(factory=dict)
    is_main_process: bool = True
    status: str = "running"
    snapshot: Callable[[], dict[str, Any]] | None = None
    restore: Callable[[dict[str, Any]], None] | None = None


class Callback:
    """Base class for callbacks: every hook is a no-op, override what you need.

    Hooks run on every process; write files only when ``state.is_main_process``.
    """

    def on_train_start(self, state: TrainerState) -> None:
        """Called once, after the model, optimizer and data are ready (and after a resume)."""

    def on_step_end(self, state: TrainerState) -> None:
        """Called after each optimizer step; ``state.step`` counts it."""

    def on_eval_end(self, state: TrainerState) -> None:
        """Called after each evaluation; ``state.metrics`` holds ``train_loss`` and ``val_loss``."""

    def on_epoch_end(self, state: TrainerState) -> None:
        """Called after the last step of each epoch."""

    def on_train_end(self, state: TrainerState) -> None:
        """Called once when the run ends, also when it stops early or fails."""

    def state_dict(self) -> dict[str, Any]:
        """This callback's own state, saved in checkpoints (tensors and plain containers only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, when a run resumes."""


CALLBACK_HOOKS = ("on_train_start", "on_step_end", "on_eval_end", "on_epoch_end", "on_train_end")
