"""The delivery promise against faults the other fault tests do not inject, one test per fault, each
triggered deterministically with the fault injector's proxy or Redis commands (testkit/proxy.py).

Every test here states what a client must see. Each failed on the queue before its delivery mechanism
(docs/delivery.md): a lost pub/sub wake-up, a listener killed by one bad message, a lost XREADGROUP reply,
a rolled-back Redis, a rehome racing a submit, a late store after expiry, TTLs counted from submit, a
poison limit off by one, retried scripts that were not idempotent, a stream deleted under a blocked read,
and an `up` that did not supervise its workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from common.jobstore import record_ttl
from common.protocol import Job
from common.redis_conn import connect
from common.rediskeys import RedisKeys
from gateway.listener import JobListener
from testkit import AsyncRedisProcess, RedisOptions
from testkit.jobs import SHAPE, make_job, succeeded
from testkit.proxy import DropRule, FaultProxy
from tests.protection import running_worker
from tests.queues import Queue
from tests.support import RedisServer, play_worker
from worker.delivery import ClaimedJob

KEYS = RedisKeys()
STREAM = KEYS.size_stream(SHAPE.size)
# Long enough for any fix to act (a re-check after resubscribing, a sweep, a takeover after a heartbeat
# TTL of 2 s); a job that has no answer by then has none coming.
ANSWER_BOUND_S = 15.0


@pytest.fixture
async def proxy(redis_server: RedisServer, redis_client: aioredis.Redis) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the session's Redis (database 0, flushed)."""
    proxy = FaultProxy("under-test", redis_server.port)
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def expiries(redis_client: aioredis.Redis) -> AsyncIterator[Any]:
    """A subscription to key expirations in database 0 (notifications switched on for the test)."""
    previous = (await redis_client.config_get("notify-keyspace-events"))["notify-keyspace-events"]
    await redis_client.config_set("notify-keyspace-events", "Ex")
    pubsub: Any = redis_client.pubsub()
    await pubsub.subscribe("__keyevent@0__:expired")
    yield pubsub
    await pubsub.aclose()
    await redis_client.config_set("notify-keyspace-events", previous or "")


async def expired(pubsub: Any, key: str) -> None:
    """Until `key` has expired."""
    async with asyncio.timeout(ANSWER_BOUND_S):
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=ANSWER_BOUND_S)
            if message is not None and message["data"].decode() == key:
                return


async def completion(redis_url: str, queue: Queue, job_id: str) -> None:
    """Until `job_id` has a stored result, within ANSWER_BOUND_S (TimeoutError past it)."""
    client = aioredis.Redis.from_url(redis_url)
    pubsub: Any = client.pubsub()
    try:
        await pubsub.subscribe(KEYS.completions_channel)
        async with asyncio.timeout(ANSWER_BOUND_S):
            while await queue.jobs.fetch_meta(job_id) is None:
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
    finally:
        await pubsub.aclose()
        await client.aclose()


async def submitted_and_claimed(queue: Queue, job: Job, worker: str = "w1") -> ClaimedJob:
    await queue.streams.ensure_group(STREAM)
    await queue.jobs.submit(job, STREAM)
    claimed = await queue.delivery.claim(worker, [STREAM], block_ms=100)
    assert claimed is not None
    return claimed


async def test_a_completion_announced_while_the_subscription_was_down_is_not_missed(
    proxy: FaultProxy, redis_client: aioredis.Redis
) -> None:
    listener_redis = connect(proxy.url(), name="listener-under-test")
    listener = JobListener(listener_redis, KEYS)
    listening = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.subscribed.wait(), ANSWER_BOUND_S)
        queue = Queue.of(redis_client, KEYS)
        job = make_job()
        claimed = await submitted_and_claimed(queue, job)
        done = listener.expect(job.id)
        proxy.partition()  # the announcement reaches the proxy and goes no further
        assert await queue.delivery.complete(claimed, succeeded(job, "w1"), [b"png"])
        proxy.kill(pubsub_only=True)  # the subscription breaks; redis-py makes a new one by itself
        proxy.heal()
        await asyncio.wait_for(done, ANSWER_BOUND_S)
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        await listener_redis.aclose()


async def test_a_non_utf8_completion_message_leaves_the_gateway_serving(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, fake_worker: None
) -> None:
    await redis_client.publish(KEYS.completions_channel, b"\xff\xfe not utf-8")
    worker = asyncio.create_task(play_worker(redis_client, [b"png"] * 4))
    response = await client.post("/v1/generate", json={"prompt": "a cat", "num_inference_steps": 2})
    await worker
    assert response.status == 200, await response.text()


