"""Where an engine row starts: text-to-image from pure noise over its whole schedule, image-to-image and inpainting
from an encoded input image part way down it (worker/img2img.py), all as the same few arrays the admit executable
writes to the row's slot.

A request's `RowStart` holds its table (the rows it runs, padded to `max_steps`: the steps that strength skips
never reach the device), the two weights of its initial latents (`image_weight * encoded + noise_scale * noise`),
its encoded image on every device and its latent mask (ones unless it inpaints: the step's blend is then the
identity). A text row's encoded image is zeros and its `image_weight` 0, so its initial latents are `noise *
init_noise_sigma` exactly, as before images. The image is encoded once per request, the same image on every device
(`VaeEncoder.encode_wave`): each device then holds the latents its own rows read, and the devices without a row
encode in parallel with those that have one, at no extra wall time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import jax
import numpy as np

from common.input_images import resize_mask_to, resize_to, to_model_input
from common.protocol import Size
from common.strength import StrengthError
from worker.img2img import (
    LATENT_CHANNELS,
    Start,
    img2img_start,
    inpaint_start,
    latent_mask,
    masked_image,
    text_start,
)
from worker.inpainting_model import is_inpainting
from worker.pipeline import _IMAGES, PipelineError, SDXLPipeline, _Clock
from worker.pipeline_protocol import ImageInput
from worker.schedulers import Table
from worker.vae_encoder import VaeEncoder

logger = logging.getLogger(__name__)


class ImageRefused(PipelineError):
    """An input image a row cannot start from: a strength outside 0..1 or one that runs no step, a mask that
    repaints nothing at latent size, an array of the wrong shape."""


@dataclass(frozen=True)
class RowStart:
    """A request's start, on the devices: `steps` (the denoising steps its rows run), its `table` ([max_steps,
    ROW_WIDTH], replicated), the weights `image_weight` and `noise_scale` (float32 scalars, replicated), and per
    device its `encoded` image ([devices, 4, h, w]), the latents its slot keeps (`kept`: the encoded image, which the
    base UNet's blend goes back to, or for a 9-channel inpainting UNet the masked image's, its input at every step)
    and its latent `mask` ([devices, 1, h, w], 1 = repaint), split by image."""

    steps: int
    table: jax.Array
    image_weight: jax.Array
    noise_scale: jax.Array
    encoded: jax.Array
    kept: jax.Array
    mask: jax.Array


class RowStarts:
    """Makes `RowStart`s for a pipeline's compiled sizes: the VAE encoder per size (`compile`), and per size the
    blank image (zeros) and mask (ones) that text rows carry."""

    def __init__(self, pipeline: SDXLPipeline) -> None:
        self._pipeline = pipeline
        self._encoder = VaeEncoder(pipeline)
        self._factor = int(pipeline._pipe.vae_scale_factor)
        self._inpainting = is_inpainting(pipeline)
        self._blanks: dict[Size, tuple[jax.Array, jax.Array]] = {}

    @property
    def encoder(self) -> VaeEncoder:
        """The VAE encoder the image rows start from."""
        return self._encoder

    def compile(self, size: Size, clock: _Clock) -> float:
        """Compile the encoder for `size` (timed on `clock`) and run it once; returns the warm-up's seconds."""
        warm_up_s = self._encoder.compile(size, clock)
        if size not in self._blanks:
            devices, (height, width) = self._pipeline.devices, self._latent_size(size)
            self._blanks[size] = (
                self._per_device(np.zeros((devices, LATENT_CHANNELS, height, width), np.float32)),
                self._per_device(np.ones((devices, 1, height, width), np.float32)),
            )
        return warm_up_s

    def text(self, size: Size, table: Table) -> RowStart:
        """Text-to-image: pure noise at the table's initial scale, every step, no image, nothing to keep."""
        encoded, mask = self._blanks[size]
        return self._row_start(text_start(table), encoded, encoded, mask)

    def image(self, size: Size, table: Table, image: ImageInput) -> RowStart:
        """Image-to-image (no mask) or inpainting: ImageRefused for a strength that runs no step at the table's
        step count, a mask that repaints nothing at latent size or arrays of the wrong shape."""
        _check_arrays(image)
        start = _start(table, image)
        pixels = to_model_input(resize_to(image.image, size.width, size.height))
        encoded = self._encode(pixels, size)
        if image.mask is None:
            return self._row_start(start, encoded, encoded, self._blanks[size][1])
        mask = resize_mask_to(image.mask, size.width, size.height)
        kept = self._encode(masked_image(pixels, mask), size) if self._inpainting else encoded
        return self._row_start(start, encoded, kept, self._mask(size, mask))

    def _encode(self, pixels: np.ndarray, size: Size) -> jax.Array:
        """The image's latents on every device."""
        return self._encoder.encode_wave([pixels] * self._pipeline.devices, size)

    def _mask(self, size: Size, mask: np.ndarray) -> jax.Array:
        """The latent mask of a pixel mask at `size`, on every device; ImageRefused if it repaints nothing."""
        latent = latent_mask(mask, self._factor)
        if not latent.any():
            raise ImageRefused(
                f"mask: nothing to repaint at {size}: the mask's repainted region vanishes at the model's latent "
                f"resolution (every {self._factor}th pixel is read); paint a region at least {self._factor} pixels "
                "wide, or send no mask for image-to-image"
            )
        return self._per_device(np.broadcast_to(latent[None], (self._pipeline.devices, *latent.shape)))

    def _row_start(self, start: Start, encoded: jax.Array, kept: jax.Array, mask: jax.Array) -> RowStart:
        put = self._pipeline._put
        return RowStart(
            steps=start.steps,
            table=put(start.padded(self._pipeline.max_steps)),
            image_weight=put(np.float32(start.image_weight)),
            noise_scale=put(np.float32(start.noise_scale)),
            encoded=encoded,
            kept=kept,
            mask=mask,
        )

    def _latent_size(self, size: Size) -> tuple[int, int]:
        return size.height // self._factor, size.width // self._factor

    def _per_device(self, array: np.ndarray) -> jax.Array:
        return self._pipeline._put(np.ascontiguousarray(array), _IMAGES)


def _start(table: Table, image: ImageInput) -> Start:
    """diffusers' start for the request: img2img's without a mask, inpainting's with one."""
    try:
        return img2img_start(table, image.strength) if image.mask is None else inpaint_start(table, image.strength)
    except StrengthError as error:
        raise ImageRefused(str(error)) from error  # it names the field


def _check_arrays(image: ImageInput) -> None:
    """ImageRefused unless the image is uint8 [H, W, 3] and the mask (if any) bool [H, W] of the same H and W."""
    pixels, mask = image.image, image.mask
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageRefused(f"image: uint8 [height, width, 3] expected, got {pixels.dtype} {list(pixels.shape)}")
    if mask is not None and (mask.dtype != np.bool_ or mask.shape != pixels.shape[:2]):
        raise ImageRefused(
            f"mask: bool [{pixels.shape[0]}, {pixels.shape[1]}] (the image's size) expected, "
            f"got {mask.dtype} {list(mask.shape)}"
        )
