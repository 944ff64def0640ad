"""A claimed job's input images (image-to-image, inpainting), read from where the gateway stored them and handed to
the engine before the job is admitted.

Only a worker that advertises `image_input` (WorkerInfo) is given such a job, but a race, a rehomed job or an older
gateway may bring one to another: it fails, saying so, and the worker serves on. The inputs are read with
common/inputs.py `load_inputs`, which checks them again as the gateway did (the worker trusts no queue), and go to
the engine's `admit` as an `ImageInput`; inputs that fail the checks, are gone (expired while queued) or are in a
store this worker lacks fail the job, naming why.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis

from common.blobstore import BlobStore, BlobStoreError
from common.input_images import InputImageError
from common.inputs import InputsUnavailable, load_inputs
from common.protocol import Job, default_strength
from worker.pipeline_protocol import ImageInput

logger = logging.getLogger(__name__)

NOT_HERE = "this worker does not generate from input images (it does not advertise image_input)"


class InputsRefused(Exception):
    """A job's input images this worker cannot take: the message says why, and the job fails with it."""


class JobInputs:
    """Reads claimed jobs' inputs (from `blobs`, else Redis) for a worker that takes them (`image_input`)."""

    def __init__(self, redis: aioredis.Redis, blobs: BlobStore | None, image_input: bool) -> None:
        self._redis = redis
        self._blobs = blobs
        self._image_input = image_input

    async def read(self, job: Job) -> ImageInput | None:
        """`job`'s input image as the engine takes it (`Engine.admit(..., image=)`), None for a job without one;
        InputsRefused when this worker takes none, or they are gone or fail the checks."""
        if job.inputs is None:
            return None
        if not self._image_input:
            raise InputsRefused(NOT_HERE)
        try:
            inputs = await load_inputs(job, self._blobs, self._redis)
        except InputImageError as exc:
            raise InputsRefused(f"the stored input images are refused: {exc}") from None
        except (InputsUnavailable, BlobStoreError) as exc:
            raise InputsRefused(str(exc)) from None
        strength = job.params.strength
        if strength is None:  # the gateway fills it; a job from elsewhere gets the same default
            strength = default_strength(inputs.mask is not None)
        return ImageInput(inputs.image, inputs.mask, strength)
