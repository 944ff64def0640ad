"""The gateway over real HTTP and a real redis-server; a test plays the worker where one is needed."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from common.protocol import SCHEDULERS, Shape
from common.rediskeys import RedisKeys
from testkit.standin import with_step_range
from tests.protection import running_worker
from tests.support import (
    TEST_SHAPES,
    RedisServer,
    claim_next,
    play_worker,
    queued_jobs,
    register_worker,
    worker_streams,
)
from worker.delivery import ClaimedJob, Delivery

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
        ({"json": {"prompt": "a", "num_inference_steps": 25}}, "unsupported_steps", "num_inference_steps"),
        ({"json": {"prompt": "a", "width": 1024}}, "unsupported_size", "width"),
        ({"json": {"prompt": "a", "height": 1024}}, "unsupported_size", "height"),
        ({"json": {"prompt": "a", "scheduler": "ddim"}}, "literal_error", "scheduler"),
        ({"json": {"prompt": "a", "scheduler": "dpmpp_2m_karras"}}, "unsupported_scheduler", "scheduler"),
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
    # /v1/generate takes input images, up to --max-image-body-bytes (tests/test_image_routes.py); this route does not.
    response = await client.post("/v1/images/generations", data=huge, headers={"Content-Type": "application/json"})
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


async def test_workers_are_listed_with_what_they_serve_and_their_state(
    client: TestClient[Any, Any], redis_client: aioredis.Redis
) -> None:
    assert await (await client.get("/v1/workers")).json() == {"workers": [], "serving": 0}
    await register_worker(redis_client, "w1")
    await register_worker(redis_client, "w2", state="warming")
    body = await (await client.get("/v1/workers")).json()
    assert sorted((w["id"], w["state"]) for w in body["workers"]) == [("w1", "ready"), ("w2", "warming")]
    assert body["serving"] == 1
    served = {k: body["workers"][0][k] for k in ("sizes", "max_steps", "default_steps", "schedulers")}
    assert served == {
        "sizes": [{"width": 64, "height": 64}],
        "max_steps": 3,
        "default_steps": 2,
        "schedulers": ["euler"],
    }


async def test_a_shape_served_only_by_warming_workers_is_503_not_queued(
    client: TestClient[Any, Any], redis_client: aioredis.Redis
) -> None:
    await register_worker(redis_client, "warming", state="warming")
    response = await client.post("/v1/jobs", json={"prompt": "a cat"})
    assert response.status == 503 and response.headers["Retry-After"]
    assert (await response.json())["error"]["code"] == "no_ready_worker"
    assert await queued_jobs(redis_client) == 0


LARGE = 1024
LARGE_SHAPE = Shape(width=LARGE, height=LARGE, steps=20)


async def test_any_step_count_up_to_the_workers_max_is_accepted_and_placed(
    client: TestClient[Any, Any], redis_client: aioredis.Redis
) -> None:
    await register_worker(redis_client, shapes=(LARGE_SHAPE,), max_steps=50)
    response = await client.post("/v1/jobs", json={"prompt": "a cat", "num_inference_steps": 7})
    assert response.status == 202, await response.text()
    claimed = await claim_next(redis_client, shapes=(LARGE_SHAPE,))
    assert (str(claimed.job.params.shape), claimed.job.params.scheduler) == ("1024x1024x7", "euler")
    too_many = await client.post("/v1/jobs", json={"prompt": "a cat", "num_inference_steps": 51})
    assert too_many.status == 400
    error = (await too_many.json())["error"]
    assert (error["code"], error["field"]) == ("unsupported_steps", "num_inference_steps")
    assert "1..50" in error["message"]
    wrong_size = await (await client.post("/v1/jobs", json={"prompt": "a cat", "width": 512})).json()
    assert (
        wrong_size["error"]["field"] == "width"
        and "served sizes (WIDTHxHEIGHT): 1024x1024" in wrong_size["error"]["message"]
    )
    assert await queued_jobs(redis_client) == 1


async def test_a_stand_in_worker_serves_every_step_count_up_to_its_max(
    client: TestClient[Any, Any], redis_server: RedisServer
) -> None:
    async with running_worker(redis_server.url(0), shapes=with_step_range(SHAPES[:1], 50)) as worker:
        served = {k: getattr(worker.info, k) for k in ("sizes", "max_steps", "default_steps", "schedulers")}
        expected = {"sizes": [SHAPES[0].size], "max_steps": 50, "default_steps": 2, "schedulers": list(SCHEDULERS)}
        assert served == expected  # the worker publishes the schedulers its pipeline runs: the stand-in, all
        response = await client.post("/v1/generate", json={"prompt": "a cat", "num_inference_steps": 7})
        body = await response.json()
        assert (response.status, body["num_inference_steps"], body["scheduler"]) == (200, 7, "euler")
        too_many = await client.post("/v1/generate", json={"prompt": "a cat", "num_inference_steps": 51})
        assert too_many.status == 400


async def test_each_request_lands_on_a_worker_serving_its_size(
    client: TestClient[Any, Any], redis_client: aioredis.Redis
) -> None:
    small, large = (SHAPES[0],), (LARGE_SHAPE,)
    await register_worker(redis_client, "small", shapes=small)
    await register_worker(redis_client, "large", shapes=large)
    for width in (LARGE, 64, LARGE):
        body = {"prompt": "a cat", "width": width, "height": width, "num_inference_steps": 2}
        assert (await client.post("/v1/jobs", json=body)).status == 202
    delivery = Delivery(redis_client, KEYS)
    taken = {"small": 0, "large": 0}
    for name, shapes in (("small", small), ("large", large)):
        while (claimed := await delivery.claim(name, worker_streams(name, shapes), block_ms=10)) is not None:
            assert claimed.job.params.shape.size == shapes[0].size
            await delivery.discard(claimed)
            taken[name] += 1
    assert taken == {"small": 1, "large": 2}


async def test_what_only_warming_workers_serve_is_503_and_the_default_is_what_most_serving_workers_list(
    client: TestClient[Any, Any], redis_client: aioredis.Redis
) -> None:
    await register_worker(redis_client, "a", shapes=(SHAPES[1], LARGE_SHAPE))  # default 64x64 at 3 steps
    await register_worker(redis_client, "b", shapes=(SHAPES[0],))  # default 64x64 at 2 steps
    await register_worker(redis_client, "c", shapes=(SHAPES[1],))
    await register_worker(redis_client, "warm-1", state="warming", shapes=(LARGE_SHAPE,), max_steps=50)
    await register_worker(redis_client, "warm-2", state="warming", shapes=(LARGE_SHAPE,), max_steps=50)
    for body in ({"num_inference_steps": 30, "width": LARGE, "height": LARGE}, {"width": LARGE, "height": LARGE}):
        response = await client.post("/v1/jobs", json={"prompt": "a cat", **body})
        code = (await response.json())["error"]["code"] if response.status != 202 else None
        assert (response.status, code) == ((503, "no_ready_worker") if "num_inference_steps" in body else (202, None))
    await client.post("/v1/jobs", json={"prompt": "a cat"})
    # Placed on the size stream or on one capable worker's own stream (a or c, whichever is shorter).
    taken = [j for w in ("a", "c") for j in await drain(redis_client, w, (SHAPES[1], LARGE_SHAPE))]
    shapes = {str(j.job.params.shape) for j in taken}
    assert shapes == {"1024x1024x3", "64x64x3"}  # a worker has one default step count, for every size


async def drain(redis_client: aioredis.Redis, worker_id: str, shapes: tuple[Shape, ...]) -> list[ClaimedJob]:
    """Claim (and settle) every job on the streams of a worker serving `shapes`."""
    delivery, taken = Delivery(redis_client, KEYS), []
    while (claimed := await delivery.claim(worker_id, worker_streams(worker_id, shapes), block_ms=10)) is not None:
        await delivery.discard(claimed)
        taken.append(claimed)
    return taken


async def test_models_lists_what_serving_workers_serve(
    client: TestClient[Any, Any], redis_client: aioredis.Redis
) -> None:
    assert await (await client.get("/v1/models")).json() == {"object": "list", "data": []}
    await register_worker(redis_client, "a", shapes=(SHAPES[0], LARGE_SHAPE), max_steps=50)
    await register_worker(redis_client, "b", shapes=(SHAPES[0],), schedulers=["euler_trailing", "euler"])
    await register_worker(redis_client, "w", state="warming", shapes=(Shape(width=96, height=96, steps=4),))
    (card,) = (await (await client.get("/v1/models")).json())["data"]
    assert card["id"] == "m" and card["object"] == "model" and card["created"] > 0
    served = {k: card[k] for k in ("sizes", "min_steps", "max_steps", "default_steps", "schedulers")}
    assert served == {
        "sizes": ["64x64", "1024x1024"],
        "min_steps": 1,
        "max_steps": 50,
        "default_steps": 2,
        "schedulers": ["euler", "euler_trailing"],
    }


async def test_readyz_says_not_ready_when_the_job_listener_is_gone(
    client: TestClient[Any, Any], fake_worker: None
) -> None:
    assert (await client.get("/readyz")).status == 200
    (listener,) = [t for t in asyncio.all_tasks() if t.get_name() == "completion-listener"]
    listener.cancel()  # whatever stopped it, requests waiting for a result would never hear of it
    await asyncio.gather(listener, return_exceptions=True)
    response = await client.get("/readyz")
    assert response.status == 503 and (await response.json())["error"]["code"] == "not_subscribed"
