"""Routing policies and per-worker streams on a real redis-server: where jobs go, and that they come back
when their worker is gone."""

from __future__ import annotations

import random
from typing import Any

import pytest
import redis.asyncio as aioredis

from common.protocol import Shape
from common.rediskeys import RedisKeys
from common.registry import Registry, WorkerInfo
from gateway.placement import Placement
from testkit.jobs import make_job
from tests.queues import Queue
from tests.support import worker_info

KEYS = RedisKeys()
SMALL = Shape(width=64, height=64, steps=2)
LARGE = Shape(width=128, height=128, steps=2)


async def test_shared_routing_uses_the_size_stream(redis_client: aioredis.Redis) -> None:
    router = Placement("shared", redis_client, KEYS)
    assert await router.stream_for(SMALL, "euler", [worker_info("a", SMALL)]) == KEYS.size_stream(SMALL.size)


@pytest.mark.parametrize("policy", ["shared", "random", "p2c"])
async def test_only_workers_whose_step_range_and_schedulers_fit_are_chosen(
    redis_client: aioredis.Redis, policy: str
) -> None:
    workers = [
        worker_info("short", SMALL, max_steps=20),
        worker_info("long", SMALL, max_steps=50),
        worker_info("long-dpm", SMALL, max_steps=50, schedulers=["euler", "dpmpp_2m_karras"]),
    ]
    router = Placement(policy, redis_client, KEYS, random.Random(0))  # type: ignore[arg-type]
    at_30 = Shape(width=64, height=64, steps=30)
    assert {await router.stream_for(at_30, "euler", workers) for _ in range(50)} == {
        KEYS.worker_stream("long"),
        KEYS.worker_stream("long-dpm"),
    }
    assert {await router.stream_for(SMALL, "dpmpp_2m_karras", workers) for _ in range(10)} == {
        KEYS.worker_stream("long-dpm")
    }


async def test_shared_routing_keeps_a_job_every_worker_of_its_size_runs_on_the_size_stream(
    redis_client: aioredis.Redis,
) -> None:
    workers = [
        worker_info("a", SMALL, max_steps=50),
        worker_info("b", SMALL, max_steps=20),
        worker_info("c", LARGE, max_steps=5),
    ]
    router = Placement("shared", redis_client, KEYS)
    for steps in (1, 7, 20):
        shape = Shape(width=64, height=64, steps=steps)
        assert await router.stream_for(shape, "euler", workers) == KEYS.size_stream(SMALL.size)


@pytest.mark.parametrize("policy", ["random", "p2c"])
async def test_only_ready_workers_that_compiled_the_shape_are_chosen(redis_client: aioredis.Redis, policy: str) -> None:
    workers = [
        worker_info("small", SMALL),
        worker_info("large", LARGE),
        worker_info("both-warming", SMALL, LARGE, state="warming"),
        worker_info("both-draining", SMALL, LARGE, state="draining"),
        worker_info("both-busy", SMALL, LARGE, state="busy"),
    ]
    router = Placement(policy, redis_client, KEYS, random.Random(0))  # type: ignore[arg-type]
    chosen = {await router.stream_for(LARGE, "euler", workers) for _ in range(50)}
    assert chosen == {KEYS.worker_stream("large"), KEYS.worker_stream("both-busy")}


async def test_random_spreads_over_every_candidate(redis_client: aioredis.Redis) -> None:
    router = Placement("random", redis_client, KEYS, random.Random(1))
    workers = [worker_info(f"w{k}", SMALL) for k in range(4)]
    chosen = [await router.stream_for(SMALL, "euler", workers) for _ in range(200)]
    assert {chosen.count(KEYS.worker_stream(f"w{k}")) > 20 for k in range(4)} == {True}


async def test_p2c_sends_the_job_to_the_shorter_of_two_queues(redis_client: aioredis.Redis) -> None:
    queue = Queue.of(redis_client, KEYS)
    for k in range(3):
        await queue.jobs.submit(make_job(f"long-{k}"), KEYS.worker_stream("long"))
    router = Placement("p2c", redis_client, KEYS, random.Random(2))
    workers = [worker_info("long", SMALL), worker_info("short", SMALL)]
    assert {await router.stream_for(SMALL, "euler", workers) for _ in range(20)} == {KEYS.worker_stream("short")}


