"""Samplers as tables of per-step coefficients, computed on the host, so that one compiled denoising step serves
every scheduler and every step count.

Everything works in k-diffusion's "sigma" space: a latent at noise level sigma is `x = x0 + sigma * noise`, the UNet
sees `x / sqrt(sigma**2 + 1)` (the variance-preserving latent it was trained on) and the initial latents are
`noise * init_noise_sigma`. Each step first predicts the clean latent, `denoised = c_skip * x + c_out * model_output`,
then moves to the next noise level with one update for every sampler:

    x_next = a * x + b * (c0 * denoised + c1 * prev_denoised)

Euler is `a = sigma_next / sigma`, `b = 1 - a`, `c0 = 1`, `c1 = 0` (which is also DDIM and first-order
DPM-Solver++). Second-order DPM-Solver++ (2M, midpoint) keeps `a` and `b` (`b = -expm1(-h)`, `h = log(sigma /
sigma_next)`) and extrapolates the data prediction: `c0 = 1 + 1/(2r)`, `c1 = -1/(2r)`, `r = h_prev / h`. A final
sigma of 0 makes `a = 0`, `b = 1`: the last step lands on `denoised`, with no logarithm of 0 anywhere.

The schedules follow diffusers 0.39 (`EulerDiscreteScheduler`, `DPMSolverMultistepScheduler` with
`use_karras_sigmas=True`, and their Flax twins): the tests compare whole sampling loops against them.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

import jax
import jax.numpy as jnp
import numpy as np

from common.protocol import SCHEDULERS, Scheduler

logger = logging.getLogger(__name__)

# The columns of a table row: what the UNet is given (TIMESTEP, C_IN), how its output becomes the clean-latent
# prediction (C_SKIP, C_OUT) and the update's coefficients (A, B, C0, C1). SIGMA and SIGMA_NEXT are there for
# inspection (and img2img-style uses); the step itself does not read them.
TIMESTEP, SIGMA, SIGMA_NEXT, C_IN, C_SKIP, C_OUT, A, B, C0, C1 = range(10)
ROW_WIDTH = 10

Spacing = Literal["leading", "linspace", "trailing"]
BetaSchedule = Literal["linear", "scaled_linear"]
PredictionType = Literal["epsilon", "v_prediction"]
Solver = Literal["euler", "dpmpp_2m"]
_N = TypeVar("_N", int, float)

# diffusers' DPM-Solver++ with `lower_order_final` takes a first-order final step below this many steps: the
# second-order one is unstable there.
_LOWER_ORDER_FINAL_BELOW = 15
# Karras et al.'s schedule exponent (k-diffusion, diffusers).
_KARRAS_RHO = 7.0

# What diffusers' schedulers assume for a key a model's scheduler config leaves out. `steps_offset` is the
# exception: diffusers' Flax Euler, which this worker ran before, always offsets "leading" timesteps by 1 (it has no
# such setting), as every Stable Diffusion and SDXL config asks for explicitly.
_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "steps_offset": 1,
    "timestep_spacing": "linspace",
    "prediction_type": "epsilon",
}


class SchedulerConfigError(ValueError):
    """A model's scheduler config asks for something these samplers do not do; the message names the key."""


class UnknownScheduler(ValueError):
    """A scheduler name that is not one of `common.protocol.SCHEDULERS`."""


@dataclass(frozen=True)
class SchedulerConfig:
    """The parts of a model's scheduler config that define its noise schedule (diffusers' names)."""

    num_train_timesteps: int
    beta_start: float
    beta_end: float
    beta_schedule: BetaSchedule
    steps_offset: int
    timestep_spacing: Spacing
    prediction_type: PredictionType

    def __post_init__(self) -> None:
        _check_choice("beta_schedule", self.beta_schedule, BetaSchedule)
        _check_choice("timestep_spacing", self.timestep_spacing, Spacing)
        _check_choice("prediction_type", self.prediction_type, PredictionType)
        if self.num_train_timesteps < 2:
            raise SchedulerConfigError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise SchedulerConfigError(
                f"beta_start and beta_end must satisfy 0 < beta_start < beta_end < 1, "
                f"got {self.beta_start} and {self.beta_end}"
            )
        if self.steps_offset < 0:
            raise SchedulerConfigError(f"steps_offset must be at least 0, got {self.steps_offset}")


