"""Tenants (gateway/tenants.py): one caller can neither see, cancel nor starve another's jobs.

Each test runs a real gateway (an aiohttp server on a free port, keys from a real keys file) against the
session's redis-server, and speaks HTTP to it as two or more callers: two API keys, an admin key, and
callers without a key under `--public-demo`, told apart by the address a trusted proxy vouches for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from yarl import URL

from common.apikeys import digest, new_key
from common.config import ConfigError, log_config
from common.rediskeys import RedisKeys
from gateway import auth
from gateway.cli import gateway_config
from gateway.config import GatewayConfig, RateLimits, parse_networks
from sdxl_serve.cli import build_parser
from sdxl_serve.processes import free_port
from testkit.jobs import make_job
from tests.protection import Client, error_of, gateway, running_worker
from tests.support import ClientFactory, RedisServer, claim_next, finish, read_events
from worker.delivery import Delivery

A, B, ADMIN = new_key(), new_key(), new_key()
JOB = {"prompt": "a lighthouse"}
OTHER_JOB = {"prompt": "a harbour"}
# Rate limits stay out of the way: these tests are about what one caller may do to another.
NO_RATES = RateLimits(**dict.fromkeys(("key_submit", "key_read", "public_submit", "public_read"), None))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def public(address: str) -> dict[str, str]:
    """A caller without a key, at `address` (the gateway trusts the loopback proxy's X-Forwarded-For)."""
    return {"X-Forwarded-For": address}


def keys_file(path: Path, revoked: frozenset[str] = frozenset()) -> Path:
    lines = [f"{digest(k)} revoked" if k in revoked else digest(k) for k in (A, B)]
    path.write_text("\n".join([*lines, f"{digest(ADMIN)} admin  # operator", ""]))
    return path


async def tenants(aiohttp_client: ClientFactory, redis_server: RedisServer, tmp_path: Path, **settings: Any) -> Client:
    """A gateway with keys A, B and an admin key from a keys file, the public demo open, loopback trusted."""
    defaults: dict[str, Any] = {
        "api_keys_file": keys_file(tmp_path / "keys"),
        "public_demo": True,
        "trusted_proxies": parse_networks("127.0.0.0/8"),
        "rate_limits": NO_RATES,
    }
    return await gateway(aiohttp_client, redis_server, **(defaults | settings))


async def submit(client: Client, headers: dict[str, str], body: dict[str, Any] = JOB, key: str | None = None) -> Any:
    extra = {"Idempotency-Key": key} if key else {}
    return await client.post("/v1/jobs", json=body, headers=headers | extra)


async def job_id(client: Client, headers: dict[str, str], body: dict[str, Any] = JOB) -> str:
    response = await submit(client, headers, body)
    assert response.status == 202, await response.text()
    return str((await response.json())["id"])


# --- 1. Idempotency keys are the caller's own


async def test_an_idempotency_key_is_scoped_to_its_caller(
    aiohttp_client: ClientFactory, redis_server: RedisServer, tmp_path: Path, fake_worker: None
) -> None:
    client = await tenants(aiohttp_client, redis_server, tmp_path)
    first = await submit(client, bearer(A), key="order-42")
    assert first.status == 202
    a_job = (await first.json())["id"]
    # Another key sending the same key, with the same body or another, makes its own job and hears
    # nothing of A's.
    same = await submit(client, bearer(B), key="order-42")
    assert same.status == 202 and "Idempotent-Replayed" not in same.headers
    b_job = (await same.json())["id"]
    assert b_job != a_job
    conflict = await submit(client, bearer(B), OTHER_JOB, key="order-42")
    assert conflict.status == 422 and a_job not in await conflict.text()
    assert (await conflict.json())["id"] == b_job  # B's own earlier job
    replay = await submit(client, bearer(A), key="order-42")
    assert replay.headers["Idempotent-Replayed"] == "true" and (await replay.json())["id"] == a_job
    # Callers without a key are told apart by address; an IPv6 client by its /64.
    seen = {a_job, b_job}
    for address in ("203.0.113.7", "2001:db8:1:2::1", "2001:db8:1:3::1"):
        answer = await submit(client, public(address), key="order-42")
        assert answer.status == 202 and "Idempotent-Replayed" not in answer.headers, address
        seen.add((await answer.json())["id"])
    assert len(seen) == 5
    neighbour = await submit(client, public("2001:db8:1:2::99"), key="order-42")
    assert neighbour.headers["Idempotent-Replayed"] == "true"


async def test_the_synchronous_routes_scope_idempotency_keys_too(
    aiohttp_client: ClientFactory, redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    client = await tenants(aiohttp_client, redis_server, tmp_path, request_timeout_s=30.0)
    async with running_worker(redis_server.url(0)):
        ids = []
        for key in (A, B):
            answer = await client.post("/v1/generate", json=JOB, headers=bearer(key) | {"Idempotency-Key": "gen-1"})
            assert answer.status == 200, await answer.text()
            ids.append((await answer.json())["id"])
        assert ids[0] != ids[1]
        urls = []
        for key in (A, B):
            answer = await client.post(
                "/v1/images/generations", json={"prompt": "a cat"}, headers=bearer(key) | {"Idempotency-Key": "oai-1"}
            )
            assert answer.status == 200, await answer.text()
            urls.append((await answer.json())["data"][0]["url"])
        assert urls[0] != urls[1]
        # The OpenAI answer's image URL is the caller's: another key is told it does not exist.
        path = URL(urls[0]).path
        assert (await client.get(path, headers=bearer(A))).status == 200
        assert (await client.get(path, headers=bearer(B))).status == 404


# --- 2. Jobs belong to their caller


async def unknown_body(client: Client, headers: dict[str, str], method: str, suffix: str, job: str) -> str:
    """What the route answers for an id that was never submitted, with `job` written in its place."""
    ghost = uuid.uuid4().hex
    response = await client.request(method, f"/v1/jobs/{ghost}{suffix}", headers=headers)
    assert response.status == 404
    return (await response.text()).replace(ghost, job)


async def test_another_callers_job_is_answered_as_unknown(
    aiohttp_client: ClientFactory,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    fake_worker: None,
) -> None:
    client = await tenants(aiohttp_client, redis_server, tmp_path)
    job = await job_id(client, bearer(A))
    routes = [("GET", ""), ("GET", "/events"), ("GET", "/images/0"), ("DELETE", "")]
    for stranger in (bearer(B), public("203.0.113.7")):
        for method, suffix in routes:
            response = await client.request(method, f"/v1/jobs/{job}{suffix}", headers=stranger)
            assert response.status == 404, (method, suffix)
            assert await response.text() == await unknown_body(client, stranger, method, suffix, job)
    # Nothing happened to it: its owner and an admin see it queued.
    for caller in (A, ADMIN):
        state = await client.get(f"/v1/jobs/{job}", headers=bearer(caller))
        assert state.status == 200 and (await state.json())["status"] == "queued"
    cancelled = await client.delete(f"/v1/jobs/{job}", headers=bearer(ADMIN))
    assert cancelled.status == 200 and (await cancelled.json())["status"] == "cancelled"


async def test_public_demo_jobs_are_reachable_by_their_id_alone(
    aiohttp_client: ClientFactory, redis_server: RedisServer, tmp_path: Path, fake_worker: None
) -> None:
    client = await tenants(aiohttp_client, redis_server, tmp_path)
    job = await job_id(client, public("203.0.113.7"))
    for caller in (public("203.0.113.7"), public("198.51.100.1"), bearer(A), bearer(ADMIN)):
        assert (await client.get(f"/v1/jobs/{job}", headers=caller)).status == 200


# --- 3. Fair share


async def test_one_caller_flooding_leaves_room_for_another(
    aiohttp_client: ClientFactory,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    fake_worker: None,
) -> None:
    client = await tenants(aiohttp_client, redis_server, tmp_path, max_queue_depth=30, request_timeout_s=30.0)
    flood = await asyncio.gather(*(submit(client, bearer(A), {"prompt": f"flood {k}"}) for k in range(40)))
    accepted = [r for r in flood if r.status == 202]
    refused = [r for r in flood if r.status == 429]
    assert (len(accepted), len(refused)) == (20, 20)  # the default cap per caller
    error = await error_of(refused[0])
    assert error["code"] == "too_many_jobs_in_flight" and "20 jobs in flight" in error["message"]
    assert 1 <= int(refused[0].headers["Retry-After"]) <= 60
    # Another key is still accepted, and served.
    async with running_worker(redis_server.url(0)):
        answer = await client.post("/v1/generate", json=JOB, headers=bearer(B))
        assert answer.status == 200, await answer.text()
        # A's jobs were queued first, so they have finished: A has room again.
        assert (await submit(client, bearer(A))).status == 202


async def test_public_callers_are_capped_per_address(
    aiohttp_client: ClientFactory, redis_server: RedisServer, tmp_path: Path, fake_worker: None
) -> None:
    client = await tenants(aiohttp_client, redis_server, tmp_path, max_jobs_in_flight_per_caller=2)
    statuses = [(await submit(client, public("2001:db8::1"))).status for _ in range(3)]
    assert statuses == [202, 202, 429]
    assert (await submit(client, public("2001:db8::2"))).status == 429  # the same /64
    assert (await submit(client, public("2001:db8:0:1::1"))).status == 202
    assert (await submit(client, bearer(A))).status == 202


async def redis_time_passes(redis_client: aioredis.Redis, ms: int) -> None:
    """Return once `ms` have passed by Redis's clock: a key set to expire then announces it."""
    await redis_client.config_set("notify-keyspace-events", "Ex")
    marker = f"test:marker:{uuid.uuid4().hex}"
    async with redis_client.pubsub() as events, asyncio.timeout(30):
        await events.subscribe("__keyevent@0__:expired")
        await redis_client.set(marker, 1, px=ms)
        while (message := await events.get_message(timeout=None)) is None or message["data"] != marker.encode():
            pass


async def test_a_job_counts_against_its_callers_cap_as_long_as_it_is_unfinished(
    aiohttp_client: ClientFactory,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    fake_worker: None,
) -> None:
    # The job waits in the queue for longer than a result lives: it is still unfinished, so it still counts.
    client = await tenants(aiohttp_client, redis_server, tmp_path, max_jobs_in_flight_per_caller=1, result_ttl_s=1)
    first = await job_id(client, bearer(A))
    await redis_time_passes(redis_client, 1500)
    refused = await submit(client, bearer(A), OTHER_JOB)
    assert refused.status == 429 and (await error_of(refused))["code"] == "too_many_jobs_in_flight"
    claimed = await claim_next(redis_client)
    assert claimed.job.id == first
    assert await finish(redis_client, claimed, [b"png"])
    in_flight = [key async for key in redis_client.scan_iter(match="sdxl:in-flight:*")]
    assert in_flight == []  # the job's end took it out of its caller's set, and the empty set is gone
    assert (await submit(client, bearer(A), OTHER_JOB)).status == 202


async def first_answers(tasks: list[asyncio.Task[Any]], count: int) -> list[Any]:
    """The first `count` of `tasks` to finish (the others still waiting)."""
    pending: set[asyncio.Task[Any]] = set(tasks)
    done: list[asyncio.Task[Any]] = []
    while len(done) < count:
        finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        done += finished
    return [task.result() for task in done]


async def test_waiting_requests_are_capped_per_caller_replays_included(
    aiohttp_client: ClientFactory,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    fake_worker: None,
) -> None:
    # Six replays of one Idempotency-Key make one job; only three of them may wait for it.
    client = await tenants(
        aiohttp_client, redis_server, tmp_path, max_waiting_requests_per_caller=3, request_timeout_s=60.0
    )
    replay = bearer(A) | {"Idempotency-Key": "one-job"}
    waits = [asyncio.create_task(client.post("/v1/generate", json=JOB, headers=replay)) for _ in range(6)]
    refused = await first_answers(waits, 3)
    assert [r.status for r in refused] == [429, 429, 429]
    error = await error_of(refused[0])
    assert error["code"] == "too_many_waiting_requests" and "3 waiting requests per caller" in error["message"]
    assert int(refused[0].headers["Retry-After"]) >= 1
    held = [task for task in waits if not task.done()]
    # The OpenAI route waits too, and counts against the same cap; another caller has its own.
    openai = await client.post("/v1/images/generations", json={"prompt": "a cat"}, headers=bearer(A))
    assert openai.status == 429 and (await openai.json())["error"]["code"] == "too_many_waiting_requests"
    other = asyncio.create_task(client.post("/v1/generate", json=OTHER_JOB, headers=bearer(B)))
    for _ in range(2):
        assert await finish(redis_client, await claim_next(redis_client), [b"png"])
    answers = [await task for task in [*held, other]]
    assert sorted(r.status for r in answers) == [200, 200, 200, 200]


def test_the_default_burst_of_one_address_cannot_fill_the_queue() -> None:
    limits = RateLimits()
    for rate in (limits.address_submit, limits.public_submit, limits.key_submit):
        assert rate is not None and rate.burst < GatewayConfig.max_queue_depth
    config = GatewayConfig()
    assert 0 < config.max_jobs_in_flight_per_caller < config.max_queue_depth
    with pytest.raises(ConfigError, match="--max-jobs-in-flight-per-caller"):
        GatewayConfig(max_jobs_in_flight_per_caller=-1)


# --- 4. Event streams


async def open_stream(client: Client, job: str, headers: dict[str, str]) -> Any:
    response = await client.get(f"/v1/jobs/{job}/events", headers=headers)
    if response.status == 200:
        assert (await anext(read_events(response)))[0] == "queued"
    return response


async def test_event_streams_are_capped_per_caller(
    aiohttp_client: ClientFactory, redis_server: RedisServer, tmp_path: Path, fake_worker: None
) -> None:
    client = await tenants(aiohttp_client, redis_server, tmp_path, max_event_streams_per_caller=2)
    job = await job_id(client, bearer(A))
    first, _ = await open_stream(client, job, bearer(A)), await open_stream(client, job, bearer(A))
    refused = await open_stream(client, job, bearer(A))
    assert refused.status == 429 and int(refused.headers["Retry-After"]) >= 1
    error = await error_of(refused)
    assert error["code"] == "too_many_event_streams" and "2 open event streams" in error["message"]
    assert (await open_stream(client, job, bearer(ADMIN))).status == 200  # another caller has its own
    first.close()  # a closed stream gives its place back (noticed at the next position check)
    for _ in range(100):
        again = await open_stream(client, job, bearer(A))
        if again.status == 200:
            break
        await asyncio.sleep(0.05)
    assert again.status == 200


async def test_a_revoked_key_loses_its_open_streams(
    aiohttp_client: ClientFactory,
    redis_server: RedisServer,
    tmp_path: Path,
    fake_worker: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(auth, "KEYS_RELOAD_INTERVAL_S", 0.05)
    path = tmp_path / "keys"
    client = await tenants(aiohttp_client, redis_server, tmp_path, api_keys_file=keys_file(path))
    a_job, b_job = await job_id(client, bearer(A)), await job_id(client, bearer(B))
    a_stream, b_stream = await open_stream(client, a_job, bearer(A)), await open_stream(client, b_job, bearer(B))
    keys_file(path, revoked=frozenset({A}))
    events = [event async for event in read_events(a_stream)]  # ends: the server closes it
    assert events[-1] == ("closed", {"id": a_job, "reason": "api_key_revoked"})
    # B's stream is still followed: cancelling B's job reaches it.
    assert (await client.delete(f"/v1/jobs/{b_job}", headers=bearer(B))).status == 200
    async for name, _ in read_events(b_stream):
        if name != "queued":
            break
    assert name == "cancelled"


# --- 5. Dead letters


async def test_dead_letters_are_bounded_expire_and_keep_no_prompt(
    redis_client: aioredis.Redis, redis_server: RedisServer
) -> None:
    keys = RedisKeys()
    stream = keys.dead_letter_stream
    stale = int(time.time() * 1000) - 3_600_000  # older than the job's result ttl below
    await redis_client.xadd(stream, {"job": json.dumps({"prompt": "a secret"})}, id=f"{stale}-0")
    for _ in range(300):
        await redis_client.xadd(stream, {"job": "{}"})
    job = make_job(uuid.uuid4().hex, prompt="a private prompt", negative_prompt="blurry", result_ttl_s=600)
    delivery = Delivery(redis_client, keys, dead_letter_max_len=50)
    await redis_client.xadd(keys.size_stream(job.params.shape.size), {"job": job.model_dump_json()})
    claimed = await claim_next(redis_client)
    await delivery.dead_letter(claimed, "test-worker", "for the test")
    entries: list[tuple[bytes, dict[bytes, bytes]]] = await redis_client.xrange(stream)  # type: ignore[assignment]
    assert 50 <= len(entries) <= 150  # MAXLEN ~ 50: trimmed by whole nodes of at most 100 entries
    assert entries[0][0].decode() != f"{stale}-0"  # older than the result ttl: gone
    _, fields = entries[-1]
    stored = b"".join(fields.values())
    assert b"private" not in stored and b"blurry" not in stored
    recorded = json.loads(fields[b"job"])
    assert recorded["id"] == job.id and recorded["prompt_chars"] == len(job.params.prompt)
    assert 0 < await redis_client.ttl(stream) <= job.result_ttl_s


# --- 6. /metrics


async def test_metrics_can_need_a_bearer_token(
    aiohttp_client: ClientFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    client = await gateway(aiohttp_client, redis_server, metrics_token="scrape-me")
    refused = await client.get("/metrics")
    assert refused.status == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await error_of(refused))["code"] == "missing_metrics_token"
    assert (await client.get("/metrics", headers=bearer("wrong"))).status == 401
    allowed = await client.get("/metrics", headers=bearer("scrape-me"))
    assert allowed.status == 200 and "sdxl_gateway_requests_total" in await allowed.text()
    assert (await client.get("/healthz")).status == 200


async def test_metrics_can_move_to_their_own_address(aiohttp_client: ClientFactory, redis_server: RedisServer) -> None:
    port = free_port()
    client = await gateway(aiohttp_client, redis_server, metrics_listen=("127.0.0.1", port), metrics_token="t")
    assert (await client.get("/metrics")).status == 404
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port}/metrics"
        async with session.get(url) as response:
            assert response.status == 401
        async with session.get(url, headers=bearer("t")) as response:
            assert response.status == 200 and "sdxl_queue_depth" in await response.text()


def test_the_metrics_flags(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("SDXL_SERVE_METRICS_TOKEN", "from-env")
    args = build_parser().parse_args(["gateway", "--metrics-listen", "127.0.0.1:9401"])
    config = gateway_config(args)
    assert (config.metrics_listen, config.metrics_token) == (("127.0.0.1", 9401), "from-env")
    log_config(logging.getLogger("test"), config)
    assert "config metrics_token=***" in caplog.text
    assert "from-env" not in repr(config) and "from-env" not in caplog.text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["gateway", "--metrics-listen", "nowhere"])
