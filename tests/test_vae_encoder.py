"""The compiled VAE encoder on the tiny model, four virtual CPU devices: shapes, determinism, the same latents on
every device, parity with diffusers' Flax `AutoencoderKL.encode`, no compile after warm-up, and a decode of what
it encodes."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from common.input_images import to_model_input
from common.protocol import Size
from tests.test_pipeline import BACKEND_COMPILE, counting_compiles
from worker.pipeline import PipelineOptions, SDXLPipeline, StepState, UnsupportedShape, _Clock, _decode
from worker.quiet import silence_flax_deprecation
from worker.vae_encoder import ENCODER_PARTS, VaeEncoder

pytestmark = pytest.mark.compile

SIZE = Size(width=64, height=64)
LATENTS = (4, 32, 32)  # the tiny VAE downsamples by 2


def picture(seed: int, size: Size = SIZE) -> np.ndarray:
    """A random picture as the encoder's input, float32 [1, 3, H, W] in [-1, 1]."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size.height, size.width, 3), dtype=np.uint8)
    return to_model_input(pixels)


@pytest.fixture(scope="module")
def pipeline(tiny_model: Path) -> SDXLPipeline:
    """The tiny model loaded and replicated; nothing of the pipeline's own is compiled."""
    return SDXLPipeline.load(str(tiny_model), None, PipelineOptions(images_per_request=4, max_steps=1))


@pytest.fixture(scope="module")
def encoder(pipeline: SDXLPipeline) -> VaeEncoder:
    compiled = VaeEncoder(pipeline)
    clock = _Clock()
    assert compiled.compile(SIZE, clock) > 0  # warmed up
    assert clock.compile_s > 0 and compiled.sizes == (SIZE,)
    assert compiled.compile(SIZE, clock) == 0.0  # once per size
    return compiled


def test_latents_are_float32_per_image_over_several_waves(encoder: VaeEncoder) -> None:
    latents = encoder.encode([picture(seed) for seed in range(5)])  # two waves on four devices
    assert latents.shape == (5, *LATENTS) and latents.dtype == np.float32
    assert np.isfinite(latents).all()
    assert len({row.tobytes() for row in latents}) == 5
    assert encoder.latent_shape(SIZE) == LATENTS


def test_the_same_image_gives_the_same_latents_every_time_and_on_every_device(encoder: VaeEncoder) -> None:
    image, other = picture(1), picture(2)
    once = encoder.encode([image])
    np.testing.assert_array_equal(encoder.encode([image]), once)
    everywhere = np.asarray(encoder.encode_wave([image] * 4, SIZE))
    for device in range(4):
        np.testing.assert_array_equal(everywhere[device], once[0], err_msg=f"device {device}")
    # Beside other images, on another device, in another wave: the same latents.
    mixed = encoder.encode([other, other, other, image, other, image])
    np.testing.assert_array_equal(mixed[3], once[0])
    np.testing.assert_array_equal(mixed[5], once[0])


def test_a_wave_leaves_each_rows_latents_on_its_device(encoder: VaeEncoder) -> None:
    """Row d comes back on device d, so the engine can admit it there without the host."""
    images = [picture(10 + device) for device in range(4)]
    wave = encoder.encode_wave([images[0], None, images[2], None], SIZE)
    assert wave.shape == (4, *LATENTS)
    shards = sorted(wave.addressable_shards, key=lambda shard: shard.index[0].start)
    assert [shard.device for shard in shards] == jax.local_devices()
    np.testing.assert_array_equal(np.asarray(shards[2].data)[0], encoder.encode([images[2]])[0])


