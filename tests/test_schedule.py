"""The learning-rate schedule (train.lr_at) and Mistral's checkpoint schedule against values worked out here:
closed forms written another way, literal numbers, and a step-by-step walk."""
import math

import numpy as np
import pytest

import checkpoint
from configs import MISTRAL_CHECKPOINT_INTERVALS, PRESETS, OptimConfig
from train import lr_at


def expected_lr(step: int, peak: float, floor: float, warmup: int, decay_end: int, shape: str) -> float:
    """The schedule the OptimConfig docstrings describe, written independently of train.py: optimizer step s
    (0-based) warms up linearly and reaches the peak on the last warmup step (s = warmup - 1); from s = warmup the
    decay runs from the peak to the floor, reached at s = decay_end and held after; constant keeps the peak."""
    if step < warmup:
        return float(np.interp(step + 1, [0, warmup], [0.0, peak]))  # step s has seen s + 1 updates' worth
    if shape == "constant":
        return peak
    t = min(1.0, (step - warmup) / (decay_end - warmup))  # the fraction of the decay done
    if shape == "linear":
        return float(np.interp(t, [0.0, 1.0], [peak, floor]))
    return floor + (peak - floor) * math.cos(math.pi * t / 2) ** 2  # (1 + cos πt) / 2 = cos²(πt/2)


def boundary_steps(warmup: int, decay_end: int) -> list[int]:
    """Both sides of every edge, the middle of each phase, and well past the end."""
    steps = {0, 1, warmup - 2, warmup - 1, warmup, warmup + 1, (warmup + decay_end) // 2, decay_end - 1, decay_end,
             decay_end + 1, 2 * decay_end, *range(0, 2 * decay_end, 7)}
    return sorted(s for s in steps if s >= 0)


@pytest.mark.parametrize("shape", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("peak,floor,warmup,decay_end", [(3e-3, 1e-4, 10, 100), (6e-4, 0.0, 40, 400), (1.0, 0.5, 1, 9), (2e-3, 2e-4, 0, 50)])
def test_lr_at_follows_warmup_then_decay(shape, peak, floor, warmup, decay_end):
    optim = OptimConfig(lr=peak, min_lr=floor, warmup_steps=warmup, decay=shape, decay_steps=decay_end)
    for step in boundary_steps(warmup, decay_end):
        assert lr_at(step, optim) == pytest.approx(expected_lr(step, peak, floor, warmup, decay_end, shape),
                                                   rel=1e-12, abs=1e-15), step


def test_lr_at_literal_values():
    """A few values by hand: warmup 10 to 1.0, then to 0.1 at step 110."""
    cosine = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay="cosine", decay_steps=110)
    linear = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay="linear", decay_steps=110)
    constant = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay="constant", decay_steps=110)
    for optim in (cosine, linear, constant):
        assert [lr_at(s, optim) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # (s + 1) / 10
    assert lr_at(10, cosine) == pytest.approx(1.0) and lr_at(10, linear) == pytest.approx(1.0)
    assert lr_at(60, cosine) == pytest.approx(0.55) and lr_at(60, linear) == pytest.approx(0.55)  # halfway
    assert lr_at(35, cosine) == pytest.approx(0.1 + 0.9 * (2 + math.sqrt(2)) / 4)  # a quarter: cos²(π/8)
    assert lr_at(35, linear) == pytest.approx(0.775)
    assert lr_at(110, cosine) == lr_at(10_000, cosine) == lr_at(110, linear) == pytest.approx(0.1)
    assert lr_at(10_000, constant) == 1.0


def test_mistral_recipe_schedule():
    """gpt2-small: 4,000 warmup steps to 6e-4, then linear to 0 at step 400,000."""
    optim = PRESETS["gpt2-small"][1].optim
    assert lr_at(0, optim) == pytest.approx(6e-4 / 4000)
    assert lr_at(1999, optim) == pytest.approx(3e-4)
    assert lr_at(3999, optim) == pytest.approx(6e-4)
    assert lr_at(202_000, optim) == pytest.approx(3e-4)  # halfway through the 396,000 decay steps
    assert lr_at(399_999, optim) == pytest.approx(6e-4 / 396_000)
    assert lr_at(400_000, optim) == 0.0


# ----------------------------------------------------------------------------- checkpoint schedule

def walk_mistral_schedule(max_steps: int) -> list[int]:
    """Mistral's checkpoint steps by walking forward: every 10 steps to 100, 50 to 2,000, 100 to 20,000,
    then 1,000 to 400,000; step 0 included."""
    steps, step = [0], 0
    while step < 400_000:
        step += 10 if step < 100 else 50 if step < 2000 else 100 if step < 20_000 else 1000
        steps.append(step)
    return [s for s in steps if s <= max_steps]


def test_mistral_checkpoint_schedule_has_609_steps():
    steps = checkpoint.scheduled_steps("mistral", MISTRAL_CHECKPOINT_INTERVALS, 400_000)
    assert len(steps) == 609 == 1 + 10 + 38 + 180 + 380  # step 0, then (100/10, 1900/50, 18000/100, 380000/1000)
    assert sorted(steps) == walk_mistral_schedule(400_000)
    for step in (0, 10, 100, 150, 2000, 2100, 20_000, 21_000, 399_000, 400_000):
        assert step in steps, step
    for step in (5, 110, 120, 2050, 20_050, 20_500, 399_999):
        assert step not in steps, step


@pytest.mark.parametrize("max_steps", [0, 95, 1234, 20_000])
def test_shorter_runs_keep_the_schedule_up_to_the_end_and_the_last_step(max_steps):
    steps = checkpoint.scheduled_steps("mistral", MISTRAL_CHECKPOINT_INTERVALS, max_steps)
    assert sorted(steps) == sorted(set(walk_mistral_schedule(max_steps)) | {max_steps})


@pytest.mark.parametrize("schedule", ["every", "none"])
def test_other_schedules_keep_only_the_last_step(schedule):
    assert checkpoint.scheduled_steps(schedule, MISTRAL_CHECKPOINT_INTERVALS, 700) == {700}