def _check_choice(key: str, value: object, choices: Any) -> None:
    if value not in get_args(choices):
        allowed = ", ".join(repr(c) for c in get_args(choices))
        raise SchedulerConfigError(f"scheduler config {key}={value!r} is not supported (one of {allowed})")


def scheduler_config(model_scheduler_config: Mapping[str, Any]) -> SchedulerConfig:
    """The noise schedule of a model's scheduler config (diffusers' `scheduler_config.json`, or a diffusers
    scheduler's `.config`). Settings that change the schedule in ways these samplers do not follow are refused
    with `SchedulerConfigError`; the sampler-specific ones (Karras sigmas, solver order, ...) are the request's
    choice, not the model's, and are ignored."""
    cfg = model_scheduler_config
    if cfg.get("trained_betas") is not None:
        raise SchedulerConfigError("scheduler config trained_betas is not supported (only beta_start..beta_end)")
    if cfg.get("rescale_betas_zero_snr"):
        raise SchedulerConfigError("scheduler config rescale_betas_zero_snr=True is not supported")
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise SchedulerConfigError(f"scheduler config timestep_type={cfg['timestep_type']!r} is not supported")
    if cfg.get("interpolation_type", "linear") != "linear":
        raise SchedulerConfigError(
            f"scheduler config interpolation_type={cfg['interpolation_type']!r} is not supported (only 'linear')"
        )
    values = {key: cfg.get(key, default) for key, default in _DEFAULTS.items()}
    config = SchedulerConfig(
        num_train_timesteps=_number(values, "num_train_timesteps", int),
        beta_start=_number(values, "beta_start", float),
        beta_end=_number(values, "beta_end", float),
        beta_schedule=values["beta_schedule"],
        steps_offset=_number(values, "steps_offset", int),
        timestep_spacing=values["timestep_spacing"],
        prediction_type=values["prediction_type"],
    )
    logger.info("noise schedule of the model's %s: %s", cfg.get("_class_name", "scheduler"), config)
    return config


def _number(values: Mapping[str, Any], key: str, kind: type[_N]) -> _N:
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
        raise SchedulerConfigError(
            f"scheduler config {key}={value!r} is not {'an integer' if kind is int else 'a number'}"
        )
    return kind(value)


@dataclass(frozen=True)
class Table:
    """One sampler at one step count: the initial noise scale and a float32 row per step (columns TIMESTEP ...
    C1). The rows are read-only: tables are cached and shared."""

    init_noise_sigma: float
    rows: np.ndarray

    @property
    def steps(self) -> int:
        """The number of denoising steps (UNet evaluations)."""
        return int(self.rows.shape[0])

    def padded(self, length: int) -> np.ndarray:
        """The rows followed by identity rows (`x_next = x`) up to `length`, for a loop of fixed length that
        runs only the first `steps` of them, or that runs all of them at the cost of wasted UNet passes."""
        if length < self.steps:
            raise ValueError(f"cannot pad {self.steps} rows to {length}")
        identity = np.zeros((length - self.steps, ROW_WIDTH), np.float32)
        identity[:, [C_IN, C_SKIP, A]] = 1.0
        return np.concatenate([self.rows, identity])


def table(name: Scheduler, steps: int, config: SchedulerConfig) -> Table:
    """The coefficient table of sampler `name` (one of `common.protocol.SCHEDULERS`) at `steps` steps."""
    if name not in SCHEDULERS:
        raise UnknownScheduler(f"scheduler {name!r} is not one of {', '.join(SCHEDULERS)}")
    if not 1 <= steps <= config.num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {config.num_train_timesteps}, got {steps}")
    return _table(name, steps, config)


