"""The job queue on a real redis-server: submit, claim, complete once, reject, and completion wake-ups."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from common.protocol import Job, JobResult, Shape, Timings
from common.rediskeys import RedisKeys
from gateway.listener import JobListener
from tests.queues import Queue
from worker.delivery import ClaimedJob, MalformedJob

KEYS = RedisKeys()
SHAPE = Shape(width=64, height=64, steps=2)
STREAM = KEYS.shape_stream(SHAPE)


def make_job(job_id: str = "job-1") -> Job:
    return Job(id=job_id, prompt="a cat", seed=1, guidance_scale=7.5, shape=SHAPE, result_ttl_s=60)


def success(job: Job, worker: str = "w1") -> JobResult:
    return JobResult(
        id=job.id,
        status="succeeded",
        worker=worker,
        seed=job.seed,
        shape=job.shape,
        image_count=2,
        timings=Timings(queued_ms=1, generate_ms=2, encode_ms=3),
    )


async def queue_with_group(redis_client: aioredis.Redis) -> Queue:
    queue = Queue.of(redis_client, KEYS)
    await queue.streams.ensure_group(STREAM)
    await queue.streams.ensure_group(STREAM)  # idempotent
    return queue


async def submitted_and_claimed(redis_client: aioredis.Redis) -> tuple[Queue, Job, ClaimedJob]:
    """A queue with one job submitted and claimed by "w1"."""
    queue = await queue_with_group(redis_client)
    job = make_job()
    await queue.jobs.submit(job, STREAM)
    claimed = await queue.delivery.claim("w1", [STREAM], block_ms=100)
    assert claimed is not None
    return queue, job, claimed


async def test_submitted_job_is_claimed_once_with_its_fields(redis_client: aioredis.Redis) -> None:
    queue = await queue_with_group(redis_client)
    job = make_job()
    await queue.jobs.submit(job, STREAM)
    assert await queue.jobs.job_status(job.id) == "queued"
    claimed = await queue.delivery.claim("w1", [STREAM], block_ms=100)
    assert claimed is not None and claimed.job == job
    assert claimed.enqueued_ms > 0
    assert await queue.delivery.claim("w2", [STREAM], block_ms=50) is None  # delivered to one consumer only


async def test_complete_stores_result_acks_and_deletes_entry(redis_client: aioredis.Redis) -> None:
    queue, job, claimed = await submitted_and_claimed(redis_client)
    assert await queue.delivery.complete(claimed, success(job), [b"png-0", b"png-1"])
    stored = await queue.jobs.fetch_result(job.id)
    assert stored is not None and stored.images == [b"png-0", b"png-1"]
    assert stored.result.status == "succeeded" and await queue.jobs.job_status(job.id) == "succeeded"
    pending = await redis_client.xpending(STREAM, KEYS.workers_group)
    assert pending["pending"] == 0 and await redis_client.xlen(STREAM) == 0
    assert 0 < await redis_client.ttl(KEYS.result(job.id)) <= 60


async def test_first_result_wins_and_duplicate_is_dropped(redis_client: aioredis.Redis) -> None:
    queue, job, claimed = await submitted_and_claimed(redis_client)
    assert await queue.delivery.complete(claimed, success(job, "w1"), [b"a", b"b"]) is True
    assert await queue.delivery.complete(claimed, success(job, "w2"), [b"c", b"d"]) is False
    stored = await queue.jobs.fetch_result(job.id)
    assert stored is not None and stored.result.worker == "w1" and stored.images == [b"a", b"b"]
    assert (await queue.streams.counters())["duplicate_results"] == 1


async def claim_malformed(queue: Queue) -> MalformedJob:
    with pytest.raises(MalformedJob) as caught:
        await queue.delivery.claim("w1", [STREAM], block_ms=100)
    return caught.value


async def test_malformed_entry_with_id_fails_its_job(redis_client: aioredis.Redis) -> None:
    queue = await queue_with_group(redis_client)
    await redis_client.xadd(STREAM, {"job": '{"id": "bad-1", "prompt": ""}'})
    bad = await claim_malformed(queue)
    assert bad.job_id == "bad-1"
    await queue.delivery.reject(bad, "w1", ttl_s=60)
    stored = await queue.jobs.fetch_result("bad-1")
    assert stored is not None and stored.result.status == "failed"
    assert stored.result.error is not None and "prompt" in stored.result.error
    assert (await redis_client.xpending(STREAM, KEYS.workers_group))["pending"] == 0


async def test_malformed_entry_without_id_is_acknowledged(redis_client: aioredis.Redis) -> None:
    queue = await queue_with_group(redis_client)
    await redis_client.xadd(STREAM, {"garbage": "x"})
    bad = await claim_malformed(queue)
    assert bad.job_id is None
    await queue.delivery.reject(bad, "w1", ttl_s=60)
    assert (await redis_client.xpending(STREAM, KEYS.workers_group))["pending"] == 0
    assert await redis_client.xlen(STREAM) == 0


async def complete_next(queue: Queue, job: Job) -> None:
    claimed: ClaimedJob | None = await queue.delivery.claim("w1", [STREAM], block_ms=1000)
    assert claimed is not None
    await queue.delivery.complete(claimed, success(job), [b"a", b"b"])


async def test_listener_wakes_the_waiting_request(redis_client: aioredis.Redis) -> None:
    queue = await queue_with_group(redis_client)
    listener = JobListener(redis_client, KEYS)
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.subscribed.wait(), 10)
        job = make_job()
        done = listener.expect(job.id)
        other = listener.expect("someone-else")
        assert listener.waiting == 2
        await queue.jobs.submit(job, STREAM)
        await complete_next(queue, job)
        await asyncio.wait_for(done, 10)
        assert not other.done()
        listener.forget("someone-else", other)
        assert listener.waiting == 0
    finally:
        task.cancel()


async def test_listener_catches_results_stored_before_it_subscribed(redis_client: aioredis.Redis) -> None:
    queue = await queue_with_group(redis_client)
    listener = JobListener(redis_client, KEYS)
    job = make_job()
    done = listener.expect(job.id)
    await queue.jobs.submit(job, STREAM)
    await complete_next(queue, job)  # announced while nobody listens
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(done, 10)
    finally:
        task.cancel()


async def test_start_records_the_attempt_and_announces_it(redis_client: aioredis.Redis) -> None:
    queue, job, claimed = await submitted_and_claimed(redis_client)
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(KEYS.job_events_channel)
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    ms = await queue.delivery.start(claimed, "w1")
    assert ms is not None and abs(ms - claimed.enqueued_ms) < 60_000
    event = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
    assert event is not None and json.loads(event["data"]) == {"id": job.id, "type": "started", "worker": "w1"}
    assert await queue.jobs.job_status(job.id) == "running"
    assert await redis_client.lrange(KEYS.attempts(job.id), 0, -1) == [f"w1@{ms}".encode()]
    await pubsub.aclose()


async def test_job_of_a_dead_worker_is_taken_over(redis_client: aioredis.Redis) -> None:
    queue = await queue_with_group(redis_client)
    job = make_job()
    await queue.jobs.submit(job, STREAM)
    assert await queue.delivery.claim("dead", [STREAM], block_ms=100) is not None
    claimed = await queue.recovery.reclaim("w2", live={"w2"}, max_deliveries=3, streams=[STREAM])
    assert claimed is not None and claimed.job == job and claimed.deliveries == 2
    owner = await redis_client.xpending_range(STREAM, KEYS.workers_group, "-", "+", 10)
    assert [p["consumer"] for p in owner] == [b"w2"]
    assert await queue.recovery.reclaim("w2", live={"w2"}, max_deliveries=3, streams=[STREAM]) is None
    consumers = await redis_client.xinfo_consumers(STREAM, KEYS.workers_group)
    assert [c["name"] for c in consumers] == [b"w2"]  # the dead consumer, emptied, is forgotten
    assert (await queue.streams.counters())["reclaimed"] == 1


async def test_slow_but_alive_worker_keeps_its_job(redis_client: aioredis.Redis) -> None:
    queue = await queue_with_group(redis_client)
    await queue.jobs.submit(make_job(), STREAM)
    assert await queue.delivery.claim("slow", [STREAM], block_ms=100) is not None
    assert await queue.recovery.reclaim("w2", live={"slow", "w2"}, max_deliveries=3, streams=[STREAM]) is None
    owner = await redis_client.xpending_range(STREAM, KEYS.workers_group, "-", "+", 10)
    assert [p["consumer"] for p in owner] == [b"slow"]


async def test_two_reclaimers_never_take_the_same_job(redis_client: aioredis.Redis) -> None:
    queue = await queue_with_group(redis_client)
    await queue.jobs.submit(make_job(), STREAM)
    assert await queue.delivery.claim("dead", [STREAM], block_ms=100) is not None
    live = {"a", "b", "c"}
    results = await asyncio.gather(*(queue.recovery.reclaim(w, live, max_deliveries=3, streams=[STREAM]) for w in live))
    assert sum(r is not None for r in results) == 1


async def test_job_whose_workers_keep_dying_is_dead_lettered(redis_client: aioredis.Redis) -> None:
    queue, job, claimed = await submitted_and_claimed(redis_client)
    await queue.delivery.start(claimed, "w1")
    for worker in ("w2", "w3"):  # each takes over from the last one, starts, and dies in turn
        taken = await queue.recovery.reclaim(worker, live={worker}, max_deliveries=3, streams=[STREAM])
        assert taken is not None
        await queue.delivery.start(taken, worker)
    assert await queue.recovery.reclaim("w4", live={"w4"}, max_deliveries=3, streams=[STREAM]) is None
    dead = await redis_client.xrange(KEYS.dead_letter_stream)
    assert dead is not None and len(dead) == 1
    fields = dead[0][1]
    assert fields is not None
    assert json.loads(fields[b"job"])["id"] == job.id and fields[b"deliveries"] == b"4"
    assert [a.split("@")[0] for a in json.loads(fields[b"attempts"])] == ["w1", "w2", "w3"]
    stored = await queue.jobs.fetch_result(job.id)
    assert stored is not None and stored.result.status == "failed"
    assert stored.result.error is not None and "delivered 4 times" in stored.result.error
    assert (await redis_client.xpending(STREAM, KEYS.workers_group))["pending"] == 0
    assert (await queue.streams.counters())["dead_lettered"] == 1
