"""A claimed job's input images (image-to-image, inpainting), read from where the gateway stored them and handed to
the engine before the job is admitted.

Only a worker that advertises `image_input` (WorkerInfo) is given such a job, but a race, a rehomed job or an older
gateway may bring one to another: it fails, saying so, and the worker serves on. The inputs are read with
common/inputs.py `load_inputs`, which checks them again as the gateway did (the worker trusts no queue); inputs that
fail the checks, are gone (expired while queued) or are in a store this worker lacks fail the job, naming why.
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

import redis.asyncio as aioredis

from common.blobstore import BlobStore, BlobStoreError
from common.input_images import InputImageError
from common.inputs import Inputs, InputsUnavailable, load_inputs
from common.protocol import Job
from worker.pipeline_protocol import Engine

logger = logging.getLogger(__name__)

NOT_HERE = "this worker does not generate from input images (it does not advertise image_input)"


@runtime_checkable
class TakesInputs(Protocol):
    """An engine that generates from input images: it is given a job's inputs before the job is admitted."""

    def admit_inputs(self, key: str, inputs: Inputs) -> None:
        """Hold `inputs` for the request `key` that `admit` is given next."""


class JobInputs:
    """Reads claimed jobs' inputs (from `blobs`, else Redis) for a worker that takes them (`image_input`)."""

    def __init__(self, redis: aioredis.Redis, blobs: BlobStore | None, image_input: bool) -> None:
        self._redis = redis
        self._blobs = blobs
        self._image_input = image_input

    async def hand_over(self, engine: Engine, job: Job) -> str | None:
        """Give the engine `job`'s inputs; None when it has none or the engine took them, else why the job fails."""
        if job.inputs is None:
            return None
        if not self._image_input or not isinstance(engine, TakesInputs):
            return NOT_HERE
        try:
            inputs = await load_inputs(job, self._blobs, self._redis)
        except InputImageError as exc:
            return f"the stored input images are refused: {exc}"
        except (InputsUnavailable, BlobStoreError) as exc:
            return str(exc)
        engine.admit_inputs(job.id, inputs)
        return None
