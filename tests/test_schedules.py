"""The learning rate at chosen token counts equals the recipe's formula."""

import math

import pytest

from cpt_lightning.schedules import PhaseLR, TokenSchedule, warmup_then_constant

M, B = 1_000_000, 1_000_000_000
RECIPE = TokenSchedule(
    [
        PhaseLR(tokens=50 * B, shape="constant", warmup_tokens=100 * M),
        PhaseLR(tokens=5 * B, shape="sqrt_decay", final_ratio=0.1),
    ]
)


@pytest.mark.parametrize(
    "tokens, expected",
    [
        (0, 0.0),
        (25 * M, 0.25),
        (100 * M, 1.0),
        (30 * B, 1.0),
        (50 * B - 1, 1.0),
        (50 * B, 1.0),  # the decay phase starts at peak
        (50 * B + 1_250 * M, 0.1 + 0.9 * (1 - math.sqrt(0.25))),
        (55 * B, 0.1),  # ends at 10% of peak
        (60 * B, 0.1),  # and holds if a run overshoots
    ],
)
def test_recipe_multiplier(tokens, expected):
    assert RECIPE.multiplier(tokens) == pytest.approx(expected, abs=1e-12)


def test_phase_index_by_tokens():
    assert [RECIPE.phase_index(t) for t in (0, 50 * B - 1, 50 * B, 55 * B)] == [0, 0, 1, 1]


def test_linear_decay_and_default_schedule():
    linear = PhaseLR(tokens=100, shape="linear_decay", final_ratio=0.0)
    assert [linear.multiplier(t) for t in (0, 50, 100)] == [1.0, 0.5, 0.0]
    default = warmup_then_constant(1000)
    assert [default.multiplier(t) for t in (0, 500, 1000, 10**12)] == [0.0, 0.5, 1.0, 1.0]


def test_on_step_grid_rounds_every_boundary_up_to_a_step():
    tokens_per_step = 384 * 8192
    grid = RECIPE.on_step_grid(tokens_per_step)
    clm_steps, total_steps = math.ceil(50 * B / tokens_per_step), math.ceil(55 * B / tokens_per_step)
    assert grid.starts == [0, clm_steps * tokens_per_step, total_steps * tokens_per_step]
    assert grid.multiplier(clm_steps * tokens_per_step) == 1.0  # the decay starts at exactly peak
    assert grid.multiplier(total_steps * tokens_per_step) == pytest.approx(0.1)
    assert RECIPE.multiplier(clm_steps * tokens_per_step) < 0.99  # what the nominal boundaries gave


@pytest.mark.parametrize("shape, decayed", [("sqrt_decay", lambda p: 1 - math.sqrt(p)), ("linear_decay", lambda p: 1 - p)],
                         ids=["sqrt_decay", "linear_decay"])
def test_a_decay_after_warmup_spans_the_tokens_after_the_warmup(shape, decayed):
    """Warmup, then the decay from peak over the rest of the phase, to exactly ``final_ratio`` at its end
    (a decay spread over the whole phase, warmup included, would end above it)."""
    phase = PhaseLR(tokens=1000, shape=shape, warmup_tokens=200, final_ratio=0.1)
    expected = [0.5, 1.0, 0.1 + 0.9 * decayed(0.5), 0.1]
    assert [phase.multiplier(t) for t in (100, 200, 600, 1000)] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("shape", ["sqrt_decay", "linear_decay"])
def test_a_decay_phase_that_is_all_warmup_holds_its_final_ratio_after_it(shape):
    """Warmup over the whole phase leaves no tokens to decay over: past the warmup (a run training on after its last
    phase) the rate is the phase's end value, as after any decay, not a step at peak then the floor."""
    phase = TokenSchedule([PhaseLR(tokens=400, shape=shape, warmup_tokens=400, final_ratio=0.1)])
    assert [phase.multiplier(t) for t in (0, 200, 399, 400, 500)] == pytest.approx([0.0, 0.5, 0.9975, 0.1, 0.1])