@functools.lru_cache(maxsize=1024)
def _table(name: Scheduler, steps: int, config: SchedulerConfig) -> Table:
    if name == "dpmpp_2m_karras":
        timesteps, sigmas = karras_schedule(steps, config)
        return from_sigmas("dpmpp_2m", timesteps, sigmas, config.prediction_type, _vp_noise_scale(sigmas))
    spacing: Spacing = "trailing" if name == "euler_trailing" else config.timestep_spacing
    timesteps, sigmas = euler_schedule(spacing, steps, config)
    # diffusers' Euler: noise at the largest sigma, made variance-preserving-sized for "leading" spacing only.
    noise = _vp_noise_scale(sigmas) if spacing == "leading" else float(sigmas.max())
    return from_sigmas("euler", timesteps, sigmas, config.prediction_type, noise)


def from_sigmas(
    solver: Solver, timesteps: np.ndarray, sigmas: np.ndarray, prediction_type: PredictionType, init_noise_sigma: float
) -> Table:
    """The table of `solver` over a given schedule: the UNet's `timesteps` (one per step) and `sigmas` (one per
    step and the final one, 0 or not), decreasing."""
    timesteps, sigmas = np.asarray(timesteps, np.float64), np.asarray(sigmas, np.float64)
    if sigmas.shape != (timesteps.shape[0] + 1,) or timesteps.ndim != 1:
        raise ValueError(f"need one sigma per timestep and a final one, got {sigmas.shape} and {timesteps.shape}")
    if not (np.all(sigmas[:-1] > 0) and np.all(np.diff(sigmas) < 0) and sigmas[-1] >= 0):
        raise ValueError("sigmas must be positive and strictly decreasing (the last may be 0)")
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    rows = np.zeros((timesteps.shape[0], ROW_WIDTH))
    rows[:, TIMESTEP], rows[:, SIGMA], rows[:, SIGMA_NEXT] = timesteps, sigma, sigma_next
    rows[:, C_IN] = 1 / np.sqrt(sigma**2 + 1)
    rows[:, C_SKIP], rows[:, C_OUT] = _prediction_coefficients(prediction_type, sigma)
    rows[:, A] = sigma_next / sigma
    rows[:, B] = 1 - rows[:, A]
    rows[:, C0], rows[:, C1] = _multistep_coefficients(solver, sigmas)
    rows = rows.astype(np.float32)
    rows.flags.writeable = False
    return Table(init_noise_sigma=float(init_noise_sigma), rows=rows)


