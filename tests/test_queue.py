"""The job queue on a real redis-server: submit, claim, complete once, reject, and completion wake-ups."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from common.jobstore import record_ttl
from common.protocol import Job
from common.redis_conn import connect
from common.rediskeys import RedisKeys
from common.registry import Registry
from gateway.listener import JobListener
from testkit.jobs import SHAPE, make_job, succeeded
from testkit.proxy import FaultProxy
from tests.queues import Queue
from tests.support import RedisServer
from worker.claiming import Claims
from worker.config import WorkerConfig
from worker.delivery import ClaimedJob, Delivery, MalformedJob
from worker.metrics import WorkerMetrics

KEYS = RedisKeys()
STREAM = KEYS.size_stream(SHAPE.size)


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
    assert await queue.delivery.complete(claimed, succeeded(job, "w1", 2), [b"png-0", b"png-1"])
    stored = await queue.jobs.fetch_result(job.id)
    assert stored is not None and stored.images == [b"png-0", b"png-1"]
    assert stored.result.status == "succeeded" and await queue.jobs.job_status(job.id) == "succeeded"
    pending = await redis_client.xpending(STREAM, KEYS.workers_group)
    assert pending["pending"] == 0 and await redis_client.xlen(STREAM) == 0
    assert 0 < await redis_client.ttl(KEYS.result(job.id)) <= 60


async def test_first_result_wins_and_a_later_one_is_dropped(redis_client: aioredis.Redis) -> None:
    queue, job, claimed = await submitted_and_claimed(redis_client)
    await queue.delivery.start(claimed, "w1")
    other = await queue.recovery.reclaim("w2", live={"w2"}, max_deliveries=3, streams=[STREAM])  # w1 looked dead
    assert other is not None
    assert await queue.delivery.complete(claimed, succeeded(job, "w1", 2), [b"a", b"b"]) is True
    assert await queue.delivery.start(other, "w2") is None  # the job is terminal: w2 does not run it
    assert await queue.delivery.complete(other, succeeded(job, "w2", 2), [b"c", b"d"]) is False
    stored = await queue.jobs.fetch_result(job.id)
    assert stored is not None and stored.result.worker == "w1" and stored.images == [b"a", b"b"]
    assert (await queue.streams.counters())["duplicate_results"] == 1


async def claim_malformed(queue: Queue) -> MalformedJob:
    with pytest.raises(MalformedJob) as caught:
        await queue.delivery.claim("w1", [STREAM], block_ms=100)
    return caught.value


async def test_malformed_entry_with_id_fails_its_job(redis_client: aioredis.Redis) -> None:
    queue = await queue_with_group(redis_client)
    await redis_client.xadd(STREAM, {"job": '{"id": "bad-1", "params": {"prompt": ""}}'})
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
    await queue.delivery.complete(claimed, succeeded(job, "w1", 2), [b"a", b"b"])


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


async def test_a_worker_whose_clock_runs_ahead_keeps_the_dead_letters(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dead-letter stream drops entries older than the result TTL by Redis's clock: a worker whose own
    clock runs an hour ahead (with a 60 s TTL) dead-letters a job without wiping the stream."""
    queue = await queue_with_group(redis_client)
    for job_id in ("first", "second"):
        await queue.jobs.submit(make_job(job_id), STREAM)
        claimed = await queue.delivery.claim("w1", [STREAM], block_ms=100)
        assert claimed is not None
        await queue.delivery.dead_letter(claimed, "w1", "for the test")
        monkeypatch.setattr(time, "time", lambda real=time.time: real() + 3600)  # from now on, an hour ahead
    dead: Any = await redis_client.xrange(KEYS.dead_letter_stream)
    assert [json.loads(fields[b"job"])["id"] for _, fields in dead] == ["first", "second"]


# --- Delivery under faults: each test reproduces one way a result could be lost, stuck or shown twice.


async def listening(
    redis_client: aioredis.Redis, sweep_interval_s: float = 3600.0
) -> tuple[JobListener, asyncio.Task[None]]:
    """A running listener; by default its periodic sweep never comes, so only what a test exercises can
    resolve a waiter."""
    listener = JobListener(redis_client, KEYS, sweep_interval_s=sweep_interval_s)
    task = asyncio.create_task(listener.run())
    await asyncio.wait_for(listener.subscribed.wait(), 10)
    return listener, task


