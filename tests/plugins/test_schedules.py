"""The built-in schedules: values at chosen steps, computed by hand."""

from __future__ import annotations

import itertools
import math

import pytest

from nanogpt_plugins.schedules.standard import WSD, Constant, Cosine, Linear, WSDOptions


def lrs(schedule, steps, *, peak=1.0, floor=0.1, warmup=2, total=12):
    return [
        schedule.lr(s, peak=peak, floor=floor, warmup_steps=warmup, total_steps=total)
        for s in steps
    ]


def test_every_schedule_warms_up_linearly_as_nanogpt_does():
    for schedule in (Cosine(None), Linear(None), Constant(None), WSD(WSDOptions())):
        # Step s of the warmup gets peak * (s + 1) / (warmup + 1).
        assert lrs(schedule, [0, 1], peak=3e-3, warmup=2) == [3e-3 * 1 / 3, 3e-3 * 2 / 3]


def test_cosine_is_nanogpts_schedule():
    cosine = Cosine(None)
    total, warmup, peak, floor = 100, 10, 1e-3, 1e-4
    values = lrs(cosine, range(total), peak=peak, floor=floor, warmup=warmup, total=total)
    assert values[10] == peak  # the decay starts at the peak ...
    assert values[99] == pytest.approx(floor)  # ... and reaches the floor at the last step
    # Halfway through the decay: cos(pi / 2) = 0, the midpoint; a quarter: cos(pi / 4).
    assert cosine.lr(1, peak=1.0, floor=0.0, warmup_steps=0, total_steps=3) == pytest.approx(0.5)
    assert cosine.lr(55, peak=peak, floor=floor, warmup_steps=10, total_steps=101) == (
        pytest.approx((peak + floor) / 2)
    )
    quarter = floor + 0.5 * (1 + math.cos(math.pi / 4)) * (peak - floor)
    assert cosine.lr(32, peak=peak, floor=floor, warmup_steps=10, total_steps=99) == (
        pytest.approx(quarter)
    )
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))


def test_linear_decays_in_equal_steps_to_the_floor_at_the_last_step():
    # Warmup 2, total 12: the decay runs from step 2 (the peak) to step 11 (the floor), 9 steps.
    values = lrs(Linear(None), range(12))
    assert values[2] == pytest.approx(1.0)
    assert values[5] == pytest.approx(0.7)  # 3 of 9 steps: 0.1 + (1 - 3 / 9) * 0.9
    assert values[11] == pytest.approx(0.1)
    steps = [b - a for a, b in itertools.pairwise(values[2:])]
    assert steps == pytest.approx([-0.1] * 9)


def test_constant_stays_at_the_peak_after_warmup():
    assert lrs(Constant(None), [0, 1, 2, 6, 11], warmup=2) == [1 / 3, 2 / 3, 1.0, 1.0, 1.0]


def test_wsd_holds_the_peak_then_decays_over_the_last_cooldown_fraction():
    # 100 steps, 20% cooldown: steps 80..99 are below the peak, 99 is at the floor.
    wsd = WSD(WSDOptions(cooldown_fraction=0.2))
    values = lrs(wsd, range(100), peak=1.0, floor=0.0, warmup=10, total=100)
    assert values[10:80] == [1.0] * 70
    assert values[80] == pytest.approx(0.95)
    assert values[89] == pytest.approx(0.5)
    assert values[99] == 0.0
    assert all(a > b for a, b in itertools.pairwise(values[79:]))
    # With a floor, the decay ends there.
    assert wsd.lr(99, peak=1.0, floor=0.1, warmup_steps=10, total_steps=100) == pytest.approx(0.1)


def test_wsd_without_cooldown_is_constant():
    wsd = WSD(WSDOptions(cooldown_fraction=0.0))
    assert lrs(wsd, [2, 11]) == [1.0, 1.0]
