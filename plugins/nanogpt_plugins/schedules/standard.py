"""The built-in learning-rate schedules: ``cosine``, ``wsd``, ``linear``, ``constant``.

Each starts with the same linear warmup over ``train.warmup_steps`` (nanoGPT's:
step ``s`` gets ``peak * (s + 1) / (warmup_steps + 1)``), then:

- ``cosine`` (nanoGPT's): cosine decay from the peak to the floor at the last step;
- ``linear``: linear decay from the peak to the floor at the last step;
- ``constant``: the peak to the end (the floor is not used);
- ``wsd`` (warmup, stable, decay): the peak, then a linear decay to the floor over
  the last ``cooldown_fraction`` of the steps, reaching it at the last step.

A group's floor is ``train.min_lr`` for a peak of ``train.learning_rate`` (the
trainer scales it for other peaks).
"""

from __future__ import annotations

import math

import attrs

from nanogpt_core import OptionValueError, hookimpl, option


def warmup(step: int, peak: float, warmup_steps: int) -> float:
    """nanoGPT's linear warmup: ``peak * (step + 1) / (warmup_steps + 1)``."""
    return peak * (step + 1) / (warmup_steps + 1)


def decay_ratio(step: int, start: int, last: int) -> float:
    """How far ``step`` is from ``start`` (0.0) to ``last`` (1.0), clamped to [0, 1]."""
    return min(1.0, max(0.0, (step - start) / max(1, last - start)))


class Cosine:
    """Linear warmup, then cosine decay to the floor at the last step (nanoGPT's)."""

    def __init__(self, options: object) -> None:
        self.options = options

    def lr(
        self, step: int, *, peak: float, floor: float, warmup_steps: int, total_steps: int
    ) -> float:
        """The learning rate at the 0-based ``step``."""
        if step < warmup_steps:
            return warmup(step, peak, warmup_steps)
        decay_steps = max(1, total_steps - 1 - warmup_steps)
        ratio = min(1.0, (step - warmup_steps) / decay_steps)
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return floor + coeff * (peak - floor)


class Linear:
    """Linear warmup, then linear decay to the floor at the last step."""

    def __init__(self, options: object) -> None:
        self.options = options

    def lr(
        self, step: int, *, peak: float, floor: float, warmup_steps: int, total_steps: int
    ) -> float:
        """The learning rate at the 0-based ``step``."""
        if step < warmup_steps:
            return warmup(step, peak, warmup_steps)
        ratio = decay_ratio(step, warmup_steps, total_steps - 1)
        return floor + (1.0 - ratio) * (peak - floor)


class Constant:
    """Linear warmup, then the peak learning rate to the end."""

    def __init__(self, options: object) -> None:
        self.options = options

    def lr(
        self, step: int, *, peak: float, floor: float, warmup_steps: int, total_steps: int
    ) -> float:
        """The learning rate at the 0-based ``step``."""
        return warmup(step, peak, warmup_steps) if step < warmup_steps else peak


def _cooldown(_instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0 <= value <= 1:
        raise OptionValueError(attribute.name, f"must be in [0, 1], got {value!r}")


@attrs.frozen(kw_only=True)
class WSDOptions:
    """Options of the ``wsd`` schedule: the ``[train.wsd]`` table."""

    cooldown_fraction: float = option(
        0.2,
        "Share of the steps, at the end, over which the learning rate decays linearly "
        "to the floor (0: none, 1: all of them after warmup).",
        validator=_cooldown,
    )


class WSD:
    """Warmup, stable, decay: the peak, then linear decay over the last ``cooldown_fraction``."""

    def __init__(self, options: WSDOptions) -> None:
        self.options = options

    def cooldown_steps(self, total_steps: int) -> int:
        """How many steps, at the end, are below the peak: ``round(fraction * total_steps)``."""
        return round(self.options.cooldown_fraction * total_steps)

    def lr(
        self, step: int, *, peak: float, floor: float, warmup_steps: int, total_steps: int
    ) -> float:
        """The learning rate at the 0-based ``step``."""
        if step < warmup_steps:
            return warmup(step, peak, warmup_steps)
        # The decay starts from the peak at step total - 1 - cooldown and reaches
        # the floor at the last step, total - 1: `cooldown` steps below the peak.
        start = total_steps - 1 - self.cooldown_steps(total_steps)
        if step <= start:
            return peak
        ratio = decay_ratio(step, start, total_steps - 1)
        return floor + (1.0 - ratio) * (peak - floor)


@hookimpl
def register_schedules(register):
    """The four built-in schedules."""
    register(
        "cosine",
        Cosine,
        description="Warmup, then cosine decay to min_lr at the last step (nanoGPT's).",
    )
    register("linear", Linear, description="Warmup, then linear decay to min_lr at the last step.")
    register("constant", Constant, description="Warmup, then the peak learning rate to the end.")
    register(
        "wsd",
        WSD,
        options=WSDOptions,
        description="Warmup, stable, then linear decay to min_lr over the last cooldown_fraction of the steps.",
    )
