"""Redis URLs, and clients that follow a Sentinel failover, against a real primary, replica and sentinels."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common.config import ConfigError
from common.jobstore import DurabilityUnsupported, JobStore, NotDurable
from common.redis_conn import EvictingRedis, RedisUrlError, SentinelUrl, check_url, connect, parse_sentinel_url
from common.rediskeys import RedisKeys
from gateway.app import create_app
from gateway.config import GatewayConfig
from sdxl_serve.cli import main
from sdxl_serve.processes import signal_group
from testkit import RedisOptions, RedisProcess, free_port, gateway_args, redis_process, sdxl_serve_argv, worker_args
from testkit.jobs import make_job
from testkit.sentinel import SentinelGroup, start_sentinel_group
from tests.support import ClientFactory, register_worker
from worker.config import WorkerConfig


def test_a_sentinel_url_names_sentinels_service_db_and_credentials() -> None:
    url = "redis+sentinel://app:s%40cret@10.0.0.1:26379,[::1]:26380,sentinel-c/sdxl/2?sentinel_password=x"
    assert parse_sentinel_url(url) == SentinelUrl(
        sentinels=(("10.0.0.1", 26379), ("::1", 26380), ("sentinel-c", 26379)),
        service="sdxl",
        db=2,
        username="app",
        password="s@cret",
        sentinel_password="x",
    )
    assert parse_sentinel_url("redis+sentinel://h:1/sdxl") == SentinelUrl(sentinels=(("h", 1),), service="sdxl")


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("redis+sentinel://h:1", "names its service"),
        ("redis+sentinel://h:1/", "names its service"),
        ("redis+sentinel://h:x/sdxl", "port of sentinel h must be a number"),
        ("redis+sentinel://h:1,/sdxl", "a sentinel address is empty"),
        ("redis+sentinel://h:1/sdxl/zero", "database after the service must be a number"),
        ("http://h:1/0", "must be a redis://, rediss://, unix://, redis\\+sentinel:// URL"),
    ],
)
def test_a_bad_url_is_refused_naming_the_part(url: str, rule: str) -> None:
    with pytest.raises(RedisUrlError, match=rule):
        check_url(url)
    for config in (GatewayConfig, WorkerConfig):
        with pytest.raises(ConfigError, match=f"--redis-url .*{rule}"):
            config(redis_url=url)


@pytest.fixture
async def sentinel_group(tmp_path: Path) -> AsyncIterator[SentinelGroup]:
    group = await start_sentinel_group(tmp_path)
    yield group
    await group.close()


async def test_a_client_follows_a_failover_and_keeps_its_data(sentinel_group: SentinelGroup) -> None:
    client = connect(sentinel_group.url(), name="test-failover")
    try:
        await client.set("before", "1")
        assert await client.wait(1, 5000) == 1  # the replica holds it
        await sentinel_group.kill_primary()
        # The same client, with no help: its commands are retried until the sentinels name the new master.
        assert await client.set("after", "2")
        assert await sentinel_group.switched() == ("127.0.0.1", sentinel_group.replica.port)
        assert await client.mget("before", "after") == [b"1", b"2"]
        assert await sentinel_group.master_port() == sentinel_group.replica.port
    finally:
        await client.aclose()


async def test_a_command_in_flight_when_the_primary_dies_completes_on_the_new_master(
    sentinel_group: SentinelGroup,
) -> None:
    """A connection that drops mid-command asks the sentinels again when it reconnects; redis-py's own
    reconnect retried the dead master's address until its retries (5 s) ran out, past the switch."""
    client = connect(sentinel_group.url(), name="test-in-flight")
    other = connect(sentinel_group.url(), name="test-other")
    try:
        waiting: asyncio.Future[Any] = asyncio.ensure_future(client.blpop(["handoff"], timeout=30))
        await blocked(other, "blpop")
        await sentinel_group.kill_primary()
        await sentinel_group.switched()
        await other.rpush("handoff", "after the failover")
        assert await waiting == (b"handoff", b"after the failover")
    finally:
        await client.aclose()
        await other.aclose()


async def blocked(client: aioredis.Redis, command: str) -> None:
    """Until some client is blocked in `command` (the server has no event for it: poll CLIENT LIST)."""
    async with asyncio.timeout(10):
        while True:
            if f"cmd={command}".encode() in await client.execute_command("CLIENT", "LIST"):
                return
            await asyncio.sleep(0.05)


async def test_durable_acceptance_waits_for_the_replica(sentinel_group: SentinelGroup) -> None:
    client = connect(sentinel_group.url(), name="test-durable")
    keys = RedisKeys("durable")
    store = JobStore(client, keys, durable_accept="replica", durable_timeout_ms=300)
    try:
        assert (await store.submit(make_job("a" * 32), keys.size_stream("64x64"))).created
        signal_group(sentinel_group.replica.process.pid, signal.SIGSTOP)  # a replica that stops acknowledging
        try:
            with pytest.raises(NotDurable, match="not confirmed by replica within 300 ms") as caught:
                await store.submit(make_job("b" * 32), keys.size_stream("64x64"), idempotency_key="k")
        finally:
            signal_group(sentinel_group.replica.process.pid, signal.SIGCONT)
        assert caught.value.job_id == "b" * 32
        # The job may exist: the retry with the same key refers to it, and is confirmed now.
        again = await store.submit(make_job("c" * 32), keys.size_stream("64x64"), idempotency_key="k")
        assert (again.job_id, again.created) == ("b" * 32, False)
    finally:
        await client.aclose()