async def test_a_worker_takes_its_own_jobs_first_then_the_shared_ones(redis_client: aioredis.Redis) -> None:
    queue = Queue.of(redis_client, KEYS)
    streams = [KEYS.worker_stream("w1"), KEYS.size_stream(SMALL.size)]
    for stream in streams:
        await queue.streams.ensure_group(stream)
    await queue.jobs.submit(make_job("shared-1"), streams[1])
    await queue.jobs.submit(make_job("own-1"), streams[0])
    first = await queue.delivery.claim("w1", streams, block_ms=100)
    assert first is not None
    await queue.delivery.discard(first)  # settled: a worker claims again only with no job in hand
    second = await queue.delivery.claim("w1", streams, block_ms=100)
    assert second is not None
    assert [(first.job.id, first.stream), (second.job.id, second.stream)] == [
        ("own-1", streams[0]),
        ("shared-1", streams[1]),
    ]


async def stream_jobs(redis_client: aioredis.Redis, stream: str) -> list[bytes | str | None]:
    """The job field of every entry on a stream, oldest first."""
    return [fields[b"job"] if fields else None for _, fields in await redis_client.xrange(stream) or []]


async def test_a_departed_workers_jobs_go_back_to_the_shared_streams(redis_client: aioredis.Redis) -> None:
    queue = Queue.of(redis_client, KEYS)
    own = KEYS.worker_stream("gone")
    await queue.streams.ensure_group(own)
    for job in (
        make_job("in-service"),
        make_job("queued-small"),
        make_job("queued-large", LARGE),
        make_job("cancelled"),
    ):
        await queue.jobs.submit(job, own)
    in_service = await queue.delivery.claim("gone", [own], block_ms=100)
    assert in_service is not None and await queue.delivery.start(in_service, "gone") is not None
    assert await queue.jobs.cancel("cancelled") == "cancelled"
    assert await queue.recovery.rehome_orphans(live={"alive"}) == 3
    assert await redis_client.exists(own) == 0 and own not in await queue.streams.names()
    small, large = KEYS.size_stream(SMALL.size), KEYS.size_stream(LARGE.size)
    assert await stream_jobs(redis_client, small) == [
        make_job("in-service").model_dump_json().encode(),
        make_job("queued-small").model_dump_json().encode(),
    ]
    record = await queue.jobs.record("in-service")
    assert record is not None and (record.status, record.stream) == ("queued", small)
    taken = await queue.delivery.claim("alive", [small, large], block_ms=100)
    assert taken is not None and taken.job.id == "in-service"
    assert taken.deliveries == 2  # its delivery to the departed worker counts towards max_deliveries
    assert taken.enqueued_ms == in_service.enqueued_ms  # queue time still counts from the first submit
    other = await queue.delivery.claim("alive", [large], block_ms=100)
    assert other is not None and (other.job.id, other.deliveries) == ("queued-large", 1)


async def test_live_workers_streams_are_left_alone(redis_client: aioredis.Redis) -> None:
    queue = Queue.of(redis_client, KEYS)
    own = KEYS.worker_stream("alive")
    await queue.streams.ensure_group(own)
    await queue.jobs.submit(make_job("mine"), own)
    assert await queue.recovery.rehome_orphans(live={"alive"}) == 0
    assert await redis_client.xlen(own) == 1


async def test_queue_position_counts_within_the_jobs_stream(redis_client: aioredis.Redis) -> None:
    queue = Queue.of(redis_client, KEYS)
    streams = [KEYS.worker_stream("w1"), KEYS.worker_stream("w2")]
    for stream in streams:
        await queue.streams.ensure_group(stream)
    await queue.jobs.submit(make_job("a1"), streams[0])
    await queue.jobs.submit(make_job("b1"), streams[1])
    await queue.jobs.submit(make_job("a2"), streams[0])
    records = {j: await queue.jobs.record(j) for j in ("a1", "b1", "a2")}
    entries = {j: r.entry_id for j, r in records.items() if r is not None and r.entry_id is not None}
    assert await queue.streams.positions(streams[0], [entries["a1"], entries["a2"]]) == {
        entries["a1"]: 0,
        entries["a2"]: 1,
    }
    assert await queue.streams.positions(streams[1], [entries["b1"]]) == {entries["b1"]: 0}
    assert await queue.streams.depth() == 3


