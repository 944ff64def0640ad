"""Image-to-image and inpainting arithmetic against diffusers: the steps strength skips (diffusers' own
`get_timesteps`, run from its source), the noising of the encoded image (diffusers' Flax schedulers, and the PyTorch
rules written out where only PyTorch has them: torch is not installed), whole sampling loops from a start step, and
the inpainting blend, with a deterministic stand-in for the UNet on small arrays."""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlaxDPMSolverMultistepScheduler, FlaxEulerDiscreteScheduler

from common.protocol import Scheduler
from common.strength import StrengthError, check_strength, denoising_steps, start_step
from worker import schedulers
from worker.img2img import (
    img2img_start,
    initial_latents,
    inpaint_blend,
    inpaint_start,
    inpainting_unet_input,
    latent_mask,
    masked_image,
    start_rows,
    text_start,
)
from worker.schedulers import C0, C1, C_IN, SIGMA, SIGMA_NEXT, scheduler_config, table

# stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json (the keys that matter).
SDXL_BASE: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
CONFIG = scheduler_config(SDXL_BASE)
SHAPE = (2, 4, 8, 8)
_FLAX_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
SDXL_PIPELINES = Path(diffusers.__file__).parent / "pipelines" / "stable_diffusion_xl"

_update = cast(Callable[..., tuple[np.ndarray, np.ndarray]], schedulers.update)
_blend = cast(Callable[..., np.ndarray], inpaint_blend)


def arrays(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encoded-image latents, noise, and the stand-in UNet's weights."""
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal(SHAPE).astype(np.float32),
        rng.standard_normal(SHAPE).astype(np.float32),
        rng.uniform(0.5, 1.5, SHAPE).astype(np.float32),
    )


def fake_unet(w: np.ndarray) -> Callable[[Any, Any], Any]:
    return lambda x, t: np.tanh(np.asarray(x) * w + np.asarray(t, np.float32) / 1000)


