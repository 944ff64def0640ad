"""The samplers' coefficient tables against diffusers' own schedulers: whole sampling loops with a deterministic
stand-in for the UNet, on small arrays."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlaxEulerDiscreteScheduler

from common.protocol import SCHEDULERS, Scheduler
from worker import schedulers
from worker.schedulers import (
    C1,
    SIGMA,
    SIGMA_NEXT,
    TIMESTEP,
    A,
    B,
    SchedulerConfig,
    SchedulerConfigError,
    Table,
    UnknownScheduler,
    scheduler_config,
    table,
)

# stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json.
SDXL_BASE: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
CONFIG = scheduler_config(SDXL_BASE)
SHAPE = (2, 4, 8, 8)

Eps = Callable[[jax.Array, jax.Array], jax.Array]


def _flax_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "timestep_spacing")
    return {key: config[key] for key in keys}


@pytest.fixture(scope="module")
def noise() -> jax.Array:
    return jax.random.normal(jax.random.key(0), SHAPE, jnp.float32)


@pytest.fixture(scope="module")
def fake_unet() -> Eps:
    """A deterministic stand-in for the UNet that depends on both its input and the timestep."""
    w = jax.random.uniform(jax.random.key(1), SHAPE, jnp.float32, 0.5, 1.5)
    return lambda x, t: jnp.tanh(x * w + t / 1000)


@pytest.fixture(scope="module")
def step(fake_unet: Eps) -> Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """One compiled step, the way the pipeline runs it: the row is an array input."""

    def run(x: jax.Array, prev: jax.Array, row: jax.Array) -> tuple[jax.Array, jax.Array]:
        eps = fake_unet(schedulers.model_input(x, row), schedulers.timestep(row))
        return schedulers.update(x, eps, prev, row)

    return jax.jit(run)


def _sample(step: Any, tab: Table | np.ndarray, noise: jax.Array, init_noise_sigma: float) -> jax.Array:
    rows = tab.rows if isinstance(tab, Table) else tab
    x, prev = noise * init_noise_sigma, jnp.zeros_like(noise)
    for row in jnp.asarray(rows):
        x, prev = step(x, prev, row)
    return x


def _flax_euler(config: dict[str, Any], steps: int, noise: jax.Array, fake_unet: Eps) -> tuple[Any, jax.Array]:
    """diffusers' Flax Euler over `steps` steps, compiled as one executable (run op by op it takes seconds)."""
    scheduler = FlaxEulerDiscreteScheduler(**_flax_kwargs(config))

    def run(state: Any, noise: jax.Array) -> tuple[Any, jax.Array]:
        state = scheduler.set_timesteps(state, steps, noise.shape)

        def body(i: jax.Array, x: jax.Array) -> jax.Array:
            t = state.timesteps[i]
            eps = fake_unet(scheduler.scale_model_input(state, x, t), t)
            x_next: jax.Array = scheduler.step(state, eps, t, x).prev_sample
            return x_next

        return state, jax.lax.fori_loop(0, steps, body, noise * state.init_noise_sigma)

    result: tuple[Any, jax.Array] = jax.jit(run)(scheduler.create_state(), noise)
    return result


def _assert_euler_matches(
    config: dict[str, Any], tab: Table, steps: int, noise: jax.Array, fake_unet: Eps, step: Any
) -> None:
    state, expected = _flax_euler(config, steps, noise, fake_unet)
    np.testing.assert_allclose(tab.rows[:, TIMESTEP], state.timesteps, rtol=1e-6)
    np.testing.assert_allclose(tab.rows[:, SIGMA], state.sigmas[:-1], rtol=5e-5)
    np.testing.assert_allclose(tab.rows[:, SIGMA_NEXT], state.sigmas[1:], rtol=5e-5)
    assert tab.init_noise_sigma == pytest.approx(float(state.init_noise_sigma), rel=1e-5)
    np.testing.assert_allclose(_sample(step, tab, noise, tab.init_noise_sigma), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 20, 50])
