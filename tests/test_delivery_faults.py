"""The delivery promise against faults the other fault tests do not inject, one test per fault, each
triggered deterministically with the fault injector's proxy or Redis commands (testkit/proxy.py).

Every test here states what a client must see. Those marked xfail fail on today's code: each reason
names the defect, and the fix of the delivery mechanism turns them into passes (strict: a pass while the
mark is still there fails the suite, so the mark goes with the fix).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from redis.exceptions import ResponseError

from common.keys import Keys
from common.protocol import Job, JobResult, Shape, Timings
from common.queue import ClaimedJob, JobListener, JobQueue
from common.redis_conn import connect
from common.registry import Registry
from testkit import AsyncRedisProcess, RedisOptions, free_port
from testkit.procs import sdxl_serve_argv
from testkit.proxy import DropRule, FaultProxy
from tests.conftest import RedisServer, play_worker
from tests.protection import running_worker

KEYS = Keys()
SHAPE = Shape(width=64, height=64, steps=2)
STREAM = KEYS.shape_stream(SHAPE)
# Long enough for any fix to act (a re-check after resubscribing, a sweep, a takeover after a heartbeat
# TTL of 2 s); a job that has no answer by then has none coming.
ANSWER_BOUND_S = 15.0
UP_READY_TIMEOUT_S = 300.0


def make_job(job_id: str = "job-1", ttl_s: int = 60) -> Job:
    return Job(id=job_id, prompt="a cat", seed=1, guidance_scale=7.5, shape=SHAPE, result_ttl_s=ttl_s)


def success(job: Job, worker: str) -> JobResult:
    return JobResult(
        id=job.id,
        status="succeeded",
        worker=worker,
        seed=job.seed,
        shape=job.shape,
        image_count=1,
        timings=Timings(queued_ms=1, generate_ms=2, encode_ms=3),
    )


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


async def completion(redis_url: str, queue: JobQueue, job_id: str) -> None:
    """Until `job_id` has a stored result, within ANSWER_BOUND_S (TimeoutError past it)."""
    client = aioredis.Redis.from_url(redis_url)
    pubsub: Any = client.pubsub()
    try:
        await pubsub.subscribe(KEYS.completions_channel)
        async with asyncio.timeout(ANSWER_BOUND_S):
            while await queue.fetch_meta(job_id) is None:
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
    finally:
        await pubsub.aclose()
        await client.aclose()


async def submitted_and_claimed(queue: JobQueue, job: Job, worker: str = "w1") -> ClaimedJob:
    await queue.ensure_group(STREAM)
    await queue.submit(job, STREAM)
    claimed = await queue.claim(worker, [STREAM], block_ms=100)
    assert claimed is not None
    return claimed


@pytest.mark.xfail(
    strict=True,
    raises=TimeoutError,
    reason="silent pub/sub resubscribe: redis-py reconnects and resubscribes inside its own retry loop, so "
    "JobListener never re-checks its waiters and a completion announced meanwhile is missed",
)
async def test_a_completion_announced_while_the_subscription_was_down_is_not_missed(
    proxy: FaultProxy, redis_client: aioredis.Redis
) -> None:
    listener_redis = connect(proxy.url(), name="listener-under-test")
    listener = JobListener(listener_redis, KEYS)
    listening = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.subscribed.wait(), ANSWER_BOUND_S)
        queue = JobQueue(redis_client, KEYS)
        job = make_job()
        claimed = await submitted_and_claimed(queue, job)
        done = listener.expect(job.id)
        proxy.partition()  # the announcement reaches the proxy and goes no further
        assert await queue.complete(claimed, success(job, "w1"), [b"png"])
        proxy.kill(pubsub_only=True)  # the subscription breaks; redis-py makes a new one by itself
        proxy.heal()
        await asyncio.wait_for(done, ANSWER_BOUND_S)
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        await listener_redis.aclose()


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="one malformed message kills the listener: a non-UTF-8 payload on the completions channel raises "
    "UnicodeDecodeError, the completion-listener task dies and every later /v1/generate times out",
)
async def test_a_non_utf8_completion_message_leaves_the_gateway_serving(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, fake_worker: None
) -> None:
    await redis_client.publish(KEYS.completions_channel, b"\xff\xfe not utf-8")
    worker = asyncio.create_task(play_worker(redis_client, [b"png"] * 4))
    response = await client.post("/v1/generate", json={"prompt": "a cat", "num_inference_steps": 2})
    await worker
    assert response.status == 200, await response.text()


@pytest.mark.xfail(
    strict=True,
    raises=TimeoutError,
    reason="lost XREADGROUP reply: redis-py retries the read with '>', which skips the delivered entry; it "
    "stays pending under a live worker forever",
)
async def test_a_job_whose_delivery_reply_was_lost_is_still_served(
    proxy: FaultProxy, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    queue = JobQueue(redis_client, KEYS)
    async with running_worker(proxy.url(0)):
        lost = proxy.drop_reply(DropRule(b"XREADGROUP", b"job"))
        job = make_job()
        await queue.submit(job, STREAM)
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


@pytest.mark.xfail(
    strict=True,
    raises=TimeoutError,
    reason="Redis back without its last writes: the job record says running, the entry is pending under a live "
    "worker that finished it long ago, and nothing ever runs it again",
)
async def test_a_job_whose_result_was_rolled_back_is_run_again(own_redis: AsyncRedisProcess, tmp_path: Path) -> None:
    proxy = FaultProxy("worker", own_redis.port)
    await proxy.start()
    admin = connect(own_redis.url(), name="test-admin")  # retries: it outlives the restore
    queue = JobQueue(admin, KEYS)
    try:
        async with running_worker(proxy.url()):
            # The start script answers Redis's time in ms: pause the worker right after it, job running.
            started = proxy.pause_after(DropRule(b"EVALSHA", b":1"))
            job = make_job()
            await queue.submit(job, STREAM)
            await asyncio.wait_for(started.wait(), ANSWER_BOUND_S)
            assert await queue.job_status(job.id) == "running"
            own_redis.snapshot(tmp_path / "snapshot")
            proxy.heal()
            await completion(own_redis.url(), queue, job.id)
            await own_redis.restore(tmp_path / "snapshot")  # the result, the ack: gone
            assert await queue.fetch_meta(job.id) is None
            await completion(own_redis.url(), queue, job.id)
    finally:
        await admin.aclose()
        await proxy.close()


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="rehome() race: it reads a departed worker's stream empty, then deletes it in a second round trip; "
    "a job submitted in between is deleted with it",
)
async def test_a_job_routed_to_a_departing_worker_during_its_rehome_is_kept(
    proxy: FaultProxy, redis_client: aioredis.Redis
) -> None:
    queue = JobQueue(redis_client, KEYS)
    stream = KEYS.worker_stream("departed")
    await queue.ensure_group(stream)
    rehomer_redis = connect(proxy.url(), name="rehomer")
    try:
        emptied = proxy.pause_after(DropRule(b"XRANGE"))
        rehoming = asyncio.create_task(JobQueue(rehomer_redis, KEYS).rehome(stream))
        await asyncio.wait_for(emptied.wait(), ANSWER_BOUND_S)
        job = make_job()
        await queue.submit(job, stream)  # a gateway routes a job to it before it has left
        proxy.heal()
        await rehoming
    finally:
        await rehomer_redis.aclose()
    record = await queue.record(job.id)
    assert record is not None and record.stream is not None and record.entry_id is not None
    assert await redis_client.xrange(record.stream, record.entry_id, record.entry_id), "the job's entry is gone"


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="a second visible result after expiry: first-result-wins looks only at the result key, which expires, "
    "so a partitioned worker's late store becomes visible",
)
async def test_a_late_result_is_dropped_even_after_the_first_expired(
    redis_client: aioredis.Redis, expiries: Any
) -> None:
    queue = JobQueue(redis_client, KEYS)
    job = make_job(ttl_s=1)
    claimed = await submitted_and_claimed(queue, job)
    assert await queue.complete(claimed, success(job, "w1"), [b"first"])
    await expired(expiries, KEYS.result(job.id))
    # The worker that was cut off mid-job comes back and retries its store.
    assert not await queue.complete(claimed, success(job, "w2"), [b"second"])
    meta = await queue.fetch_meta(job.id)
    assert meta is None or meta.worker == "w1"


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="TTLs counted from submit: a job queued longer than its result TTL loses its record and its "
    "Idempotency-Key, and a retry with the key creates a second job",
)
async def test_a_job_queued_past_its_ttl_keeps_its_record_and_key(redis_client: aioredis.Redis, expiries: Any) -> None:
    queue = JobQueue(redis_client, KEYS)
    await queue.ensure_group(STREAM)
    job = make_job(ttl_s=1)
    first = await queue.submit(job, STREAM, idempotency_key="order-42", fingerprint="same")
    assert first.created
    with contextlib.suppress(TimeoutError):  # with the fix nothing expires: the bound passes quietly
        await expired(expiries, KEYS.job(job.id))
    retry = await queue.submit(make_job("job-2", ttl_s=1), STREAM, idempotency_key="order-42", fingerprint="same")
    assert (retry.job_id, retry.created) == (job.id, False)
    assert await queue.job_status(job.id) == "queued"


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="poison limit off by one under random/p2c: the takeover compares only the shared stream's delivery "
    "count, so a job moved off a worker's stream is delivered max_deliveries + 1 times",
)
async def test_a_job_moved_off_a_worker_stream_is_delivered_at_most_max_deliveries_times(
    redis_client: aioredis.Redis,
) -> None:
    queue = JobQueue(redis_client, KEYS)
    own = KEYS.worker_stream("w1")
    for stream in (own, STREAM):
        await queue.ensure_group(stream)
    job = make_job()
    await queue.submit(job, own)
    assert await queue.claim("w1", [own], block_ms=100) is not None  # delivery 1; then w1 dies
    assert await queue.rehome_orphans({"w2", "w3"}) == 1
    second = await queue.claim("w2", [STREAM], block_ms=100)  # delivery 2; then w2 dies
    assert second is not None and second.deliveries == 2
    third = await queue.reclaim("w3", {"w3"}, max_deliveries=2, streams=[STREAM])
    assert third is None, f"delivered a third time (deliveries={third.deliveries}) with max_deliveries=2"
    assert await redis_client.xlen(KEYS.dead_letter_stream) == 1


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="client retries re-run scripts that are not idempotent: a lost reply to the submit script makes "
    "redis-py run it again, which answers the client's first request as a replay (or queues the job twice)",
)
async def test_a_submit_whose_reply_was_lost_queues_one_job_and_is_not_a_replay(
    proxy: FaultProxy, redis_client: aioredis.Redis
) -> None:
    await JobQueue(redis_client, KEYS).ensure_group(STREAM)
    submitter = connect(proxy.url(), name="gateway-under-test")
    queue = JobQueue(submitter, KEYS)
    try:
        lost = proxy.drop_reply(DropRule(b"EVALSHA", b"created"))
        keyed = await queue.submit(make_job("job-1"), STREAM, idempotency_key="order-7", fingerprint="f")
        assert lost.is_set()
        lost = proxy.drop_reply(DropRule(b"EVALSHA", b"created"))
        await queue.submit(make_job("job-2"), STREAM)
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


@pytest.mark.xfail(
    strict=True,
    raises=ResponseError,  # the worker's task, re-raised as the worker is stopped at the end
    reason="a stream deleted under a blocked read (a rehome of a worker taken for dead, a rollback) answers "
    "'UNBLOCKED the stream key no longer exists'; the worker loop does not catch it and the process exits",
)
async def test_a_worker_whose_stream_is_deleted_under_its_blocked_read_keeps_serving(
    proxy: FaultProxy, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    queue = JobQueue(redis_client, KEYS)
    async with running_worker(proxy.url(), worker_id="blocked", claim_block_ms=10_000) as worker:
        blocking = proxy.sent(b"BLOCK")
        await asyncio.wait_for(blocking.wait(), ANSWER_BOUND_S)
        await blocked_clients(redis_client, 1)
        await redis_client.delete(KEYS.worker_stream(worker.id))  # another worker took it for dead
        job = make_job()
        await queue.submit(job, STREAM)
        await completion(redis_server.url(0), queue, job.id)


def _workers_of(pid: int) -> list[int]:
    """Pids of `sdxl-serve up`'s worker children."""
    found = []
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        with contextlib.suppress(FileNotFoundError):
            if b"worker" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
                found.append(int(child))
    return found


