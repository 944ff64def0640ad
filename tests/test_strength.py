"""The img2img strength rule the gateway checks and the worker runs by (common/strength.py); tests/test_img2img.py
compares it with diffusers' own `get_timesteps`."""

from __future__ import annotations

import pytest

from common.strength import StrengthError, check_strength, denoising_steps, start_step


def test_start_step_follows_floating_point_as_diffusers() -> None:
    # 0.29 * 100 is 28.999...: 28 steps run, 72 are skipped.
    assert start_step(100, 0.29) == 72 and start_step(10, 0.3) == 7 and start_step(20, 1.0) == 0
    assert start_step(20, 0.0) == 20
    assert denoising_steps(100, 0.29) == 28 and denoising_steps(20, 1.0) == 20


@pytest.mark.parametrize("strength", [-0.1, 1.01, float("nan")])
def test_a_strength_outside_zero_to_one_is_refused(strength: float) -> None:
    with pytest.raises(StrengthError, match=r"^strength: must be between 0 and 1"):
        check_strength(20, strength)


@pytest.mark.parametrize(("steps", "strength", "runs"), [(3, 0.3, False), (3, 0.34, True), (100, 0.0099, False)])
def test_a_strength_runs_a_step_or_is_refused_naming_the_field(steps: int, strength: float, runs: bool) -> None:
    if runs:
        check_strength(steps, strength)
        assert denoising_steps(steps, strength) == 1
        return
    with pytest.raises(StrengthError) as error:
        check_strength(steps, strength)
    assert str(error.value) == (
        f"strength: {strength} at {steps} steps runs no step; strength * steps must be at least 1"
    )
