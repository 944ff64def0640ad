"""Images in a blob store: a result names its objects, Redis keeps metadata only, the gateway serves them
(or redirects to a pre-signed URL), a losing attempt's objects are removed, and an unreachable store is a
503 to the client and a retry to the worker: against real Redis, a real directory and real SeaweedFS.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from common.blobstore import BlobStore, FileBlobStore, S3Location, open_blob_store
from common.protocol import JobResult
from common.rediskeys import RedisKeys
from common.s3blobstore import S3BlobStore
from gateway.app import create_app
from gateway.config import GatewayConfig
from testkit.jobs import succeeded
from testkit.objectstore import S3Server
from tests.support import ClientFactory, RedisServer, claim_next, register_worker
from worker.delivery import ClaimedJob, Delivery
from worker.images import ImageWriter

IMAGES = [b"\x89PNG first image" * 100, b"\x89PNG second image" * 100]
JOB = {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 2}


async def gateway(aiohttp_client: ClientFactory, redis_server: RedisServer, **options: Any) -> TestClient[Any, Any]:
    config = GatewayConfig(redis_url=redis_server.url(0), request_timeout_s=5.0, result_ttl_s=60, **options)
    return await aiohttp_client(create_app(config))


async def run_attempt(redis_client: aioredis.Redis, blobs: BlobStore, claimed: ClaimedJob, worker: str) -> JobResult:
    """What a worker does with a finished job: objects first, then the result that names them; a dropped
    result's objects are removed. Returns the result it tried to store."""
    writer = ImageWriter(blobs, worker)
    result = await writer.put(claimed.job, succeeded(claimed.job, worker, len(IMAGES)), IMAGES)
    if not await Delivery(redis_client, RedisKeys()).complete(claimed, result, []):
        await writer.discard(result)
    return result


async def submit(client: TestClient[Any, Any]) -> str:
    response = await client.post("/v1/jobs", json=JOB)
    assert response.status == 202, await response.text()
    job_id: str = (await response.json())["id"]
    return job_id


