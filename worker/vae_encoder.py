"""The VAE encoder as compiled executables: an init image (or an inpainting mask's masked image) into latents.

One executable per compiled size takes up to one image per device, `[devices, 3, H, W]` float32 in [-1, 1] split
over the mesh by image (the layout `common/input_images.to_model_input` makes, one image per row), as the engine's
decode takes one slot per device, and returns `[devices, 4, H / f, W / f]` float32 latents, times the VAE's
scaling factor: what the samplers start from (`worker/img2img.initial_latents`) and what the 9-channel inpainting
UNet reads as its masked-image latents. A row's latents come back on the device its pixels went to, so the engine
can hand them to its admit executable without a trip through the host (`encode_wave`); `encode` batches any
number of images over the devices and returns them on the host.

Where this differs from diffusers (0.39):
- **The posterior's mean, not a sample.** diffusers' PyTorch SDXL img2img and inpainting pipelines call
  `retrieve_latents(vae.encode(image), generator)` with its default `sample_mode="sample"`, that is
  `latent_dist.sample(generator)` (mean + std * noise), and its Flax SD img2img pipeline likewise
  `latent_dist.sample(key)`; `latent_dist.mode()` (the mean) is what `sample_mode="argmax"` returns. Here the mean
  is taken: the same image gives the same latents on any device and any worker, without a key. The posterior
  of Stable Diffusion's VAEs is narrow (they were trained with a tiny KL weight), and the sampler adds the row's
  own noise to the latents anyway.
- **Float32.** SDXL's VAE config says `force_upcast: true`: diffusers encodes in float32 whatever the pipeline's
  dtype (float16 overflows). The encoder here computes in float32 too, on a float32 copy of the served encoder's
  weights (bfloat16, upcast once at start: the same values), where the decoder runs in bfloat16: an encode runs
  once per image, not once per step.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common.protocol import Size
from worker.pipeline import _IMAGES, _PER_IMAGE, SDXLPipeline, UnsupportedShape, _Clock

logger = logging.getLogger(__name__)

RGB = 3
# The VAE's parameters an encode reads (the decoder's are not handed to it: each input array is flattened and
# checked at every call).
ENCODER_PARTS = ("encoder", "quant_conv")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Pixels:
    """Up to one image per device, the VAE's input: float32 [devices, 3, H, W] in [-1, 1], split by image."""

    pixels: jax.Array = field(metadata=_PER_IMAGE)


