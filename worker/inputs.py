"""A claimed job's input images (image-to-image, inpainting), read from where the gateway stored them and handed to
the engine before the job is admitted.

Only a worker that advertises `image_input` (WorkerInfo) is given such a job, but a race, a rehomed job or an older
gateway may bring one to another: it fails, saying so, and the worker serves on. The inputs are read with
common/inputs.py `load_inputs`, which checks them again as the gateway did (the worker trusts no queue), and go to
the engine's `admit` as an `ImageInput`; inputs that fail the checks, are gone (expired while queued) or are in a
store this worker lacks fail the job, naming why. A store that cannot be reached now (the blob store unavailable,
Redis away) fails nothing: `InputsUnreachable`, and the runner leaves the job's entry pending to be delivered again
once the store answers (worker/runner.py). Inputs gone from Redis because Redis lost them with the job (restored
from an older state while this worker held a delivery of it) fail nothing either: `InputsLost`, and the runner
gives the job back to the gateway that accepted it, whose journal queues it again with its inputs.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis

from common.blobstore import BlobStore, BlobStoreError, BlobStoreUnavailable
from common.input_images import InputImageError
from common.inputs import InputsGone, InputsUnavailable, load_inputs
from common.protocol import Job, default_strength
from common.redis_conn import CONNECTION_ERRORS
from worker.pipeline_protocol import ImageInput

logger = logging.getLogger(__name__)

NOT_HERE = "this worker does not generate from input images (it does not advertise image_input)"


class InputsRefused(Exception):
    """A job's input images this worker cannot take: the message says why, and the job fails with it."""


class InputsLost(InputsRefused):
    """A job's input images stored in Redis are not there: expired, or lost by Redis with the job (worker/runner.py
    tells which, and gives a lost job back to its gateway's journal rather than failing it)."""


class InputsUnreachable(Exception):
    """The store that holds a job's input images cannot be reached now (a transient fault): the job is to be run
    again once it answers, not failed. `in_blob_store`: the blob store (else Redis) is the one away."""

    def __init__(self, message: str, in_blob_store: bool) -> None:
        super().__init__(message)
        self.in_blob_store = in_blob_store


class JobInputs:
    """Reads claimed jobs' inputs (from `blobs`, else Redis) for a worker that takes them (`image_input`)."""

    def __init__(self, redis: aioredis.Redis, blobs: BlobStore | None, image_input: bool) -> None:
        self._redis = redis
        self._blobs = blobs
        self._image_input = image_input

    async def read(self, job: Job) -> ImageInput | None:
        """`job`'s input image as the engine takes it (`Engine.admit(..., image=)`), None for a job without one;
        InputsRefused when this worker takes none, or they are gone or fail the checks; InputsUnreachable when
        their store cannot be reached now."""
        if job.inputs is None:
            return None
        if not self._image_input:
            raise InputsRefused(NOT_HERE)
        try:
            inputs = await load_inputs(job, self._blobs, self._redis)
        except BlobStoreUnavailable as exc:  # before BlobStoreError, its base: transient, not the job's fault
            raise InputsUnreachable(str(exc), in_blob_store=True) from None
        except CONNECTION_ERRORS as exc:  # the link only: an OSError may be the decoder's, and is no outage
            raise InputsUnreachable(f"Redis: {exc}", in_blob_store=False) from None
        except InputImageError as exc:
            raise InputsRefused(f"the stored input images are refused: {exc}") from None
        except InputsGone as exc:
            raise (InputsLost if job.inputs.store == "redis" else InputsRefused)(str(exc)) from None
        except (InputsUnavailable, BlobStoreError) as exc:
            raise InputsRefused(str(exc)) from None
        strength = job.params.strength
        if strength is None:  # the gateway fills it; a job from elsewhere gets the same default
            strength = default_strength(inputs.mask is not None)
        return ImageInput(inputs.image, inputs.mask, strength)