@functools.cache
def diffusers_function(module: str, cls: str, name: str) -> Callable[..., Any]:
    """A method of a diffusers PyTorch pipeline, compiled from its installed source alone (torch is not installed)."""
    path = SDXL_PIPELINES / module
    tree = ast.parse(path.read_text())
    klass = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    function = next(n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace: dict[str, Any] = {}
    # Only diffusers' own installed source is run: the function as its pipeline defines it.
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return cast(Callable[..., Any], namespace[name])


def diffusers_get_timesteps(module: str, cls: str, steps: int, strength: float) -> tuple[int, int, int]:
    """diffusers' `get_timesteps(steps, strength, device, denoising_start=None)` on a first-order scheduler: the
    timesteps it keeps, the step count it returns and the begin index it sets."""
    begin: list[int] = []
    scheduler = SimpleNamespace(timesteps=np.arange(steps)[::-1], order=1, set_begin_index=begin.append)
    kept, count = diffusers_function(module, cls, "get_timesteps")(
        SimpleNamespace(scheduler=scheduler), steps, strength, "cpu"
    )
    return len(kept), count, begin[0]


STRENGTHS = sorted({*np.round(np.linspace(0, 1, 101), 2).tolist(), 1 / 3, 2 / 3, 0.29, 0.57, 0.999, 1e-9})


@pytest.mark.parametrize(
    ("module", "cls"),
    [
        ("pipeline_stable_diffusion_xl_img2img.py", "StableDiffusionXLImg2ImgPipeline"),
        ("pipeline_stable_diffusion_xl_inpaint.py", "StableDiffusionXLInpaintPipeline"),
    ],
)
def test_start_step_is_diffusers_get_timesteps(module: str, cls: str) -> None:
    for steps in (*range(1, 61), 99, 100, 150):
        for strength in STRENGTHS:
            kept, count, begin = diffusers_get_timesteps(module, cls, steps, strength)
            assert start_step(steps, strength) == begin == steps - kept, (steps, strength)
            assert denoising_steps(steps, strength) == count == kept, (steps, strength)


@pytest.mark.parametrize(("steps", "strength"), [(20, 0.0), (20, 0.04), (3, 0.3), (1, 0.99), (50, 0.019)])
def test_a_strength_that_runs_no_step_is_refused(steps: int, strength: float) -> None:
    # diffusers keeps no timestep here (its inpainting pipeline raises; img2img would return the image un-noised).
    assert (
        diffusers_get_timesteps(
            "pipeline_stable_diffusion_xl_img2img.py", "StableDiffusionXLImg2ImgPipeline", steps, strength
        )[0]
        == 0
    )
    with pytest.raises(StrengthError, match=f"^strength: {strength} at {steps} steps runs no step"):
        check_strength(steps, strength)
    with pytest.raises(StrengthError):
        img2img_start(table("euler", steps, CONFIG), strength)


@pytest.mark.parametrize(("steps", "strength"), [(20, 0.05), (1, 1.0), (3, 0.34), (50, 0.02)])
def test_a_strength_that_runs_a_step_is_accepted(steps: int, strength: float) -> None:
    check_strength(steps, strength)
    assert img2img_start(table("euler", steps, CONFIG), strength).steps == 1


def flax_euler(spacing: str, steps: int) -> tuple[Any, Any]:
    scheduler = FlaxEulerDiscreteScheduler(**{key: SDXL_BASE[key] for key in _FLAX_KEYS}, timestep_spacing=spacing)
    return scheduler, scheduler.set_timesteps(scheduler.create_state(), steps, SHAPE)


@pytest.mark.parametrize(("steps", "strength"), [(20, 0.6), (30, 0.35), (8, 1.0)])
def test_euler_noising_is_diffusers_add_noise_at_the_start_step(steps: int, strength: float) -> None:
    encoded, noise, _ = arrays(0)
    start = img2img_start(table("euler", steps, CONFIG), strength)
    scheduler, state = flax_euler("leading", steps)
    # PyTorch's EulerDiscreteScheduler.add_noise (after set_begin_index) takes `sigmas[begin_index]`; Flax's indexes
    # its sigmas with what it is given, so it is given the begin index.
    expected = scheduler.add_noise(state, jnp.asarray(encoded), jnp.asarray(noise), jnp.array([start.start]))
    assert start.start == start_step(steps, strength) and start.image_weight == 1.0
    assert start.noise_scale == pytest.approx(float(state.sigmas[start.start]), rel=5e-5)
    latents = initial_latents(encoded, noise, start.image_weight, start.noise_scale)
    np.testing.assert_allclose(latents, expected, rtol=1e-5, atol=1e-5)


def test_dpm_solver_noising_is_diffusers_variance_preserving_add_noise() -> None:
    # Flax's DPM-Solver (whole timesteps): sqrt(alphas_cumprod[t]) * x0 + sqrt(1 - alphas_cumprod[t]) * noise, which
    # is the sigma-space latent times C_IN.
    encoded, noise, _ = arrays(1)
    scheduler = FlaxDPMSolverMultistepScheduler(**{key: SDXL_BASE[key] for key in _FLAX_KEYS})
    state = scheduler.set_timesteps(scheduler.create_state(), 20, SHAPE)
    for k in (0, 7, 19):
        t = int(state.timesteps[k])
        sigma = float(schedulers.train_sigmas(CONFIG)[t])
        expected = scheduler.add_noise(state, jnp.asarray(encoded), jnp.asarray(noise), jnp.array([t]))
        vp = initial_latents(encoded, noise, 1.0, sigma) / np.sqrt(sigma**2 + 1)
        np.testing.assert_allclose(vp, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("steps", "strength"), [(20, 0.5), (25, 0.8), (10, 1.0)])
def test_karras_noising_is_diffusers_add_noise_written_out(steps: int, strength: float) -> None:
    # DPMSolverMultistepScheduler.add_noise (PyTorch only): sigma = self.sigmas[begin_index] (the Karras sigma),
    # alpha_t = 1 / sqrt(sigma**2 + 1), sigma_t = sigma * alpha_t, noisy = alpha_t * x0 + sigma_t * noise.
    encoded, noise, _ = arrays(2)
    tab = table("dpmpp_2m_karras", steps, CONFIG)
    _, karras = schedulers.karras_schedule(steps, CONFIG)
    begin = start_step(steps, strength)
    alpha_t = 1 / np.sqrt(karras[begin] ** 2 + 1)
    expected_vp = alpha_t * encoded + karras[begin] * alpha_t * noise
    start = img2img_start(tab, strength)
    latents = initial_latents(encoded, noise, start.image_weight, start.noise_scale)
    # The step scales by the first row's C_IN: the model sees diffusers' variance-preserving latent.
    np.testing.assert_allclose(latents * start.rows[0, C_IN], expected_vp, rtol=1e-5, atol=1e-5)


def sample(
    rows: np.ndarray, x: np.ndarray, w: np.ndarray, after: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
) -> np.ndarray:
    """The table loop as the engine runs it, on numpy: `after(x, row)` after each step (the inpainting blend)."""
    unet, prev = fake_unet(w), np.zeros_like(x)
    for row in rows:
        eps = unet(x * row[C_IN], row[schedulers.TIMESTEP])
        x, prev = _update(x, eps, prev, row)
        if after is not None:
            x = after(x, row)
    return x


def flax_euler_loop(
    steps: int, begin: int, x: Any, w: np.ndarray, after: Callable[[int, Any], Any] | None = None
) -> Any:
    """diffusers' Flax Euler from step `begin` of `steps` (the img2img pipeline's loop over `timesteps[begin:]`)."""
    scheduler, state = flax_euler("leading", steps)
    unet = fake_unet(w)
    for i, t in enumerate(state.timesteps[begin:]):
        eps = unet(scheduler.scale_model_input(state, x, t), t)
        x = scheduler.step(state, jnp.asarray(eps, jnp.float32), t, x).prev_sample
        if after is not None:
            x = after(i, x)
    return x


@pytest.mark.parametrize(("steps", "strength"), [(20, 0.6), (12, 1.0), (7, 0.3)])
def test_an_euler_img2img_loop_matches_diffusers(steps: int, strength: float) -> None:
    encoded, noise, w = arrays(3)
    start = img2img_start(table("euler", steps, CONFIG), strength)
    x0 = initial_latents(encoded, noise, start.image_weight, start.noise_scale)
    expected = flax_euler_loop(steps, start.start, jnp.asarray(x0), w)
    np.testing.assert_allclose(sample(start.rows, x0, w), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("steps", "strength"), [(20, 0.5), (14, 0.75), (16, 0.9)])
def test_a_dpm_solver_img2img_loop_matches_diffusers_and_needs_its_first_step_first_order(
    steps: int, strength: float
) -> None:
    encoded, noise, w = arrays(4)
    scheduler = FlaxDPMSolverMultistepScheduler(**{key: SDXL_BASE[key] for key in _FLAX_KEYS})
    state = scheduler.set_timesteps(scheduler.create_state(), steps, SHAPE)
    timesteps = np.asarray(state.timesteps)
    train = schedulers.train_sigmas(CONFIG)
    sigmas = np.append(train[timesteps], train[0])  # Flax's DPM-Solver stops at the model's smallest sigma
    tab = schedulers.from_sigmas("dpmpp_2m", timesteps, sigmas, "epsilon", float(np.sqrt(sigmas[0] ** 2 + 1)))
    begin = start_step(steps, strength)
    x = jnp.asarray(scheduler.add_noise(state, jnp.asarray(encoded), jnp.asarray(noise), jnp.array([timesteps[begin]])))
    unet = fake_unet(w)
    for t in state.timesteps[begin:]:
        eps = unet(scheduler.scale_model_input(state, x, t), t)
        x, state = scheduler.step(state, jnp.asarray(eps, jnp.float32), t, x, return_dict=False)
    ours = sample(start_rows(tab, begin), initial_latents(encoded, noise, 1.0, float(sigmas[begin])), w)
    to_vp = 1 / np.sqrt(sigmas[-1] ** 2 + 1)
    np.testing.assert_allclose(ours * to_vp, x, rtol=1e-4, atol=2e-5)
    # The table's own row at `begin` extrapolates from a prediction this row never made.
    assert tab.rows[begin, C1] != 0
    wrong = sample(tab.rows[begin:], initial_latents(encoded, noise, 1.0, float(sigmas[begin])), w)
    assert np.abs(wrong * to_vp - np.asarray(x)).max() > 1e-3


def test_start_rows_are_the_tables_from_the_start_first_order_and_read_only() -> None:
    tab = table("dpmpp_2m_karras", 20, CONFIG)
    rows = start_rows(tab, 8)
    assert rows.shape == (12, schedulers.ROW_WIDTH) and not rows.flags.writeable
    assert (rows[0, C0], rows[0, C1]) == (1.0, 0.0) and tab.rows[8, C1] != 0
    np.testing.assert_array_equal(rows[1:], tab.rows[9:])
    np.testing.assert_array_equal(rows[0, :C0], tab.rows[8, :C0])
    euler = table("euler", 20, CONFIG)
    np.testing.assert_array_equal(start_rows(euler, 5), euler.rows[5:])
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="start must be between 0 and 19"):
            start_rows(tab, bad)


