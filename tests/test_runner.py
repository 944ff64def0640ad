"""The worker loop (worker/runner.py) keeps the device busy: a job is encoded and stored while the next one
generates, and whatever happens to the encoding, each job is settled exactly once; a stop drains both. A job
cancelled while it runs stops within a few steps, and the worker takes the next job.

The first tests run a real Worker (its loop, heartbeats and queue scripts) on the session's redis-server, with a
stand-in pipeline and a stand-in encoder that they hold and release by events: no JAX work, no timing. The
cancel test runs a real worker process on the tiny model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis.asyncio as aioredis

from common.blobstore import FileBlobStore
from common.jobstore import JobStore
from common.protocol import REQUEST_KINDS, SCHEDULERS, JobResult, ResolvedParams, Shape, Size
from common.rediskeys import RedisKeys
from common.registry import Registry
from testkit import worker_args
from testkit.jobs import make_job
from testkit.standin import StandInEngine, StandInPipeline
from tests.support import (
    TEST_MAX_STEPS,
    TEST_SHAPES,
    TEST_SIZE,
    Cluster,
    ProcessGroup,
    RedisServer,
    scrape,
    wait_ready,
)
from worker.config import WorkerConfig
from worker.encode import Encoding
from worker.handoff import EncodeImages
from worker.pipeline import CompileTimings
from worker.pipeline_protocol import Engine
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
    max_steps = TEST_MAX_STEPS
    schedulers = SCHEDULERS
    request_kinds = REQUEST_KINDS

    def __init__(self) -> None:
        self.generating: dict[int, threading.Event] = {}
        self.on_generate: Callable[[int], None] = lambda seed: None

    def started(self, seed: int) -> threading.Event:
        return self.generating.setdefault(seed, threading.Event())

    def default_sizes(self) -> tuple[Size, ...]:
        return (TEST_SIZE,)

    def compile(self, size: Size) -> CompileTimings:
        return CompileTimings(lower_s=0.0, compile_s=0.0, warmup_s=0.0)

    def generate(self, params: ResolvedParams, on_step: object = None) -> np.ndarray:
        seed = params.seed
        self.started(seed).set()
        self.on_generate(seed)
        return np.full((4, params.height, params.width, 3), seed, dtype=np.uint8)


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


def _worker_config(redis_server: RedisServer) -> WorkerConfig:
    """Worker "w" on the session's Redis, serving the test size at every step count up to the test maximum."""
    return WorkerConfig(
        redis_url=redis_server.url(0),
        sizes=(TEST_SIZE,),
        max_steps=TEST_MAX_STEPS,
        default_steps=TEST_SHAPES[0].steps,
        worker_id="w",
        claim_block_ms=100,
        metrics_port=0,
    )


@contextlib.asynccontextmanager
async def worker(
    redis_server: RedisServer,
    pipeline: Pipeline | Engine,
    encoder: EncodeImages,
    config: WorkerConfig | None = None,
) -> AsyncIterator[Worker]:
    """A worker in this process serving `pipeline` (a pipeline, run one request at a time, or an engine)."""
    config = config or _worker_config(redis_server)
    client = aioredis.Redis.from_url(redis_server.url(0))
    serving = Worker(config, client, load_pipeline=lambda: pipeline, encode_images=encoder)
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
        job = make_job(f"job-{seed}", SHAPE, seed=seed)
        await store.submit(job, KEYS.size_stream(SHAPE.size))


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
    stream = KEYS.size_stream(SHAPE.size)
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
    config = _worker_config(redis_server)
    serving = Worker(config, redis_client, load_pipeline=lambda: pipeline, encode_images=encoder)
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
    assert await redis_client.xlen(KEYS.size_stream(SHAPE.size)) == 1
    assert (await redis_client.xpending(KEYS.size_stream(SHAPE.size), KEYS.workers_group))["pending"] == 0


