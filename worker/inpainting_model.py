"""What kind of SDXL model a pipeline serves: base (a UNet of 4 input channels) or inpainting (9).

An inpainting UNet takes `[scaled latents, mask, masked-image latents]` on the channel axis
(`worker/img2img.inpainting_unet_input`): it cannot run text-to-image, whose rows have neither a mask nor a masked
image. Served as it is today, such a model fails at start, in the first compile, with a broadcast error deep in
the sampler update (the text-to-image latents are drawn with the UNet's 9 input channels, its prediction has 4):
`check_text_to_image` says so in words, before anything is compiled.
"""

from __future__ import annotations

import logging

from worker.img2img import INPAINTING_IN_CHANNELS
from worker.pipeline import PipelineError, SDXLPipeline

logger = logging.getLogger(__name__)


class InpaintingOnly(PipelineError):
    """A request (or a compile) of text-to-image on an inpainting model."""


def unet_in_channels(pipeline: SDXLPipeline) -> int:
    """The UNet's input channels: 4 for SDXL base, 9 for an inpainting model."""
    return int(pipeline._pipe.unet.config.in_channels)


def is_inpainting(pipeline: SDXLPipeline) -> bool:
    """Whether the pipeline's UNet is an inpainting one (9 input channels)."""
    return unet_in_channels(pipeline) == INPAINTING_IN_CHANNELS


def check_text_to_image(pipeline: SDXLPipeline) -> None:
    """InpaintingOnly unless the model can run text-to-image (and image-to-image, which runs the same UNet): an
    inpainting UNet needs a mask and a masked image with every step."""
    if is_inpainting(pipeline):
        raise InpaintingOnly(
            f"this is an inpainting model (its UNet takes {INPAINTING_IN_CHANNELS} input channels: latents, mask "
            "and masked image): it runs inpainting requests only, not text-to-image or image-to-image"
        )
