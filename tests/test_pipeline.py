"""The JAX pipeline on the tiny model, four virtual CPU devices: sizes and step counts, determinism, distinctness."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from common.protocol import SCHEDULERS, GenerationParams, ResolvedParams, Scheduler, Shape, Size
from tests.test_parity import per_device
from worker import pipeline as pipeline_module
from worker.pipeline import (
    Conditioning,
    DeviceMismatch,
    InvalidShape,
    PipelineError,
    PipelineOptions,
    Schedule,
    SDXLPipeline,
    StepState,
    UnsupportedShape,
    layout,
)
from worker.schedulers import table

pytestmark = pytest.mark.compile

SIZE = Size(width=64, height=64)
MAX_STEPS = 3
GUIDANCE = 7.5
SHAPE = Shape(width=64, height=64, steps=2)


def ask(
    shape: Shape,
    prompt: str,
    negative_prompt: str = "",
    seed: int = 1,
    guidance_scale: float = 7.5,
    scheduler: str = "euler",
) -> ResolvedParams:
    """A job's parameters, as the gateway resolves them."""
    request = GenerationParams(prompt=prompt, negative_prompt=negative_prompt, guidance_scale=guidance_scale)
    return request.resolved(shape, seed, cast(Scheduler, scheduler))


# JAX reports every compile of an executable for a backend under this event (with its duration).
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def pipeline(tiny_model: Path) -> SDXLPipeline:
    loaded = SDXLPipeline.load(str(tiny_model), None, PipelineOptions(images_per_request=4, max_steps=MAX_STEPS))
    loaded.compile(SIZE)
    return loaded


@pytest.fixture(scope="module")
def fused(pipeline: SDXLPipeline) -> SDXLPipeline:
    """The same model without progress: one executable per size and variant runs the whole loop."""
    variant = pipeline.variant(report_progress=False)
    variant.compile(SIZE)
    return variant


@contextmanager
def counting_compiles() -> Iterator[list[str]]:
    """The names of the compile events JAX reports while the block runs."""
    events: list[str] = []

    def listen(event: str, duration_secs: float, **kwargs: str | int) -> None:
        if event == BACKEND_COMPILE:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_runs_on_four_devices_with_one_image_each(pipeline: SDXLPipeline) -> None:
    assert jax.local_device_count() == 4
    assert (pipeline.devices, pipeline.per_device) == (4, 1)
    assert pipeline.sizes == (SIZE,)
    assert pipeline.native_size == (64, 64)
    assert pipeline.max_steps == MAX_STEPS and pipeline.schedulers == SCHEDULERS


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Undeclared:
    latents: jax.Array


def test_named_inputs_declare_their_layout_per_field() -> None:
    """shard_map's specs come from the inputs' own fields; an argument that declares none is refused, not
    replicated by default (a per-image array replicated would give each device every image)."""
    per_image, replicated = PartitionSpec("data"), PartitionSpec()  # type: ignore[no-untyped-call]
    assert vars(layout(StepState)) == {"latents": per_image, "denoised": per_image}
    assert set(vars(layout(Schedule)).values()) == {replicated}
    assert vars(layout(Conditioning)) == {"prompt": per_image, "negative": per_image, "time_ids": per_image}
    with pytest.raises(TypeError, match=r"Undeclared.latents declares no layout"):
        layout(Undeclared)
    with pytest.raises(TypeError, match=r"shape \(4, 8\) must be a named input"):
        pipeline_module._layout_of(np.zeros((4, 8)))


def test_params_are_bfloat16_replicated(pipeline: SDXLPipeline) -> None:
    weights = jax.tree_util.tree_leaves(pipeline._params)
    assert weights and all(w.dtype == jnp.bfloat16 and w.sharding.is_fully_replicated for w in weights)
    assert all(len(w.addressable_shards) == 4 for w in weights)


