"""The worker's pipeline against diffusers' own: `FlaxStableDiffusionXLPipeline.__call__(jit=True)` on the
tiny model, the same modules, parameters, prompts and initial noise, stepwise and fused, for several sizes, step
counts and negative prompts. Two claims, each a bound that holds whatever the CPU:

- **The algorithm, in float32.** Both pipelines built in float32 make the same images: no pixel more than 1
  level apart (two values a float32 rounding apart can fall either side of a uint8 rounding boundary), and all
  but 1 in 1,000 identical. What is left is float32 arithmetic in different places (the worker steps as
  `a * x + b * denoised` from a host-made table, diffusers as `x + (x - denoised) / sigma * dt`): differences of
  the order of 1e-6 in values whose levels are 1/255 apart, so the bound does not move with the instruction set
  or the summation order of a CPU's kernels (measured: at most 0.022% of values differ, natively and under
  SSE4.2). The check has teeth: height and width swapped in SDXL's time ids fail it.
- **The serving precision, bfloat16.** The worker's bfloat16 images are as close to the float32 images as
  diffusers' own bfloat16 images are (mean level error, with an allowance for sampling noise). Both run on the
  same CPU in the same process, so whatever that CPU does to bfloat16 rounding it does to both.

The cases run 2 and 3 steps at three sizes, and 20 steps (a served count) at 64x64: the float32 claim holds
there too (measured: no value more than 1 level apart, 0.014% of values differ). Between the two bfloat16 pipelines
at 20 steps the claim is a loose bound on single pixels, the one they honestly meet: at most 6 levels apart and at
most 1% of values more than 2 apart (measured on a shared 2-core VM: 3 levels and 0.03%; an independent run on
another CPU: 5 levels and 0.6%).

Not claimed: a tight bound on single pixels between the two bfloat16 pipelines. They round to bfloat16 in different
places (diffusers post-processes in bfloat16 and takes the guidance difference of bfloat16 noise predictions, the
worker does both in float32), and a random 3-step UNet amplifies a rounding into a few levels: the share of
pixels more than 2 levels apart in the 96x64, 3-step case is 0.13% on one CPU and 0.35% on another, and with
`--xla_cpu_max_isa=SSE4_2` (no FMA) it moves again. Against the float32 images both bfloat16 pipelines are
about 1.5 levels off on average, up to 14 levels: that is the bfloat16 UNet's error, common to both.

`test_the_claims_hold_under_a_capped_instruction_set` runs the 96x64, 3-step case with a negative prompt again in a
process whose XLA:CPU may use nothing newer than SSE4.2."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlaxStableDiffusionXLPipeline

from common.protocol import GenerationParams, Shape, Size
from worker import pipeline as pipeline_module
from worker.pipeline import PipelineOptions, SDXLPipeline

pytestmark = pytest.mark.compile

IMAGES = 4  # one per virtual device
SEED = 11
GUIDANCE = 5.0
MAX_STEPS = 20  # each compiled size serves every step count up to this
# (progress reported, shape): the stepwise executables at two sizes and step counts, the fused loop at a third, and
# a served step count (20) at the first size.
CASES = (
    (True, Shape(width=64, height=64, steps=2)),
    (True, Shape(width=96, height=64, steps=3)),
    (False, Shape(width=64, height=96, steps=2)),
    (True, Shape(width=64, height=64, steps=20)),
)
LONG = CASES[3][1]
NEGATIVES = ("", "blurry, low quality")
# The bfloat16 claim at the sizes and step counts where rounding has the most room to grow (3 steps, a non-square
# size, the fused loop); the float32 claim, the algorithm, at every case.
BFLOAT16_CASES = CASES[1:]
FLOAT32_LEVELS = 1
FLOAT32_DIFFERENT = 1e-3  # the share of values that may be 1 level apart in float32
# The standard error of a mean of one-level differences in random directions over this test's ~50,000 to ~74,000
# values is about 0.002 levels (0.01 if neighbouring values moved together in blocks of 25); measured, the
# worker's bfloat16 error is 0.01 to 0.02 levels below diffusers' at a mean of about 1.5.
SAMPLING_NOISE = 0.05
# Between the two bfloat16 pipelines at 20 steps (64x64): measured at most 3 levels and 0.03% of values more than 2
# apart on a shared 2-core VM, at most 5 levels and 0.6% in an independent run on another CPU; the bounds leave a
# little room above the larger.
LONG_BFLOAT16_LEVELS = 6
LONG_BFLOAT16_BEYOND_2 = 0.01
CAPPED_ISA = "SSE4_2"  # XLA:CPU's name for it: no AVX, so no FMA and 128-bit vectors
# Compiling four pipelines at several sizes takes minutes on a busy 2-core machine; the first test pays for it.
pytestmark = pytest.mark.timeout(1200)


@dataclass
class Implementations:
    """The worker's pipeline (stepwise, and its fused variant) and diffusers' pipeline in one precision, each
    size compiled when a test first needs it and each reference image made once."""

    stepwise: SDXLPipeline
    fused: SDXLPipeline = field(init=False)
    _params: Any = field(init=False)
    _references: dict[tuple[Shape, str], np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fused = self.stepwise.variant(report_progress=False)
        pipe = self.stepwise._pipe
        # diffusers' pipeline maps over a leading device axis (pmap) and reads its scheduler's state from the
        # params; the worker's parameters are replicated arrays and its schedule is made on the host.
        state = {**self.stepwise._params, "scheduler": pipe.scheduler.create_state()}
        self._params = per_device(state, jax.local_device_count())

    def ours(self, progress: bool, shape: Shape, negative: str) -> np.ndarray:
        pipeline = self.stepwise if progress else self.fused
        if shape.size not in pipeline.sizes:
            pipeline.compile(shape.size)
        return generate(pipeline, shape, negative)

    def theirs(self, shape: Shape, negative: str) -> np.ndarray:
        if (shape, negative) not in self._references:
            self._references[shape, negative] = _diffusers_images(self.stepwise._pipe, self._params, shape, negative)
        return self._references[shape, negative]


@pytest.fixture(scope="module")
def bfloat16(tiny_model: Path) -> Implementations:
    """As served: parameters in bfloat16 (worker/checkpoints.py)."""
    return Implementations(
        SDXLPipeline.load(str(tiny_model), None, PipelineOptions(images_per_request=IMAGES, max_steps=MAX_STEPS))
    )


@pytest.fixture(scope="module")
def float32(tiny_model: Path) -> Implementations:
    """The same model with its modules and parameters in float32, as stored."""
    pipe, params = FlaxStableDiffusionXLPipeline.from_pretrained(
        str(tiny_model), split_head_dim=True, dtype=jnp.float32
    )
    params.pop("scheduler")
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {np.dtype(np.float32)}
    replicated = pipeline_module._replicate(params)
    return Implementations(
        SDXLPipeline(pipe, replicated, PipelineOptions(images_per_request=IMAGES, max_steps=MAX_STEPS))
    )


def per_device(tree: Any, devices: int) -> Any:
    """Every leaf of `tree` with a leading device axis, one copy per device, on the host (for `jax.pmap`)."""
    return jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x), (devices, *np.shape(x))), tree)


def _diffusers_images(pipe: object, params: object, shape: Shape, negative: str) -> np.ndarray:
    devices = jax.local_device_count()

    def sharded(x: np.ndarray) -> np.ndarray:
        return np.asarray(x).reshape(devices, IMAGES // devices, *np.shape(x)[1:])

    prompt_ids = sharded(pipe.prepare_inputs(["a lighthouse at dusk"] * IMAGES))  # type: ignore[attr-defined]
    # No negative prompt is zeros in both pipelines; diffusers takes None for it.
    negative_ids = sharded(pipe.prepare_inputs([negative] * IMAGES)) if negative else None  # type: ignore[attr-defined]
    # The worker's initial noise: one key per image, split from the seed.
    keys = jax.random.split(jax.random.PRNGKey(SEED), IMAGES)
    factor = pipe.vae_scale_factor  # type: ignore[attr-defined]
    latent_shape = (4, shape.height // factor, shape.width // factor)
    latents = jax.vmap(lambda key: jax.random.normal(key, latent_shape, dtype=np.float32))(keys)
    output = pipe(  # type: ignore[operator]
        prompt_ids,
        params,
        sharded(np.asarray(keys)),
        num_inference_steps=shape.steps,
        guidance_scale=GUIDANCE,
        height=shape.height,
        width=shape.width,
        latents=sharded(np.asarray(latents)),
        neg_prompt_ids=negative_ids,
        jit=True,
    ).images
    pixels = np.round(np.asarray(output, np.float32) * 255).astype(np.uint8)
    return pixels.reshape(IMAGES, shape.height, shape.width, 3)


def generate(pipeline: SDXLPipeline, shape: Shape, negative: str) -> np.ndarray:
    return pipeline.generate(
        GenerationParams(prompt="a lighthouse at dusk", negative_prompt=negative, guidance_scale=GUIDANCE).resolved(
            shape, seed=SEED
        )
    )


def level_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def case_id(case: tuple[bool, Shape]) -> str:
    progress, shape = case
    return f"{'stepwise' if progress else 'fused'}-{shape}"


@pytest.mark.parametrize("negative", NEGATIVES, ids=["no-negative", "negative"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float32_matches_diffusers(float32: Implementations, case: tuple[bool, Shape], negative: str) -> None:
    progress, shape = case
    ours, theirs = float32.ours(progress, shape, negative), float32.theirs(shape, negative)
    assert theirs.std() > 0
    difference = level_difference(ours, theirs)
    assert difference.max() <= FLOAT32_LEVELS
    assert (difference > 0).mean() <= FLOAT32_DIFFERENT, f"{(difference > 0).mean():.3%} of values differ"


@pytest.mark.parametrize("negative", NEGATIVES, ids=["no-negative", "negative"])
@pytest.mark.parametrize("case", BFLOAT16_CASES, ids=case_id)
def test_bfloat16_is_as_close_to_float32_as_diffusers(
    bfloat16: Implementations, float32: Implementations, case: tuple[bool, Shape], negative: str
) -> None:
    progress, shape = case
    exact = float32.theirs(shape, negative)
    ours = level_difference(bfloat16.ours(progress, shape, negative), exact).mean()
    theirs = level_difference(bfloat16.theirs(shape, negative), exact).mean()
    assert theirs > 0.1, "bfloat16 rounds somewhere: a check against identical images proves nothing"
    assert ours <= theirs + SAMPLING_NOISE, f"worker {ours:.3f} levels off float32, diffusers {theirs:.3f}"


@pytest.mark.parametrize("negative", NEGATIVES, ids=["no-negative", "negative"])
def test_bfloat16_at_20_steps_is_within_a_few_levels_of_diffusers(bfloat16: Implementations, negative: str) -> None:
    """At a served step count the two bfloat16 pipelines' rounding differences have 20 steps to grow: the bound
    they honestly meet (LONG_BFLOAT16_*: measured values beside them) rather than the float32 claim's."""
    difference = level_difference(bfloat16.ours(True, LONG, negative), bfloat16.theirs(LONG, negative))
    assert difference.max() <= LONG_BFLOAT16_LEVELS
    beyond = (difference > 2).mean()
    assert beyond <= LONG_BFLOAT16_BEYOND_2, f"{beyond:.3%} of values more than 2 levels apart"


