"""What kind of SDXL model a pipeline serves: base (a UNet of 4 input channels) or inpainting (9).

An inpainting UNet takes `[scaled latents, mask, masked-image latents]` on the channel axis
(`worker/img2img.inpainting_unet_input`): it cannot run text-to-image, whose rows have neither a mask nor a masked
image. Served as it is today, such a model fails at start, in the first compile, with a broadcast error deep in
the sampler update (the text-to-image latents are drawn with the UNet's 9 input channels, its prediction has 4):
`check_text_to_image` says so in words, before anything is compiled.

A worker tells its kinds before the weights load (`kinds_before_loading`), so that while it warms it advertises
what it will run: from a local folder's `unet/config.json`, or that one small file of a hub repository; for a
single-file checkpoint, from its header, where the shape of the first convolution's weight gives the channels
(nothing is read but the header). Only the row engine takes input images: an inpainting model under
`--engine request` would run nothing, and `check_engine` refuses it at start.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from common.config import ConfigError
from common.protocol import REQUEST_KINDS, RequestKind
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


def kinds_of_unet(in_channels: int) -> tuple[RequestKind, ...]:
    """The kinds of request a UNet of `in_channels` input channels runs: inpainting only with 9, else all three."""
    return ("inpainting",) if in_channels == INPAINTING_IN_CHANNELS else REQUEST_KINDS


def kinds_before_loading(model: str, revision: str | None) -> tuple[RequestKind, ...] | None:
    """The kinds of request `model` runs, from its `unet/config.json` alone (a local folder's, or a hub
    repository's: that file only, as the load would fetch it) or a single file's header. None where they cannot be
    read so: a folder or repository without the file, a hub that does not answer, a file that is no SDXL checkpoint
    (the load says what is wrong)."""
    path = Path(model).expanduser()
    if path.is_file():
        return _single_file_kinds(path)
    config = path / "unet" / "config.json" if path.is_dir() else _hub_unet_config(model, revision)
    try:
        in_channels = json.loads(config.read_text())["in_channels"] if config is not None else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.info("the model's kind is known once it is loaded (%s: %s)", config, exc)
        return None
    return kinds_of_unet(int(in_channels)) if isinstance(in_channels, int) else None


def _single_file_kinds(path: Path) -> tuple[RequestKind, ...] | None:
    from worker.checkpoints import CheckpointError, single_file_in_channels

    try:
        return kinds_of_unet(single_file_in_channels(path))
    except CheckpointError as exc:
        logger.info("the model's kind is known once it is loaded (%s)", exc)
        return None


def _hub_unet_config(repo: str, revision: str | None) -> Path | None:
    if Path(repo).is_absolute() or repo.startswith(".") or repo.count("/") != 1:
        return None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, "unet/config.json", revision=revision))
    except Exception as exc:  # hub errors have many types (offline, refused, 401, 404): the load reports them
        logger.info("the model's kind is known once it is loaded (the hub: %s)", type(exc).__name__)
        return None


class NoKindOnThisEngine(ConfigError):
    """The model runs no kind of request under the engine asked for (an inpainting model, one request at a time)."""


def check_engine(model: str, kinds: Sequence[RequestKind], engine: str) -> None:
    """NoKindOnThisEngine, naming the fix, for an inpainting-only model under `--engine request`, which runs
    text-to-image only: the worker would advertise no kind of request and never be given a job."""
    if engine == "request" and "text-to-image" not in kinds:
        raise NoKindOnThisEngine(
            f"--model {model} is an inpainting model (inpainting requests only), and --engine request runs "
            "text-to-image only; serve it with --engine rows"
        )
