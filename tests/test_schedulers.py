"""The samplers' coefficient tables against diffusers' own schedulers: whole sampling loops with a deterministic
stand-in for the UNet, on small arrays."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlaxDPMSolverMultistepScheduler, FlaxEulerDiscreteScheduler

from common.protocol import SCHEDULERS, Scheduler
from worker import schedulers
from worker.schedulers import (
    C0,
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
NumpyEps = Callable[[np.ndarray, float], np.ndarray]
# The update is plain arithmetic: on numpy arrays it runs 20,000 steps in a fraction of a second.
_numpy_update = cast(Callable[..., tuple[np.ndarray, np.ndarray]], schedulers.update)


def _flax_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "timestep_spacing")
    return {key: config[key] for key in keys}


# diffusers' sampling loops that the tests compare against, by scheduler config (Euler) or spacing (DPM-Solver,
# on SDXL base's betas) and step count. They are compiled together, once: one executable each takes seconds.
FLAX_CONFIGS = {
    "sdxl_base": SDXL_BASE,
    "linspace_v": {**SDXL_BASE, "timestep_spacing": "linspace", "prediction_type": "v_prediction"},
}
EULER_STEPS = (1, 2, 20, 50)
FLAX_EULER_RUNS = [*(("sdxl_base", steps) for steps in EULER_STEPS), ("linspace_v", 20)]
# 14 and 15 straddle lower_order_final: below 15 steps the final step is first order.
FLAX_DPM_RUNS = [("linspace", 2), ("linspace", 14), ("linspace", 15), ("trailing", 8)]


class Harness:
    """Noise, a deterministic stand-in for the UNet, one compiled step as the pipeline runs it (the row an array
    input), and diffusers' reference loops over the same noise and stand-in."""

    def __init__(self) -> None:
        self.noise = jax.random.normal(jax.random.key(0), SHAPE, jnp.float32)
        w = jax.random.uniform(jax.random.key(1), SHAPE, jnp.float32, 0.5, 1.5)
        self.fake_unet: Eps = lambda x, t: jnp.tanh(x * w + t / 1000)
        self.step = jax.jit(self._step)
        self._references: dict[tuple[str, str, int], Any] | None = None

    def _step(self, x: jax.Array, prev: jax.Array, row: jax.Array) -> tuple[jax.Array, jax.Array]:
        eps = self.fake_unet(schedulers.model_input(x, row), schedulers.timestep(row))
        return schedulers.update(x, eps, prev, row)

    def sample(self, rows: np.ndarray, init_noise_sigma: float) -> jax.Array:
        x, prev = self.noise * init_noise_sigma, jnp.zeros_like(self.noise)
        for row in rows:
            x, prev = self.step(x, prev, row)
        return x

    def flax_euler(self, config: str, steps: int) -> tuple[Any, jax.Array]:
        """diffusers' Flax Euler with `FLAX_CONFIGS[config]` over `steps` steps: its state and final latents."""
        result: tuple[Any, jax.Array] = self._reference("euler", config, steps)
        return result

    def flax_dpmpp_2m(self, spacing: str, steps: int) -> tuple[jax.Array, jax.Array]:
        """diffusers' Flax DPM-Solver++ 2M (its defaults: midpoint, lower_order_final) over `steps` steps on its own
        schedule (the model's sigmas at whole timesteps, ending at sigma_min, not 0): its timesteps and final
        latents, in the variance-preserving space."""
        result: tuple[jax.Array, jax.Array] = self._reference("dpmpp_2m", spacing, steps)
        return result

    def _reference(self, kind: str, name: str, steps: int) -> Any:
        if self._references is None:
            # Run once: XLA's slower optimisations do not pay for themselves.
            compiled = jax.jit(self._all_references).lower(self.noise).compile({"xla_backend_optimization_level": "0"})
            self._references = compiled(self.noise)
        return self._references[(kind, name, steps)]

    def _all_references(self, noise: jax.Array) -> dict[tuple[str, str, int], Any]:
        runs: dict[tuple[str, str, int], Any] = {}
        for config, steps in FLAX_EULER_RUNS:
            euler = FlaxEulerDiscreteScheduler(**_flax_kwargs(FLAX_CONFIGS[config]))
            runs[("euler", config, steps)] = self._flax_euler(euler, steps, noise)
        for spacing, steps in FLAX_DPM_RUNS:
            dpm = FlaxDPMSolverMultistepScheduler(**{**_flax_kwargs(SDXL_BASE), "timestep_spacing": spacing})
            runs[("dpmpp_2m", spacing, steps)] = self._flax_dpmpp_2m(dpm, steps, noise)
        return runs

    def _flax_euler(self, scheduler: Any, steps: int, noise: jax.Array) -> tuple[Any, jax.Array]:
        state = scheduler.set_timesteps(scheduler.create_state(), steps, noise.shape)

        def body(i: jax.Array, x: jax.Array) -> jax.Array:
            t = state.timesteps[i]
            eps = self.fake_unet(scheduler.scale_model_input(state, x, t), t)
            x_next: jax.Array = scheduler.step(state, eps, t, x).prev_sample
            return x_next

        return state, jax.lax.fori_loop(0, steps, body, noise * state.init_noise_sigma)

    def _flax_dpmpp_2m(self, scheduler: Any, steps: int, noise: jax.Array) -> tuple[jax.Array, jax.Array]:
        state = scheduler.set_timesteps(scheduler.create_state(), steps, noise.shape)

        def body(i: jax.Array, carry: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
            x, state = carry
            t = state.timesteps[i]
            eps = self.fake_unet(scheduler.scale_model_input(state, x, t), t)
            x_next, state = scheduler.step(state, eps, t, x, return_dict=False)
            return x_next, state

        x, _ = jax.lax.fori_loop(0, steps, body, (noise * state.init_noise_sigma, state))
        return state.timesteps, x


@pytest.fixture(scope="module")
def harness() -> Harness:
    return Harness()


def _assert_euler_matches(harness: Harness, config: str, tab: Table, steps: int) -> None:
    state, expected = harness.flax_euler(config, steps)
    np.testing.assert_allclose(tab.rows[:, TIMESTEP], state.timesteps, rtol=1e-6)
    # diffusers computes the schedule in float32: its smallest sigma is off by 1e-5 (1 - alpha cancels).
    np.testing.assert_allclose(tab.rows[:, SIGMA], state.sigmas[:-1], rtol=5e-5)
    np.testing.assert_allclose(tab.rows[:, SIGMA_NEXT], state.sigmas[1:], rtol=5e-5)
    assert tab.init_noise_sigma == pytest.approx(float(state.init_noise_sigma), rel=1e-5)
    np.testing.assert_allclose(harness.sample(tab.rows, tab.init_noise_sigma), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", EULER_STEPS)
def test_euler_matches_diffusers_flax_euler_on_sdxl_base(harness: Harness, steps: int) -> None:
    _assert_euler_matches(harness, "sdxl_base", table("euler", steps, CONFIG), steps)


def test_euler_comparison_catches_another_spacing(harness: Harness) -> None:
    linspace = scheduler_config({**SDXL_BASE, "timestep_spacing": "linspace"})
    with pytest.raises(AssertionError):
        _assert_euler_matches(harness, "sdxl_base", table("euler", 20, linspace), 20)


def test_euler_follows_the_models_spacing_and_prediction_type(harness: Harness) -> None:
    config = scheduler_config(FLAX_CONFIGS["linspace_v"])
    _assert_euler_matches(harness, "linspace_v", table("euler", 20, config), 20)
    for wrong in ({"prediction_type": "v_prediction"}, {"timestep_spacing": "linspace"}):
        with pytest.raises(AssertionError):
            _assert_euler_matches(
                harness, "linspace_v", table("euler", 20, scheduler_config({**SDXL_BASE, **wrong})), 20
            )


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
    tab = table("euler_trailing", 3, CONFIG)
    np.testing.assert_array_equal(tab.rows[:, TIMESTEP], [999, 666, 332])
    np.testing.assert_allclose(tab.rows[:, SIGMA], train[[999, 666, 332]], rtol=1e-6)
    np.testing.assert_array_equal(tab.rows[:, SIGMA_NEXT], [tab.rows[1, SIGMA], tab.rows[2, SIGMA], 0])
    assert tab.init_noise_sigma == pytest.approx(train[-1])


def test_one_step_trailing_euler_lands_on_the_prediction(harness: Harness) -> None:
    tab = table("euler_trailing", 1, CONFIG)
    row = jnp.asarray(tab.rows[0])
    x = harness.noise * tab.init_noise_sigma
    assert float(schedulers.timestep(row)) == 999
    eps = harness.fake_unet(schedulers.model_input(x, row), schedulers.timestep(row))
    x_next, denoised = schedulers.update(x, eps, jnp.zeros_like(x), row)
    np.testing.assert_array_equal(x_next, denoised)
    np.testing.assert_allclose(denoised, x - tab.init_noise_sigma * eps, rtol=1e-6, atol=1e-5)


def test_one_compiled_step_serves_every_scheduler_and_step_count(harness: Harness) -> None:
    traces = []

    def run(x: jax.Array, prev: jax.Array, row: jax.Array) -> tuple[jax.Array, jax.Array]:
        traces.append(row.shape)  # runs once per trace, that is once per compilation
        eps = harness.fake_unet(schedulers.model_input(x, row), schedulers.timestep(row))
        return schedulers.update(x, eps, prev, row)

    compiled = jax.jit(run)
    for name in SCHEDULERS:
        for steps in (1, 4, 9):
            tab = table(name, steps, CONFIG)  # type: ignore[arg-type]
            x, prev = harness.noise * tab.init_noise_sigma, jnp.zeros_like(harness.noise)
            for row in jnp.asarray(tab.rows):
                x, prev = compiled(x, prev, row)
            assert np.all(np.isfinite(x))
    assert traces == [(schedulers.ROW_WIDTH,)]


def test_padding_with_identity_rows_changes_nothing(harness: Harness) -> None:
    tab = table("dpmpp_2m_karras", 7, CONFIG)
    padded = tab.padded(12)
    assert padded.shape == (12, schedulers.ROW_WIDTH)
    unpadded = harness.sample(tab.rows, tab.init_noise_sigma)
    np.testing.assert_array_equal(harness.sample(padded, tab.init_noise_sigma), unpadded)
    with pytest.raises(ValueError, match="cannot pad"):
        tab.padded(6)


def _assert_dpmpp_2m_matches(harness: Harness, solver: schedulers.Solver, spacing: str, steps: int) -> None:
    flax_timesteps, expected_vp = harness.flax_dpmpp_2m(spacing, steps)
    timesteps = np.asarray(flax_timesteps)
    train = schedulers.train_sigmas(CONFIG)
    sigmas = np.append(train[timesteps], train[0])
    tab = schedulers.from_sigmas(solver, timesteps, sigmas, "epsilon", float(np.sqrt(sigmas[0] ** 2 + 1)))
    x = harness.sample(tab.rows, tab.init_noise_sigma)
    # sigma space to variance-preserving: x_vp = x / sqrt(sigma**2 + 1).
    np.testing.assert_allclose(x / np.sqrt(sigmas[-1] ** 2 + 1), expected_vp, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize(("spacing", "steps"), FLAX_DPM_RUNS)
def test_dpmpp_2m_matches_diffusers_flax_dpm_solver(harness: Harness, spacing: str, steps: int) -> None:
    _assert_dpmpp_2m_matches(harness, "dpmpp_2m", spacing, steps)


def test_dpmpp_2m_comparison_catches_a_first_order_solver(harness: Harness) -> None:
    with pytest.raises(AssertionError):
        _assert_dpmpp_2m_matches(harness, "euler", "linspace", 14)
    with pytest.raises(AssertionError):
        _assert_dpmpp_2m_matches(harness, "euler", "linspace", 15)


def test_karras_sigmas_and_timesteps_for_sdxl() -> None:
    tab = table("dpmpp_2m_karras", 4, CONFIG)
    # Karras et al. (rho 7) from SDXL's sigma_max 14.6146 to its sigma_min 0.0291675 in 4 steps, then 0 (diffusers'
    # DPMSolverMultistepScheduler, use_karras_sigmas=True, final_sigmas_type="zero"); timesteps by interpolating
    # log sigmas between training timesteps, rounded.
    np.testing.assert_allclose(tab.rows[:, SIGMA], [14.6146, 3.16860, 0.446918, 0.0291675], rtol=2e-5)
    np.testing.assert_allclose(tab.rows[:, SIGMA_NEXT], [3.16860, 0.446918, 0.0291675, 0], rtol=2e-5)
    np.testing.assert_array_equal(tab.rows[:, TIMESTEP], [999, 687, 146, 0])
    # Unit-variance noise in the variance-preserving space diffusers' DPM-Solver works in.
    assert tab.init_noise_sigma == pytest.approx(np.sqrt(14.6146**2 + 1), rel=1e-5)


@pytest.mark.parametrize("steps", [3, 10, 30])
def test_karras_timesteps_are_diffusers_sigma_to_t_rounded(steps: int) -> None:
    train = schedulers.train_sigmas(CONFIG)
    log_train = np.log(train)
    rows = table("dpmpp_2m_karras", steps, CONFIG).rows
    for sigma, t in zip(rows[:, SIGMA].astype(np.float64), rows[:, TIMESTEP], strict=True):
        # diffusers' _sigma_to_t, written out: the last training timestep at or below sigma, then log-linear.
        low = min(int(np.cumsum(np.log(sigma) - log_train >= 0).argmax()), len(train) - 2)
        w = np.clip((log_train[low] - np.log(sigma)) / (log_train[low] - log_train[low + 1]), 0, 1)
        assert t == np.round((1 - w) * low + w * (low + 1))
    ramp = np.linspace(0, 1, steps)
    formula = (train[-1] ** (1 / 7) + ramp * (train[0] ** (1 / 7) - train[-1] ** (1 / 7))) ** 7
    np.testing.assert_allclose(rows[:, SIGMA], formula, rtol=1e-6)


def _diffusers_dpmpp_2m(sigmas: np.ndarray, timesteps: np.ndarray, eps: NumpyEps, noise: np.ndarray) -> np.ndarray:
    """diffusers' PyTorch DPMSolverMultistepScheduler.step written out in numpy (dpmsolver++, midpoint, order 2,
    lower_order_final, final_sigmas_type "zero"), in its variance-preserving space; float64."""

    def alpha_sigma_lambda(sigma: float) -> tuple[float, float, float]:
        alpha = 1 / np.sqrt(sigma**2 + 1)
        with np.errstate(divide="ignore"):
            return alpha, sigma * alpha, float(np.log(alpha) - np.log(sigma * alpha))

    x, previous = noise.astype(np.float64), np.zeros_like(noise, np.float64)
    for i, t in enumerate(timesteps):
        alpha_s0, sigma_s0, lambda_s0 = alpha_sigma_lambda(sigmas[i])
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(sigmas[i + 1])
        m0 = (x - sigma_s0 * eps(x, t)) / alpha_s0
        h = lambda_t - lambda_s0
        if i == 0 or i == len(timesteps) - 1:
            x = (sigma_t / sigma_s0) * x - (alpha_t * (np.exp(-h) - 1.0)) * m0
        else:
            r0 = (lambda_s0 - alpha_sigma_lambda(sigmas[i - 1])[2]) / h
            d0, d1 = m0, (1.0 / r0) * (m0 - previous)
            x = (
                (sigma_t / sigma_s0) * x
                - (alpha_t * (np.exp(-h) - 1.0)) * d0
                - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * d1
            )
        previous = m0
    return x


@pytest.mark.parametrize("steps", [4, 20, 30])
def test_dpmpp_2m_karras_matches_diffusers_pytorch_step_written_out(steps: int) -> None:
    rng = np.random.default_rng(0)
    noise, w = rng.standard_normal(64), rng.uniform(0.5, 1.5, 64)

    def eps(x_vp: np.ndarray, t: float) -> np.ndarray:
        return np.asarray(np.tanh(x_vp * w + t / 1000))

    tab = table("dpmpp_2m_karras", steps, CONFIG)
    sigmas = np.append(tab.rows[:, SIGMA], 0.0).astype(np.float64)
    expected = _diffusers_dpmpp_2m(sigmas, tab.rows[:, TIMESTEP], eps, noise)
    x, prev = (noise * tab.init_noise_sigma).astype(np.float32), np.zeros(64, np.float32)
    for row in tab.rows:
        x, prev = _numpy_update(x, eps(x * row[schedulers.C_IN], row[TIMESTEP]).astype(np.float32), prev, row)
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-4)  # sigma 0: both spaces agree


def test_dpmpp_2m_karras_is_first_order_at_both_ends() -> None:
    for steps in (1, 2, 10, 20):
        rows = table("dpmpp_2m_karras", steps, CONFIG).rows
        assert rows[0, C1] == 0 and rows[-1, C1] == 0
        assert np.all(rows[1:-1, C1] < 0)
        np.testing.assert_allclose(rows[:, C0] + rows[:, C1], 1, rtol=1e-6)


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
        ({"num_train_timesteps": None}, "num_train_timesteps=None is not an integer"),
        ({"steps_offset": 0.5}, "steps_offset=0.5 is not an integer"),
        ({"beta_start": "0.1"}, "beta_start='0.1' is not a number"),
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
