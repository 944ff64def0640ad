"""The gateway over real HTTP and a real redis-server; a test plays the worker where one is needed."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from common.rediskeys import RedisKeys
from tests.conftest import TEST_SHAPES, play_worker, queued_jobs, register_worker

KEYS = RedisKeys()
SHAPES = TEST_SHAPES


async def test_healthz_and_demo_page(client: TestClient[Any, Any]) -> None:
    response = await client.get("/healthz")
    assert response.status == 200 and (await response.json()) == {"status": "ok"}
    page = await client.get("/")
    assert page.status == 200 and page.content_type == "text/html"
    assert "/v1/generate" in await page.text() or "app.js" in await page.text()


async def test_generate_returns_the_workers_images(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, fake_worker: None
) -> None:
    images = [f"png-{k}".encode() for k in range(4)]
    worker = asyncio.create_task(play_worker(redis_client, images))
    response = await client.post("/v1/generate", json={"prompt": "a cat", "num_inference_steps": 3})
    await worker
    assert response.status == 200
    body = await response.json()
    assert [base64.b64decode(i) for i in body["images"]] == images
    assert (body["width"], body["height"], body["num_inference_steps"]) == (64, 64, 3)
    assert 0 <= body["seed"] < 2**32 and body["worker"] == "test-worker"
    assert set(body["timings"]) == {"queued_ms", "generate_ms", "encode_ms", "total_ms"}
    assert body["timings"]["total_ms"] > 0


async def test_omitted_shape_takes_the_workers_default(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, fake_worker: None
) -> None:
    worker = asyncio.create_task(play_worker(redis_client, [b"x"] * 4))
    response = await client.post("/v1/generate", json={"prompt": "a cat", "seed": 7})
    await worker
    body = await response.json()
    assert (body["num_inference_steps"], body["seed"]) == (SHAPES[0].steps, 7)


@pytest.mark.parametrize(
    ("kwargs", "code", "field"),
    [
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, "invalid_json", None),
        ({"json": ["a list"]}, "invalid_body", None),
        ({"json": {}}, "missing", "prompt"),
        ({"json": {"prompt": ""}}, "string_too_short", "prompt"),
        ({"json": {"prompt": "a", "seed": "1"}}, "int_type", "seed"),
        ({"json": {"prompt": "a", "unknown": 1}}, "extra_forbidden", "unknown"),
        ({"json": {"prompt": "a", "num_inference_steps": 25}}, "unsupported_shape", "num_inference_steps"),
        ({"json": {"prompt": "a", "width": 1024}}, "unsupported_shape", "width"),
        ({"json": {"prompt": "a", "height": 1024}}, "unsupported_shape", "height"),
    ],
)
async def test_bad_input_is_refused_before_the_queue(
    client: TestClient[Any, Any],
    redis_client: aioredis.Redis,
    fake_worker: None,
    kwargs: dict[str, Any],
    code: str,
    field: str | None,
) -> None:
    response = await client.post("/v1/generate", **kwargs)
    assert response.status == 400
    error = (await response.json())["error"]
    assert (error["code"], error["field"]) == (code, field)
    assert error["message"]
    assert await queued_jobs(redis_client) == 0


async def test_wrong_content_type_and_oversized_body(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, fake_worker: None
) -> None:
    response = await client.post("/v1/generate", data="prompt=a", headers={"Content-Type": "text/plain"})
    assert response.status == 415 and (await response.json())["error"]["code"] == "unsupported_media_type"
    huge = b'{"prompt": "' + b"x" * 70_000 + b'"}'
    response = await client.post("/v1/generate", data=huge, headers={"Content-Type": "application/json"})
    assert response.status == 413 and (await response.json())["error"]["code"] == "body_too_large"
    assert await queued_jobs(redis_client) == 0


async def test_no_worker_means_503_with_retry_after(client: TestClient[Any, Any], redis_client: aioredis.Redis) -> None:
    response = await client.post("/v1/generate", json={"prompt": "a cat"})
    assert response.status == 503 and response.headers["Retry-After"]
    assert (await response.json())["error"]["code"] == "no_workers"
    assert await queued_jobs(redis_client) == 0


async def test_a_full_redis_means_503_storage_full_not_500(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, fake_worker: None
) -> None:
    """maxmemory reached under `noeviction`: Redis refuses writes; the gateway says so and keeps serving."""
    await redis_client.config_set("maxmemory", "1")
    try:
        response = await client.post("/v1/jobs", json={"prompt": "a cat"})
        body = await response.json()
    finally:
        await redis_client.config_set("maxmemory", "0")
    assert response.status == 503 and response.headers["Retry-After"], body
    assert body["error"]["code"] == "storage_full"
    assert await queued_jobs(redis_client) == 0
    assert (await client.post("/v1/jobs", json={"prompt": "a cat"})).status == 202  # room again: served


async def test_unknown_routes_and_jobs_are_json_404(client: TestClient[Any, Any]) -> None:
    response = await client.get("/nope")
    assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"
    response = await client.get("/v1/jobs/does-not-exist")
    assert response.status == 404
    assert (await response.json())["error"] == {
        "code": "unknown_job",
        "field": "job_id",
        "message": "no job 'does-not-exist' (never submitted, or its result expired)",
    }


async def test_deadline_gives_504_with_id_and_result_is_fetchable_later(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, fake_worker: None
) -> None:
    response = await client.post("/v1/generate", json={"prompt": "a cat"})
    assert response.status == 504
    body = await response.json()
    assert body["error"]["code"] == "timeout" and body["status_url"] == f"/v1/jobs/{body['id']}"
    queued = await client.get(body["status_url"])
    assert (await queued.json()) == {"id": body["id"], "status": "queued", "queue_position": 0}
    await play_worker(redis_client, [b"late"] * 4)
    done = await (await client.get(body["status_url"])).json()
    assert done["status"] == "succeeded" and done["worker"] == "test-worker"
    assert done["result"]["images"] == [f"/v1/jobs/{body['id']}/images/{k}" for k in range(4)]
    image = await client.get(done["result"]["images"][0])
    assert image.status == 200 and image.content_type == "image/png" and await image.read() == b"late"


async def test_workers_are_listed_with_their_shapes_and_state(
    client: TestClient[Any, Any], redis_client: aioredis.Redis
) -> None:
    assert await (await client.get("/v1/workers")).json() == {"workers": [], "serving": 0}
    await register_worker(redis_client, "w1")
    await register_worker(redis_client, "w2", state="warming")
    body = await (await client.get("/v1/workers")).json()
    assert sorted((w["id"], w["state"]) for w in body["workers"]) == [("w1", "ready"), ("w2", "warming")]
    assert body["serving"] == 1
    assert body["workers"][0]["shapes"] == [s.model_dump() for s in SHAPES]


async def test_a_shape_served_only_by_warming_workers_is_503_not_queued(
    client: TestClient[Any, Any], redis_client: aioredis.Redis
) -> None:
    await register_worker(redis_client, "warming", state="warming")
    response = await client.post("/v1/jobs", json={"prompt": "a cat"})
    assert response.status == 503 and response.headers["Retry-After"]
    assert (await response.json())["error"]["code"] == "no_ready_worker"
    assert await queued_jobs(redis_client) == 0


async def test_readyz_says_not_ready_when_the_job_listener_is_gone(
    client: TestClient[Any, Any], fake_worker: None
) -> None:
    assert (await client.get("/readyz")).status == 200
    (listener,) = [t for t in asyncio.all_tasks() if t.get_name() == "completion-listener"]
    listener.cancel()  # whatever stopped it, requests waiting for a result would never hear of it
    await asyncio.gather(listener, return_exceptions=True)
    response = await client.get("/readyz")
    assert response.status == 503 and (await response.json())["error"]["code"] == "not_subscribed"