def test_euler_matches_diffusers_flax_euler_on_sdxl_base(
    steps: int, noise: jax.Array, fake_unet: Eps, step: Any
) -> None:
    _assert_euler_matches(SDXL_BASE, table("euler", steps, CONFIG), steps, noise, fake_unet, step)


def test_euler_comparison_catches_another_spacing(noise: jax.Array, fake_unet: Eps, step: Any) -> None:
    linspace = scheduler_config({**SDXL_BASE, "timestep_spacing": "linspace"})
    with pytest.raises(AssertionError):
        _assert_euler_matches(SDXL_BASE, table("euler", 20, linspace), 20, noise, fake_unet, step)


def test_euler_follows_the_models_linspace_spacing(noise: jax.Array, fake_unet: Eps, step: Any) -> None:
    config = {**SDXL_BASE, "timestep_spacing": "linspace"}
    _assert_euler_matches(config, table("euler", 20, scheduler_config(config)), 20, noise, fake_unet, step)


def test_euler_supports_v_prediction(noise: jax.Array, fake_unet: Eps, step: Any) -> None:
    config = {**SDXL_BASE, "prediction_type": "v_prediction"}
    _assert_euler_matches(config, table("euler", 20, scheduler_config(config)), 20, noise, fake_unet, step)
    with pytest.raises(AssertionError):
        _assert_euler_matches(config, table("euler", 20, CONFIG), 20, noise, fake_unet, step)


def test_trailing_timesteps_follow_diffusers_rule() -> None:
    np.testing.assert_array_equal(table("euler_trailing", 4, CONFIG).rows[:, TIMESTEP], [999, 749, 499, 249])
    for steps in range(1, 201):
        # diffusers' EulerDiscreteScheduler.set_timesteps, timestep_spacing="trailing" (which for 61, 103, 121 and
        # 122 steps makes one timestep too many, -1: those are cut).
        expected = (np.arange(1000, 0, -1000 / steps).round() - 1)[:steps]
        np.testing.assert_array_equal(table("euler_trailing", steps, CONFIG).rows[:, TIMESTEP], expected)
    assert not np.array_equal(table("euler", 4, CONFIG).rows[:, TIMESTEP], [999, 749, 499, 249])


def test_trailing_sigmas_are_interpolated_as_euler_does() -> None:
    train = schedulers.train_sigmas(CONFIG)
    rows = table("euler_trailing", 3, CONFIG).rows
    np.testing.assert_array_equal(rows[:, TIMESTEP], [999, 666, 332])
    np.testing.assert_allclose(rows[:, SIGMA], train[[999, 666, 332]], rtol=1e-6)
    np.testing.assert_array_equal(rows[:, SIGMA_NEXT], [rows[1, SIGMA], rows[2, SIGMA], 0])
    assert table("euler_trailing", 3, CONFIG).init_noise_sigma == pytest.approx(train[-1])


def test_one_step_trailing_euler_lands_on_the_prediction(noise: jax.Array, fake_unet: Eps) -> None:
    tab = table("euler_trailing", 1, CONFIG)
    row = jnp.asarray(tab.rows[0])
    x = noise * tab.init_noise_sigma
    assert float(schedulers.timestep(row)) == 999
    eps = fake_unet(schedulers.model_input(x, row), schedulers.timestep(row))
    x_next, denoised = schedulers.update(x, eps, jnp.zeros_like(x), row)
    np.testing.assert_array_equal(x_next, denoised)
    np.testing.assert_allclose(denoised, x - tab.init_noise_sigma * eps, rtol=1e-6, atol=1e-5)


def test_one_compiled_step_serves_every_scheduler_and_step_count(noise: jax.Array, fake_unet: Eps) -> None:
    traces = []

    def run(x: jax.Array, prev: jax.Array, row: jax.Array) -> tuple[jax.Array, jax.Array]:
        traces.append(row.shape)  # runs once per trace, that is once per compilation
        return schedulers.update(x, fake_unet(schedulers.model_input(x, row), schedulers.timestep(row)), prev, row)

    compiled = jax.jit(run)
    for name in SCHEDULERS:
        for steps in (1, 4, 9):
            tab = table(name, steps, CONFIG)  # type: ignore[arg-type]
            assert np.all(np.isfinite(_sample(compiled, tab, noise, tab.init_noise_sigma)))
    assert traces == [(schedulers.ROW_WIDTH,)]


