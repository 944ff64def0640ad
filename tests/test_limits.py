"""Rate limits, backpressure and body limits at the gateway (gateway/limits.py, the protection middleware)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from common.config import ConfigError
from common.jobstore import QueueFull
from common.protocol import RequestLimits
from gateway.config import GatewayConfig, RateLimits, parse_networks
from gateway.limits import ThroughputMeter, queue_full
from gateway.ratelimit import Rate
from gateway.state import LIMITER
from tests.protection import error_of, gateway
from tests.support import ClientFactory, RedisServer, play_worker, queued_jobs

JOB = {"prompt": "a lighthouse"}
TIGHT = RateLimits(address_submit=Rate(1, 3600.0, 2), address_read=Rate(1, 3600.0, 3))


async def test_over_the_rate_is_429_with_retry_after(
    aiohttp_client: ClientFactory, redis_server: RedisServer, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    client = await gateway(aiohttp_client, redis_server, rate_limits=TIGHT)
    first = await client.post("/v1/jobs", json=JOB)
    assert first.status == 202
    assert (first.headers["RateLimit-Limit"], first.headers["RateLimit-Remaining"]) == ("2", "1")
    assert (await client.post("/v1/jobs", json=JOB)).status == 202
    refused = await client.post("/v1/jobs", json=JOB)
    assert refused.status == 429 and 3000 < int(refused.headers["Retry-After"]) <= 3600
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert (await error_of(refused))["code"] == "rate_limited"
    assert await queued_jobs(redis_client) == 2  # refused before anything was queued
    # Reads have their own bucket; an invalid body still counts (the check comes before the body).
    assert (await client.get("/v1/workers")).status == 200
    assert (await client.post("/v1/jobs", json={"bad": 1})).status == 429


async def test_health_metrics_and_the_page_are_never_limited(
    aiohttp_client: ClientFactory, redis_server: RedisServer
) -> None:
    client = await gateway(aiohttp_client, redis_server, rate_limits=TIGHT)
    for _ in range(10):
        for path in ("/healthz", "/metrics", "/openapi.json", "/", "/static/app.js"):
            response = await client.get(path)
            assert response.status == 200 and "RateLimit-Limit" not in response.headers, path


async def test_limits_can_be_turned_off(
    aiohttp_client: ClientFactory, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    client = await gateway(aiohttp_client, redis_server, rate_limits=RateLimits(address_read=None))
    for _ in range(20):
        response = await client.get("/v1/workers")
        assert response.status == 200 and "RateLimit-Limit" not in response.headers
    assert not await redis_client.keys("sdxl:ratelimit:*")


@pytest.mark.parametrize(("trusted", "separate"), [("127.0.0.0/8", True), ("", False)])
async def test_forwarded_for_is_believed_only_from_trusted_proxies(
    aiohttp_client: ClientFactory, redis_server: RedisServer, trusted: str, separate: bool
) -> None:
    client = await gateway(aiohttp_client, redis_server, rate_limits=TIGHT, trusted_proxies=parse_networks(trusted))
    statuses = []
    for client_ip in ("203.0.113.1", "203.0.113.2"):
        for _ in range(3):
            response = await client.get("/v1/workers", headers={"X-Forwarded-For": f"6.6.6.6, {client_ip}"})
            statuses.append(response.status)
    # Behind a trusted proxy each client has its own 3 reads; otherwise both share the peer's.
    assert statuses == ([200] * 6 if separate else [200, 200, 200, 429, 429, 429])


async def test_redis_down_while_checking_is_503_with_retry_after(
    aiohttp_client: ClientFactory, redis_server: RedisServer
) -> None:
    client = await gateway(aiohttp_client, redis_server)

    async def unreachable(*args: Any) -> None:
        raise RedisConnectionError("connection refused")

    client.app[LIMITER].check = unreachable
    response = await client.post("/v1/jobs", json=JOB)
    assert response.status == 503 and response.headers["Retry-After"]
    assert (await error_of(response))["code"] == "queue_unavailable"


async def test_a_full_queue_refuses_before_queueing(
    aiohttp_client: ClientFactory, redis_server: RedisServer, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    client = await gateway(aiohttp_client, redis_server, max_queue_depth=2)
    first = await client.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "first"})
    assert first.status == 202
    assert (await client.post("/v1/jobs", json=JOB)).status == 202
    for path in ("/v1/jobs", "/v1/generate", "/v1/images/generations"):
        refused = await client.post(path, json=JOB)
        assert refused.status == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60, path
        body = await refused.json()
        assert body["error"]["code"] == "queue_full"
    assert await queued_jobs(redis_client) == 2
    # A retry of an accepted job is not a new job: it is answered even now.
    replay = await client.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "first"})
    assert replay.status == 202 and replay.headers["Idempotent-Replayed"] == "true"
    assert (await replay.json())["id"] == (await first.json())["id"]
    await play_worker(redis_client, [b"png"] * 4)  # one finishes: there is room again
    assert (await client.post("/v1/jobs", json=JOB)).status == 202
    exposition = await (await client.get("/metrics")).text()
    assert 'sdxl_gateway_rejections_total{code="queue_full"} 3.0' in exposition


async def test_replicas_cannot_overshoot_the_depth(
    aiohttp_client: ClientFactory, redis_server: RedisServer, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    replicas = [await gateway(aiohttp_client, redis_server, max_queue_depth=5) for _ in range(2)]
    answers = await asyncio.gather(*(replicas[k % 2].post("/v1/jobs", json={"prompt": f"job {k}"}) for k in range(30)))
    assert sorted(a.status for a in answers) == [202] * 5 + [429] * 25
    assert await queued_jobs(redis_client) == 5


def test_retry_after_of_a_full_queue_follows_throughput() -> None:
    now = [0.0]
    meter = ThroughputMeter(window_s=10.0, clock=lambda: now[0])
    full = QueueFull("s", depth=10, max_depth=10)
    assert queue_full(full, meter).headers["Retry-After"] == "5"  # nothing seen yet: the constant
    for _ in range(5):
        meter.record()
    now[0] = 10.0  # 5 jobs in 10 s: one every 2 s
    assert meter.per_second() == 0.5
    assert queue_full(full, meter).headers["Retry-After"] == "2"
    assert queue_full(QueueFull("s", depth=14, max_depth=10), meter).headers["Retry-After"] == "10"
    assert queue_full(QueueFull("s", depth=1000, max_depth=10), meter).headers["Retry-After"] == "60"
    now[0] = 30.0  # all of them out of the window
    assert meter.per_second() == 0.0


async def test_a_body_over_the_limit_is_refused_unread(
    aiohttp_client: ClientFactory, redis_server: RedisServer
) -> None:
    # /v1/jobs takes input images: its limit is --max-image-body-bytes.
    client = await gateway(aiohttp_client, redis_server, max_body_bytes=4096, max_image_body_bytes=8192)
    host, port = client.server.host, client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    # Announce 10 MB and send none of it: an answer can only come from the headers.
    writer.write(
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 413")

    # Without a length (chunked) the limit stops the read instead.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1024

    response = await client.post("/v1/jobs", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status == 413 and (await error_of(response))["code"] == "body_too_large"


async def test_the_configured_field_bounds_apply(
    aiohttp_client: ClientFactory, redis_server: RedisServer, fake_worker: None
) -> None:
    limits = RequestLimits(max_prompt_chars=10, min_guidance=1.0, max_guidance=12.0)
    client = await gateway(aiohttp_client, redis_server, limits=limits)
    cases = [
        ({"prompt": "x" * 11}, "string_too_long", "prompt"),
        ({"prompt": "x", "negative_prompt": "y" * 11}, "string_too_long", "negative_prompt"),
        ({"prompt": "x", "guidance_scale": 12.5}, "less_than_equal", "guidance_scale"),
        ({"prompt": "x", "guidance_scale": 0.5}, "greater_than_equal", "guidance_scale"),
        ({"prompt": "a\u0000b"}, "control_character", "prompt"),
    ]
    for body, code, field in cases:
        response = await client.post("/v1/jobs", json=body)
        assert response.status == 400
        assert (await error_of(response))["code"] == code and (await response.json())["error"]["field"] == field
    response = await client.post("/v1/images/generations", json={"prompt": "x" * 11})
    assert response.status == 400 and (await response.json())["error"]["param"] == "prompt"
    assert (await client.post("/v1/jobs", json={"prompt": "x" * 10, "guidance_scale": 12})).status == 202
    schema = (await (await client.get("/openapi.json")).json())["components"]["schemas"]["GenerateRequest"]
    assert schema["properties"]["prompt"]["maxLength"] == 10
    assert (schema["properties"]["guidance_scale"]["minimum"], schema["properties"]["guidance_scale"]["maximum"]) == (
        1.0,
        12.0,
    )


@pytest.mark.parametrize(
    ("settings", "flag"),
    [
        ({"limits": RequestLimits(max_prompt_chars=2001)}, "--max-prompt-chars"),
        ({"limits": RequestLimits(min_guidance=5, max_guidance=2)}, "--guidance-range"),
        ({"limits": RequestLimits(max_guidance=31)}, "--guidance-range"),
        ({"max_body_bytes": 10}, "--max-body-bytes"),
        ({"max_queue_depth": -1}, "--max-queue-depth"),
        ({"result_ttl_s": 10**9}, "--result-ttl"),
    ],
)
def test_settings_outside_the_protocol_fail_at_start(settings: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        GatewayConfig(**settings)