def test_swapped_time_ids_fail_the_check(float32: Implementations, monkeypatch: pytest.MonkeyPatch) -> None:
    """SDXL is conditioned on (height, width); a pipeline that passes (width, height) is far off."""
    shape = CASES[1][1]  # not square
    correct = pipeline_module.time_ids_of

    def swapped(size: Size) -> list[int]:
        height, width, top, left, *_ = correct(size)
        return [width, height, top, left, width, height]

    monkeypatch.setattr(pipeline_module, "time_ids_of", swapped)
    broken = float32.stepwise.variant()
    broken.compile(shape.size)
    difference = level_difference(generate(broken, shape, ""), float32.theirs(shape, ""))
    assert difference.max() > 10 and (difference > FLOAT32_LEVELS).mean() > 0.1


@pytest.fixture
def capped_environment() -> Iterator[dict[str, str]]:
    if platform.machine() not in {"x86_64", "AMD64"}:
        pytest.skip(f"{CAPPED_ISA} is an x86 instruction set; this is {platform.machine()}")
    # The session's conftest adds its device count to whatever XLA_FLAGS the child starts with.
    yield os.environ | {"XLA_FLAGS": f"--xla_cpu_max_isa={CAPPED_ISA}"}


def test_the_claims_hold_under_a_capped_instruction_set(capped_environment: dict[str, str], tmp_path: Path) -> None:
    """This module's float32 and bfloat16 checks of the 96x64, 3-step case with a negative prompt, in a process
    whose XLA:CPU may use nothing newer than SSE4.2: other generated code (no FMA, narrower vectors), other
    rounding, the same bounds."""
    selection = f"{case_id(CASES[1])}-negative"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selection],
        env=capped_environment,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout, done.stdout[-2000:]