@pytest.mark.parametrize("queued", ["while-the-worker-waits", "before-the-worker-started"])
async def test_a_job_whose_delivery_reply_was_lost_is_still_served(
    queued: str, proxy: FaultProxy, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    """A worker takes a new job with its claim script (an EVALSHA, run before each wait: a job queued before
    it started) or with its blocking read (a job that arrives while it waits; the claim script when it
    arrives between two reads): the reply that delivers the job is lost whichever carried it."""
    queue = Queue.of(redis_client, KEYS)
    job = make_job()
    lost = proxy.drop_reply(DropRule((b"XREADGROUP", b"EVALSHA"), job.id.encode()))
    if queued == "before-the-worker-started":
        await queue.streams.ensure_group(STREAM)
        await queue.jobs.submit(job, STREAM)
    async with running_worker(proxy.url(0)):
        if queued == "while-the-worker-waits":
            await queue.jobs.submit(job, STREAM)
        await asyncio.wait_for(lost.wait(), ANSWER_BOUND_S)  # the fault did happen
        await completion(redis_server.url(0), queue, job.id)
    assert (await redis_client.xpending(STREAM, KEYS.workers_group))["pending"] == 0


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[AsyncRedisProcess]:
    """A redis-server of the test's own (AOF on), which it may roll back."""
    (tmp_path / "redis").mkdir()
    server = AsyncRedisProcess(
        tmp_path / "redis", RedisOptions(appendonly=True, extra=("--auto-aof-rewrite-percentage", "0"))
    )
    await server.start()
    yield server
    await server.stop()


async def test_a_job_whose_result_was_rolled_back_is_run_again(own_redis: AsyncRedisProcess, tmp_path: Path) -> None:
    proxy = FaultProxy("worker", own_redis.port)
    await proxy.start()
    admin = connect(own_redis.url(), name="test-admin")  # retries: it outlives the restore
    queue = Queue.of(admin, KEYS)
    try:
        async with running_worker(proxy.url()):
            # The start script answers Redis's time in ms: pause the worker right after it, job running.
            # (":17", Redis's clock in ms this decade: the claim script's reply ends in ":1", its delivery count)
            started = proxy.pause_after(DropRule(b"EVALSHA", b":17"))
            job = make_job()
            await queue.jobs.submit(job, STREAM)
            await asyncio.wait_for(started.wait(), ANSWER_BOUND_S)
            assert await queue.jobs.job_status(job.id) == "running"
            own_redis.snapshot(tmp_path / "snapshot")
            proxy.heal()
            await completion(own_redis.url(), queue, job.id)
            await own_redis.restore(tmp_path / "snapshot")  # the result, the ack: gone
            assert await queue.jobs.fetch_meta(job.id) is None
            await completion(own_redis.url(), queue, job.id)
    finally:
        await admin.aclose()
        await proxy.close()


async def test_a_job_routed_to_a_departing_worker_during_its_rehome_is_kept(
    proxy: FaultProxy, redis_client: aioredis.Redis
) -> None:
    queue = Queue.of(redis_client, KEYS)
    stream = KEYS.worker_stream("departed")
    await queue.streams.ensure_group(stream)
    rehomer_redis = connect(proxy.url(), name="rehomer")
    try:
        emptied = proxy.pause_after(DropRule(b"XRANGE"))
        rehoming = asyncio.create_task(Queue.of(rehomer_redis, KEYS).recovery.rehome(stream))
        await asyncio.wait_for(emptied.wait(), ANSWER_BOUND_S)
        job = make_job()
        await queue.jobs.submit(job, stream)  # a gateway routes a job to it before it has left
        proxy.heal()
        await rehoming
    finally:
        await rehomer_redis.aclose()
    record = await queue.jobs.record(job.id)
    assert record is not None and record.stream is not None and record.entry_id is not None
    assert await redis_client.xrange(record.stream, record.entry_id, record.entry_id), "the job's entry is gone"


async def test_a_late_result_is_dropped_even_after_the_first_expired(
    redis_client: aioredis.Redis, expiries: Any
) -> None:
    queue = Queue.of(redis_client, KEYS)
    job = make_job(result_ttl_s=1)
    claimed = await submitted_and_claimed(queue, job)
    assert await queue.delivery.complete(claimed, succeeded(job, "w1"), [b"first"])
    await expired(expiries, KEYS.result(job.id))
    # The worker that was cut off mid-job comes back and retries its store. Its delivery is the attempt that
    # made the job terminal, so docs/delivery.md's fencing answers the retry "stored" (a rerun of the store,
    # which changes nothing) rather than refusing it: what a client must not see is a second result.
    await queue.delivery.complete(claimed, succeeded(job, "w2"), [b"second"])
    meta = await queue.jobs.fetch_meta(job.id)
    assert meta is None or meta.worker == "w1"
    assert await queue.jobs.job_status(job.id) == "succeeded"


async def test_a_job_queued_past_its_ttl_keeps_its_record_and_key(redis_client: aioredis.Redis, expiries: Any) -> None:
    queue = Queue.of(redis_client, KEYS)
    await queue.streams.ensure_group(STREAM)
    job = make_job(result_ttl_s=1)
    first = await queue.jobs.submit(job, STREAM, idempotency_key="order-42", fingerprint="same")
    assert first.created
    # Wait until every lifetime counted from the submit is over (the record's, the longest, included): a
    # marker key set now with that lifetime announces its expiry, so the wait is an event and not a bound.
    marker = "marker:queued-past-ttl"
    await redis_client.set(marker, b"", px=record_ttl(job.result_ttl_s) * 1000 + 100)
    await expired(expiries, marker)
    # Lifetimes count from the terminal state (docs/delivery.md): a queued job's record and key have none.
    assert await redis_client.ttl(KEYS.job(job.id)) == -1
    assert await redis_client.ttl(KEYS.idempotency("order-42")) == -1
    retry = await queue.jobs.submit(
        make_job("job-2", result_ttl_s=1), STREAM, idempotency_key="order-42", fingerprint="same"
    )
    assert (retry.job_id, retry.created) == (job.id, False)
    assert await queue.jobs.job_status(job.id) == "queued"


async def test_a_job_moved_off_a_worker_stream_is_delivered_at_most_max_deliveries_times(
    redis_client: aioredis.Redis,
) -> None:
    queue = Queue.of(redis_client, KEYS)
    own = KEYS.worker_stream("w1")
    for stream in (own, STREAM):
        await queue.streams.ensure_group(stream)
    job = make_job()
    await queue.jobs.submit(job, own)
    assert await queue.delivery.claim("w1", [own], block_ms=100) is not None  # delivery 1; then w1 dies
    assert await queue.recovery.rehome_orphans({"w2", "w3"}) == 1
    second = await queue.delivery.claim("w2", [STREAM], block_ms=100)  # delivery 2; then w2 dies
    assert second is not None and second.deliveries == 2
    third = await queue.recovery.reclaim("w3", {"w3"}, max_deliveries=2, streams=[STREAM])
    assert third is None, f"delivered a third time (deliveries={third.deliveries}) with max_deliveries=2"
    assert await redis_client.xlen(KEYS.dead_letter_stream) == 1


async def test_a_submit_whose_reply_was_lost_queues_one_job_and_is_not_a_replay(
    proxy: FaultProxy, redis_client: aioredis.Redis
) -> None:
    await Queue.of(redis_client, KEYS).streams.ensure_group(STREAM)
    submitter = connect(proxy.url(), name="gateway-under-test")
    queue = Queue.of(submitter, KEYS)
    try:
        lost = proxy.drop_reply(DropRule(b"EVALSHA", b"created"))
        keyed = await queue.jobs.submit(make_job("job-1"), STREAM, idempotency_key="order-7", fingerprint="f")
        assert lost.is_set()
        lost = proxy.drop_reply(DropRule(b"EVALSHA", b"created"))
        await queue.jobs.submit(make_job("job-2"), STREAM)
        assert lost.is_set()
    finally:
        await submitter.aclose()
    assert keyed.created, "the first request was answered as a replay of itself"
    assert await redis_client.xlen(STREAM) == 2, "a job was queued twice"


async def blocked_clients(redis_client: aioredis.Redis, count: int) -> None:
    """Until Redis counts `count` clients blocked in a command: it announces no such event, so ask, at most
    1000 times 10 ms apart."""
    for _ in range(1000):
        if int((await redis_client.info("clients"))["blocked_clients"]) >= count:
            return
        await asyncio.sleep(0.01)
    raise RuntimeError(f"fewer than {count} clients blocked after 10 s")


async def test_a_worker_whose_stream_is_deleted_under_its_blocked_read_keeps_serving(
    proxy: FaultProxy, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    queue = Queue.of(redis_client, KEYS)
    # The read blocks long enough to be deleted under, and short enough for the stop at the end: a stopping
    # worker finishes its blocked read first, and running_worker waits 10 s for it.
    async with running_worker(proxy.url(), worker_id="blocked", claim_block_ms=5_000) as worker:
        blocking = proxy.sent(b"BLOCK")
        await asyncio.wait_for(blocking.wait(), ANSWER_BOUND_S)
        await blocked_clients(redis_client, 1)
        await redis_client.delete(KEYS.worker_stream(worker.id))  # another worker took it for dead
        job = make_job()
        await queue.jobs.submit(job, STREAM)
        await completion(redis_server.url(0), queue, job.id)