async def test_shared_routing_never_hands_a_worker_a_shape_it_did_not_compile(redis_client: aioredis.Redis) -> None:
    queue = Queue.of(redis_client, KEYS)
    small_worker = [KEYS.worker_stream("small"), KEYS.size_stream(SMALL.size)]
    large_worker = [KEYS.worker_stream("large"), KEYS.size_stream(LARGE.size)]
    for stream in {*small_worker, *large_worker}:
        await queue.streams.ensure_group(stream)
    router = Placement("shared", redis_client, KEYS)
    workers = [worker_info("small", SMALL), worker_info("large", LARGE)]
    await queue.jobs.submit(make_job("large-1", LARGE), await router.stream_for(LARGE, "euler", workers))
    assert await queue.delivery.claim("small", small_worker, block_ms=50) is None
    taken = await queue.delivery.claim("large", large_worker, block_ms=50)
    assert taken is not None and taken.job.id == "large-1"


async def test_a_job_submitted_while_its_worker_stream_is_rehomed_is_not_lost(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = Queue.of(redis_client, KEYS)
    own = KEYS.worker_stream("leaving")
    await queue.streams.ensure_group(own)
    entries = queue.recovery._entries

    async def read_then_race(stream: str, count: int) -> object:
        found = await entries(stream, count)
        if not found and await queue.jobs.job_status("late") is None:
            await queue.jobs.submit(make_job("late"), own)  # lands between the read and the deletion
        return found

    monkeypatch.setattr(queue.recovery, "_entries", read_then_race)
    await queue.recovery.rehome(own)
    await queue.recovery.rehome_orphans(live=set())
    record = await queue.jobs.record("late")
    assert record is not None and record.stream is not None and record.entry_id is not None
    assert await redis_client.xrange(record.stream, record.entry_id, record.entry_id)


async def registered(redis_client: aioredis.Redis, *workers: WorkerInfo) -> list[WorkerInfo]:
    """Publish `workers` to the registry and read them back, as a gateway sees them."""
    registry = Registry(redis_client, KEYS)
    for worker in workers:
        await registry.publish(worker, ttl_s=60)
    return await registry.workers()


async def test_p2c_sends_the_job_to_the_worker_with_more_free_rows(redis_client: aioredis.Redis) -> None:
    queue = Queue.of(redis_client, KEYS)
    for k in range(3):  # a longer stream does not matter when the entries say which has room
        await queue.jobs.submit(make_job(f"roomy-{k}"), KEYS.worker_stream("roomy"))
    workers = await registered(
        redis_client,
        worker_info("roomy", SMALL, state="busy", rows=16, free_rows=12),
        worker_info("full", SMALL, state="busy", rows=16, free_rows=2),
    )
    router = Placement("p2c", redis_client, KEYS, random.Random(2))
    assert {await router.stream_for(SMALL, "euler", workers, n=1) for _ in range(20)} == {KEYS.worker_stream("roomy")}


async def test_p2c_sends_a_job_that_fits_neither_worker_to_the_shared_stream(redis_client: aioredis.Redis) -> None:
    workers = await registered(
        redis_client,
        worker_info("a", SMALL, state="busy", rows=8, free_rows=3),
        worker_info("b", SMALL, state="busy", rows=8, free_rows=2),
    )
    router = Placement("p2c", redis_client, KEYS, random.Random(2))
    assert await router.stream_for(SMALL, "euler", workers, n=4) == KEYS.size_stream(SMALL.size)
    assert await router.stream_for(SMALL, "euler", workers, n=3) == KEYS.worker_stream("a")


async def test_p2c_compares_workers_without_rows_by_their_streams_as_before(redis_client: aioredis.Redis) -> None:
    queue = Queue.of(redis_client, KEYS)
    for k in range(3):
        await queue.jobs.submit(make_job(f"old-{k}"), KEYS.worker_stream("old"))
    workers = await registered(
        redis_client,
        worker_info("old", SMALL),  # an entry of a worker from before rows: rows == 0
        worker_info("new", SMALL, rows=8, free_rows=0),
    )
    assert {w.id: w.rows for w in workers} == {"old": 0, "new": 8}
    router = Placement("p2c", redis_client, KEYS, random.Random(2))
    assert {await router.stream_for(SMALL, "euler", workers, n=4) for _ in range(20)} == {KEYS.worker_stream("new")}


@pytest.mark.parametrize("policy", ["shared", "random", "p2c"])
async def test_a_job_with_adapters_goes_only_to_workers_that_offer_them_all(
    redis_client: aioredis.Redis, policy: str
) -> None:
    workers = [
        worker_info("plain", SMALL, rows=8, free_rows=8),
        worker_info("ink", SMALL, loras=["ink"], max_loras=4, rows=8, free_rows=8),
        worker_info("both", SMALL, loras=["ink", "oil"], max_loras=4, rows=8, free_rows=8),
        worker_info("both-one", SMALL, loras=["ink", "oil"], max_loras=1, rows=8, free_rows=8),  # applies one
    ]
    router = Placement(policy, redis_client, KEYS, random.Random(0))  # type: ignore[arg-type]
    streams = {await router.stream_for(SMALL, "euler", workers, 1, ["ink", "oil"]) for _ in range(30)}
    assert streams == {KEYS.worker_stream("both")}
    streams = {await router.stream_for(SMALL, "euler", workers, 1, ["ink"]) for _ in range(50)}
    assert streams == {KEYS.worker_stream(w) for w in ("ink", "both", "both-one")}


async def test_shared_routing_keeps_a_job_with_adapters_every_worker_of_its_size_offers_on_the_size_stream(
    redis_client: aioredis.Redis,
) -> None:
    workers = [
        worker_info("a", SMALL, loras=["ink"], max_loras=2),
        worker_info("b", SMALL, loras=["ink", "oil"], max_loras=2),
        worker_info("c", LARGE),  # another size: no part of it
    ]
    router = Placement("shared", redis_client, KEYS)
    assert await router.stream_for(SMALL, "euler", workers, 1, ["ink"]) == KEYS.size_stream(SMALL.size)
    assert await router.stream_for(SMALL, "euler", workers, 1, ["oil"]) == KEYS.worker_stream("b")
    assert await router.stream_for(SMALL, "euler", workers, 1) == KEYS.size_stream(SMALL.size)


@pytest.mark.parametrize("policy", ["shared", "p2c"])
async def test_a_worker_holding_the_jobs_adapters_with_room_for_it_is_preferred(
    redis_client: aioredis.Redis, policy: str
) -> None:
    offered: dict[str, Any] = {"loras": ["ink", "oil"], "max_loras": 2, "rows": 8}
    workers = await registered(
        redis_client,
        worker_info("cold", SMALL, free_rows=8, **offered),
        worker_info("warm", SMALL, free_rows=3, loras_loaded=["oil", "ink", "wax"], **offered),
        worker_info("half", SMALL, free_rows=8, loras_loaded=["ink"], **offered),
    )
    router = Placement(policy, redis_client, KEYS, random.Random(1))  # type: ignore[arg-type]
    assert {await router.stream_for(SMALL, "euler", workers, 2, ["ink", "oil"]) for _ in range(20)} == {
        KEYS.worker_stream("warm")
    }
    # No room for 4 images on the warm worker: placed as any job the others can run is, never on it.
    elsewhere = {await router.stream_for(SMALL, "euler", workers, 4, ["ink", "oil"]) for _ in range(20)}
    if policy == "shared":
        assert elsewhere == {KEYS.size_stream(SMALL.size)}
    else:
        assert elsewhere <= {KEYS.worker_stream("cold"), KEYS.worker_stream("half")}
