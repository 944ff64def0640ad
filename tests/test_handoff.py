"""Hand-off (worker/handoff.py) on the session's redis-server: generated jobs are encoded and stored behind the
device, at most `limit` at a time; each stays in hand (a claim must not take it again) until its result is
stored, and each is stored once. The worker hands off with a limit of one; a worker holding several jobs raises
it. The encoder is a stand-in held and released by events: no timing."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Executor

import numpy as np
import redis.asyncio as aioredis

from common.protocol import Shape
from common.rediskeys import RedisKeys
from testkit.jobs import make_job
from tests.queues import Queue
from worker.config import WorkerConfig
from worker.delivery import ClaimedJob
from worker.encode import Encoding
from worker.handoff import Generated, HandOff
from worker.metrics import WorkerMetrics

KEYS = RedisKeys()
SHAPE = Shape(width=64, height=64, steps=2)
STREAM = KEYS.size_stream(SHAPE.size)
WAIT_S = 30.0
JOBS = 3


class Encoder:
    """Stands in for `encode_all`: the images of job n (their pixels carry n) wait until `release[n]` is set."""

    def __init__(self) -> None:
        self.entered = [threading.Event() for _ in range(JOBS)]
        self.release = [threading.Event() for _ in range(JOBS)]

    def __call__(self, images: np.ndarray, encoding: Encoding, executor: Executor) -> list[bytes]:
        n = int(images[0, 0, 0, 0])
        self.entered[n].set()
        assert self.release[n].wait(WAIT_S), f"job {n} was never released"
        return [b"image"] * len(images)

    async def wait_entered(self, n: int) -> None:
        assert await asyncio.to_thread(self.entered[n].wait, WAIT_S), f"job {n} was never encoded"


async def started_jobs(queue: Queue) -> list[ClaimedJob]:
    """`JOBS` jobs submitted, claimed and started by worker "w", as the worker does before generating them."""
    await queue.streams.ensure_group(STREAM)
    claimed: list[ClaimedJob] = []
    for n in range(JOBS):
        await queue.jobs.submit(make_job(f"job-{n}", SHAPE, seed=n), STREAM)
        job = await queue.delivery.claim("w", [STREAM], block_ms=100, in_hand=claimed)
        assert job is not None and await queue.delivery.start(job, "w") is not None
        claimed.append(job)
    return claimed


def generated(claimed: ClaimedJob, n: int) -> Generated:
    return Generated(claimed, np.full((2, 8, 8, 3), n, np.uint8), None, queued_ms=1.0, generate_ms=2.0)


async def test_up_to_limit_jobs_are_in_delivery_at_once_and_each_is_stored_once(
    redis_client: aioredis.Redis,
) -> None:
    queue = Queue.of(redis_client, KEYS)
    claimed = await started_jobs(queue)
    encoder, settled = Encoder(), []
    config = WorkerConfig(worker_id="w", compile_cache_dir=None)
    handoff = HandOff(config, queue.delivery, None, encoder, WorkerMetrics(), lambda: settled.append(1), limit=2)
    async with asyncio.timeout(WAIT_S):
        await handoff.hand_off(generated(claimed[0], 0))
        await handoff.hand_off(generated(claimed[1], 1))  # returns while job 0 is still held in its encoder
        await encoder.wait_entered(1)
        assert handoff.in_hand() == claimed[:2]
        third = asyncio.create_task(handoff.hand_off(generated(claimed[2], 2)))
        encoder.release[0].set()
        await third  # it waited for a delivery to finish: job 0's, the one released
        assert await queue.jobs.job_status("job-0") == "succeeded"
        assert await queue.jobs.job_status("job-1") == "running"
        assert handoff.in_hand() == claimed[1:]
        for release in encoder.release:
            release.set()
        await handoff.drain()
    handoff.close()
    assert handoff.in_hand() == [] and len(settled) == JOBS
    assert [await queue.jobs.job_status(f"job-{n}") for n in range(JOBS)] == ["succeeded"] * JOBS
    assert (await redis_client.xpending(STREAM, KEYS.workers_group))["pending"] == 0
    assert await redis_client.hget(KEYS.stats, "duplicate_results") is None
