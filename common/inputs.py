"""A job's input images (image-to-image, inpainting): stored by the gateway beside the job, read by the worker.

The image bytes never travel in the Redis stream: the gateway decodes what the client sent (common/input_images.py,
refusing a bad one with a 400), re-encodes the pixels as PNG and stores them, then queues the job with their keys
(`Job.inputs`, an `InputRefs`). With a blob store they are objects under the result's `ttl-N/` prefix, so they go
as its images go (the file store's sweep, an S3 lifecycle rule); without one, Redis strings that expire after the
result TTL. Either way they live one result TTL from the submit: a job still queued after that fails, naming its
inputs. The worker reads them with `load_inputs`, which decodes them again with the same checks: it trusts no queue.

Inputs in Redis go where the job goes when Redis loses data (restored from an older snapshot, failed over to a
replica that missed them): `store_inputs` hands back their bytes (`RedisCopy`), which the accepting gateway's journal
keeps with the job and stores again with `restore_inputs` before it queues the job again (gateway/journal.py).
Inputs in a blob store need no copy: Redis losing its data leaves them.
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import redis.asyncio as aioredis
from PIL import Image

from common.blobstore import BlobNotFound, BlobStore, BlobStoreMismatch
from common.input_images import InputLimits, decode_image, decode_mask
from common.protocol import InputRefs, Job
from common.rediskeys import RedisKeys

logger = logging.getLogger(__name__)

# What a worker accepts from the store: the gateway's largest image (InputLimits' bound on pixels) as a PNG, which
# may be larger than the bytes the client sent (a JPEG re-encoded losslessly), so the byte bound is the raw pixels'.
STORED_LIMITS = InputLimits(max_bytes=InputLimits().max_pixels * 3 + 1024 * 1024)


EXPIRED = "the job's input images are gone: they expired before a worker ran it"
GONE = (
    "the job's input images are gone: they expired before a worker ran it, or Redis lost them (restored from an "
    "older state) and the gateway that accepted the job no longer held a copy"
)


class InputsUnavailable(Exception):
    """A job's stored inputs are gone (expired, removed) or were written to a store this process does not have."""


class InputsGone(InputsUnavailable):
    """A job's stored inputs are not there: expired or removed, or (in Redis) lost by Redis with the job."""


@dataclass(frozen=True)
class Inputs:
    """Decoded input images: `image` uint8 [H, W, 3]; `mask` bool [H, W], True where repainted (None: no mask)."""

    image: np.ndarray
    mask: np.ndarray | None

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


def decode_inputs(image: bytes, mask: bytes | None, limits: InputLimits, *, transparent_mask: bool = False) -> Inputs:
    """The image (field `image`) and mask (field `mask`, the image's size; with `transparent_mask`, OpenAI's
    convention: alpha 0 is repainted) decoded from untrusted bytes; raises InputImageError naming the field and the
    rule."""
    pixels = decode_image(image, "image", limits)
    size = (int(pixels.shape[1]), int(pixels.shape[0]))
    masked = None if mask is None else decode_mask(mask, "mask", limits, size, transparent=transparent_mask)
    return Inputs(pixels, masked)


def png(pixels: np.ndarray) -> bytes:
    """`pixels` (uint8 RGB, or a bool mask as black and white) encoded as PNG."""
    array = np.where(pixels, np.uint8(255), np.uint8(0)) if pixels.dtype == np.bool_ else pixels
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", compress_level=1)  # speed over size: it lives one TTL
    return out.getvalue()


@dataclass(frozen=True)
class RedisCopy:
    """The PNG bytes of a job's inputs stored in Redis, by key: what the gateway's journal keeps to store them again
    in a Redis that lost them."""

    pngs: tuple[tuple[str, bytes], ...]

    @property
    def size(self) -> int:
        """Its bytes (what it costs the journal's memory)."""
        return sum(len(data) for _, data in self.pngs)


@dataclass(frozen=True)
class StoredInputs:
    """A job's stored inputs: their refs (`Job.inputs`), and their bytes when in Redis (None in a blob store)."""

    refs: InputRefs
    redis_copy: RedisCopy | None


