"""Image-to-image and inpainting as arithmetic over the samplers' tables (worker/schedulers.py), as diffusers' SDXL
img2img and inpainting pipelines do it (diffusers 0.39, `StableDiffusionXLImg2ImgPipeline`,
`StableDiffusionXLInpaintPipeline`).

- **Where a row starts.** `strength` skips the first `start_step(steps, strength)` steps of the full schedule (the
  schedule of `steps` steps is built, then cut, as diffusers' `get_timesteps` with `denoising_start=None`; the rule
  is common/strength.py's, which the gateway checks too); the row runs the rest. Its initial latents are the encoded
  image noised to the first step it runs: `encoded + noise * sigma_start`, in the tables' sigma space, for every
  sampler here: diffusers' Euler adds `noise * sigma` (`EulerDiscreteScheduler.add_noise`), its DPM-Solver++
  `alpha_t * x0 + sigma_t * noise` in the variance-preserving space, which is the same latent times the tables'
  C_IN, `1 / sqrt(sigma**2 + 1)`. The img2img pipeline never multiplies by `init_noise_sigma`: at strength 1 its
  start is `encoded + noise * sigma_max`, not text-to-image's `noise * init_noise_sigma` (for SDXL's Euler,
  `sqrt(sigma_max**2 + 1)`), and the image still shows through. The inpainting pipeline at strength 1 starts from
  pure noise, `noise * init_noise_sigma`, as text-to-image does. `img2img_start` and `inpaint_start` say which, as a
  `Start`.
- **The first step runs first order.** DPM-Solver++ 2M's table rows extrapolate from the previous step's
  prediction; a row that starts at step k has none (diffusers' multistep state starts empty at `begin_index`), so
  the first row it runs is made first order (`C0 = 1`, `C1 = 0`). Euler's rows are first order already.
- **Inpainting with the base (4-channel) UNet**: after each step, the region the mask keeps is put back to the
  encoded image noised to the next step's level, `(1 - mask) * (encoded + noise * sigma_next) + mask * x`
  (`inpaint_blend`). The next level is the row's SIGMA_NEXT column, 0 after the last step: the kept region ends
  exactly on the encoded image, as diffusers' pipeline leaves it un-noised after its last step.
- **The 9-channel inpainting UNet** takes `[scaled latents, mask, masked-image latents]` on the channel axis
  (`inpainting_unet_input`), the masked image being the image with the repainted region set to 0 (`masked_image`),
  and needs no blend. Its mask and the blend's are the pixel mask at latent size by nearest neighbour
  (`latent_mask`, PyTorch's `interpolate` rule).

Latents here are NCHW, as the pipeline's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TypeVar

import jax
import numpy as np

from common.strength import check_strength, start_step
from worker.schedulers import C0, C1, SIGMA, SIGMA_NEXT, Table

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 4
# The 9-channel inpainting UNet's input: the latents, the mask (one channel) and the masked image's latents.
INPAINTING_IN_CHANNELS = 2 * LATENT_CHANNELS + 1
# The step's arrays: numpy on the host and in tests, JAX in the compiled step.
ArrayT = TypeVar("ArrayT", np.ndarray, jax.Array)


@dataclass(frozen=True)
class Start:
    """Where an image-conditioned row begins: the table `rows` it runs (read-only float32, padded as any table by
    the engine) and its initial latents `image_weight * encoded + noise_scale * noise`. Text-to-image is
    `image_weight` 0 and `noise_scale` the table's `init_noise_sigma` over the whole table (`text_start`)."""

    rows: np.ndarray
    start: int
    image_weight: float
    noise_scale: float

    @property
    def steps(self) -> int:
        """The steps the row runs."""
        return int(self.rows.shape[0])

    def padded(self, length: int) -> np.ndarray:
        """The rows followed by identity rows up to `length`, as `Table.padded`."""
        return Table(init_noise_sigma=self.noise_scale, rows=self.rows).padded(length)


def text_start(table: Table) -> Start:
    """Text-to-image as a `Start`: pure noise at the table's initial scale, every row."""
    return Start(rows=table.rows, start=0, image_weight=0.0, noise_scale=table.init_noise_sigma)


