"""The ``checkpoint`` callback: when to save, which files, how many to keep.

The core owns what a checkpoint holds, how it is written and how a run
resumes; this plugin only asks for saves through ``state.request_save``:
``last.pth`` every ``every_steps`` steps, at every epoch end and when a run stops
(SIGTERM, Ctrl-C or the end), and ``ckpt_epoch_{N}.pth`` every ``every_epochs``
epochs, keeping the newest ``keep_last`` of those.
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from nanogpt_core import Callback, TrainerState, hookimpl, option, positive

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
    """Requests ``last.pth`` and epoch checkpoints; prunes old epoch checkpoints."""

    def __init__(self, options: CheckpointOptions) -> None:
        self.options = options

    def on_step_end(self, state: TrainerState) -> None:
        """``last.pth`` every ``every_steps`` steps (epoch ends ask on their own)."""
        every = self.options.every_steps
        at_epoch_end = state.step % state.steps_per_epoch == 0
        if every and state.step % every == 0 and not at_epoch_end:
            state.request_save("last.pth")

    def on_epoch_end(self, state: TrainerState) -> None:
        """``last.pth``, and ``ckpt_epoch_{N}.pth`` every ``every_epochs`` epochs."""
        if state.epoch % self.options.every_epochs == 0:
            state.request_save(f"ckpt_epoch_{state.epoch}.pth")
        state.request_save("last.pth")

    def on_train_end(self, state: TrainerState) -> None:
        """On a clean stop or the end, ``last.pth`` unless this step is saved already.

        The core never saves a failed run, whatever is asked.
        """
        if state.status in ("interrupted", "completed") and state.step > (
            state.last_saved_step or 0
        ):
            state.request_save("last.pth")

    def on_checkpoint(self, state: TrainerState, path: Path) -> None:
        """After a new epoch checkpoint is written, delete the oldest beyond ``keep_last``."""
        if state.is_main_process and self.options.keep_last and EPOCH_FILE.match(path.name):
            self._prune(path.parent)

    def _prune(self, folder: Path) -> None:
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
        description="Ask for last.pth and epoch checkpoints; keep the newest epoch files.",
    )