async def store_unannounced(redis_client: aioredis.Redis, job: Job) -> None:
    """A result stored while the listener could not hear it: written without its announcement."""
    await redis_client.hset(KEYS.result(job.id), "meta", succeeded(job, "w1", 2).model_dump_json())


async def test_listener_rechecks_its_waiters_after_a_silent_resubscribe(
    redis_client: aioredis.Redis, redis_server: RedisServer
) -> None:
    retrying = connect(redis_server.url(0), name="listener")  # retries as the gateway's client does
    listener, task = await listening(retrying)
    try:
        job = make_job()
        done = listener.expect(job.id)
        await store_unannounced(redis_client, job)
        # redis-py reconnects and resubscribes inside its own retry loop: the listener sees no error.
        assert await redis_client.client_kill_filter(_type="pubsub") >= 1
        await asyncio.wait_for(done, 10)
        assert listener.counts["subscribed"] == 2 and listener.counts["recovered"] == 1
    finally:
        task.cancel()
        await retrying.aclose()


async def test_listener_survives_malformed_messages(redis_client: aioredis.Redis) -> None:
    listener, task = await listening(redis_client)
    try:
        job = make_job()
        done = listener.expect(job.id)
        for channel, payload in (
            (KEYS.completions_channel, b"\xff\xfe not utf-8"),
            (KEYS.completions_channel, b"not a job id!"),
            (KEYS.job_events_channel, b"\xff"),
            (KEYS.job_events_channel, b"[1, 2]"),
            (KEYS.job_events_channel, b'{"id": 7, "type": "started"}'),
        ):
            await redis_client.publish(channel, payload)
        await queue_with_group(redis_client)
        await Queue.of(redis_client, KEYS).jobs.submit(job, STREAM)
        await complete_next(Queue.of(redis_client, KEYS), job)
        await asyncio.wait_for(done, 10)
        assert not task.done() and listener.health() is None
        assert listener.counts["bad_message"] == 5
    finally:
        task.cancel()


async def test_listener_sweep_finds_a_completion_whose_message_was_lost(redis_client: aioredis.Redis) -> None:
    listener, task = await listening(redis_client, sweep_interval_s=0.2)
    try:
        job = make_job()
        done = listener.expect(job.id)
        await store_unannounced(redis_client, job)
        await asyncio.wait_for(done, 10)
        assert listener.counts["recovered"] == 1
    finally:
        task.cancel()


