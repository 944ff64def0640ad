"""The gateway's `/readyz` and `/metrics` over real HTTP and a real redis-server."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.support import claim_next, finish, register_worker

Client = TestClient[Any, Any]


async def scrape(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status == 200 and response.content_type == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_readyz_is_the_gateways_own_and_submits_say_no_worker_is_ready(
    client: Client, redis_client: aioredis.Redis
) -> None:
    """With no worker ready the gateway stays in service: /readyz is 200, and each submit answers 503 with
    Retry-After, counted by code."""
    response = await client.get("/readyz")
    assert response.status == 200 and await response.json() == {"status": "ready", "workers_ready": 0}
    for route in ("/v1/generate", "/v1/jobs"):
        response = await client.post(route, json={"prompt": "a cat"})
        assert response.status == 503 and (await response.json())["error"]["code"] == "no_workers"
        assert int(response.headers["Retry-After"]) > 0
    assert (await scrape(client))[("sdxl_gateway_rejections_total", (("code", "no_workers"),))] == 2
    await register_worker(redis_client, "warming", state="warming")
    assert await (await client.get("/readyz")).json() == {"status": "ready", "workers_ready": 0}
    response = await client.post("/v1/jobs", json={"prompt": "a cat"})
    assert response.status == 503 and (await response.json())["error"]["code"] == "no_ready_worker"
    assert int(response.headers["Retry-After"]) > 0
    await register_worker(redis_client, "ready")
    response = await client.get("/readyz")
    assert response.status == 200 and await response.json() == {"status": "ready", "workers_ready": 1}
    assert (await client.get("/healthz")).status == 200


async def test_metrics_count_requests_rejections_queue_and_workers(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    assert (await client.post("/v1/jobs", json={"prompt": ""})).status == 400
    assert (await client.post("/v1/jobs", json={"prompt": "a cat"})).status == 202
    assert (await client.post("/v1/jobs", json={"prompt": "a dog"})).status == 202
    await finish(redis_client, await claim_next(redis_client), [b"png"])
    samples = await scrape(client)
    requests = "sdxl_gateway_requests_total"
    assert samples[(requests, (("method", "POST"), ("route", "/v1/jobs"), ("status", "400")))] == 1
    assert samples[(requests, (("method", "POST"), ("route", "/v1/jobs"), ("status", "202")))] == 2
    assert samples[("sdxl_gateway_rejections_total", (("code", "string_too_short"),))] == 1
    assert samples[("sdxl_gateway_request_seconds_count", (("method", "POST"), ("route", "/v1/jobs")))] == 3
    assert samples[("sdxl_queue_depth", ())] == 1  # one finished (deleted), one still queued
    assert samples[("sdxl_workers", (("state", "ready"),))] == 1
    assert samples[("sdxl_gateway_waiting_requests", ())] == 0
    listener = "sdxl_gateway_listener_events_total"
    assert samples[(listener, (("event", "subscribed"),))] == 1  # one subscription: no re-subscribe yet
    assert samples[(listener, (("event", "resubmitted"),))] == 0
    assert (
        samples[(listener, (("event", "inputs_restored"),))] == samples[(listener, (("event", "inputs_dropped"),))] == 0
    )


async def test_queue_events_from_redis_are_exported(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    job_id = (await (await client.post("/v1/jobs", json={"prompt": "a cat"})).json())["id"]
    assert (await client.delete(f"/v1/jobs/{job_id}")).status == 200
    samples = await scrape(client)
    assert samples[("sdxl_queue_events_total", (("event", "cancelled"),))] == 1
    unknown = await client.get("/nope")
    assert unknown.status == 404
    samples = await scrape(client)
    assert samples[("sdxl_gateway_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1


async def test_the_rows_of_serving_workers_are_exported_as_capacity_and_use(
    client: Client, redis_client: aioredis.Redis
) -> None:
    await register_worker(redis_client, "engine-a", rows=16, free_rows=4)
    await register_worker(redis_client, "engine-b", state="busy", rows=16, free_rows=16)
    await register_worker(redis_client, "old")  # one request at a time: no rows advertised
    await register_worker(redis_client, "leaving", state="draining", rows=16, free_rows=0)
    samples = await scrape(client)
    assert (samples[("sdxl_worker_rows", ())], samples[("sdxl_worker_rows_in_use", ())]) == (32, 12)
