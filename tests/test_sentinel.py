"""The test kit's replicated Redis (testkit/sentinel.py) against real servers and sentinels: a primary brought
back after a failover is never promoted before its first sync, and is in sync when `rejoin` returns."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from sdxl_serve.processes import ProcessError
from testkit.sentinel import HOST, SentinelGroup, start_sentinel_group

ABORT = "-failover-abort-no-good-slave"


@pytest.fixture
async def group(tmp_path: Path) -> AsyncIterator[SentinelGroup]:
    started = await start_sentinel_group(tmp_path)
    yield started
    await started.close()


async def _listed(master_port: int, replica_port: int) -> None:
    """Until the master lists the replica on `replica_port` (in whatever state of its sync)."""
    client = aioredis.Redis(host=HOST, port=master_port)
    try:
        while True:  # replication has no event to await from outside
            info: dict[str, Any] = await client.info("replication")
            if any(isinstance(v, dict) and v.get("port") == replica_port for v in info.values()):
                return
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def _replicates_from(replica_port: int, upstream_port: int) -> None:
    """Until the replica on `replica_port` says its master is on `upstream_port`."""
    client = aioredis.Redis(host=HOST, port=replica_port)
    try:
        while True:  # replication has no event to await from outside
            if (await client.info("replication")).get("master_port") == upstream_port:
                return
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def _first_event(pubsub: aioredis.client.PubSub) -> str:
    """The first channel a subscribed sentinel announces something on."""
    async for message in pubsub.listen():
        if message["type"] == "message":
            return str(message["channel"].decode())
    raise AssertionError("the sentinel's announcements ended")


async def test_a_returning_primary_is_not_promoted_before_its_first_sync(group: SentinelGroup) -> None:
    """The new master dies while the old primary, back as its replica, still waits for its first sync (it is
    empty): the sentinels find no replica to promote, where they would have promoted the empty one."""
    await group.kill_primary()
    await group.switched()
    returning = group.primary.port
    rejoining = asyncio.create_task(group.rejoin())
    sentinel = aioredis.Redis(host=HOST, port=group.sentinel_ports[0])
    pubsub = sentinel.pubsub()
    try:
        await asyncio.wait_for(_listed(group.replica.port, returning), 30)
        await pubsub.subscribe(ABORT, "+switch-master")
        await group.kill_primary()  # the new master: `rejoin` made it the group's primary
        # A second failover waits out the first one's (2 x failover-timeout), then picks a replica; on a busy
        # machine a sentinel whose timer ran late also sits out 30 s in TILT mode first.
        assert await asyncio.wait_for(_first_event(pubsub), 120) == ABORT
    finally:
        rejoining.cancel()
        await asyncio.gather(rejoining, return_exceptions=True)
        await pubsub.aclose()
        await sentinel.aclose()


async def test_rejoin_returns_with_the_returning_primary_in_sync(group: SentinelGroup) -> None:
    await group.kill_primary()
    await group.switched()
    await group.rejoin()
    replica = aioredis.Redis(host=HOST, port=group.replica.port)
    try:
        info: dict[str, Any] = await replica.info("replication")
        assert (info["master_port"], info["master_link_status"]) == (group.primary.port, "up")
        assert await replica.config_get("replica-priority") == {"replica-priority": "100"}
    finally:
        await replica.aclose()


async def test_holding_a_replica_the_sentinels_repointed_is_refused(tmp_path: Path) -> None:
    """A replica relayed from the primary reports the relay as its master; the sentinels repoint it at the
    primary a failover timeout after they found it. Holding the relay then would hold nothing: refused."""
    relayed = await start_sentinel_group(tmp_path, relayed=True)
    try:
        # Whichever sentinel gets there first repoints it (+fix-slave-config): watch the replica itself.
        await asyncio.wait_for(_replicates_from(relayed.replica.port, relayed.primary.port), 60)
        with pytest.raises(ProcessError, match="not through the relay"):
            await relayed.hold_replica()
    finally:
        await relayed.close()