def test_a_start_pads_with_identity_rows_like_a_table() -> None:
    encoded, noise, w = arrays(5)
    start = img2img_start(table("dpmpp_2m_karras", 20, CONFIG), 0.5)
    padded = start.padded(20)
    assert padded.shape == (20, schedulers.ROW_WIDTH)
    x0 = initial_latents(encoded, noise, 1.0, start.noise_scale)
    np.testing.assert_array_equal(sample(padded, x0, w), sample(start.rows, x0, w))


@pytest.mark.parametrize("name", ["euler", "euler_trailing", "dpmpp_2m_karras"])
def test_at_strength_one_img2img_still_adds_the_image_and_inpainting_starts_as_text_to_image(
    name: Scheduler,
) -> None:
    encoded, noise, _ = arrays(6)
    tab = table(name, 20, CONFIG)
    img = img2img_start(tab, 1.0)
    # diffusers' img2img: add_noise(image_latents, noise, timesteps[0]) = encoded + noise * sigma_max.
    assert (img.start, img.image_weight, img.noise_scale) == (0, 1.0, float(tab.rows[0, SIGMA]))
    np.testing.assert_array_equal(img.rows, tab.rows)
    text = text_start(tab)
    text_latents = initial_latents(encoded, noise, text.image_weight, text.noise_scale)
    np.testing.assert_array_equal(text_latents, noise * np.float32(tab.init_noise_sigma))
    # diffusers' inpainting at strength 1: noise * init_noise_sigma, text-to-image's start exactly.
    inpaint = inpaint_start(tab, 1.0)
    np.testing.assert_array_equal(
        initial_latents(encoded, noise, inpaint.image_weight, inpaint.noise_scale), text_latents
    )
    img_latents = initial_latents(encoded, noise, img.image_weight, img.noise_scale)
    assert not np.array_equal(img_latents, text_latents)
    if name == "euler_trailing":  # its initial noise is sigma_max: the two differ by the image alone
        np.testing.assert_allclose(img_latents - text_latents, encoded, rtol=1e-5, atol=1e-5)
    else:  # "leading" Euler and DPM-Solver start at sqrt(sigma_max**2 + 1)
        assert tab.init_noise_sigma == pytest.approx(np.sqrt(tab.rows[0, SIGMA] ** 2 + 1), rel=1e-6)


