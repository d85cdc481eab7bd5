"""The ``checkpoint`` callback: more frequent saves, epoch files, how many to keep.

``last.pth`` is the core's: every run writes it every ``[train] save_every``
steps, at every epoch end and when it completes or is stopped, and resumes
from it, with or without this plugin. The plugin adds, through
``state.request_save``: ``last.pth`` every ``every_steps`` steps as well, and
``ckpt_epoch_{N}.pth`` every ``every_epochs`` epochs, keeping the newest
``keep_last`` of those. A ``last.pth`` asked for at a step the core saves is
written once.
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
        "Also write last.pth every this many steps, besides the core's saves "
        "([train] save_every, epoch ends, the end).",
        validator=positive,
    )
    every_epochs: int = option(
        1, "Write ckpt_epoch_{N}.pth every this many epochs.", validator=positive
    )
    keep_last: int | None = option(
        None, "Keep only this many epoch checkpoints (default: all).", validator=positive
    )


class CheckpointCallback(Callback):
    """Requests ``last.pth`` every ``every_steps`` and epoch checkpoints; prunes old epoch checkpoints."""

    def __init__(self, options: CheckpointOptions) -> None:
        self.options = options

    def planned_checkpoints(self, epochs: int) -> int:
        """Epoch files left at the end of a run of ``epochs`` epochs (``gpt plan`` sizes the disk)."""
        written = epochs // self.options.every_epochs
        keep = self.options.keep_last
        return written if keep is None else min(written, keep)

    def on_step_end(self, state: TrainerState) -> None:
        """``last.pth`` every ``every_steps`` steps (at epoch ends it asks after the epoch file)."""
        every = self.options.every_steps
        at_epoch_end = state.step % state.steps_per_epoch == 0
        if every and state.step % every == 0 and not at_epoch_end:
            state.request_save("last.pth")

    def on_epoch_end(self, state: TrainerState) -> None:
        """``ckpt_epoch_{N}.pth`` every ``every_epochs`` epochs, then ``last.pth`` (the core's too)."""
        if state.epoch % self.options.every_epochs == 0:
            state.request_save(f"ckpt_epoch_{state.epoch}.pth")
        state.request_save("last.pth")

    def on_train_end(self, state: TrainerState) -> None:
        """On a clean stop or the end, ``last.pth`` unless this step is saved already.

        The core saves then too (once per step); it never saves a failed run,
        whatever is asked.
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
        description="More frequent last.pth saves and epoch checkpoints; keep the newest epoch files.",
    )
