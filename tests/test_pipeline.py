"""The JAX pipeline on the tiny model, four virtual CPU devices: shapes, determinism, distinctness."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.protocol import Shape
from worker.pipeline import DeviceMismatch, InvalidShape, SDXLPipeline, UnsupportedShape

SHAPE = Shape(width=64, height=64, steps=2)


@pytest.fixture(scope="module")
def pipeline(tiny_model: Path) -> SDXLPipeline:
    loaded = SDXLPipeline.load(str(tiny_model), None, images_per_request=4)
    loaded.compile(SHAPE)
    return loaded


def test_runs_on_four_devices_with_one_image_each(pipeline: SDXLPipeline) -> None:
    assert jax.local_device_count() == 4
    assert (pipeline.devices, pipeline.per_device) == (4, 1)
    assert pipeline.shapes == (SHAPE,)
    assert pipeline.native_size == (64, 64)


def test_params_are_bfloat16_replicated_with_float32_scheduler(pipeline: SDXLPipeline) -> None:
    params = pipeline._params
    weights = jax.tree_util.tree_leaves({k: v for k, v in params.items() if k != "scheduler"})
    assert weights and all(w.dtype == jnp.bfloat16 and w.shape[0] == 4 for w in weights)
    scheduler = [
        leaf for leaf in jax.tree_util.tree_leaves(params["scheduler"]) if jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    assert scheduler and all(leaf.dtype == jnp.float32 for leaf in scheduler)


def test_generates_four_distinct_uint8_images(pipeline: SDXLPipeline) -> None:
    images = pipeline.generate(SHAPE, "a cat", "", seed=1, guidance_scale=7.5)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    assert images.std() > 0
    assert len({image.tobytes() for image in images}) == 4


def test_same_seed_same_images_and_other_inputs_change_them(pipeline: SDXLPipeline) -> None:
    first = pipeline.generate(SHAPE, "a cat", "", seed=2**32 - 1, guidance_scale=7.5)
    assert np.array_equal(first, pipeline.generate(SHAPE, "a cat", "", seed=2**32 - 1, guidance_scale=7.5))
    for changed in [
        pipeline.generate(SHAPE, "a cat", "", seed=0, guidance_scale=7.5),
        pipeline.generate(SHAPE, "a cat", "blurry", seed=2**32 - 1, guidance_scale=7.5),
        pipeline.generate(SHAPE, "a dog", "", seed=2**32 - 1, guidance_scale=7.5),
    ]:
        assert not np.array_equal(first, changed)


def test_negative_prompts_are_encoded_once_each_and_kept_least_recently_used(pipeline: SDXLPipeline) -> None:
    negatives = pipeline._negatives
    first = pipeline.generate(SHAPE, "a cat", "low quality", seed=4, guidance_scale=7.5)
    assert "low quality" in negatives._cache
    with mock.patch.object(negatives, "_encode", side_effect=AssertionError("encoded again")):
        np.testing.assert_array_equal(pipeline.generate(SHAPE, "a cat", "low quality", 4, 7.5), first)
    with mock.patch.object(negatives, "capacity", len(negatives)):
        oldest = next(iter(negatives._cache))
        pipeline.generate(SHAPE, "a cat", "watermark", seed=4, guidance_scale=7.5)
        assert oldest not in negatives._cache and len(negatives) == negatives.capacity


def test_without_guidance_the_prompt_decides_and_the_negative_prompt_is_unused(pipeline: SDXLPipeline) -> None:
    """Guidance at or below 1 is no classifier-free guidance, as in diffusers' PyTorch SDXL pipeline: the
    prompt alone conditions the UNet (before, guidance 0 ignored the prompt: one image for any prompt)."""
    cat = pipeline.generate(SHAPE, "a cat", "", seed=5, guidance_scale=0.0)
    assert not np.array_equal(cat, pipeline.generate(SHAPE, "a dog", "", seed=5, guidance_scale=0.0))
    np.testing.assert_array_equal(pipeline.generate(SHAPE, "a cat", "blurry", seed=5, guidance_scale=1.0), cat)
    assert not np.array_equal(cat, pipeline.generate(SHAPE, "a cat", "", seed=5, guidance_scale=1.5))


def test_without_guidance_a_request_runs_one_unet_evaluation_per_step(pipeline: SDXLPipeline) -> None:
    """Counted from XLA's FLOPs of the compiled step against one UNet evaluation's."""
    assert pipeline.unet_evaluations(SHAPE, guidance_scale=0.0) == SHAPE.steps
    assert pipeline.unet_evaluations(SHAPE, guidance_scale=1.0) == SHAPE.steps
    assert pipeline.unet_evaluations(SHAPE, guidance_scale=7.5) == 2 * SHAPE.steps


def test_uncompiled_shape_is_refused(pipeline: SDXLPipeline) -> None:
    with pytest.raises(UnsupportedShape, match="64x64x2"):
        pipeline.generate(Shape(width=64, height=64, steps=5), "a cat", "", seed=1, guidance_scale=7.5)


def test_size_off_the_model_grid_is_refused_at_compile(pipeline: SDXLPipeline) -> None:
    with pytest.raises(InvalidShape, match="multiples of 4"):
        pipeline.compile(Shape(width=66, height=64, steps=2))


def test_images_must_divide_over_devices(tiny_model: Path) -> None:
    with pytest.raises(DeviceMismatch, match="multiple of 4"):
        SDXLPipeline.load(str(tiny_model), None, images_per_request=6)


def test_default_shapes_are_native_size(pipeline: SDXLPipeline) -> None:
    assert pipeline.default_shapes() == (Shape(width=64, height=64, steps=20),)


def test_the_compiled_loop_reports_every_step_in_order(pipeline: SDXLPipeline) -> None:
    steps: list[int] = []
    images = pipeline.generate(SHAPE, "progress", "", 5, 7.5, on_step=steps.append)
    assert steps == [1, 2]  # once per step from the first device only, each after its step's work
    quiet = pipeline.variant(report_progress=False)
    quiet.compile(SHAPE)
    silent: list[int] = []
    np.testing.assert_array_equal(quiet.generate(SHAPE, "progress", "", 5, 7.5, on_step=silent.append), images)
    assert silent == []