def test_inpainting_below_strength_one_starts_as_img2img() -> None:
    tab = table("euler", 20, CONFIG)
    inpaint, img = inpaint_start(tab, 0.6), img2img_start(tab, 0.6)
    assert (inpaint.start, inpaint.image_weight, inpaint.noise_scale) == (img.start, 1.0, tab.rows[8, SIGMA])
    np.testing.assert_array_equal(inpaint.rows, img.rows)


def test_the_inpainting_blend_matches_diffusers_loop() -> None:
    # diffusers' 4-channel inpainting loop after each step i: init_latents_proper = image_latents, noised with
    # add_noise(..., timesteps[i + 1]) unless i is the last (the scheduler's step index has moved on: the next
    # step's sigma), then latents = (1 - mask) * init_latents_proper + mask * latents.
    encoded, noise, w = arrays(7)
    mask = np.zeros((1, 1, 8, 8), np.float32)
    mask[..., 2:6, 3:7] = 1
    steps, strength = 20, 0.7
    start = inpaint_start(table("euler", steps, CONFIG), strength)
    x0 = initial_latents(encoded, noise, start.image_weight, start.noise_scale)
    scheduler, state = flax_euler("leading", steps)
    kept_steps = len(state.timesteps) - start.start

    def diffusers_blend(i: int, x: Any) -> Any:
        proper = jnp.asarray(encoded)
        if i < kept_steps - 1:
            proper = scheduler.add_noise(state, proper, jnp.asarray(noise), jnp.array([start.start + i + 1]))
        return (1 - mask) * proper + mask * x

    expected = flax_euler_loop(steps, start.start, jnp.asarray(x0), w, diffusers_blend)
    ours = sample(start.rows, x0, w, lambda x, row: _blend(x, encoded, noise, mask, row))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    # The kept region ends exactly on the encoded image: the last row's SIGMA_NEXT is 0.
    assert start.rows[-1, SIGMA_NEXT] == 0
    np.testing.assert_array_equal(np.broadcast_to(mask, SHAPE) == 0, ours == encoded)


