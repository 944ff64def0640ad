"""Redis URLs, and clients that follow a Sentinel failover, against a real primary, replica and sentinels."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common.config import ConfigError
from common.jobstore import DurabilityUnsupported, JobStore, NotDurable
from common.protocol import GenerationParams, Job, Shape
from common.redis_conn import RedisUrlError, SentinelUrl, check_url, connect, parse_sentinel_url
from common.rediskeys import RedisKeys
from gateway.config import GatewayConfig
from sdxl_serve.processes import signal_group
from testkit.sentinel import SentinelGroup, start_sentinel_group
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


def _job(job_id: str) -> Job:
    shape = Shape(width=64, height=64, steps=2)
    return Job(
        id=job_id, params=GenerationParams(prompt="a fox", guidance_scale=5.0).resolved(shape, seed=1), result_ttl_s=60
    )


async def test_durable_acceptance_waits_for_the_replica(sentinel_group: SentinelGroup) -> None:
    client = connect(sentinel_group.url(), name="test-durable")
    keys = RedisKeys("durable")
    store = JobStore(client, keys, durable_accept="replica", durable_timeout_ms=300)
    try:
        assert (await store.submit(_job("a" * 32), keys.size_stream("64x64"))).created
        signal_group(sentinel_group.replica.process.pid, signal.SIGSTOP)  # a replica that stops acknowledging
        try:
            with pytest.raises(NotDurable, match="not confirmed by replica within 300 ms") as caught:
                await store.submit(_job("b" * 32), keys.size_stream("64x64"), idempotency_key="k")
        finally:
            signal_group(sentinel_group.replica.process.pid, signal.SIGCONT)
        assert caught.value.job_id == "b" * 32
        # The job may exist: the retry with the same key refers to it, and is confirmed now.
        again = await store.submit(_job("c" * 32), keys.size_stream("64x64"), idempotency_key="k")
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
            await store.submit(_job("d" * 32), keys.size_stream("64x64"))
    finally:
        await client.aclose()