def test_padding_with_identity_rows_changes_nothing(noise: jax.Array, step: Any) -> None:
    tab = table("euler", 7, CONFIG)
    padded = tab.padded(12)
    assert padded.shape == (12, schedulers.ROW_WIDTH)
    unpadded = _sample(step, tab, noise, tab.init_noise_sigma)
    np.testing.assert_array_equal(_sample(step, padded, noise, tab.init_noise_sigma), unpadded)
    with pytest.raises(ValueError, match="cannot pad"):
        tab.padded(6)


# The update is plain arithmetic: on numpy arrays it runs 20,000 steps in a fraction of a second.
_numpy_update = cast(Callable[..., tuple[np.ndarray, np.ndarray]], schedulers.update)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_step_count_is_finite_and_ends_on_the_prediction(name: Scheduler) -> None:
    x0 = np.linspace(-2, 2, 16, dtype=np.float32)
    for steps in range(1, 201):
        tab = table(name, steps, CONFIG)
        assert tab.rows.shape == (steps, schedulers.ROW_WIDTH) and tab.rows.dtype == np.float32
        assert np.all(np.isfinite(tab.rows)) and np.isfinite(tab.init_noise_sigma)
        assert tab.rows[-1, SIGMA_NEXT] == 0 and tab.rows[-1, A] == 0 and tab.rows[-1, B] == 1
        x, prev = x0 * np.float32(tab.init_noise_sigma), np.zeros_like(x0)
        for row in tab.rows:
            # The ideal denoiser of a single point x0 as the model: what is left is noise.
            eps = (x - x0) / row[SIGMA]
            x, prev = _numpy_update(x, eps, prev, row)
        np.testing.assert_allclose(x, x0, atol=1e-4)


def test_tables_are_cached_and_read_only() -> None:
    tab = table("euler", 20, CONFIG)
    assert table("euler", 20, scheduler_config(dict(SDXL_BASE))) is tab
    with pytest.raises(ValueError):
        tab.rows[0, A] = 0


def test_scheduler_config_reads_a_models_config() -> None:
    assert CONFIG == SchedulerConfig(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    # A diffusers Flax scheduler's own config (it has no steps_offset: it always offsets "leading" by 1).
    assert scheduler_config(FlaxEulerDiscreteScheduler(**_flax_kwargs(SDXL_BASE)).config) == CONFIG


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"prediction_type": "sample"}, "prediction_type='sample'"),
        ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule='squaredcos_cap_v2'"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing='uniform'"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"timestep_type": "continuous"}, "timestep_type='continuous'"),
        ({"interpolation_type": "log_linear"}, "interpolation_type='log_linear'"),
        ({"beta_end": 0.0001}, "beta_end"),
        ({"num_train_timesteps": 1}, "num_train_timesteps"),
    ],
)
def test_an_unsupported_model_config_is_a_clear_error(change: dict[str, Any], named: str) -> None:
    with pytest.raises(SchedulerConfigError, match=named):
        scheduler_config({**SDXL_BASE, **change})


def test_an_unknown_scheduler_or_step_count_is_a_clear_error() -> None:
    with pytest.raises(UnknownScheduler, match="'heun' is not one of euler, euler_trailing, dpmpp_2m_karras"):
        table("heun", 20, CONFIG)  # type: ignore[arg-type]
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
            table("euler", steps, CONFIG)


def test_second_order_rows_only_for_dpmpp() -> None:
    assert np.all(table("euler", 30, CONFIG).rows[:, C1] == 0)
    assert np.all(table("euler_trailing", 30, CONFIG).rows[:, C1] == 0)
    assert np.all(table("dpmpp_2m_karras", 30, CONFIG).rows[1:-1, C1] != 0)