def test_a_mask_of_ones_leaves_the_step_exactly_as_it_was() -> None:
    encoded, noise, w = arrays(8)
    rows = table("dpmpp_2m_karras", 9, CONFIG).rows
    x0 = initial_latents(encoded, noise, 0.0, 3.0)
    ones = np.ones((1, 1, 8, 8), np.float32)
    np.testing.assert_array_equal(
        sample(rows, x0, w, lambda x, row: _blend(x, encoded, noise, ones, row)), sample(rows, x0, w)
    )


def test_the_blend_runs_in_a_compiled_step_with_the_row_as_an_input() -> None:
    encoded, noise, _ = arrays(9)
    mask = jnp.zeros((1, 1, 8, 8)).at[..., :4, :].set(1)
    traces: list[int] = []

    def blend(x: jax.Array, row: jax.Array) -> jax.Array:
        traces.append(1)
        return inpaint_blend(x, jnp.asarray(encoded), jnp.asarray(noise), mask, row)

    compiled = jax.jit(blend)
    x = jnp.asarray(noise)
    for row in jnp.asarray(table("euler", 5, CONFIG).rows):
        out = compiled(x, row)
        np.testing.assert_allclose(
            out[..., 4:, :], (encoded + noise * row[SIGMA_NEXT])[..., 4:, :], rtol=1e-6, atol=1e-6
        )
        np.testing.assert_array_equal(out[..., :4, :], x[..., :4, :])
    assert len(traces) == 1


def test_the_latent_mask_is_pytorch_nearest_at_latent_size() -> None:
    rng = np.random.default_rng(10)
    mask = rng.random((64, 96)) > 0.5
    small = latent_mask(mask, 8)
    assert small.shape == (1, 8, 12) and small.dtype == np.float32
    # For a whole factor, PyTorch's nearest picks source index floor(i * 8.0): the first pixel of each 8x8 block.
    np.testing.assert_array_equal(small[0], mask[::8, ::8])
    stroke = np.zeros((64, 64), bool)
    stroke[:, 3:6] = True  # a 3-pixel stroke between the sampled columns vanishes, as in diffusers
    assert not latent_mask(stroke, 8).any()


def test_the_latent_mask_rounds_as_pytorch_for_other_ratios() -> None:
    # aten's nearest: src = min(floor(dst * (float)in / out), in - 1), the product in float32.
    mask = np.zeros((20, 20), bool)
    mask[np.arange(20), np.arange(20)] = True
    small = latent_mask(mask, 3)  # 20 -> 6, scale 3.333...: sources 0, 3, 6, 10, 13, 16
    sources = [0, 3, 6, 10, 13, 16]
    np.testing.assert_array_equal(small[0], mask[np.ix_(sources, sources)])


def test_the_masked_image_zeroes_the_region_to_repaint() -> None:
    image = np.linspace(-1, 1, 3 * 4 * 5, dtype=np.float32).reshape(1, 3, 4, 5)
    mask = np.zeros((4, 5), bool)
    mask[1:3, 2:4] = True
    masked = masked_image(image, mask)
    assert masked.dtype == np.float32 and masked.shape == image.shape
    assert (masked[..., 1:3, 2:4] == 0).all()
    np.testing.assert_array_equal(masked[..., ~mask], image[..., ~mask])


@pytest.mark.parametrize("xp", [np, jnp])
def test_the_nine_channel_input_is_latents_mask_masked_image(xp: Any) -> None:
    latents, masked_latents = xp.full((2, 4, 8, 8), 1.0), xp.full((2, 4, 8, 8), 3.0)
    mask = xp.full((2, 1, 8, 8), 2.0)
    out = np.asarray(inpainting_unet_input(latents, mask, masked_latents))
    assert out.shape == (2, 9, 8, 8)
    assert (out[:, :4] == 1).all() and (out[:, 4] == 2).all() and (out[:, 5:] == 3).all()