@pytest.mark.parametrize("report_progress", [True, False], ids=["stepwise", "fused"])
def test_one_compiled_size_serves_every_step_count_and_scheduler_without_a_compile(
    pipeline: SDXLPipeline, fused: SDXLPipeline, report_progress: bool
) -> None:
    """Steps and scheduler are runtime values: 1, 2 and max_steps steps, each scheduler, guided or not, run on
    the executables compiled for the size; the listener does see a compile (a new small function)."""
    variant = pipeline if report_progress else fused
    with counting_compiles() as compiles:
        images = {
            (steps, scheduler, guidance): variant.generate(
                ask(
                    Shape(width=64, height=64, steps=steps),
                    "a cat",
                    seed=7,
                    guidance_scale=guidance,
                    scheduler=scheduler,
                )
            )
            for steps in (1, 2, MAX_STEPS)
            for scheduler in SCHEDULERS
            for guidance in (0.0, 7.5)
        }
    assert compiles == []
    assert len({image.tobytes() for image in images.values()}) > len(images) // 2  # the inputs were used
    with counting_compiles() as compiles:
        jax.jit(lambda x: x * 3)(np.arange(5)).block_until_ready()
    assert compiles == [BACKEND_COMPILE]


def test_generates_four_distinct_uint8_images(pipeline: SDXLPipeline) -> None:
    images = pipeline.generate(ask(SHAPE, "a cat"))
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    assert images.std() > 0
    assert len({image.tobytes() for image in images}) == 4


def test_same_seed_same_images_and_other_inputs_change_them(pipeline: SDXLPipeline) -> None:
    first = pipeline.generate(ask(SHAPE, "a cat", seed=2**32 - 1))
    assert np.array_equal(first, pipeline.generate(ask(SHAPE, "a cat", seed=2**32 - 1)))
    for changed in [
        pipeline.generate(ask(SHAPE, "a cat", seed=0)),
        pipeline.generate(ask(SHAPE, "a cat", "blurry", seed=2**32 - 1)),
        pipeline.generate(ask(SHAPE, "a dog", seed=2**32 - 1)),
    ]:
        assert not np.array_equal(first, changed)


def test_negative_prompts_are_encoded_once_each_and_kept_least_recently_used(pipeline: SDXLPipeline) -> None:
    negatives = pipeline._negatives
    first = pipeline.generate(ask(SHAPE, "a cat", "low quality", seed=4))
    assert "low quality" in negatives._cache
    with mock.patch.object(negatives, "_encode", side_effect=AssertionError("encoded again")):
        np.testing.assert_array_equal(pipeline.generate(ask(SHAPE, "a cat", "low quality", seed=4)), first)
    with mock.patch.object(negatives, "capacity", len(negatives)):
        oldest = next(iter(negatives._cache))
        pipeline.generate(ask(SHAPE, "a cat", "watermark", seed=4))
        assert oldest not in negatives._cache and len(negatives) == negatives.capacity


def test_without_guidance_the_prompt_decides_and_the_negative_prompt_is_unused(pipeline: SDXLPipeline) -> None:
    """Guidance at or below 1 is no classifier-free guidance, as in diffusers' PyTorch SDXL pipeline: the
    prompt alone conditions the UNet (before, guidance 0 ignored the prompt: one image for any prompt)."""
    cat = pipeline.generate(ask(SHAPE, "a cat", seed=5, guidance_scale=0.0))
    assert not np.array_equal(cat, pipeline.generate(ask(SHAPE, "a dog", seed=5, guidance_scale=0.0)))
    np.testing.assert_array_equal(pipeline.generate(ask(SHAPE, "a cat", "blurry", seed=5, guidance_scale=1.0)), cat)
    assert not np.array_equal(cat, pipeline.generate(ask(SHAPE, "a cat", seed=5, guidance_scale=1.5)))


def test_without_guidance_a_request_runs_one_unet_evaluation_per_step(pipeline: SDXLPipeline) -> None:
    """Counted from XLA's FLOPs of the compiled step against one UNet evaluation's."""
    assert pipeline.unet_evaluations(SHAPE, guidance_scale=0.0) == SHAPE.steps
    assert pipeline.unet_evaluations(SHAPE, guidance_scale=1.0) == SHAPE.steps
    assert pipeline.unet_evaluations(SHAPE, guidance_scale=7.5) == 2 * SHAPE.steps
    unguided = pipeline.flop_count(SHAPE, guidance=False)
    assert unguided.unet_per_image == SHAPE.steps * unguided.unet_per_sample
    assert pipeline.flop_count(SHAPE).unet_per_image == 2 * unguided.unet_per_image