async def _new_ready_worker(pubsub: Any, known: set[str]) -> str:
    """The id of the first worker not in `known` to announce itself ready."""
    while True:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
        if message is not None:
            info = json.loads(message["data"])
            if info["id"] not in known and info["state"] == "ready":
                return str(info["id"])


@pytest.mark.e2e
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="`sdxl-serve up` does not supervise: one worker process dying stops the whole cluster",
)
async def test_up_keeps_serving_and_replaces_a_worker_that_died(
    redis_server: RedisServer, tiny_model: Path, tmp_path: Path
) -> None:
    redis_url = redis_server.url(5)
    admin = aioredis.Redis.from_url(redis_url)
    await admin.flushdb()
    port = free_port()
    argv = sdxl_serve_argv("up", "--redis-url", redis_url, "--workers", "2", "--port", str(port))
    argv += ["--model", str(tiny_model), "--shapes", "64x64x2", "--cache-dir", str(tmp_path)]
    up = subprocess.Popen(  # noqa: ASYNC220 (the test waits on it alone)
        argv, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    pubsub: Any = admin.pubsub()
    try:
        assert up.stdout is not None
        assert (await asyncio.to_thread(up.stdout.readline)).startswith("ready:")
        known = {w.id for w in await Registry(admin, KEYS).workers()}
        victims = _workers_of(up.pid)
        assert len(known) == len(victims) == 2, (known, victims)
        await pubsub.subscribe(KEYS.worker_events_channel)
        os.kill(victims[0], signal.SIGKILL)
        replaced = asyncio.create_task(_new_ready_worker(pubsub, known))
        exited = asyncio.create_task(asyncio.to_thread(up.wait))
        done, _ = await asyncio.wait({replaced, exited}, timeout=UP_READY_TIMEOUT_S, return_when="FIRST_COMPLETED")
        assert replaced in done, f"no replacement worker; sdxl-serve up exited with {up.returncode}"
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "a cat", "num_inference_steps": 2}
            async with session.post(f"http://127.0.0.1:{port}/v1/generate", json=body) as response:
                assert response.status == 200
    finally:
        up.send_signal(signal.SIGTERM)
        await asyncio.to_thread(up.wait, 200)
        await pubsub.aclose()
        await admin.aclose()