def _prediction_coefficients(prediction_type: PredictionType, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`denoised = c_skip * x + c_out * model_output` for the model's prediction type (in sigma space)."""
    if prediction_type == "epsilon":
        return np.ones_like(sigma), -sigma
    return 1 / (sigma**2 + 1), -sigma / np.sqrt(sigma**2 + 1)


def _multistep_coefficients(solver: Solver, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c0, c1) per step. Euler uses this step's prediction alone. DPM-Solver++ 2M extrapolates from the previous
    one, except on its first step (there is none) and on the final step when there are few steps or when it
    lands on sigma 0 (diffusers' `lower_order_final` and `final_sigmas_type="zero"`: h would be infinite)."""
    steps = sigmas.shape[0] - 1
    c0, c1 = np.ones(steps), np.zeros(steps)
    if solver == "euler" or steps < 2:
        return c0, c1
    last = steps - 1 if (steps < _LOWER_ORDER_FINAL_BELOW or sigmas[-1] == 0) else steps
    i = np.arange(1, last)
    h = np.log(sigmas[i] / sigmas[i + 1])
    h_prev = np.log(sigmas[i - 1] / sigmas[i])
    half_inverse_r = h / (2 * h_prev)
    c0[i], c1[i] = 1 + half_inverse_r, -half_inverse_r
    return c0, c1


def _vp_noise_scale(sigmas: np.ndarray) -> float:
    """The initial noise scale that matches unit-variance noise in the variance-preserving space."""
    return math.sqrt(float(sigmas.max()) ** 2 + 1)


def train_sigmas(config: SchedulerConfig) -> np.ndarray:
    """The model's sigma at each training timestep 0..T-1, increasing.

    Computed as diffusers' Flax schedulers compute them, in float32 with JAX on the host's CPU: the model is
    served with those values, and the images of a random test model move by several levels for a change in
    the sixth digit of a sigma (a float64 cumulative product of 1,000 factors rounds that far apart).
    """
    t = config.num_train_timesteps
    with jax.default_device(jax.devices("cpu")[0]):
        if config.beta_schedule == "scaled_linear":
            betas = jnp.linspace(config.beta_start**0.5, config.beta_end**0.5, t, dtype=jnp.float32) ** 2
        else:
            betas = jnp.linspace(config.beta_start, config.beta_end, t, dtype=jnp.float32)
        alphas_cumprod = jnp.cumprod(1.0 - betas)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return np.asarray(sigmas, dtype=np.float64)


def spaced_timesteps(spacing: Spacing, steps: int, config: SchedulerConfig) -> np.ndarray:
    """The UNet timesteps of `steps` steps, decreasing, by diffusers' Euler rules for each spacing."""
    t = config.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, t - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(steps) * (t // steps))[::-1] + float(config.steps_offset)
    # diffusers' own expression (numpy's arange rounds its values its own way: 48 steps give 936, not 937), cut to
    # `steps` values: for some counts (61, 103, 121, ...) the float step makes arange one element longer.
    return (np.arange(t, 0, -t / steps).round() - 1)[:steps]


def euler_schedule(spacing: Spacing, steps: int, config: SchedulerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Euler's timesteps and sigmas (interpolated at the timesteps, then a final 0)."""
    timesteps = spaced_timesteps(spacing, steps, config)
    sigmas = train_sigmas(config)
    return timesteps, np.append(np.interp(timesteps, np.arange(sigmas.shape[0]), sigmas), 0.0)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    """Karras et al.'s noise levels (rho 7) from `sigma_max` down to `sigma_min`, `steps` of them."""
    ramp = np.linspace(0, 1, steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / _KARRAS_RHO), sigma_min ** (1 / _KARRAS_RHO)
    return np.asarray((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** _KARRAS_RHO)


def karras_schedule(steps: int, config: SchedulerConfig) -> tuple[np.ndarray, np.ndarray]:
    """DPM-Solver++'s Karras schedule as diffusers builds it: Karras sigmas over the model's whole range, the
    timesteps found by interpolating log sigmas and rounded, then a final sigma of 0."""
    train = train_sigmas(config)
    sigmas = karras_sigmas(float(train[0]), float(train[-1]), steps)
    timesteps = np.round(sigma_to_t(sigmas, np.log(train)))
    return timesteps, np.append(sigmas, 0.0)


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma: linear in log sigma between neighbouring timesteps, as
    diffusers' `_sigma_to_t`."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_train_sigmas, log_sigma, side="right") - 1, 0, log_train_sigmas.shape[0] - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return np.asarray((1 - w) * low + w * (low + 1))


def model_input(x: jax.Array, row: jax.Array) -> jax.Array:
    """What the UNet is given for latents `x` (sigma space): `x / sqrt(sigma**2 + 1)`."""
    return x * row[C_IN].astype(x.dtype)


def timestep(row: jax.Array) -> jax.Array:
    """The UNet's timestep for this step, a float32 scalar."""
    return row[TIMESTEP].astype(jnp.float32)


def update(
    x: jax.Array, model_output: jax.Array, prev_denoised: jax.Array, row: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One sampler step: `(x_next, denoised)`. `model_output` is the (guided) UNet output for `x`,
    `prev_denoised` the `denoised` of the step before (anything finite on the first step: its weight is 0)."""
    denoised = row[C_SKIP] * x + row[C_OUT] * model_output.astype(x.dtype)
    x_next = row[A] * x + row[B] * (row[C0] * denoised + row[C1] * prev_denoised)
    return x_next.astype(x.dtype), denoised.astype(x.dtype)