def _encoded(inputs: Inputs) -> dict[str, bytes]:
    return {"image": png(inputs.image)} | ({} if inputs.mask is None else {"mask": png(inputs.mask)})


def input_key(ttl_s: int, job_id: str, name: str) -> str:
    """The blob key of a job's input `name`: under the result's `ttl-N/` prefix (common/blobstore.py `result_key`),
    so that what expires the job's images expires its inputs."""
    return f"ttl-{ttl_s}/{job_id}/inputs/{name}.png"


async def store_inputs(
    job: Job, inputs: Inputs, blobs: BlobStore | None, redis: aioredis.Redis, keys: RedisKeys
) -> StoredInputs:
    """Store a job's decoded inputs as PNG (in `blobs`, else in Redis with the job's result TTL); their refs, and in
    Redis their bytes too. The encoding runs on a thread: a large image takes long enough to stall an event loop."""
    named = await asyncio.to_thread(_encoded, inputs)
    copy = None
    if blobs is not None:
        stored = {name: input_key(job.result_ttl_s, job.id, name) for name in named}
        for name, data in named.items():
            await blobs.put(stored[name], data, "image/png")
    else:
        stored = {name: keys.job_input(job.id, name) for name in named}
        copy = RedisCopy(tuple((stored[name], data) for name, data in named.items()))
        await restore_inputs(copy, redis, job.result_ttl_s, only_missing=False)
    store: Literal["blob", "redis"] = "redis" if blobs is None else "blob"
    return StoredInputs(InputRefs(store=store, width=inputs.width, height=inputs.height, **stored), copy)


async def restore_inputs(copy: RedisCopy, redis: aioredis.Redis, ttl_s: int, *, only_missing: bool = True) -> int:
    """Store `copy` in Redis for `ttl_s`, in one transaction; with `only_missing`, only the keys Redis lacks (SET NX:
    one still there keeps its expiry, so a job Redis did not lose gets no longer life). How many were stored."""
    async with redis.pipeline(transaction=True) as pipe:
        for key, data in copy.pngs:
            pipe.set(key, data, ex=ttl_s, nx=only_missing)
        replies = await pipe.execute()
    return sum(1 for reply in replies if reply)


async def load_inputs(job: Job, blobs: BlobStore | None, redis: aioredis.Redis) -> Inputs:
    """The worker's read of a job's inputs: fetched where the gateway stored them and decoded again with the same
    checks (InputImageError if they fail them, or differ from the size the job records). InputsUnavailable when
    they are gone. A job without inputs is a caller's error (ValueError)."""
    refs = job.inputs
    if refs is None:
        raise ValueError(f"job {job.id} has no input images")
    image = await _fetch(refs, refs.image, blobs, redis)
    mask = None if refs.mask is None else await _fetch(refs, refs.mask, blobs, redis)
    inputs = await asyncio.to_thread(decode_inputs, image, mask, STORED_LIMITS)  # off the loop: heartbeats go on
    if (inputs.width, inputs.height) != (refs.width, refs.height):
        raise InputsUnavailable(
            f"the stored image is {inputs.width}x{inputs.height}, the job says {refs.width}x{refs.height}"
        )
    return inputs


async def _fetch(refs: InputRefs, key: str, blobs: BlobStore | None, redis: aioredis.Redis) -> bytes:
    if refs.store == "redis":
        data: bytes | str | None = await redis.get(key)
        if data is None:
            raise InputsGone(GONE)
        return data if isinstance(data, bytes) else data.encode("latin-1")
    if blobs is None:
        raise BlobStoreMismatch("the job's input images are in a blob store, and this process has none (--blob-store)")
    try:
        return await blobs.get(key)
    except BlobNotFound:
        raise InputsGone(EXPIRED) from None


async def remove_inputs(refs: InputRefs, blobs: BlobStore | None, redis: aioredis.Redis) -> None:
    """Remove a job's stored inputs now (a cancelled job's), rather than at their expiry."""
    names = [refs.image, *([refs.mask] if refs.mask is not None else [])]
    if refs.store == "redis":
        await redis.delete(*names)
    elif blobs is not None:
        await blobs.delete(names)