async def test_images_live_in_the_store_and_redis_keeps_metadata_only(
    redis_server: RedisServer, redis_client: aioredis.Redis, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    await register_worker(redis_client)
    client = await gateway(aiohttp_client, redis_server, blob_store=f"file://{tmp_path}")
    job_id = await submit(client)
    result = await run_attempt(redis_client, FileBlobStore(tmp_path), await claim_next(redis_client), "w-1")
    stored = await redis_client.hgetall(RedisKeys().result(job_id))
    assert set(stored) == {b"meta"}  # no image bytes in Redis
    meta = JobResult.model_validate_json(stored[b"meta"])
    assert meta.image_sizes == [len(image) for image in IMAGES] and meta.image_keys == result.image_keys
    for index, image in enumerate(IMAGES):
        response = await client.get(f"/v1/jobs/{job_id}/images/{index}")
        assert response.status == 200 and response.content_type == "image/png"
        assert await response.read() == image
    missing = await client.get(f"/v1/jobs/{job_id}/images/2")
    assert missing.status == 404 and (await missing.json())["error"]["field"] == "index"


async def test_a_synchronous_request_answers_with_the_stored_images(
    redis_server: RedisServer, redis_client: aioredis.Redis, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    await register_worker(redis_client)
    client = await gateway(aiohttp_client, redis_server, blob_store=f"file://{tmp_path}")
    request = asyncio.create_task(client.post("/v1/generate", json=JOB))
    await run_attempt(redis_client, FileBlobStore(tmp_path), await claim_next(redis_client), "w-1")
    response = await request
    assert response.status == 200, await response.text()
    assert [base64.b64decode(image) for image in (await response.json())["images"]] == IMAGES


async def test_the_losing_attempts_objects_are_removed(
    redis_server: RedisServer, redis_client: aioredis.Redis, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """Two attempts at one job (a worker taken for dead, its job redelivered): the first result wins, and
    the second attempt's objects go; the winner's stay."""
    await register_worker(redis_client)
    client = await gateway(aiohttp_client, redis_server, blob_store=f"file://{tmp_path}")
    job_id = await submit(client)
    claimed = await claim_next(redis_client)
    blobs = FileBlobStore(tmp_path)
    winner = await run_attempt(redis_client, blobs, claimed, "w-1")
    # The redelivery is another delivery of the entry: its own attempt token (a rerun of the first one's
    # store would answer stored).
    redelivered = dataclasses.replace(claimed, deliveries=claimed.deliveries + 1)
    loser = await run_attempt(redis_client, blobs, redelivered, "w-2")
    assert winner.image_keys and loser.image_keys and set(winner.image_keys).isdisjoint(loser.image_keys)
    assert [await blobs.exists(key) for key in winner.image_keys] == [True, True]
    assert [await blobs.exists(key) for key in loser.image_keys] == [False, False]
    assert sorted(p.name for p in (tmp_path / "ttl-60" / job_id).iterdir()) == [winner.image_keys[0].split("/")[2]]
    assert (await client.get(f"/v1/jobs/{job_id}/images/1")).status == 200


async def test_presigned_image_urls_redirect_to_the_object_store(
    redis_server: RedisServer, redis_client: aioredis.Redis, aiohttp_client: ClientFactory, s3_env: S3Server
) -> None:
    await register_worker(redis_client)
    url = s3_env.url("images", "presigned")
    client = await gateway(aiohttp_client, redis_server, blob_store=url, image_urls="presigned")
    job_id = await submit(client)
    blobs = open_blob_store(url)
    assert blobs is not None
    await run_attempt(redis_client, blobs, await claim_next(redis_client), "w-1")
    response = await client.get(f"/v1/jobs/{job_id}/images/1", allow_redirects=False)
    assert response.status == 307
    location = response.headers["Location"]
    assert location.startswith(f"{s3_env.endpoint}/images/presigned/ttl-60/{job_id}/") and "X-Amz-Signature" in location
    async with aiohttp.ClientSession() as session, session.get(location) as fetched:
        assert fetched.status == 200 and await fetched.read() == IMAGES[1]
    # An unfinished job's image is answered by the gateway as before, not redirected.
    other = await submit(client)
    assert (await client.get(f"/v1/jobs/{other}/images/0", allow_redirects=False)).status == 409


async def test_an_unreachable_store_is_a_503_to_the_client_and_a_retry_to_the_worker(
    redis_server: RedisServer, redis_client: aioredis.Redis, aiohttp_client: ClientFactory, s3_env: S3Server
) -> None:
    await register_worker(redis_client)
    url = s3_env.url("images", "outage")
    client = await gateway(aiohttp_client, redis_server, blob_store=f"{url}&timeout=0.5")
    job_id = await submit(client)
    blobs = S3BlobStore(S3Location("images", "outage", s3_env.endpoint, None, timeout_s=0.5, retry_timeout_s=0.5))
    claimed = await claim_next(redis_client)
    s3_env.pause()
    try:
        attempt = asyncio.create_task(run_attempt(redis_client, blobs, claimed, "w-1"))
        done, _ = await asyncio.wait({attempt}, timeout=3)
        assert not done  # still retrying: the job is neither failed nor stored without its images
        assert await redis_client.exists(RedisKeys().result(job_id)) == 0
    finally:
        s3_env.resume()
    result = await attempt
    assert result.image_keys is not None
    s3_env.pause()
    try:
        response = await client.get(f"/v1/jobs/{job_id}/images/0")
        assert response.status == 503 and response.headers["Retry-After"] == "2"
        assert (await response.json())["error"]["code"] == "image_store_unavailable"
    finally:
        s3_env.resume()
    response = await client.get(f"/v1/jobs/{job_id}/images/0")
    assert response.status == 200 and await response.read() == IMAGES[0]


async def test_a_gateway_without_the_workers_blob_store_says_so(
    redis_server: RedisServer, redis_client: aioredis.Redis, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """A gateway left on `--blob-store redis` while the workers write to a directory (a rolling config change,
    a forgotten flag) names the setting in a 500, and logs one line, not a traceback."""
    await register_worker(redis_client)
    client = await gateway(aiohttp_client, redis_server)  # no --blob-store
    job_id = await submit(client)
    await run_attempt(redis_client, FileBlobStore(tmp_path), await claim_next(redis_client), "w-1")
    response = await client.get(f"/v1/jobs/{job_id}/images/0")
    assert response.status == 500
    error = (await response.json())["error"]
    assert error["code"] == "image_store_mismatch" and "--blob-store must be the same" in error["message"]