def diffusers_encode(folder: Path, pixels: np.ndarray, cast: Any = np.float32) -> np.ndarray:
    """diffusers' Flax VAE on the host: its float32 module and the folder's weights (cast to `cast` and back),
    `apply(..., method=encode)`, the posterior's mean NCHW, times the scaling factor."""
    silence_flax_deprecation()
    from diffusers import FlaxAutoencoderKL

    vae, params = FlaxAutoencoderKL.from_pretrained(str(folder / "vae"))
    weights = jax.tree_util.tree_map(lambda w: np.asarray(w).astype(cast).astype(np.float32), params)

    def mean(weights: Any, pixels: np.ndarray) -> Any:
        return vae.apply({"params": weights}, pixels, method=vae.encode).latent_dist.mean

    scaled: np.ndarray = np.asarray(jax.jit(mean)(weights, pixels)).transpose(0, 3, 1, 2) * vae.config.scaling_factor
    return scaled


def test_parity_with_diffusers_flax_encode(encoder: VaeEncoder, tiny_model: Path) -> None:
    """Against the served weights (bfloat16, computed in float32) to float32 rounding; against the float32 weights
    on disk within what rounding them to bfloat16 moves."""
    images = np.concatenate([picture(20), picture(21)])
    ours = encoder.encode(list(images))
    served = diffusers_encode(tiny_model, images, cast=jax.numpy.bfloat16)
    np.testing.assert_allclose(ours, served, rtol=1e-4, atol=1e-4 * np.abs(served).max())
    on_disk = diffusers_encode(tiny_model, images)
    error = np.abs(ours - on_disk).max() / np.abs(on_disk).max()
    assert 0 < error < 2e-2, error  # bfloat16 has 8 significant bits: 2**-8 per weight, summed over layers


def test_the_encoder_reads_a_float32_copy_of_the_served_encoder_weights_made_once(
    encoder: VaeEncoder, pipeline: SDXLPipeline
) -> None:
    """force_upcast: the bfloat16 encoder weights upcast once (the same values, laid out as served, so no call moves
    them), and the executable reads no other weights; the served weights stay bfloat16."""
    ours = flatten_dict(encoder._params["vae"])  # type: ignore[no-untyped-call]
    served = flatten_dict({part: pipeline._params["vae"][part] for part in ENCODER_PARTS})  # type: ignore[no-untyped-call]
    assert ours.keys() == served.keys()
    for name, weight in ours.items():
        assert weight.dtype == np.float32 and served[name].dtype == jax.numpy.bfloat16, name
        assert weight.sharding == served[name].sharding, name
        np.testing.assert_array_equal(np.asarray(weight), np.asarray(served[name]).astype(np.float32))


def test_no_compile_after_warm_up_for_other_images(encoder: VaeEncoder) -> None:
    with counting_compiles() as compiles:
        encoder.encode([picture(seed) for seed in range(30, 37)])
        encoder.encode_wave([picture(40), None, None, picture(41)], SIZE).block_until_ready()
    assert compiles == []
    with counting_compiles() as compiles:
        jax.jit(lambda x: x + 2)(np.arange(3)).block_until_ready()
    assert compiles == [BACKEND_COMPILE]  # the listener does see a compile


def test_decoding_what_it_encodes_gives_back_the_images_shape(encoder: VaeEncoder, pipeline: SDXLPipeline) -> None:
    latents = jax.numpy.asarray(encoder.encode([picture(50), picture(51)]))
    decode = jax.jit(functools.partial(_decode, pipeline._pipe))
    images = np.asarray(decode(pipeline._step_params.finish, StepState(latents, latents)))
    assert images.shape == (2, SIZE.height, SIZE.width, 3) and images.dtype == np.uint8


def test_a_size_not_compiled_or_a_wrong_shape_is_refused(encoder: VaeEncoder) -> None:
    with pytest.raises(UnsupportedShape, match=r"not compiled for 128x128; compiled: 64x64"):
        encoder.encode([picture(1, Size(width=128, height=128))])
    with pytest.raises(ValueError, match=r"an image to encode is \[1, 3, 64, 32\]"):
        encoder.encode([picture(1), picture(1, Size(width=32, height=64))])
    with pytest.raises(ValueError, match="one entry per device"):
        encoder.encode_wave([picture(1)], SIZE)
    with pytest.raises(ValueError, match="no image"):
        encoder.encode([])
