"""API keys at the gateway (gateway/auth.py): 401 without, 403 revoked, the public demo, reloads, no leaks."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from common.apikeys import KeyRing, digest, new_key
from common.config import log_config
from gateway import auth
from gateway.config import GatewayConfig, RateLimits
from gateway.ratelimit import Rate
from tests.protection import Client, error_of, gateway
from tests.support import ClientFactory, RedisServer, queued_jobs

GOOD, REVOKED = new_key(), new_key()
RING = KeyRing(active=frozenset({digest(GOOD)}), revoked=frozenset({digest(REVOKED)}))
JOB = {"prompt": "a lighthouse"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def keyed(aiohttp_client: ClientFactory, redis_server: RedisServer, fake_worker: None) -> Client:
    return await gateway(aiohttp_client, redis_server, api_keys=RING)


async def test_without_keys_configured_the_api_is_open(client: Client, fake_worker: None) -> None:
    assert (await client.post("/v1/jobs", json=JOB)).status == 202
    assert (await client.post("/v1/jobs", json=JOB, headers=bearer("anything"))).status == 202


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "missing_api_key"),
        ({"Authorization": f"Basic {GOOD}"}, 401, "invalid_authorization"),
        ({"Authorization": "Bearer "}, 401, "invalid_authorization"),
        (bearer("sdxl_not-a-key"), 401, "invalid_api_key"),
        (bearer(REVOKED), 403, "revoked_api_key"),
    ],
)
async def test_every_v1_route_refuses_a_missing_or_bad_key(
    keyed: Client, redis_client: aioredis.Redis, headers: dict[str, str], status: int, code: str
) -> None:
    for method, path in [
        ("POST", "/v1/jobs"),
        ("POST", "/v1/generate"),
        ("GET", "/v1/jobs/abc"),
        ("DELETE", "/v1/jobs/abc"),
        ("GET", "/v1/jobs/abc/events"),
        ("GET", "/v1/jobs/abc/images/0"),
        ("GET", "/v1/workers"),
    ]:
        response = await keyed.request(method, path, json=JOB if method == "POST" else None, headers=headers)
        assert response.status == status, (method, path)
        error = await error_of(response)
        assert (error["code"], error["field"]) == (code, "Authorization")
        if status == 401:
            assert response.headers["WWW-Authenticate"].startswith('Bearer realm="sdxl-serve"')
    assert await queued_jobs(redis_client) == 0


async def test_a_good_key_passes_and_operations_routes_need_none(keyed: Client) -> None:
    assert (await keyed.post("/v1/jobs", json=JOB, headers=bearer(GOOD))).status == 202
    assert (await keyed.get("/v1/workers", headers={"Authorization": f"bearer  {GOOD} "})).status == 200
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/"):
        assert (await keyed.get(path)).status == 200, path


async def test_the_openai_route_answers_in_openai_shape(keyed: Client) -> None:
    response = await keyed.post("/v1/images/generations", json={"prompt": "a cat"})
    assert response.status == 401
    error = (await response.json())["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "authentication_error",
        "missing_api_key",
        "Authorization",
    )
    response = await keyed.post("/v1/images/generations", json={"prompt": "a cat"}, headers=bearer(REVOKED))
    assert (await response.json())["error"]["type"] == "authentication_error" and response.status == 403


async def test_the_public_demo_opens_only_the_pages_routes(
    aiohttp_client: ClientFactory, redis_server: RedisServer, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    demo = await gateway(
        aiohttp_client,
        redis_server,
        api_keys=RING,
        public_demo=True,
        rate_limits=RateLimits(public_submit=Rate(1, 3600.0, 2)),
    )
    accepted = await demo.post("/v1/jobs", json=JOB)
    assert accepted.status == 202 and accepted.headers["RateLimit-Limit"] == "2"
    job = (await accepted.json())["id"]
    assert (await demo.get(f"/v1/jobs/{job}")).status == 200
    assert (await demo.post("/v1/jobs", json=JOB)).status == 202
    limited = await demo.post("/v1/jobs", json=JOB)  # the stricter public limit, per address
    assert limited.status == 429 and int(limited.headers["Retry-After"]) > 0
    assert (await error_of(limited))["code"] == "rate_limited"
    assert (await demo.post("/v1/jobs", json=JOB, headers=bearer(GOOD))).status == 202  # a key has its own
    for method, path in [("POST", "/v1/generate"), ("POST", "/v1/images/generations"), ("GET", "/v1/workers")]:
        assert (await demo.request(method, path, json=JOB)).status == 401, path
    assert (await demo.post("/v1/jobs", json=JOB, headers=bearer("wrong"))).status == 401  # never downgraded
    assert await queued_jobs(redis_client) == 3
    document = await (await demo.get("/openapi.json")).json()
    assert document["paths"]["/v1/jobs"]["post"]["security"] == [{"bearerAuth": []}, {}]
    assert document["paths"]["/v1/generate"]["post"]["security"] == [{"bearerAuth": []}]
    assert "security" not in document["paths"]["/healthz"]["get"]


async def test_the_keys_file_is_reread_when_it_changes(
    aiohttp_client: ClientFactory,
    redis_server: RedisServer,
    fake_worker: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(auth, "KEYS_RELOAD_INTERVAL_S", 0.05)
    path = tmp_path / "keys"
    key = new_key()
    path.write_text(f"# test keys\n{digest(key)}  # tester\n")
    client = await gateway(aiohttp_client, redis_server, api_keys_file=path)
    assert (await client.get("/v1/workers", headers=bearer(key))).status == 200
    path.write_text("this is not a keys file\n")  # a broken edit keeps the keys in force
    await asyncio.sleep(0.3)
    assert (await client.get("/v1/workers", headers=bearer(key))).status == 200
    assert "keeping the previous API keys" in caplog.text
    path.write_text(f"{digest(key)} revoked\n")
    for _ in range(100):
        status = (await client.get("/v1/workers", headers=bearer(key))).status
        if status == 403:
            break
        await asyncio.sleep(0.05)
    assert status == 403


async def test_keys_never_reach_logs_metrics_or_redis(
    aiohttp_client: ClientFactory,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    fake_worker: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    config = GatewayConfig(api_keys=RING)
    log_config(logging.getLogger("test"), config)
    client = await gateway(aiohttp_client, redis_server, api_keys=RING)
    for key in (GOOD, REVOKED, "sdxl_unknown-key"):
        await client.post("/v1/jobs", json=JOB, headers=bearer(key))
        await client.get("/v1/workers", headers=bearer(key))
    exposition = await (await client.get("/metrics")).text()
    assert 'sdxl_gateway_rejections_total{code="revoked_api_key"} 2.0' in exposition
    assert 'sdxl_gateway_rejections_total{code="invalid_api_key"} 2.0' in exposition
    stored = [k.decode() if isinstance(k, bytes) else k for k in await redis_client.keys("*")]
    for secret in (GOOD, REVOKED, "sdxl_unknown-key", digest(GOOD), digest(REVOKED)):
        assert secret not in caplog.text and secret not in exposition
        assert not any(secret in k for k in stored)
    assert f"key-{digest(GOOD)[:16]}" in " ".join(stored)  # the rate-limit bucket is named by a prefix