async def test_an_image_store_that_stays_unwritable_fails_the_job_and_the_worker_waits_unready(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """A file store whose directory was replaced by a file (no write can succeed, even as root): past
    --blob-store-timeout the job in hand fails with a result saying why, the worker counts it, says it is not
    ready and stops claiming (registry state draining); once the directory is back it claims again."""
    images = tmp_path / "images"
    images.write_text("not a directory")
    pipeline = Pipeline()
    config = dataclasses.replace(_worker_config(redis_server), blob_store_timeout_s=0.5)
    serving = Worker(
        config,
        redis_client,
        load_pipeline=lambda: pipeline,
        encode_images=Encoder(pipeline, held=0, until=0),
        blobs=FileBlobStore(images),
    )
    running = asyncio.create_task(serving.run())
    try:
        (failed,) = (await run_jobs(redis_client, [1])).values()
        assert failed.status == "failed" and failed.error is not None, failed
        assert failed.error.startswith(
            "could not store its images: the image store refused writes for 0.5s: file store:"
        )
        assert serving.metrics.image_store_failures._value.get() == 1
        assert serving.metrics.image_store_writable._value.get() == 0
        assert serving.info.state == "draining"
        await probed_again(serving)  # the worker is probing the store, not claiming
        async with redis_client.pubsub() as completions:
            await completions.subscribe(KEYS.completions_channel)
            await submit(redis_client, [2])
            images.unlink()
            images.mkdir()  # the volume is back
            async with asyncio.timeout(WAIT_S):
                async for message in completions.listen():
                    if message["type"] == "message" and message["data"] == b"job-2":
                        break
        stored = await results_of(redis_client, [2])
        assert stored[2].status == "succeeded" and stored[2].image_keys is not None
        assert [(images / key).is_file() for key in stored[2].image_keys] == [True] * 4
        assert serving.not_ready() is None and serving.info.state in ("ready", "busy")
        assert serving.metrics.image_store_writable._value.get() == 1
    finally:
        serving.stop()
        await asyncio.wait_for(running, WAIT_S)


async def probed_again(serving: Worker) -> None:
    """Until the worker's readiness names the store's own error: its probe ran (after the job failed)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            trouble = serving.not_ready() or ""
            if "refused writes for" not in trouble:
                break
            await asyncio.sleep(0.05)  # a probe has no event to wait on
    assert "the image store is unavailable (file store:" in trouble, trouble


# --- Cancel a running job: a real worker process on the tiny model.

LONG = Shape(width=64, height=64, steps=40)  # long enough that running it to its end is plain to see
SHORT = TEST_SHAPES[0]


async def job_events(channel: Any, job_id: str) -> AsyncIterator[dict[str, Any]]:
    """The events published for `job_id` (started, progress) on the job events channel, as they come."""
    async for message in channel.listen():
        if message["type"] == "message" and (event := json.loads(message["data"]))["id"] == job_id:
            yield event


@pytest.mark.e2e
async def test_a_cancelled_running_job_stops_at_its_next_step_and_the_worker_takes_the_next_job(
    redis_server: RedisServer, redis_client: aioredis.Redis, tiny_model: Path, processes: ProcessGroup
) -> None:
    args = worker_args(
        redis_server.url(0), tiny_model, "stopper", size=str(TEST_SIZE), max_steps=LONG.steps,
        default_steps=TEST_SHAPES[0].steps,
    )  # fmt: skip
    processes.start("stopper", *args)
    try:
        [info] = await wait_ready(redis_server.url(0), 1)
        store = JobStore(redis_client, KEYS)
        long_job = make_job("long", LONG)
        short_job = make_job("short", SHORT, prompt="a dog", seed=2)
        async with redis_client.pubsub() as channel:
            await channel.subscribe(KEYS.job_events_channel)
            await store.submit(long_job, KEYS.size_stream(LONG.size))
            async with asyncio.timeout(WAIT_S):
                async for event in job_events(channel, "long"):
                    if event["type"] == "progress":
                        break
            assert await store.cancel("long") == "cancelled"
            record = await store.record("long")
            assert record is not None and record.step is not None
            reported = record.step  # the last step reported before the cancel: none is recorded after it
            await store.submit(short_job, KEYS.size_stream(SHORT.size))
            async with asyncio.timeout(WAIT_S):
                async for event in job_events(channel, "short"):
                    if event["type"] == "started":
                        break
        assert event["worker"] == "stopper"  # the same worker took the next job...
        short = await wait_result(redis_client, "short")
        assert short.status == "succeeded"
        async with aiohttp.ClientSession() as session:
            samples = await scrape(session, f"http://127.0.0.1:{info.metrics_port}")
        # ...having stopped the long one within a few steps of the cancel instead of running its 40: the steps it
        # ran are those counted, less the short job's. (One step's report was in flight when the cancel landed,
        # and the step after it was already dispatched: the device stops within two or three steps.)
        long_steps = samples[("sdxl_worker_denoising_steps_total", ())] - SHORT.steps
        assert reported <= long_steps <= reported + 5 < LONG.steps
        assert samples[("sdxl_worker_jobs_total", (("outcome", "stopped_cancelled"),))] == 1
        assert ("sdxl_worker_jobs_total", (("outcome", "discarded"),)) not in samples  # no late result was made
        cancelled = await store.fetch_meta("long")
        assert cancelled is not None and cancelled.status == "cancelled"
        assert (await redis_client.xpending(KEYS.size_stream(LONG.size), KEYS.workers_group))["pending"] == 0
    finally:
        processes.stop("stopper")


async def wait_result(redis_client: aioredis.Redis, job_id: str) -> JobResult:
    """A job's result, waiting for its announcement on the completions channel if it has none yet."""
    store = JobStore(redis_client, KEYS)
    async with redis_client.pubsub() as completions:
        await completions.subscribe(KEYS.completions_channel)
        async with asyncio.timeout(WAIT_S):
            while (result := await store.fetch_meta(job_id)) is None:
                await completions.get_message(ignore_subscribe_messages=True, timeout=1.0)
    return result


@pytest.mark.e2e
async def test_a_worker_publishes_its_sizes_and_step_range_runs_every_scheduler_and_fails_a_job_it_cannot_run(
    cluster: Cluster,
) -> None:
    """Jobs queued past the gateway's checks (straight onto the size's stream): a step count over the worker's
    maximum fails with a reason naming it, and the worker carries on with the next job, at any scheduler."""
    client = aioredis.Redis.from_url(cluster.redis_url)
    try:
        workers = await Registry(client, KEYS).workers()
        assert {(w.sizes[0], w.max_steps, w.default_steps, tuple(w.schedulers)) for w in workers} == {
            (TEST_SIZE, TEST_MAX_STEPS, TEST_SHAPES[0].steps, SCHEDULERS)
        }
        store = JobStore(client, KEYS)
        too_long = Shape(width=TEST_SIZE.width, height=TEST_SIZE.height, steps=TEST_MAX_STEPS + 1)
        jobs = {"too-long": (too_long, "euler")} | {scheduler: (SHORT, scheduler) for scheduler in SCHEDULERS}
        for job_id, (shape, scheduler) in jobs.items():
            job = make_job(job_id, shape, seed=3, scheduler=scheduler)
            await store.submit(job, KEYS.size_stream(TEST_SIZE))
        results = {job_id: await wait_result(client, job_id) for job_id in jobs}
    finally:
        await client.aclose()
    failed = results.pop("too-long")
    assert failed.status == "failed" and failed.error == f"{TEST_MAX_STEPS + 1} steps: this worker runs 1 to 3"
    assert {job_id: result.status for job_id, result in results.items()} == dict.fromkeys(SCHEDULERS, "succeeded")


async def test_warm_up_says_each_phase_in_the_registry_and_the_log(
    redis_server: RedisServer, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Loading, then each size's compile with its place in the list: published as it starts, so `sdxl-serve
    status` and the log say what a person waits for; gone once the worker is ready."""
    other = Size(width=TEST_SIZE.width * 2, height=TEST_SIZE.height)
    # An id of its own: other tests' workers announce themselves on the same channel.
    config = dataclasses.replace(_worker_config(redis_server), sizes=(TEST_SIZE, other), worker_id="w-phases")
    caplog.set_level("INFO")
    heard: list[tuple[str, str | None]] = []
    async with redis_client.pubsub() as pubsub:
        await pubsub.subscribe(KEYS.worker_events_channel)
        while await pubsub.get_message(timeout=WAIT_S) is None:  # subscribed: nothing published is missed
            pass
        serving = Worker(config, redis_client, load_pipeline=Pipeline, encode_images=encode_nothing)
        task = asyncio.create_task(serving.run())
        try:
            async with asyncio.timeout(WAIT_S):
                while not heard or heard[-1][0] != "ready":
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=WAIT_S)
                    info = json.loads(message["data"]) if message is not None else {}
                    if info.get("id") == "w-phases":
                        heard.append((info["state"], info["phase"]))
        finally:
            serving.stop()
            await asyncio.wait_for(task, WAIT_S)
    phases = [phase for _, phase in dict.fromkeys(heard)]
    assert phases == [
        None,
        "loading weights",
        f"compiling and warming {TEST_SIZE} (1/2)",
        f"compiling and warming {other} (2/2)",
        None,
    ], heard
    log = caplog.text
    assert "weights loaded in" in log and f"compiling and warming {other} (2/2)" in log
    assert f"{other} compiled in" in log


def encode_nothing(images: np.ndarray, encoding: Encoding, executor: Executor) -> list[bytes]:
    return [b"image"] * len(images)


# --- Several jobs at once: an in-process Worker on the stand-in engine (rows of several jobs per step).

MANY_STEPS = Shape(width=64, height=64, steps=40)  # long enough for a cancel to land while the others run


class RecordingEngine(StandInEngine):
    """The stand-in engine, recording the jobs in each step's batch; with `gate`, each step after the second
    waits for it (so a test can act between two steps)."""

    def __init__(self, rows_per_device: int = 1, gate: threading.Event | None = None) -> None:
        shapes = (Shape(width=TEST_SIZE.width, height=TEST_SIZE.height, steps=MANY_STEPS.steps),)
        super().__init__(StandInPipeline(shapes), rows_per_device, step_s=0.0, max_images=4)
        self.batches: list[frozenset[str]] = []
        self._gate = gate
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def _boundary(self) -> list[Any]:
        running = super()._boundary()
        if running:
            self.batches.append(frozenset(request.key for request in running))
        if self._gate is not None and len(self.batches) > 2 and not self._gate.wait(WAIT_S):
            raise TimeoutError("the test never opened the gate")
        return running


@contextlib.asynccontextmanager
async def engine_worker(redis_server: RedisServer, engine: RecordingEngine) -> AsyncIterator[Worker]:
    config = dataclasses.replace(_worker_config(redis_server), max_steps=MANY_STEPS.steps)
    async with worker(redis_server, engine, encode_nothing, config) as serving:
        yield serving


async def queue_jobs(redis_client: aioredis.Redis, jobs: dict[str, Shape]) -> None:
    store = JobStore(redis_client, KEYS)
    for job_id, shape in jobs.items():
        await store.submit(make_job(job_id, shape, n=1), KEYS.size_stream(shape.size))


async def wait_results(redis_client: aioredis.Redis, job_ids: set[str]) -> dict[str, JobResult]:
    return {job_id: await wait_result(redis_client, job_id) for job_id in sorted(job_ids)}


async def test_a_worker_claims_several_jobs_at_once_and_stores_each_once(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    engine = RecordingEngine()  # four rows: four one-image jobs
    jobs = {f"one-{k}": SHAPE for k in range(4)}
    await queue_jobs(redis_client, jobs)  # queued before the worker claims: one claim takes them all
    async with engine_worker(redis_server, engine) as serving:
        results = await wait_results(redis_client, set(jobs))
        assert serving.info.rows == 4 and serving.info.images_per_request == 4
    assert engine.batches[0] == set(jobs)  # all four denoised together from the first step
    assert {job_id: (r.status, r.image_count) for job_id, r in results.items()} == dict.fromkeys(jobs, ("succeeded", 1))
    for job_id in jobs:  # each started and stored once, by its own delivery
        assert await redis_client.llen(KEYS.attempts(job_id)) == 1
    await settled_once(redis_client)


async def test_the_worker_closes_its_engine_as_it_stops(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    """The engine's own threads (the row engine's adapter reader) end with the worker: `close` once it stops."""
    engine = RecordingEngine()
    async with engine_worker(redis_server, engine):
        await queue_jobs(redis_client, {"one": SHAPE})
        assert (await wait_result(redis_client, "one")).status == "succeeded"
        assert not engine.closed  # serving
    assert engine.closed


async def test_a_job_the_engine_refuses_fails_alone_and_the_others_of_its_claim_succeed(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    too_long = Shape(width=TEST_SIZE.width, height=TEST_SIZE.height, steps=MANY_STEPS.steps + 1)
    engine = RecordingEngine()
    await queue_jobs(redis_client, {"before": SHAPE, "too-long": too_long, "after": SHAPE})
    async with engine_worker(redis_server, engine):
        results = await wait_results(redis_client, {"before", "too-long", "after"})
    assert results["too-long"].status == "failed" and "is not served here" in (results["too-long"].error or "")
    assert (results["before"].status, results["after"].status) == ("succeeded", "succeeded")
    assert engine.batches[0] == {"before", "after"}
    await settled_once(redis_client)


async def test_a_cancelled_jobs_rows_leave_the_batch_and_the_others_finish(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    gate = threading.Event()
    engine = RecordingEngine(gate=gate)
    jobs = {"stays-1": MANY_STEPS, "cancelled": MANY_STEPS, "stays-2": MANY_STEPS}
    store = JobStore(redis_client, KEYS)
    async with redis_client.pubsub() as channel:
        await channel.subscribe(KEYS.job_events_channel)
        await queue_jobs(redis_client, jobs)  # before the worker claims: one claim takes all three
        async with engine_worker(redis_server, engine) as serving, asyncio.timeout(WAIT_S):
            async for event in job_events(channel, "cancelled"):
                if event["type"] == "progress" and event["step"] >= 2:
                    break
            # Three of its four rows held: the registry entry and the metrics say so.
            assert (serving.info.rows, serving.info.free_rows, serving.info.state) == (4, 1, "busy")
            assert serving.metrics.rows_in_use._value.get() == 3
            assert await store.cancel("cancelled") == "cancelled"
            gate.set()
            results = await wait_results(redis_client, {"stays-1", "stays-2"})
            stopped = serving.metrics.jobs.labels("stopped_cancelled")._value.get()
    assert {job_id: r.status for job_id, r in results.items()} == {"stays-1": "succeeded", "stays-2": "succeeded"}
    cancelled = await store.fetch_meta("cancelled")
    assert cancelled is not None and cancelled.status == "cancelled" and stopped == 1
    assert engine.batches[0] == set(jobs)
    left = engine.batches.index(frozenset({"stays-1", "stays-2"}))  # the first step without it...
    assert all("cancelled" in batch for batch in engine.batches[:left])  # ...after it ran with the others
    assert len(engine.batches) == MANY_STEPS.steps  # the others ran every step: a cancel never stopped them
    await settled_once(redis_client)
