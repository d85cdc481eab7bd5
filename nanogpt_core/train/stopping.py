"""Stopping a run early and cleanly: SIGTERM or Ctrl-C ends it after the current step.

The first signal only asks; the trainer finishes the step, calls
``on_train_end`` with status ``"interrupted"``, saves ``last.pth`` (with what
callbacks asked), and exits with status 130 and a line saying what was saved.
A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nanogpt_core.errors import NanoGPTError


class TrainingInterrupted(NanoGPTError):
    """SIGTERM or Ctrl-C stopped the run after a clean save: exit status 130."""

    exit_code = 130


class StopRequest:
    """Turns SIGTERM and a first Ctrl-C into a request to stop after the current step."""

    def __init__(self) -> None:
        self.requested: str | None = None
        # Whether the processes agreed, at the last step, to stop (see `stopping`).
        self.agreed = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # a second Ctrl-C aborts at once
        self.requested = signal.Signals(signum).name

    def stopping(self, processes: int) -> bool:
        """Whether to stop before the next step.

        Under several processes, only as they agreed at the last step (the
        trainer sets :attr:`agreed`): a process that stopped alone would leave
        the others waiting in the next all-reduce.
        """
        if processes == 1:
            return self.requested is not None
        return self.agreed

    def message(self, step: int, saved: int | None, last_checkpoint: Path) -> str:
        """The line a stopped run ends with: what stopped it and how to continue.

        The trainer saves ``last.pth`` at the step it stops after, so a run
        that trained at all always has one.

        :param step: the steps done.
        :param saved: the step of the newest ``last.pth``, or None.
        """
        if saved is None:
            hint = "nothing was trained yet"
        elif saved == step:
            hint = f"saved {last_checkpoint}; run the same command to resume"
        else:
            hint = f"the last checkpoint is step {saved}; run the same command to resume from it"
        signal_name = self.requested or "a stop request on another process"
        return f"stopped by {signal_name} after step {step}: {hint}"

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle the signals inside the ``with`` block (main thread only)."""
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