def img2img_start(table: Table, strength: float) -> Start:
    """diffusers' SDXL img2img: the encoded image noised to the first step run, at any strength (at strength 1 too)."""
    check_strength(table.steps, strength)
    start = start_step(table.steps, strength)
    return Start(rows=start_rows(table, start), start=start, image_weight=1.0, noise_scale=_sigma(table, start))


def inpaint_start(table: Table, strength: float) -> Start:
    """diffusers' SDXL inpainting: as img2img, except at strength 1, where it starts from pure noise at the table's
    initial scale, as text-to-image (the kept region comes back through `inpaint_blend`)."""
    start = img2img_start(table, strength)
    if strength == 1.0:
        return Start(rows=start.rows, start=0, image_weight=0.0, noise_scale=table.init_noise_sigma)
    return start


def _sigma(table: Table, start: int) -> float:
    return float(table.rows[start, SIGMA])


def start_rows(table: Table, start: int) -> np.ndarray:
    """The rows a row that skips `start` steps runs: the table's from `start`, the first one made first order
    (there is no previous prediction to extrapolate from). Read-only, as the table's."""
    if not 0 <= start < table.steps:
        raise ValueError(f"start must be between 0 and {table.steps - 1}, got {start}")
    rows = table.rows[start:].copy()
    rows[0, C0], rows[0, C1] = 1.0, 0.0
    rows.flags.writeable = False
    return rows


def initial_latents(encoded: ArrayT, noise: ArrayT, image_weight: float, noise_scale: float) -> ArrayT:
    """A row's first latents: `image_weight * encoded + noise_scale * noise` (`encoded` is the VAE's latents times
    its scaling factor; `noise` the row's Gaussian draw, the same draw text-to-image makes from the same key)."""
    return image_weight * encoded + noise_scale * noise


def inpaint_blend(x: ArrayT, encoded: ArrayT, noise: ArrayT, mask: ArrayT, row: ArrayT) -> ArrayT:
    """After a step with table row `row`: the region the latent mask keeps (0) goes back to the encoded image at the
    next step's noise level, the repainted region (1) keeps the step's latents. `noise` is the row's initial draw
    (diffusers reuses it at every step). A mask of ones leaves `x` exactly as it is, so rows that do not inpaint can
    share the step."""
    kept = encoded + noise * row[SIGMA_NEXT]
    blended: ArrayT = (1 - mask) * kept + mask * x
    return blended


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """A pixel mask (bool [H, W], True = repaint) at latent size ([1, H // factor, W // factor], float32 0 or 1), by
    PyTorch's nearest-neighbour rule as diffusers' `prepare_mask_latents` calls `interpolate`: source index
    `min(floor(i * in / out), in - 1)`, the scale in float32. For a whole factor that is every `factor`-th pixel
    from the first: a stroke thinner than `factor` pixels can vanish, as it does in diffusers."""
    height, width = mask.shape
    rows = _nearest(height, height // factor)
    cols = _nearest(width, width // factor)
    return np.asarray(mask[np.ix_(rows, cols)], dtype=np.float32)[None]


def _nearest(size_in: int, size_out: int) -> np.ndarray:
    scale = np.float32(size_in) / np.float32(size_out)
    sources = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.asarray(np.minimum(sources, size_in - 1))


def masked_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The 9-channel UNet's masked image: the VAE input (float32 [1, 3, H, W] in [-1, 1]) with the repainted region
    set to 0, mid-grey (diffusers: `image * (mask < 0.5)`)."""
    return np.asarray(image * ~mask[None, None], dtype=np.float32)


def inpainting_unet_input(scaled_latents: ArrayT, mask: ArrayT, masked_latents: ArrayT) -> ArrayT:
    """The 9-channel inpainting UNet's input: the step's scaled latents (`x * C_IN`), the latent mask and the masked
    image's latents (times the VAE's scaling factor, not scaled by C_IN), on the channel axis (NCHW: axis -3)."""
    if isinstance(scaled_latents, np.ndarray):
        return np.concatenate([scaled_latents, mask, masked_latents], axis=-3)
    return jax.numpy.concatenate([scaled_latents, mask, masked_latents], axis=-3)