async def test_durable_acceptance_on_the_append_only_file_needs_redis_7_2(sentinel_group: SentinelGroup) -> None:
    """WAITAOF came with Redis 7.2: on an older server the check a gateway makes at start fails, naming the
    flag and the version, and a submit fails loudly instead of pretending."""
    client = connect(sentinel_group.url(), name="test-durable-aof")
    keys = RedisKeys("durable-aof")
    store = JobStore(client, keys, durable_accept="aof", durable_timeout_ms=300)
    try:
        version = (await client.info("server"))["redis_version"]
        if tuple(int(part) for part in str(version).split(".")[:2]) >= (7, 2):
            pytest.skip(f"redis {version} has WAITAOF; covered by the replica mode's test")
        with pytest.raises(DurabilityUnsupported, match=rf"--durable-accept aof needs WAITAOF .*Redis {version}"):
            await store.check_durability()
        with pytest.raises(ResponseError, match=r"(?i)unknown command"):
            await store.submit(make_job("d" * 32), keys.size_stream("64x64"))
    finally:
        await client.aclose()


# --- A Redis that may evict keys: refused at start and on every reconnect, unless accepted (loudly).


@pytest.fixture
def evicting_redis() -> Iterator[RedisProcess]:
    """A redis-server that evicts any key when full, as `maxmemory-policy allkeys-lru` makes it."""
    with redis_process(RedisOptions(extra=("--maxmemory-policy", "allkeys-lru"))) as server:
        yield server


@pytest.mark.parametrize("role", ["gateway", "worker"])
def test_a_role_refuses_to_start_on_an_evicting_redis_naming_the_flag(evicting_redis: RedisProcess, role: str) -> None:
    url = evicting_redis.url()
    if role == "gateway":
        args = gateway_args(url, free_port())
    else:
        args = worker_args(url, "/nonexistent", "w1", "--metrics-port", "0")
    started = subprocess.run(
        sdxl_serve_argv(*args),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 2, started.stderr
    last = started.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sdxl-serve {role}: error: Redis at 127.0.0.1:{evicting_redis.port} may evict"), last
    assert "(maxmemory-policy allkeys-lru)" in last and "--allow-evicting-redis" in last, last
    assert "Traceback" not in started.stderr


async def test_an_accepted_evicting_redis_is_served_and_logged_loudly(
    evicting_redis: RedisProcess, aiohttp_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    config = GatewayConfig(redis_url=evicting_redis.url(), allow_evicting_redis=True)
    client = await aiohttp_client(create_app(config))
    assert (await client.get("/readyz")).status == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("maxmemory-policy allkeys-lru" in w and "accepted by --allow-evicting-redis" in w for w in warnings)


async def test_a_reconnect_to_a_redis_that_now_evicts_is_refused_until_it_stops(
    redis_server: RedisProcess, redis_client: aioredis.Redis, aiohttp_client: ClientFactory
) -> None:
    """Redis reconfigured (or a failover to a replica configured otherwise): the gateway's connections, once
    re-established, refuse it; the gateway answers 503 and /readyz takes it out of service until it is fixed."""
    client = await aiohttp_client(create_app(GatewayConfig(redis_url=redis_server.url(0), result_ttl_s=60)))
    plain = connect(redis_server.url(0), name="test-evicting")
    try:
        await register_worker(redis_client)
        assert (await client.get("/readyz")).status == 200
        await redis_client.config_set("maxmemory-policy", "volatile-lru")  # it evicts keys that have a TTL
        await redis_client.client_kill_filter(_type="normal", skipme=True)  # every other client reconnects
        with pytest.raises(EvictingRedis, match="maxmemory-policy volatile-lru"):
            await plain.ping()
        assert (await client.get("/readyz")).status == 503
        response = await client.post("/v1/jobs", json={"prompt": "a cat"})
        assert response.status == 503 and "Retry-After" in response.headers
        await redis_client.config_set("maxmemory-policy", "noeviction")
        assert await plain.ping()
        assert (await client.get("/readyz")).status == 200
    finally:
        await redis_client.config_set("maxmemory-policy", "noeviction")
        await plain.aclose()


def test_status_names_the_flag_on_an_evicting_redis_and_reads_it_with_the_flag(
    evicting_redis: RedisProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--redis-url", evicting_redis.url()]) == 1
    assert "maxmemory-policy allkeys-lru" in capsys.readouterr().err
    assert main(["status", "--redis-url", evicting_redis.url(), "--allow-evicting-redis", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["workers"] == []


async def test_a_client_through_sentinel_checks_the_master_it_is_sent_to(tmp_path: Path) -> None:
    group = await start_sentinel_group(tmp_path, RedisOptions(extra=("--maxmemory-policy", "allkeys-lru")))
    client = connect(group.url(), name="test-evicting-sentinel")
    try:
        with pytest.raises(EvictingRedis, match=f"127.0.0.1:{group.primary.port} .*maxmemory-policy allkeys-lru"):
            await client.ping()
    finally:
        await client.aclose()
        await group.close()