def test_uncompiled_size_steps_past_the_maximum_and_unknown_schedulers_are_refused(pipeline: SDXLPipeline) -> None:
    with pytest.raises(UnsupportedShape, match="size 96x64 is not compiled here; compiled: 64x64"):
        pipeline.generate(ask(Shape(width=96, height=64, steps=2), "a cat"))
    with pytest.raises(UnsupportedShape, match="4 steps: this worker runs 1 to 3"):
        pipeline.generate(ask(Shape(width=64, height=64, steps=MAX_STEPS + 1), "a cat"))
    with pytest.raises(PipelineError, match="unknown scheduler 'ddim'"):
        pipeline.generate(ask(SHAPE, "a cat").model_copy(update={"scheduler": "ddim"}))


def test_size_off_the_model_grid_is_refused_at_compile(pipeline: SDXLPipeline) -> None:
    with pytest.raises(InvalidShape, match="multiples of 4"):
        pipeline.compile(Size(width=66, height=64))


def test_images_must_divide_over_devices(tiny_model: Path) -> None:
    with pytest.raises(DeviceMismatch, match="multiple of 4"):
        SDXLPipeline.load(str(tiny_model), None, PipelineOptions(images_per_request=6))


def test_default_size_is_native(pipeline: SDXLPipeline) -> None:
    assert pipeline.default_sizes() == (SIZE,)


def test_the_compiled_loop_reports_every_step_in_order(pipeline: SDXLPipeline, fused: SDXLPipeline) -> None:
    steps: list[int] = []
    images = pipeline.generate(ask(SHAPE, "progress", seed=5), on_step=steps.append)
    assert steps == [1, 2]  # once per step from the first device only, each after its step's work
    silent: list[int] = []
    np.testing.assert_array_equal(fused.generate(ask(SHAPE, "progress", seed=5), on_step=silent.append), images)
    assert silent == []


def pmap_images(pipeline: SDXLPipeline, shape: Shape, negative_prompt: str, seed: int, scheduler: str) -> np.ndarray:
    """A guided request run by `jax.pmap` of the pipeline's own per-device functions, parameters and inputs
    stacked on a leading device axis: the reference the jit and shard_map executables must match bit for bit."""
    pipe, d, size = pipeline._pipe, pipeline.devices, shape.size

    def stacked(tree: Any) -> Any:
        return per_device(tree, d)

    params = stacked(pipeline._params)
    negative = jax.pmap(functools.partial(pipeline_module._encode_negative, pipe))(
        params, stacked(pipeline._tokenize(negative_prompt)[None]), stacked(np.float32(1.0))
    )
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), pipeline.images_per_request))
    coefficients = table(scheduler, shape.steps, pipeline._scheduler)  # type: ignore[arg-type]
    schedule = pipeline_module.Schedule(
        table=stacked(coefficients.padded(pipeline.max_steps)),
        init_noise_sigma=stacked(np.float32(coefficients.init_noise_sigma)),
        guidance=stacked(np.float32(GUIDANCE)),
        steps=stacked(np.int32(shape.steps)),
    )
    variant = pipeline_module._Variant(pipe, size, cfg=True)
    begin = jax.pmap(pipeline._traced(pipeline_module._begin, variant))
    step = jax.pmap(pipeline._traced(pipeline_module._step, variant))
    finish = jax.pmap(functools.partial(pipeline_module._decode, pipe))
    ids = stacked(pipeline._tokenize("a lighthouse")[None])
    state, conditioning = begin(
        params, pipeline_module.Prompt(ids, negative, jnp.asarray(keys.reshape(d, -1, 2))), schedule
    )
    for i in range(shape.steps):
        state, _ = step(params, state, conditioning, schedule, stacked(np.int32(i)))
    return np.asarray(finish(params, state)).reshape(pipeline.images_per_request, size.height, size.width, 3)


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m_karras"])
def test_the_images_are_those_of_pmap_bit_for_bit(pipeline: SDXLPipeline, scheduler: str) -> None:
    """jit of shard_map over the mesh runs each device's share as pmap ran it: the same images, bit for bit
    (DPM-Solver++ 2M also carries the previous step's denoised estimate from step to step)."""
    shape = Shape(width=64, height=64, steps=MAX_STEPS)
    ours = pipeline.generate(ask(shape, "a lighthouse", "fog", seed=9, guidance_scale=GUIDANCE, scheduler=scheduler))
    np.testing.assert_array_equal(ours, pmap_images(pipeline, shape, "fog", 9, scheduler))
