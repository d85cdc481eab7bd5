"""Guards for long runs: skip a step that would harm the weights, stop a run that diverged.

A step is judged on its loss and gradient norm as every process sees them
(gathered once by the trainer, after clipping and before the optimizer step),
so every process makes the same decision. A step is skipped when either is NaN
or infinite (always), or, with ``[train] spike_factor``, when either exceeds
``spike_factor`` times the median of the last ``spike_window`` accepted steps
(OLMo-core's ``SkipStepOptimizer`` and levanter's ``SkipStepConfig`` do the
same with mean + 6 standard deviations over 128 steps, llm.c with its
``-sl``/``-sg`` z-scores; a median is not dragged up by the spikes it screens).
A skipped step leaves the weights and the optimizer's state as they were: no
``optimizer.step``, the gradients dropped, the fp16 loss scale lowered as the
scaler itself would after an overflow. It still consumes its step number and
its batch, as in OLMo and levanter: the schedule and the data go on, so a
resumed or a repeated run sees the same batches at the same steps.

After ``max_skips_in_a_row`` skipped steps in a row the run stops with
:class:`TrainingError` (exit status 1) and saves nothing, so the last good
``last.pth`` stays, to resume from (with a lower learning rate, say). What the
guard has seen is part of a checkpoint (:meth:`StepGuard.state_dict`), so a
resumed run decides exactly as the uninterrupted one would.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from nanogpt_core.errors import TrainingError


def agree(
    accelerator: Any, loss: torch.Tensor, grad_norm: torch.Tensor, *, stop: bool
) -> tuple[float, float, bool]:
    """The step's figures as every process sees them, in one gather and one host read.

    The loss is averaged over processes and the gradient norm is their
    largest (a NaN on any process reaches every one), so every process judges
    the step alike; a stop requested on any process stops every process after
    this step. Packing the three into one small tensor keeps the step at one
    device-to-host synchronisation.
    """
    flag = torch.ones((), device=loss.device) if stop else torch.zeros((), device=loss.device)
    packed = torch.stack([loss.float(), grad_norm.detach().float().to(loss.device), flag])
    gathered = accelerator.gather(packed[None, :])  # (processes, 3)
    agreed = torch.stack(
        [gathered[:, 0].mean(), gathered[:, 1].max(), gathered[:, 2].max()]
    ).tolist()
    return agreed[0], agreed[1], agreed[2] > 0


class StepGuard:
    """Decides whether a step is applied, counts skipped steps, stops a diverged run.

    :param optimizer: the run's optimizer (as Accelerate wrapped it).
    :param scaler: the fp16 loss scaler, or None.
    :param spike_factor: skip above this many times the window's median; 0: never.
    :param spike_window: accepted steps the median is taken over.
    :param max_skips_in_a_row: stop after this many consecutive skipped steps.
    :param last_good: a sentence naming the checkpoint a stopped run goes back to.
    :param learning_rate: the peak learning rate (the stop suggests half of it).
    """

    def __init__(
        self,
        optimizer: Any,
        scaler: Any = None,
        *,
        spike_factor: float = 0.0,
        spike_window: int = 128,
        max_skips_in_a_row: int = 20,
        last_good: Callable[[], str] = lambda: "",
        learning_rate: float = 6e-4,
    ) -> None:
        self.optimizer = optimizer
        self.scaler = scaler
        self.spike_factor = spike_factor
        self.max_skips_in_a_row = max_skips_in_a_row
        self.last_good = last_good
        self.learning_rate = learning_rate
        # (loss, grad_norm) of the latest accepted steps.
        self.window: deque[tuple[float, float]] = deque(maxlen=spike_window)
        self.skipped = 0
        self.in_a_row = 0

    @classmethod
    def for_run(
        cls, train: Any, optimizer: Any, scaler: Any, last_good: Callable[[], str]
    ) -> StepGuard:
        """The guard a ``[train]`` table (:class:`TrainConfig`) asks for."""
        return cls(
            optimizer,
            scaler,
            spike_factor=train.spike_factor,
            spike_window=train.spike_window,
            max_skips_in_a_row=train.max_skips_in_a_row,
            last_good=last_good,
            learning_rate=train.learning_rate,
        )

    def judge(self, loss: float, grad_norm: float) -> str | None:
        """Why the step with this loss and gradient norm must be skipped, or None to apply it.

        Spikes are judged only once the window is full: early steps have no
        history to compare with.
        """
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"loss {loss:.4g}, gradient norm {grad_norm:.4g}: not finite"
        if self.spike_factor <= 0 or len(self.window) < (self.window.maxlen or 0):
            return None
        for name, value, index in (("loss", loss, 0), ("gradient norm", grad_norm, 1)):
            median = statistics.median(entry[index] for entry in self.window)
            if value > self.spike_factor * median:
                return (
                    f"{name} {value:.4g} is above {self.spike_factor:g} x the median "
                    f"{median:.4g} of the last {len(self.window)} steps"
                )
        return None

    def step(
        self, step: int, loss: float, grad_norm: float, optimizer_step: Callable[[], None]
    ) -> str | None:
        """Take the optimizer step (``optimizer_step``) or skip it; the line to print, or None.

        An applied step joins the window and ends a run of skips. A skipped one
        is :func:`skip_update` and counted.

        :raises TrainingError: this makes ``max_skips_in_a_row`` skips in a row.
        """
        reason = self.judge(loss, grad_norm)
        if reason is None:
            optimizer_step()
            if not scaler_skipped(self.optimizer):
                self.window.append((loss, grad_norm))
                self.in_a_row = 0
                return None
            # The scaler's own skip: it lowered its scale, the step dropped the gradients.
            reason = "the fp16 loss scaler found an overflow"
        else:
            overflow = not (math.isfinite(loss) and math.isfinite(grad_norm))
            skip_update(self.optimizer, self.scaler, overflow=overflow)
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_skips_in_a_row:
            raise TrainingError(
                f"step {step}: {self.in_a_row} steps skipped in a row (the last: {reason}); "
                f"training diverged and nothing was saved from these steps. {self.last_good()} "
                f"Resume it with a lower learning rate: gpt run <experiment> "
                f"--set train.learning_rate={self.learning_rate / 2:g}"
            )
        return f"step {step}: skipped ({reason}); {self.skipped} skipped so far"

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the window, the counts (plain containers only)."""
        return {
            "window": [list(entry) for entry in self.window],
            "skipped": self.skipped,
            "in_a_row": self.in_a_row,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`; None (a checkpoint from before the guard): nothing seen."""
        state = state or {}
        self.window.clear()
        self.window.extend((float(loss), float(norm)) for loss, norm in state.get("window", []))
        self.skipped = int(state.get("skipped", 0))
        self.in_a_row = int(state.get("in_a_row", 0))


def finite_or_none(value: float) -> float | None:
    """``value``, or None for NaN and infinities (``metrics.jsonl`` stays strict JSON)."""
    return value if math.isfinite(value) else None


def skip_update(optimizer: Any, scaler: Any, *, overflow: bool) -> None:
    """Leave the weights and the optimizer's state as they are: drop the gradients.

    With an fp16 loss scaler (Accelerate's, or any ``torch.amp.GradScaler``
    whose ``unscale_`` already ran for this step), the scaler's bookkeeping for
    the step is closed with ``update(new_scale)``, so the next step may unscale
    again: after a NaN or infinite gradient (``overflow``) the scale drops by
    the scaler's backoff factor, as the scaler's own skip would; after a spike
    it stays. The new scale is set from the decision every process shares, not
    from each process's own overflow check, so the scales never drift apart.
    """
    optimizer.zero_grad(set_to_none=True)
    if scaler is None or not scaler.is_enabled():
        return
    scale = scaler.get_scale()
    scaler.update(scale * scaler.get_backoff_factor() if overflow else scale)


def scaler_skipped(optimizer: Any) -> bool:
    """Whether the fp16 loss scaler skipped the optimizer step it was just given.

    Accelerate's wrapped optimizer records it (``step_was_skipped``) without a
    device read. The guard already skips every step whose gathered gradient
    norm is not finite, so this catches only an overflow the norm did not show.
    """
    return bool(getattr(optimizer, "step_was_skipped", False))
