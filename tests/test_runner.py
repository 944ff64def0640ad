"""The worker loop (worker/runner.py) keeps the device busy: a job is encoded and stored while the next one
generates, and whatever happens to the encoding, each job is settled exactly once; a stop drains both.

The tests run a real Worker (its loop, heartbeats and queue scripts) on the session's redis-server, with a
stand-in pipeline and a stand-in encoder that they hold and release by events: no JAX work, no timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor

import numpy as np
import redis.asyncio as aioredis

from common.jobstore import JobStore
from common.protocol import Job, JobResult, Shape
from common.rediskeys import RedisKeys
from tests.conftest import TEST_SHAPES, RedisServer
from worker.config import WorkerConfig
from worker.encode import Encoding
from worker.pipeline import CompileTimings
from worker.runner import Worker

KEYS = RedisKeys()
SHAPE = TEST_SHAPES[0]
WAIT_S = 30.0  # how long a test waits for results and for the worker to stop
HOLD_S = 10.0  # how long a held encoder waits for the next generation before it gives up (then the test fails)


class Pipeline:
    """Stands in for SDXLPipeline: each generation says it started (by seed), and its pixels carry the seed, so
    the encoder knows whose images it has."""

    device_kind = "stand-in"
    devices = 4

    def __init__(self) -> None:
        self.generating: dict[int, threading.Event] = {}
        self.on_generate: Callable[[int], None] = lambda seed: None

    def started(self, seed: int) -> threading.Event:
        return self.generating.setdefault(seed, threading.Event())

    def default_shapes(self) -> tuple[Shape, ...]:
        return TEST_SHAPES

    def compile(self, shape: Shape) -> CompileTimings:
        return CompileTimings(lower_s=0.0, compile_s=0.0, warmup_s=0.0)

    def generate(
        self, shape: Shape, prompt: str, negative: str, seed: int, guidance: float, on_step: object
    ) -> np.ndarray:
        self.started(seed).set()
        self.on_generate(seed)
        return np.full((4, shape.height, shape.width, 3), seed, dtype=np.uint8)


class Encoder:
    """Stands in for `encode_all`: holds the images of seed `held` until seed `until` starts generating, and
    records whether it did; raises for the seeds in `failing`."""

    def __init__(self, pipeline: Pipeline, held: int, until: int, failing: frozenset[int] = frozenset()) -> None:
        self._pipeline, self._held, self._until, self._failing = pipeline, held, until, failing
        self.saw_next_generating: bool | None = None

    def __call__(self, images: np.ndarray, encoding: Encoding, executor: Executor) -> list[bytes]:
        seed = int(images[0, 0, 0, 0])
        if seed == self._held:
            self.saw_next_generating = self._pipeline.started(self._until).wait(HOLD_S)
        if seed in self._failing:
            raise OSError("disk full")
        return [b"image"] * len(images)


@contextlib.asynccontextmanager
async def worker(redis_server: RedisServer, pipeline: Pipeline, encoder: Encoder) -> AsyncIterator[Worker]:
    config = WorkerConfig(
        redis_url=redis_server.url(0), shapes=TEST_SHAPES, worker_id="w", claim_block_ms=100, metrics_port=0
    )
    client = aioredis.Redis.from_url(redis_server.url(0))
    serving = Worker(config, client, load_pipeline=lambda: pipeline, encode_images=encoder)  # type: ignore[arg-type,return-value]
    task = asyncio.create_task(serving.run())
    try:
        yield serving
    finally:
        serving.stop()
        await asyncio.wait_for(task, WAIT_S)
        await client.aclose()


async def submit(redis_client: aioredis.Redis, seeds: list[int]) -> None:
    store = JobStore(redis_client, KEYS)
    for seed in seeds:
        job = Job(id=f"job-{seed}", prompt="a cat", seed=seed, guidance_scale=7.5, shape=SHAPE, result_ttl_s=60)
        await store.submit(job, KEYS.shape_stream(SHAPE))


async def results_of(redis_client: aioredis.Redis, seeds: list[int]) -> dict[int, JobResult]:
    store = JobStore(redis_client, KEYS)
    results = {seed: await store.fetch_meta(f"job-{seed}") for seed in seeds}
    return {seed: result for seed, result in results.items() if result is not None}


async def run_jobs(redis_client: aioredis.Redis, seeds: list[int]) -> dict[int, JobResult]:
    """Queue one job per seed, then wait for every result (announced on the completions channel)."""
    async with redis_client.pubsub() as completions:
        await completions.subscribe(KEYS.completions_channel)
        await submit(redis_client, seeds)
        waiting = {f"job-{seed}" for seed in seeds}
        async with asyncio.timeout(WAIT_S):
            async for message in completions.listen():
                if message["type"] == "message":
                    waiting.discard(message["data"].decode())
                    if not waiting:
                        break
    return await results_of(redis_client, seeds)


async def settled_once(redis_client: aioredis.Redis) -> None:
    """Nothing left on the stream or pending, and no result was stored twice."""
    stream = KEYS.shape_stream(SHAPE)
    assert await redis_client.xlen(stream) == 0
    assert (await redis_client.xpending(stream, KEYS.workers_group))["pending"] == 0
    assert await redis_client.hget(KEYS.stats, "duplicate_results") is None


async def test_the_next_job_generates_while_the_last_one_is_encoded(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    pipeline = Pipeline()
    encoder = Encoder(pipeline, held=1, until=2)
    async with worker(redis_server, pipeline, encoder):
        results = await run_jobs(redis_client, [1, 2, 3])
    assert encoder.saw_next_generating is True  # job 1's images were still being encoded when job 2 started
    assert {seed: r.status for seed, r in results.items()} == {1: "succeeded", 2: "succeeded", 3: "succeeded"}
    assert all(r.image_count == 4 and r.timings is not None for r in results.values())
    await settled_once(redis_client)


async def test_a_failed_encoding_fails_its_job_once_and_the_worker_serves_on(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    pipeline = Pipeline()
    encoder = Encoder(pipeline, held=1, until=2, failing=frozenset({1}))
    async with worker(redis_server, pipeline, encoder):
        results = await run_jobs(redis_client, [1, 2])
    assert results[1].status == "failed" and results[1].error == "encoding failed: OSError: disk full"
    assert results[2].status == "succeeded"
    await settled_once(redis_client)


async def test_a_stop_drains_the_job_on_the_device_and_the_one_in_delivery(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    pipeline = Pipeline()
    encoder = Encoder(pipeline, held=1, until=2)
    config = WorkerConfig(
        redis_url=redis_server.url(0), shapes=TEST_SHAPES, worker_id="w", claim_block_ms=100, metrics_port=0
    )
    serving = Worker(config, redis_client, load_pipeline=lambda: pipeline, encode_images=encoder)  # type: ignore[arg-type,return-value]
    loop = asyncio.get_running_loop()
    # Stop as job 2 starts on the device, with job 1 still held in its encoder.

    def stop_at_job_2(seed: int) -> None:
        if seed == 2:
            loop.call_soon_threadsafe(serving.stop)

    pipeline.on_generate = stop_at_job_2
    running = asyncio.create_task(serving.run())
    await submit(redis_client, [1, 2, 3])
    await asyncio.wait_for(running, WAIT_S)  # run() returns only once both are stored
    assert encoder.saw_next_generating is True
    assert {seed: r.status for seed, r in (await results_of(redis_client, [1, 2, 3])).items()} == {
        1: "succeeded",
        2: "succeeded",
    }  # job 3 was never claimed: it waits on the stream for another worker
    assert await redis_client.xlen(KEYS.shape_stream(SHAPE)) == 1
    assert (await redis_client.xpending(KEYS.shape_stream(SHAPE), KEYS.workers_group))["pending"] == 0