class VaeEncoder:
    """The VAE encoder of a loaded pipeline, compiled per image size (`compile`), run per wave of up to one image
    per device (`encode_wave`) or over any number of images (`encode`). Nothing compiles after `compile`."""

    def __init__(self, pipeline: SDXLPipeline) -> None:
        self._pipeline = pipeline
        vae = pipeline._pipe.vae
        self._vae = vae.clone(dtype=jnp.float32)  # force_upcast: the same module computing in float32
        self._factor = int(pipeline._pipe.vae_scale_factor)
        self._channels = int(vae.config.latent_channels)
        self._scaling_factor = float(vae.config.scaling_factor)
        served = pipeline._params["vae"]
        # force_upcast: a float32 copy of the encoder's weights (small: the decoder's are not copied), made once
        # here; upcast inside the executable, they were materialised again at every call.
        self._params = {"vae": {part: _float32(served[part]) for part in ENCODER_PARTS}}
        self._compiled: dict[Size, Any] = {}

    @property
    def sizes(self) -> tuple[Size, ...]:
        """The sizes compiled so far, in compile order."""
        return tuple(self._compiled)

    def latent_shape(self, size: Size) -> tuple[int, int, int]:
        """One image's latents at `size`: (channels, height / f, width / f)."""
        return self._channels, size.height // self._factor, size.width // self._factor

    def compile(self, size: Size, clock: _Clock) -> float:
        """Compile the executable for `size` (time added to `clock`) unless it is, and run it once (so the first
        request pays no first-run cost); returns the warm-up's seconds (0 when it was compiled already)."""
        if size in self._compiled:
            return 0.0
        self._pipeline.check_size(size)
        pipeline = self._pipeline
        encode = functools.partial(_encode, self._vae, self._scaling_factor)
        self._compiled[size] = pipeline._compile(clock, encode, _IMAGES, self._params, self._blank(size))
        started = time.perf_counter()
        self.encode_wave([None] * pipeline.devices, size).block_until_ready()
        logger.info("VAE encoder compiled for %s", size)
        return time.perf_counter() - started

    def encode_wave(self, pixels: Sequence[np.ndarray | None], size: Size) -> jax.Array:
        """Encode up to one image per device: `pixels[d]` (float32 [1, 3, H, W] or [3, H, W] at `size`, or None for
        no image) goes to device d. Returns the latents on the devices, [devices, 4, H / f, W / f] float32 split
        by image, row d on device d (a row without an image holds the latents of a mid-grey one)."""
        executable = self._executable(size)
        devices = self._pipeline.devices
        if len(pixels) != devices:
            raise ValueError(f"a wave has one entry per device ({devices}), got {len(pixels)}")
        batch = np.zeros((devices, RGB, size.height, size.width), np.float32)
        for device, image in enumerate(pixels):
            if image is not None:
                batch[device] = _one_image(image, size)
        latents: jax.Array = executable(self._params, self._put(batch))
        return latents

    def encode(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """The latents of each image (each float32 [1, 3, H, W] or [3, H, W], all of one compiled size), on the
        host: float32 [n, 4, H / f, W / f], image i's in row i. The images go over the devices in waves of one
        per device, every wave dispatched before the first is read."""
        if not pixels:
            raise ValueError("no image to encode")
        size = Size(width=int(pixels[0].shape[-1]), height=int(pixels[0].shape[-2]))
        devices = self._pipeline.devices
        waves = [list(pixels[start : start + devices]) for start in range(0, len(pixels), devices)]
        outputs = [self.encode_wave(wave + [None] * (devices - len(wave)), size) for wave in waves]
        stacked = np.concatenate([np.asarray(output) for output in outputs])
        return stacked[: len(pixels)]

    def _executable(self, size: Size) -> Any:
        executable = self._compiled.get(size)
        if executable is None:
            compiled = ", ".join(map(str, self._compiled)) or "none"
            raise UnsupportedShape(f"the VAE encoder is not compiled for {size}; compiled: {compiled}")
        return executable

    def _blank(self, size: Size) -> Pixels:
        return self._put(np.zeros((self._pipeline.devices, RGB, size.height, size.width), np.float32))

    def _put(self, batch: np.ndarray) -> Pixels:
        return Pixels(pixels=self._pipeline._put(batch, _IMAGES))


def _float32(weights: Any) -> Any:
    """`weights` (a tree of device arrays) as float32, on the same devices, laid out as they are."""
    return jax.tree_util.tree_map(lambda w: w.astype(jnp.float32), weights)


def _one_image(image: np.ndarray, size: Size) -> np.ndarray:
    """`image` as [3, H, W] float32, or a ValueError naming the shape it has and the one it should have."""
    shaped = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
    if shaped.shape != (RGB, size.height, size.width):
        raise ValueError(
            f"an image to encode is {list(image.shape)}; at {size} it must be [1, 3, {size.height}, {size.width}]"
        )
    return np.asarray(shaped, np.float32)


def _encode(vae: Any, scaling_factor: float, params: dict[str, Any], batch: Pixels) -> jax.Array:
    """One device's share: the posterior's mean in float32 (on float32 weights), NCHW, times the scaling factor."""
    posterior = vae.apply({"params": params["vae"]}, batch.pixels, method=vae.encode).latent_dist
    mean: jax.Array = posterior.mean.transpose(0, 3, 1, 2)  # diffusers' Flax VAE is channels-last inside
    scaled: jax.Array = mean * jnp.float32(scaling_factor)
    return scaled