async def test_listener_restarts_after_an_unexpected_error(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener, task = await listening(redis_client)
    try:
        failures = iter([RuntimeError("a bug in a handler")])

        def broken(data: object) -> None:
            if (failure := next(failures, None)) is not None:
                raise failure
            JobListener._on_completed(listener, data)

        monkeypatch.setattr(listener, "_on_completed", broken)
        listener.subscribed.clear()
        await redis_client.publish(KEYS.completions_channel, b"job-0")
        await asyncio.wait_for(listener.subscribed.wait(), 10)  # subscribed again after the failure
        job = make_job()
        done = listener.expect(job.id)
        await redis_client.publish(KEYS.completions_channel, job.id.encode())
        await asyncio.wait_for(done, 10)
        assert listener.counts["restarted"] == 1 and not task.done()
    finally:
        task.cancel()


async def test_an_entry_whose_claim_reply_was_lost_is_read_again(redis_client: aioredis.Redis) -> None:
    queue = await queue_with_group(redis_client)
    job = make_job()
    await queue.jobs.submit(job, STREAM)
    # Redis delivered the entry to w1, but the reply never arrived; redis-py's retry reads past it with `>`.
    await redis_client.xreadgroup(KEYS.workers_group, "w1", {STREAM: ">"}, count=1)
    claimed = await queue.delivery.claim("w1", [STREAM], block_ms=100)
    assert claimed is not None and claimed.job == job


async def test_a_job_rolled_back_to_running_under_a_live_worker_runs_again(redis_client: aioredis.Redis) -> None:
    queue, job, claimed = await submitted_and_claimed(redis_client)
    await queue.delivery.start(claimed, "w1")
    saved: dict[str, Any] = {key: await redis_client.dump(key) for key in (KEYS.job(job.id), STREAM)}
    assert await queue.delivery.complete(claimed, succeeded(job, "w1", 2), [b"a", b"b"])
    # Redis comes back from a snapshot taken while the job ran: the result and the acknowledgement are gone.
    await redis_client.delete(KEYS.result(job.id))
    for key, value in saved.items():
        await redis_client.restore(key, 0, value, replace=True)
    again = await queue.delivery.claim("w1", [STREAM], block_ms=100)
    assert again is not None and again.job == job
    assert await queue.delivery.start(again, "w1") is not None
    assert await queue.delivery.complete(again, succeeded(job, "w1", 2), [b"a", b"b"])
    assert await queue.jobs.job_status(job.id) == "succeeded"


async def test_a_result_is_never_stored_twice_even_after_the_first_expired(redis_client: aioredis.Redis) -> None:
    queue = await queue_with_group(redis_client)
    job = make_job()
    await queue.jobs.submit(job, STREAM)
    first = await queue.delivery.claim("partitioned", [STREAM], block_ms=100)
    assert first is not None and await queue.delivery.start(first, "partitioned") is not None
    second = await queue.recovery.reclaim("w2", live={"w2"}, max_deliveries=3, streams=[STREAM])
    assert second is not None and await queue.delivery.start(second, "w2") is not None
    # Fenced: the partitioned worker's delivery is no longer the current attempt.
    assert await queue.delivery.complete(first, succeeded(job, "partitioned", 2), [b"old"]) is False
    assert await queue.delivery.complete(second, succeeded(job, "w2", 2), [b"new"]) is True
    await redis_client.delete(KEYS.result(job.id))  # the images expire
    assert await queue.delivery.complete(first, succeeded(job, "partitioned", 2), [b"old"]) is False
    assert await queue.jobs.fetch_result(job.id) is None and await queue.jobs.job_status(job.id) == "succeeded"


async def test_no_result_is_stored_over_a_cancellation_even_after_it_expired(redis_client: aioredis.Redis) -> None:
    queue, job, claimed = await submitted_and_claimed(redis_client)
    await queue.delivery.start(claimed, "w1")
    assert await queue.jobs.cancel(job.id) == "cancelled"
    await redis_client.delete(KEYS.result(job.id))
    assert await queue.delivery.complete(claimed, succeeded(job, "w1", 2), [b"late"]) is False
    assert await queue.jobs.fetch_result(job.id) is None and await queue.jobs.job_status(job.id) == "cancelled"


async def test_a_job_and_its_key_live_until_it_finishes_then_for_the_ttl(redis_client: aioredis.Redis) -> None:
    queue = await queue_with_group(redis_client)
    job = make_job()
    await queue.jobs.submit(job, STREAM, "key-1", "fp")
    idempotency = KEYS.idempotency("key-1")
    assert [await redis_client.ttl(k) for k in (KEYS.job(job.id), idempotency)] == [-1, -1]
    claimed = await queue.delivery.claim("w1", [STREAM], block_ms=100)
    assert claimed is not None and await queue.delivery.start(claimed, "w1") is not None
    assert await redis_client.ttl(KEYS.job(job.id)) == -1
    await queue.delivery.complete(claimed, succeeded(job, "w1", 2), [b"a"])
    assert 0 < await redis_client.ttl(idempotency) <= job.result_ttl_s
    assert job.result_ttl_s < await redis_client.ttl(KEYS.job(job.id))  # the record outlives the images


async def test_max_deliveries_counts_every_stream_a_job_was_on(redis_client: aioredis.Redis) -> None:
    queue = await queue_with_group(redis_client)
    own = KEYS.worker_stream("gone")
    await queue.streams.ensure_group(own)
    job = make_job()
    await queue.jobs.submit(job, own)
    first = await queue.delivery.claim("gone", [own], block_ms=100)
    assert first is not None
    assert await queue.recovery.rehome_orphans(live={"w2"}) == 1  # one delivery so far, carried to the shared stream
    second = await queue.delivery.claim("w2", [STREAM], block_ms=100)
    assert second is not None and second.deliveries == 2
    third = await queue.recovery.reclaim("w3", live={"w3"}, max_deliveries=3, streams=[STREAM])
    assert third is not None and third.deliveries == 3
    assert await queue.recovery.reclaim("w4", live={"w4"}, max_deliveries=3, streams=[STREAM]) is None
    dead: Any = await redis_client.xrange(KEYS.dead_letter_stream)
    assert [fields[b"deliveries"] for _, fields in dead] == [b"4"]


async def test_deliveries_given_back_for_unreachable_inputs_do_not_count_towards_max_deliveries(
    redis_client: aioredis.Redis,
) -> None:
    """A delivery given back because the job's input images were unreachable is recorded once (a retried call counts
    nothing more) and the dead-letter decision leaves it out: the job is still dead-lettered after exactly
    `max_deliveries` other deliveries, its reason saying how many were given back."""
    queue, _, first = await submitted_and_claimed(redis_client)
    assert await queue.delivery.start(first, "w1") is not None
    assert await queue.delivery.given_back_unreachable(first, "S3 store: unreachable") == 1
    assert await queue.delivery.given_back_unreachable(first, "S3 store: unreachable") == 1  # the reply was lost
    second = await queue.delivery.claim("w1", [STREAM], block_ms=100)  # taken back: pending under w1, not in hand
    assert second is not None and second.deliveries == 2
    assert not await queue.delivery.dead_letter_if_exhausted(second, "w1", max_deliveries=1)
    assert await queue.delivery.start(second, "w1") is not None  # then w1 dies with it
    third = await queue.recovery.reclaim("w2", live={"w2"}, max_deliveries=2, streams=[STREAM])
    assert third is not None and third.deliveries == 3  # its second delivery that was not given back
    assert await queue.recovery.reclaim("w3", live={"w3"}, max_deliveries=2, streams=[STREAM]) is None  # a third
    dead: Any = await redis_client.xrange(KEYS.dead_letter_stream)
    assert [(f[b"deliveries"], f[b"reason"].decode().split(";")[0]) for _, f in dead] == [
        (b"4", "delivered 4 times (1 of them given back, their input images unreachable)")
    ]
    assert await queue.delivery.given_back_unreachable(third, "S3 store: unreachable") == -1  # terminal: nothing


async def test_a_give_back_redis_was_away_for_is_recorded_before_the_next_claim(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    """A worker whose Redis is away as it reads a job's input images cannot record the give-back then; its next claim
    records it first, so the job, delivered again, is not dead-lettered under `max_deliveries` 1."""
    await queue_with_group(redis_client)
    job = make_job()
    await Queue.of(redis_client, KEYS).jobs.submit(job, STREAM)
    proxy = FaultProxy("worker", redis_server.port)
    await proxy.start()
    worker_redis = aioredis.Redis.from_url(proxy.url(0))
    try:
        config = WorkerConfig(
            redis_url=proxy.url(0), model="stand-in", worker_id="w1", compile_cache_dir=None, max_deliveries=1
        )
        delivery = Delivery(worker_redis, KEYS)
        claims = Claims(config, worker_redis, delivery, Registry(worker_redis, KEYS), WorkerMetrics())
        await claims.open([SHAPE.size])
        stopping = asyncio.Event()
        (first,) = await claims.next([], stopping, rows=4)
        assert await claims.start(first) is not None
        proxy.partition(refuse=True)  # Redis away, as the worker reads the job's inputs
        await claims.inputs_unreachable(first, "Redis: connection refused")
        assert await redis_client.hget(KEYS.job(job.id), "unreachable") is None  # not recorded yet
        proxy.heal()
        (second,) = await claims.next([], stopping, rows=4)  # the give-back recorded, then the job delivered again
        assert (second.job.id, second.deliveries) == (job.id, 2)
        assert await redis_client.hget(KEYS.job(job.id), "unreachable") == b"1"
        assert await redis_client.xlen(KEYS.dead_letter_stream) == 0
    finally:
        await worker_redis.aclose()
        await proxy.close()


async def test_a_submit_run_twice_queues_one_job_and_answers_created(redis_client: aioredis.Redis) -> None:
    queue = await queue_with_group(redis_client)
    keyed, plain = make_job("keyed"), make_job("plain")
    # The reply to the first call was lost; redis-py runs the same script again.
    assert [(await queue.jobs.submit(keyed, STREAM, "key-1", "fp")).created for _ in range(2)] == [True, True]
    assert [(await queue.jobs.submit(plain, STREAM)).created for _ in range(2)] == [True, True]
    assert await redis_client.xlen(STREAM) == 2


async def test_start_store_and_dead_letter_run_twice_act_once(redis_client: aioredis.Redis) -> None:
    queue, job, claimed = await submitted_and_claimed(redis_client)
    assert await queue.delivery.start(claimed, "w1") == await queue.delivery.start(claimed, "w1")
    assert await redis_client.llen(KEYS.attempts(job.id)) == 1
    assert await queue.delivery.complete(claimed, succeeded(job, "w1", 2), [b"a"]) is True
    assert (
        await queue.delivery.complete(claimed, succeeded(job, "w1", 2), [b"a"]) is True
    )  # its own earlier store: stored
    assert "duplicate_results" not in await queue.streams.counters()
    other = make_job("poison")
    await queue.jobs.submit(other, STREAM)
    poison = await queue.delivery.claim("w1", [STREAM], block_ms=100)
    assert poison is not None
    for _ in range(2):
        await queue.delivery.dead_letter(poison, "w1", "for the test")
    assert await redis_client.xlen(KEYS.dead_letter_stream) == 1


async def test_a_result_for_a_record_redis_lost_is_stored_but_not_for_one_that_expired(
    redis_client: aioredis.Redis,
) -> None:
    queue, job, claimed = await submitted_and_claimed(redis_client)
    await queue.delivery.start(claimed, "w1")
    await redis_client.delete(KEYS.job(job.id))  # restored from a snapshot older than the submit
    assert await queue.delivery.complete(claimed, succeeded(job, "w1", 2), [b"a"]) is True
    assert await queue.jobs.job_status(job.id) == "succeeded"
    other = make_job("old")
    await queue.jobs.submit(other, STREAM)
    late = await queue.delivery.claim("w1", [STREAM], block_ms=100)
    assert late is not None and await queue.delivery.start(late, "w1") is not None
    await redis_client.delete(KEYS.job(other.id))  # as if it had finished and its record expired
    long_ago = dataclasses.replace(late, enqueued_ms=late.enqueued_ms - 1000 * record_ttl(other.result_ttl_s) - 1)
    assert await queue.delivery.complete(long_ago, succeeded(other, "w1", 2), [b"a"]) is False
    assert await queue.jobs.fetch_result(other.id) is None


async def test_a_record_that_does_not_parse_is_read_as_far_as_it_goes(redis_client: aioredis.Redis) -> None:
    queue = await queue_with_group(redis_client)
    await redis_client.hset(KEYS.job("bad"), mapping={"status": "running", "job": "{not json", "step": "x\xff"})
    record = await queue.jobs.record("bad")
    assert record is not None and (record.status, record.job, record.step) == ("running", None, None)


async def blocked_readers(redis_client: aioredis.Redis, name: str) -> int:
    """How many connections named `name` are blocked in XREADGROUP (other tests' workers may be too)."""
    clients: Any = await redis_client.client_list()
    return sum(c["name"] == name and c["cmd"] == "xreadgroup" and "b" in c["flags"] for c in clients)


async def test_a_claim_blocked_on_a_stream_that_is_deleted_returns_nothing(
    redis_client: aioredis.Redis, redis_server: RedisServer
) -> None:
    await queue_with_group(redis_client)
    reader = aioredis.Redis.from_url(redis_server.url(0), client_name="blocked-claim")
    claim = asyncio.create_task(Queue.of(reader, KEYS).delivery.claim("w1", [STREAM], block_ms=10_000))
    try:
        async with asyncio.timeout(10):
            while not await blocked_readers(redis_client, "blocked-claim"):  # noqa: ASYNC110 (no event says so)
                await asyncio.sleep(0.01)
        await redis_client.delete(STREAM)  # its worker was taken for gone and its stream dropped
        assert await asyncio.wait_for(claim, 10) is None
    finally:
        await reader.aclose()
    groups: Any = await redis_client.xinfo_groups(STREAM)
    assert [g["name"] for g in groups] == [KEYS.workers_group.encode()]  # recreated, to be read again


async def test_a_claim_never_takes_again_a_job_its_worker_still_has_in_hand(redis_client: aioredis.Redis) -> None:
    queue, _, encoding = await submitted_and_claimed(redis_client)  # still being encoded and stored
    await queue.jobs.submit(make_job("next"), STREAM)
    following = await queue.delivery.claim("w1", [STREAM], block_ms=100, in_hand=[encoding])
    assert following is not None and following.job.id == "next"
    pending: Any = await redis_client.xpending_range(STREAM, KEYS.workers_group, "-", "+", 10)
    assert {p["message_id"].decode(): p["times_delivered"] for p in pending} == {
        encoding.entry_id: 1,  # untouched: in hand
        following.entry_id: 1,
    }


async def claimed_ids(entries: list[ClaimedJob | MalformedJob]) -> list[str]:
    ids = []
    for entry in entries:
        assert isinstance(entry, ClaimedJob), entry
        ids.append(entry.job.id)
    return ids


async def test_one_claim_takes_the_jobs_that_fit_the_rows_and_leaves_the_next_one_undelivered(
    redis_client: aioredis.Redis,
) -> None:
    queue = await queue_with_group(redis_client)
    for job_id, n in (("a", 1), ("b", 2), ("c", 4), ("d", 1)):
        await queue.jobs.submit(make_job(job_id, n=n), STREAM)
    taken = await queue.delivery.claim_rows("w1", [STREAM], None, (), rows=4)
    assert await claimed_ids(taken) == ["a", "b"]  # c (4 rows) does not fit the one row left; d waits behind it
    pending: Any = await redis_client.xpending(STREAM, KEYS.workers_group)
    assert pending["pending"] == 2  # c was looked at, not delivered: another worker may take it
    other = await queue.delivery.claim_rows("w2", [STREAM], None, (), rows=8)
    assert await claimed_ids(other) == ["c", "d"]


async def test_a_claim_takes_one_job_larger_than_its_rows_and_none_without_rows(redis_client: aioredis.Redis) -> None:
    queue = await queue_with_group(redis_client)
    await queue.jobs.submit(make_job("big", n=4), STREAM)
    await queue.jobs.submit(make_job("small", n=1), STREAM)
    assert await queue.delivery.claim_rows("w1", [STREAM], None, (), rows=0) == []
    assert await claimed_ids(await queue.delivery.claim_rows("w1", [STREAM], None, (), rows=2)) == ["big"]


async def test_a_claim_run_again_after_a_lost_reply_returns_the_same_entries(redis_client: aioredis.Redis) -> None:
    """The first call's reply is lost: the worker never saw its jobs and asks again with the same rows and the
    same jobs in hand; it gets the same entries (each counted one delivery more), and nothing new."""
    queue = await queue_with_group(redis_client)
    for index in range(5):
        await queue.jobs.submit(make_job(f"job-{index}", n=1), STREAM)
    await queue.jobs.submit(make_job("in-hand", n=1), STREAM)
    first = await queue.delivery.claim_rows("w1", [STREAM], None, (), rows=3)
    lost = await queue.delivery.claim_rows("w1", [STREAM], None, (), rows=3)
    again = await queue.delivery.claim_rows("w1", [STREAM], None, (), rows=3)
    assert await claimed_ids(lost) == await claimed_ids(again) == ["job-0", "job-1", "job-2"]
    assert [c.entry_id for c in lost if isinstance(c, ClaimedJob)] == [
        c.entry_id for c in again if isinstance(c, ClaimedJob)
    ]
    assert {c.deliveries for c in again if isinstance(c, ClaimedJob)} == {3}
    assert first and (await redis_client.xpending(STREAM, KEYS.workers_group))["pending"] == 3


async def test_an_entry_that_does_not_parse_comes_back_beside_the_jobs_of_the_same_claim(
    redis_client: aioredis.Redis,
) -> None:
    queue = await queue_with_group(redis_client)
    await queue.jobs.submit(make_job("before", n=1), STREAM)
    await redis_client.xadd(STREAM, {"job": "{not json"})
    await queue.jobs.submit(make_job("after", n=1), STREAM)
    taken = await queue.delivery.claim_rows("w1", [STREAM], None, (), rows=4)
    assert [type(entry).__name__ for entry in taken] == ["ClaimedJob", "MalformedJob", "ClaimedJob"]


async def test_a_job_that_does_not_fit_ends_the_claim_so_no_later_one_overtakes_it(
    redis_client: aioredis.Redis,
) -> None:
    queue = await queue_with_group(redis_client)
    own = KEYS.worker_stream("w1")
    await queue.streams.ensure_group(own)
    await queue.jobs.submit(make_job("small", n=1), own)
    await queue.jobs.submit(make_job("large", n=4), own)
    await queue.jobs.submit(make_job("later", n=1), STREAM)  # a stream of lower preference
    first = await queue.delivery.claim_rows("w1", [own, STREAM], None, (), rows=2)
    # The large job does not fit the row left and ends the claim: "later" would fit, but does not overtake it.
    assert await claimed_ids(first) == ["small"]
    in_hand = [entry for entry in first if isinstance(entry, ClaimedJob)]
    # The next claim starts with it, taken however large (the engine holds it until its rows are free).
    taken = await queue.delivery.claim_rows("w1", [own, STREAM], None, in_hand, rows=1)
    assert await claimed_ids(taken) == ["large"]
