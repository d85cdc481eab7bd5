"""The ranges of the sampling settings, checked alike wherever a value comes from.

``gpt sample`` and ``gpt chat`` options, chat's ``/temperature`` and ``gpt
serve``'s request bodies all check temperature, top-p and seed here, before any
work: a value outside its range is one line naming the setting and the range,
never a traceback from deep in sampling (a NaN temperature, a seed past what
torch's generators take).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

# Logits are divided by the temperature in float32: below 1e-4 the quotient can
# overflow to inf (and softmax to NaN), and such a temperature is greedy in
# effect, which 0 asks for exactly. Above 1e4 every token is equally likely.
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e4
# torch.Generator.manual_seed takes unsigned 64-bit seeds.
MAX_SEED = 2**64 - 1


def temperature_problem(value: float) -> str | None:
    """What is wrong with a temperature, or None: 0 (greedy) or a finite number in range."""
    if value == 0 or (math.isfinite(value) and MIN_TEMPERATURE <= value <= MAX_TEMPERATURE):
        return None
    return f"{value:g} is not a temperature: use 0 (greedy) or {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}"


def top_p_problem(value: float) -> str | None:
    """What is wrong with a nucleus probability, or None: more than 0, at most 1."""
    if math.isfinite(value) and 0 < value <= 1:
        return None
    return f"{value:g} is not a probability for top-p: use a number above 0 and at most 1"


def seed_problem(value: int) -> str | None:
    """What is wrong with a seed, or None: 0 to 2**64 - 1, as torch's generators take."""
    if 0 <= value <= MAX_SEED:
        return None
    return f"{value} is not a seed: use 0 to {MAX_SEED} (2**64 - 1)"


PROBLEMS: dict[str, Callable[[Any], str | None]] = {
    "temperature": temperature_problem,
    "top_p": top_p_problem,
    "seed": seed_problem,
}


def sampling_problem(name: str, value: Any) -> str | None:
    """What is wrong with the sampling setting ``name`` (a key of ``PROBLEMS``), or None."""
    return PROBLEMS[name](value)
