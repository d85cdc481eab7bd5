"""The ``checkpoint`` callback: save as training goes, resume where it stopped.

``results/<name>/checkpoints/last.pth`` is written every ``every_steps`` steps,
at every epoch end and when a run is stopped by SIGTERM or Ctrl-C;
``ckpt_epoch_{N}.pth`` every ``every_epochs`` epochs. Every write goes to a
temporary file that is renamed into place, so a kill at any moment leaves the
previous ``last.pth`` loadable. When a run starts and ``last.pth`` exists, the
run continues from it exactly: same weights, optimizer, step, batches and RNG.
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from nanogpt_core import Callback, TrainerState, hookimpl, option
from nanogpt_core.checkpoints import load_checkpoint, save_checkpoint
from nanogpt_core.options import positive

EPOCH_FILE = re.compile(r"^ckpt_epoch_(\d+)\.pth$")


@attrs.frozen(kw_only=True)
class CheckpointOptions:
    """Options of the ``checkpoint`` callback."""

    every_steps: int | None = option(
        None,
        "Also write last.pth every this many steps (default: only at epoch ends).",
        validator=positive,
    )
    every_epochs: int = option(
        1, "Write ckpt_epoch_{N}.pth every this many epochs.", validator=positive
    )
    keep_last: int | None = option(
        None, "Keep only this many epoch checkpoints (default: all).", validator=positive
    )


class CheckpointCallback(Callback):
    """Saves ``last.pth`` and epoch checkpoints; resumes from ``last.pth``."""

    def __init__(self, options: CheckpointOptions) -> None:
        self.options = options
        self.saved_step = -1

    def on_train_start(self, state: TrainerState) -> None:
        """Continue from ``last.pth`` when it exists."""
        last = state.paths.checkpoints / "last.pth"
        if not last.exists():
            return
        checkpoint = load_checkpoint(last)
        state.restore(checkpoint)
        self.saved_step = state.step
        if state.is_main_process:
            print(f"resuming from step {state.step} (epoch {state.epoch}) of {last}", flush=True)

    def on_step_end(self, state: TrainerState) -> None:
        """Save ``last.pth`` every ``every_steps`` steps (epoch ends save on their own)."""
        every = self.options.every_steps
        at_epoch_end = state.step % state.config.train.steps_per_epoch == 0
        if every and state.step % every == 0 and not at_epoch_end:
            self._save(state, "last.pth")

    def on_epoch_end(self, state: TrainerState) -> None:
        """Save ``last.pth``, and ``ckpt_epoch_{N}.pth`` every ``every_epochs`` epochs."""
        checkpoint = state.snapshot()
        if state.epoch % self.options.every_epochs == 0:
            self._write(state, f"ckpt_epoch_{state.epoch}.pth", checkpoint)
        self._write(state, "last.pth", checkpoint)
        if state.is_main_process and self.options.keep_last:
            self._prune(state.paths.checkpoints)

    def on_train_end(self, state: TrainerState) -> None:
        """Save on a clean stop (SIGTERM, Ctrl-C); never save a failed run's state."""
        if state.status in ("interrupted", "completed") and state.step != self.saved_step:
            self._save(state, "last.pth")

    def _save(self, state: TrainerState, name: str) -> None:
        self._write(state, name, state.snapshot())

    def _write(self, state: TrainerState, name: str, checkpoint: dict) -> None:
        # snapshot() runs on every process (it gathers their RNG states); one writes.
        if state.is_main_process:
            save_checkpoint(state.paths.checkpoints / name, checkpoint)
        self.saved_step = state.step

    def _prune(self, folder: Path) -> None:
        """Delete the oldest epoch checkpoints beyond ``keep_last`` (after the new one is written)."""
        epochs = sorted(
            (int(m.group(1)), path)
            for path in folder.iterdir()
            if (m := EPOCH_FILE.match(path.name))
        )
        for _, path in epochs[: -self.options.keep_last]:
            path.unlink(missing_ok=True)


@hookimpl
def register_callbacks(register):
    """Register the ``checkpoint`` callback."""
    register(
        "checkpoint",
        CheckpointCallback,
        options=CheckpointOptions,
        description="Save last.pth and epoch checkpoints atomically; resume from last.pth.",
    )
