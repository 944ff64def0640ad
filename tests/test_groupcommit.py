"""Durable acceptance by group commit, against a real primary, replica and sentinels: concurrent submits share
one WAIT, and still no submit is answered accepted before the replica holds it."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common.jobstore import JobStore, NotDurable, Submitted
from common.protocol import Job
from common.redis_conn import connect
from common.rediskeys import RedisKeys
from sdxl_serve.processes import signal_group
from testkit.jobs import make_job
from testkit.sentinel import SentinelGroup, start_sentinel_group

KEYS = RedisKeys("durable")
STREAM = KEYS.size_stream("64x64")
CONCURRENT = 20


@pytest.fixture
async def group(tmp_path: Path) -> AsyncIterator[SentinelGroup]:
    started = await start_sentinel_group(tmp_path)
    yield started
    await started.close()


@pytest.fixture
async def relayed(tmp_path: Path) -> AsyncIterator[SentinelGroup]:
    """A group whose replica replicates through a relay that can hold it back."""
    started = await start_sentinel_group(tmp_path, relayed=True)
    yield started
    await started.close()


@pytest.fixture
async def client(group: SentinelGroup) -> AsyncIterator[aioredis.Redis]:
    connected = connect(group.url(), name="test-groupcommit")
    yield connected
    await connected.aclose()


def _job() -> Job:
    return make_job(uuid.uuid4().hex, prompt="a fox")


async def _submit_all(store: JobStore, jobs: list[Job], stream: str = STREAM) -> list[Submitted | BaseException]:
    """Submit `jobs` concurrently, each with its own idempotency key (its id); every outcome, in order."""
    submits = (store.submit(job, stream, idempotency_key=job.id) for job in jobs)
    return list(await asyncio.gather(*submits, return_exceptions=True))


async def _calls(client: aioredis.Redis, command: str) -> int:
    """How many times the master ran `command` since its statistics were reset."""
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_concurrent_submits_share_one_wait(client: aioredis.Redis) -> None:
    store = JobStore(client, KEYS, durable_accept="replica", durable_timeout_ms=5000)
    await client.config_resetstat()
    jobs = [_job() for _ in range(CONCURRENT)]
    outcomes = await _submit_all(store, jobs)
    assert outcomes == [Submitted(job_id=job.id, created=True) for job in jobs]
    # They all came while no batch was out, so they went as one: their scripts, then one WAIT.
    assert (await _calls(client, "evalsha"), await _calls(client, "wait")) == (CONCURRENT, 1)


async def test_no_submit_is_accepted_while_the_replica_does_not_acknowledge(
    group: SentinelGroup, client: aioredis.Redis
) -> None:
    """A WAIT on a connection that wrote nothing answers at once with every connected replica, paused or not;
    the batch's WAIT follows its scripts on their connection, so it waits for the replica to hold them."""
    store = JobStore(client, KEYS, durable_accept="replica", durable_timeout_ms=300)
    jobs = [_job() for _ in range(CONCURRENT)]
    signal_group(group.replica.process.pid, signal.SIGSTOP)
    try:
        refused = await _submit_all(store, jobs)
    finally:
        signal_group(group.replica.process.pid, signal.SIGCONT)
    assert all(isinstance(outcome, NotDurable) for outcome in refused), refused
    assert [outcome.job_id for outcome in refused if isinstance(outcome, NotDurable)] == [job.id for job in jobs]
    # The jobs were written to the primary: a retry with the same key gets each one, confirmed now.
    retried = await asyncio.gather(*(store.submit(_job(), STREAM, idempotency_key=job.id) for job in jobs))
    assert retried == [Submitted(job_id=job.id, created=False) for job in jobs]


async def test_a_submit_that_fails_fails_alone(client: aioredis.Redis) -> None:
    store = JobStore(client, KEYS, durable_accept="replica", durable_timeout_ms=5000)
    await client.set("not-a-stream", "x")  # queueing on it is an error (WRONGTYPE) for that submit only
    jobs = [_job() for _ in range(3)]
    submits = [store.submit(jobs[0], STREAM), store.submit(jobs[1], "not-a-stream"), store.submit(jobs[2], STREAM)]
    first, failed, last = await asyncio.gather(*submits, return_exceptions=True)
    assert isinstance(failed, ResponseError) and "WRONGTYPE" in str(failed)
    assert (first, last) == (Submitted(jobs[0].id, True), Submitted(jobs[2].id, True))


async def test_a_failover_loses_no_accepted_job(relayed: SentinelGroup) -> None:
    """The replica falls behind (its link holds the primary's stream), the primary dies, the replica is
    promoted: every job accepted before is on the new master, and none was accepted meanwhile."""
    client = connect(relayed.url(), name="test-groupcommit-failover")
    store = JobStore(client, KEYS, durable_accept="replica", durable_timeout_ms=300)
    try:
        accepted = [_job() for _ in range(CONCURRENT)]
        assert all(isinstance(outcome, Submitted) for outcome in await _submit_all(store, accepted))
        await relayed.hold_replica()
        behind = await _submit_all(store, [_job() for _ in range(CONCURRENT)])
        assert all(isinstance(outcome, NotDurable) for outcome in behind), behind
        await relayed.kill_primary()
        assert relayed.link is not None
        relayed.link.cut()  # what it held back dies with the primary
        assert await relayed.switched() == ("127.0.0.1", relayed.replica.port)
        assert [await store.record(job.id) is not None for job in accepted] == [True] * CONCURRENT
    finally:
        await client.aclose()
