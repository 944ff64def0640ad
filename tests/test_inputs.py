"""A job's input images stored beside it and read back as the worker reads them (common/inputs.py), in a real
redis-server and a file blob store; and the worker's hand-over to its engine (worker/inputs.py)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from common.blobstore import BlobStoreMismatch, FileBlobStore, ttl_of
from common.input_images import InputImageError, InputLimits
from common.inputs import (
    Inputs,
    InputsUnavailable,
    decode_inputs,
    input_key,
    load_inputs,
    png,
    remove_inputs,
    store_inputs,
)
from common.protocol import Job, ResolvedParams, default_strength
from common.rediskeys import RedisKeys
from sdxl_serve.processes import free_port
from tests.test_input_images import VALID, encoded, gradient
from worker.inputs import NOT_HERE, InputsRefused, InputsUnreachable, JobInputs

KEYS = RedisKeys()
TTL_S = 90


def job(job_id: str = "job-1") -> Job:
    params = ResolvedParams(prompt="a cat", seed=1, num_inference_steps=2, width=64, height=64, scheduler="euler")
    return Job(id=job_id, params=params, result_ttl_s=TTL_S)


def masked() -> Inputs:
    mask = np.zeros((32, 48), dtype=bool)
    mask[8:24, 10:30] = True
    return decode_inputs(VALID["jpeg"], png(mask), InputLimits())


async def test_inputs_in_redis_come_back_as_stored_and_expire_with_the_result_ttl(redis_client: aioredis.Redis) -> None:
    inputs = masked()
    refs = (await store_inputs(job(), inputs, None, redis_client, KEYS)).refs
    assert (refs.store, refs.image, refs.mask) == (
        "redis",
        KEYS.job_input("job-1", "image"),
        KEYS.job_input("job-1", "mask"),
    )
    assert (refs.width, refs.height) == (48, 32)
    for key in (refs.image, refs.mask or ""):
        assert 0 < await redis_client.ttl(key) <= TTL_S
    loaded = await load_inputs(job().model_copy(update={"inputs": refs}), None, redis_client)
    assert np.array_equal(loaded.image, inputs.image)  # the JPEG's decoded pixels, kept losslessly as PNG
    assert loaded.mask is not None and inputs.mask is not None and np.array_equal(loaded.mask, inputs.mask)
    await remove_inputs(refs, None, redis_client)
    assert await redis_client.exists(refs.image, refs.mask or "") == 0
    with pytest.raises(InputsUnavailable, match="expired"):
        await load_inputs(job().model_copy(update={"inputs": refs}), None, redis_client)


async def test_inputs_in_a_blob_store_live_under_the_results_ttl_prefix(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    blobs = FileBlobStore(tmp_path)
    inputs = decode_inputs(VALID["png"], None, InputLimits())
    refs = (await store_inputs(job(), inputs, blobs, redis_client, KEYS)).refs
    assert (refs.store, refs.image, refs.mask) == ("blob", input_key(TTL_S, "job-1", "image"), None)
    assert ttl_of(refs.image) == TTL_S  # the sweep (and an S3 lifecycle rule) expires it as the job's images
    assert await redis_client.dbsize() == 0  # nothing of it in Redis
    queued = job().model_copy(update={"inputs": refs})
    loaded = await load_inputs(queued, blobs, redis_client)
    assert np.array_equal(loaded.image, inputs.image) and loaded.mask is None
    with pytest.raises(BlobStoreMismatch):
        await load_inputs(queued, None, redis_client)
    await remove_inputs(refs, blobs, redis_client)
    with pytest.raises(InputsUnavailable):
        await load_inputs(queued, blobs, redis_client)


async def test_the_file_stores_sweep_expires_inputs_with_the_result_ttl(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    blobs = FileBlobStore(tmp_path)
    refs = (await store_inputs(job(), masked(), blobs, redis_client, KEYS)).refs
    assert await blobs.sweep(now=time.time() + TTL_S - 5) == 0
    assert await blobs.exists(refs.image) and await blobs.exists(refs.mask or "")
    assert await blobs.sweep(now=time.time() + TTL_S + 5) == 2
    assert not await blobs.exists(refs.image)


async def test_the_worker_checks_stored_inputs_again(redis_client: aioredis.Redis) -> None:
    refs = (await store_inputs(job(), masked(), None, redis_client, KEYS)).refs
    queued = job().model_copy(update={"inputs": refs})
    await redis_client.set(refs.image, b"GIF89a not what the gateway stored")
    with pytest.raises(InputImageError) as caught:
        await load_inputs(queued, None, redis_client)
    assert (caught.value.field, caught.value.rule) == ("image", "format")
    await redis_client.set(refs.image, encoded(gradient(40, 32), "PNG"))  # not the mask's size, nor the job's
    with pytest.raises(InputImageError) as caught:
        await load_inputs(queued, None, redis_client)
    assert (caught.value.field, caught.value.rule) == ("mask", "mask_size")
    await redis_client.set(refs.image, encoded(gradient(48, 32).rotate(180), "PNG"))
    await redis_client.delete(refs.mask or "")
    with pytest.raises(InputsUnavailable):
        await load_inputs(queued, None, redis_client)


async def test_a_job_without_inputs_has_none_to_load(redis_client: aioredis.Redis) -> None:
    with pytest.raises(ValueError, match="no input images"):
        await load_inputs(job(), None, redis_client)


async def test_the_worker_reads_a_jobs_inputs_for_the_engine_and_refuses_what_it_cannot_take(
    redis_client: aioredis.Redis,
) -> None:
    refs = (await store_inputs(job(), masked(), None, redis_client, KEYS)).refs
    queued = job().model_copy(update={"inputs": refs})
    takes = JobInputs(redis_client, None, image_input=True)
    assert await takes.read(job()) is None  # no inputs
    image = await takes.read(queued)
    assert image is not None and np.array_equal(image.image, masked().image)
    expected = masked().mask
    assert image.mask is not None and expected is not None and np.array_equal(image.mask, expected)
    assert image.strength == default_strength(True)  # the job named none
    with pytest.raises(InputsRefused, match=re.escape(NOT_HERE)):
        await JobInputs(redis_client, None, image_input=False).read(queued)
    await redis_client.delete(refs.image)
    with pytest.raises(InputsRefused, match="expired"):
        await takes.read(queued)


async def test_a_store_out_of_reach_is_transient_and_no_refusal(redis_client: aioredis.Redis) -> None:
    """Redis away while the worker reads a job's inputs (no server on the port): InputsUnreachable, which the
    runner leaves pending for another delivery, not InputsRefused, which fails the job."""
    refs = (await store_inputs(job(), masked(), None, redis_client, KEYS)).refs
    queued = job().model_copy(update={"inputs": refs})
    away = aioredis.Redis(port=free_port(), socket_connect_timeout=1.0)
    try:
        with pytest.raises(InputsUnreachable, match="Redis") as caught:
            await JobInputs(away, None, image_input=True).read(queued)
    finally:
        await away.aclose()
    assert not caught.value.in_blob_store
    assert await JobInputs(redis_client, None, image_input=True).read(queued) is not None  # back: read as stored
