"""How many steps an image-conditioned request runs at its `strength`: the one rule the gateway checks before
queueing (a 400 `strength_too_small`) and the worker runs by (worker/img2img.py), as diffusers' SDXL img2img and
inpainting pipelines count them (diffusers 0.39, `get_timesteps` with `denoising_start=None`)."""

from __future__ import annotations


class StrengthError(ValueError):
    """A strength outside [0, 1], or one that leaves no step to run at the request's step count. The message starts
    with the field, `strength: `."""


def start_step(steps: int, strength: float) -> int:
    """How many of the `steps` steps of the full schedule are skipped: diffusers' `get_timesteps` (the schedulers
    here are first order in diffusers' sense, `scheduler.order == 1`), float arithmetic included (0.29 * 100 is
    28.999...: 28 steps of 100 run, 72 are skipped)."""
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0)


def denoising_steps(steps: int, strength: float) -> int:
    """How many steps (UNet evaluations per image) a request of `steps` steps at `strength` runs."""
    return steps - start_step(steps, strength)


def check_strength(steps: int, strength: float) -> None:
    """Refuse a strength that diffusers refuses: outside [0, 1] (its `check_inputs`), or so small that no step
    runs (`int(steps * strength) < 1`: diffusers' inpainting pipeline raises; its img2img pipeline does not check,
    and has no first timestep to noise the image to)."""
    if not 0.0 <= strength <= 1.0:
        raise StrengthError(f"strength: must be between 0 and 1, got {strength}")
    if denoising_steps(steps, strength) < 1:
        raise StrengthError(f"strength: {strength} at {steps} steps runs no step; strength * steps must be at least 1")
