"""The fault injector's TCP proxy (testkit/proxy.py) in front of a real redis-server: it forwards, and
each control does to a connection what it says."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from testkit.proxy import DropRule, FaultProxy
from tests.support import RedisServer


@pytest.fixture
async def proxy(redis_server: RedisServer, redis_client: aioredis.Redis) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy("test", redis_server.port)
    await proxy.start()
    yield proxy
    await proxy.close()


def once(proxy: FaultProxy, **options: float) -> aioredis.Redis:
    """A client through the proxy that never retries: each fault shows as an error."""
    return aioredis.Redis.from_url(proxy.url(), retry=Retry(NoBackoff(), 0), **options)  # type: ignore[arg-type]


async def test_forwards_commands_and_replies(proxy: FaultProxy, redis_client: aioredis.Redis) -> None:
    client = once(proxy)
    assert await client.set("k", "v") and await client.get("k") == b"v"
    assert await redis_client.get("k") == b"v"
    assert proxy.stats.connections == 1
    await client.aclose()


async def test_a_dropped_reply_loses_the_answer_but_not_the_write(
    proxy: FaultProxy, redis_client: aioredis.Redis
) -> None:
    client = once(proxy)
    await client.ping()
    lost = proxy.drop_reply(DropRule(b"INCR"))
    with pytest.raises(RedisConnectionError):
        await client.incr("counter")
    assert lost.is_set() and proxy.stats.replies_dropped == 1
    assert await redis_client.get("counter") == b"1"  # Redis did it; the client never heard
    assert await client.incr("counter") == 2  # the rule fired once; a new connection works
    await client.aclose()


async def test_a_rule_waits_for_a_reply_that_contains_its_bytes(
    proxy: FaultProxy, redis_client: aioredis.Redis
) -> None:
    client = once(proxy)
    proxy.drop_reply(DropRule(b"GET", b"wanted"))
    assert await client.get("k") is None  # a reply without the bytes goes through
    await redis_client.set("k", "wanted")
    with pytest.raises(RedisConnectionError):
        await client.get("k")
    await client.aclose()


async def test_kill_pubsub_resets_only_subscribers(proxy: FaultProxy) -> None:
    subscriber_reader, subscriber = await asyncio.open_connection("127.0.0.1", proxy.port)
    subscriber.write(b"*2\r\n$9\r\nSUBSCRIBE\r\n$7\r\nchannel\r\n")
    assert b"subscribe" in await subscriber_reader.read(1024)
    client = once(proxy)
    await client.ping()  # an ordinary connection beside it
    assert proxy.kill(pubsub_only=True) == 1
    with contextlib.suppress(ConnectionError):
        assert await subscriber_reader.read(1024) == b""  # reset: end of stream, or the error
    assert await client.ping()
    subscriber.close()
    await client.aclose()


async def test_a_partition_holds_traffic_until_healed(proxy: FaultProxy) -> None:
    client = once(proxy, socket_timeout=0.5)
    await client.set("k", "before")
    proxy.partition()
    with pytest.raises(RedisTimeoutError):
        await client.get("k")
    proxy.heal()
    fresh = once(proxy)
    assert await fresh.get("k") == b"before"
    await fresh.aclose()
    await client.aclose()


async def test_a_refusing_partition_resets_connections_until_healed(proxy: FaultProxy) -> None:
    client = once(proxy)
    await client.ping()
    proxy.partition(refuse=True)
    for _ in range(2):  # the old connection was reset, then a new one is refused
        with pytest.raises(RedisConnectionError):
            await client.ping()
    assert proxy.stats.refused_while_partitioned == 1
    proxy.heal()
    assert await client.ping()
    await client.aclose()


async def test_pause_after_freezes_the_client_between_two_commands(
    proxy: FaultProxy, redis_client: aioredis.Redis
) -> None:
    client = once(proxy)
    paused = proxy.pause_after(DropRule(b"GET"))

    async def get_then_set() -> None:
        assert await client.get("k") is None
        await client.set("k", "late")

    both = asyncio.create_task(get_then_set())
    await paused.wait()
    await redis_client.set("k", "between")  # lands between the client's two commands
    proxy.heal()
    await both
    assert await redis_client.get("k") == b"late"
    await client.aclose()
