"""The UNet attention switch: the same attention either way, scoped to its context, and it reaches the worker.

Tolerances. In float32 both paths compute the same function, so the images agree to one uint8 level (a
rounding step). In bfloat16, the dtype served, the paths round differently (diffusers' softmax runs in
bfloat16, `jax.nn.dot_product_attention` takes scores and softmax in float32), and on a random-weight
model a small change is amplified by guidance 7.5 and the steps, so their images are compared with the
float32 ones: the new path must be as close to float32 as the path it replaces (mean error within 25%
of it). The bfloat16 error itself is a few levels on this model.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlaxStableDiffusionXLPipeline
from diffusers.models.attention_flax import FlaxAttention

from common.config import ConfigError
from common.protocol import GenerationParams, Shape
from sdxl_serve.cli import build_parser
from sdxl_serve.up import Resolved, UpConfig, worker_argv
from worker.attention import attention, implementation, traced_with
from worker.cli import worker_config
from worker.config import WorkerConfig
from worker.pipeline import PipelineOptions, SDXLPipeline, _replicate
from worker.runner import Worker

SHAPE = Shape(width=64, height=64, steps=2)


def layer_and_inputs(dtype: Any, cross: bool = False) -> tuple[Any, Any, tuple[jax.Array, ...]]:
    """A UNet attention layer (4 heads of 16), its params, and its inputs: tokens, and a context if `cross`."""
    layer = FlaxAttention(query_dim=64, heads=4, dim_head=16, split_head_dim=True, dtype=dtype)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 256, 64), dtype)
    args = (x, jax.random.normal(jax.random.PRNGKey(1), (2, 77, 32), dtype)) if cross else (x,)
    return layer, layer.init(jax.random.PRNGKey(2), *args), args


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_dot_product_computes_the_layers_attention(cross: bool) -> None:
    layer, params, args = layer_and_inputs(jnp.float32, cross)
    reference = layer.apply(params, *args)
    spy = mock.Mock(wraps=jax.nn.dot_product_attention)
    with mock.patch.object(jax.nn, "dot_product_attention", spy), attention("dot_product"):
        swapped = jax.jit(layer.apply)(params, *args)
    assert spy.call_count == 1 and spy.call_args.kwargs["implementation"] == "xla"
    np.testing.assert_allclose(swapped, reference, rtol=1e-5, atol=1e-5)


def test_the_switch_acts_only_inside_its_context_and_thread() -> None:
    layer, params, (x,) = layer_and_inputs(jnp.bfloat16)
    reference = np.asarray(jax.jit(layer.apply)(params, x))
    spy = mock.Mock(wraps=jax.nn.dot_product_attention)
    other_thread: list[np.ndarray] = []
    with mock.patch.object(jax.nn, "dot_product_attention", spy):
        with attention("dot_product"):
            worker = threading.Thread(
                target=lambda: other_thread.append(np.asarray(jax.jit(lambda p, h: layer.apply(p, h) * 1)(params, x)))
            )
            worker.start()
            worker.join()
        after = np.asarray(jax.jit(lambda p, h: layer.apply(p, h) + 0)(params, x))
    assert spy.call_count == 0
    np.testing.assert_array_equal(other_thread[0], reference)
    np.testing.assert_array_equal(after, reference)


def test_traced_with_applies_whenever_the_function_is_traced() -> None:
    layer, params, (x,) = layer_and_inputs(jnp.float32)
    spy = mock.Mock(wraps=jax.nn.dot_product_attention)
    with mock.patch.object(jax.nn, "dot_product_attention", spy):
        jax.jit(traced_with("dot_product", layer.apply)).lower(params, x)
        jax.jit(traced_with("einsum", layer.apply)).lower(params, x)
    assert spy.call_count == 1


def test_unknown_attention_is_refused() -> None:
    with pytest.raises(ValueError, match="einsum, dot_product"), attention("flash"):  # type: ignore[arg-type]
        pass
    with pytest.raises(ConfigError, match="--attention"):
        WorkerConfig(attention="flash")  # type: ignore[arg-type]


def test_cpu_uses_xla_attention() -> None:
    assert implementation() == "xla"


@pytest.fixture(scope="module")
def images(tiny_model: Path) -> dict[str, np.ndarray]:
    """Images of one request from the tiny model: both paths, in bfloat16 (as served) and float32."""
    served = SDXLPipeline.load(str(tiny_model), None, PipelineOptions(images_per_request=4, report_progress=False))
    pipe, params = FlaxStableDiffusionXLPipeline.from_pretrained(
        str(tiny_model), split_head_dim=True, dtype=jnp.float32
    )
    full = SDXLPipeline(pipe, _replicate(params), PipelineOptions(images_per_request=4, report_progress=False))
    out = {}
    for precision, pipeline in (("bf16", served), ("f32", full)):
        for kind in ("einsum", "dot_product"):
            variant = pipeline.variant(attention=kind)
            variant.compile(SHAPE.size)
            out[f"{kind}-{precision}"] = variant.generate(
                GenerationParams(prompt="a cat", negative_prompt="blurry", guidance_scale=7.5).resolved(SHAPE, seed=3)
            ).astype(np.int32)
    return out


# The fixture compiles four pipelines (two precisions, two attention paths): minutes on a busy 2-core host.
@pytest.mark.compile
@pytest.mark.timeout(900)
def test_both_paths_give_the_same_images_in_float32(images: dict[str, np.ndarray]) -> None:
    assert np.abs(images["einsum-f32"] - images["dot_product-f32"]).max() <= 1


@pytest.mark.compile
@pytest.mark.timeout(900)
def test_in_bfloat16_dot_product_is_as_close_to_float32_as_einsum(images: dict[str, np.ndarray]) -> None:
    einsum_error = np.abs(images["einsum-bf16"] - images["einsum-f32"]).mean()
    dot_error = np.abs(images["dot_product-bf16"] - images["einsum-f32"]).mean()
    assert 0 < einsum_error < 5  # bfloat16's own error on this model, in uint8 levels
    assert dot_error <= 1.25 * einsum_error
    assert not np.array_equal(images["einsum-bf16"], images["dot_product-bf16"])  # the switch did act


def test_the_flag_reaches_the_worker_pipeline() -> None:
    # One request at a time: the row engine would compile around the loaded pipeline, which is a stand-in here.
    config = worker_config(build_parser().parse_args(["worker", "--attention", "dot_product", "--engine", "request"]))
    assert config.attention == "dot_product"
    with mock.patch.object(SDXLPipeline, "load") as load:
        load.return_value.request_kinds = ("text-to-image", "image-to-image", "inpainting")  # SDXL base's
        Worker(config, redis=mock.Mock())._default_loader()
    assert load.call_args.args[2].attention == "dot_product"
    up = build_parser().parse_args(["up", "--attention", "dot_product"])
    args = worker_argv(UpConfig.from_args(up), Resolved("redis://127.0.0.1:1/0", "redis", "model"))
    assert args[args.index("--attention") + 1] == "dot_product"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--attention", "flash"])
