"""The worker loop: claim one job, generate off the event loop, encode, store, notify, acknowledge.

The event loop only does Redis I/O; the pipeline runs on a dedicated thread (the accelerator is used by
one job at a time) and PNG encoding on a small pool, so heartbeats keep flowing while the devices work.
A worker joins the consumer group only after every configured shape is compiled and warmed up: until
then it is registered as `warming` and takes no job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import redis.asyncio as aioredis

from common.config import WorkerConfig, log_config
from common.keys import Keys
from common.logs import bound
from common.protocol import Job, JobResult, Timings
from common.queue import ClaimedJob, JobQueue, MalformedJob
from common.redis_conn import UNAVAILABLE, connect
from common.registry import Registry, WorkerInfo, WorkerState
from worker.compile_cache import disable_compilation_cache, enable_compilation_cache, on_cache_event
from worker.encode import Encoding, encode_all
from worker.metrics import WorkerMetrics, metrics_app, start_server
from worker.pipeline import PipelineError, SDXLPipeline

logger = logging.getLogger(__name__)
T = TypeVar("T")

REDIS_ERRORS = (*UNAVAILABLE, OSError)
# A job that could not be parsed still needs its failure kept for a while, so the requester can read it.
MALFORMED_RESULT_TTL_S = 3600
# Publishing the last progress step must not hold up a finished job for long when Redis is slow.
PROGRESS_FLUSH_TIMEOUT_S = 2.0
_NO_MORE_STEPS = -1


class Worker:
    """One worker process's serving loop. `run()` serves until `stop()`; the job in hand is finished."""

    def __init__(
        self,
        config: WorkerConfig,
        redis: aioredis.Redis,
        load_pipeline: Callable[[], SDXLPipeline] | None = None,
        started_at: float | None = None,
    ) -> None:
        self.config = config
        self.id = config.worker_id
        keys = Keys(config.key_prefix)
        self._keys = keys
        self._queue = JobQueue(redis, keys)
        self._registry = Registry(redis, keys)
        self._load_pipeline = load_pipeline or self._default_loader
        self._device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self._encoders = ThreadPoolExecutor(
            max_workers=min(config.images_per_request, os.cpu_count() or 1), thread_name_prefix="encode"
        )
        self._stopping = asyncio.Event()
        self._pipeline: SDXLPipeline | None = None
        self.metrics = WorkerMetrics()
        self._next_reclaim = 0.0
        self.info = WorkerInfo(
            id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            model=config.model,
            images_per_request=config.images_per_request,
            state="warming",
            shapes=list(config.shapes or ()),
            started_at=started_at or time.time(),
        )

    def stop(self) -> None:
        """Stop claiming; `run()` returns once the job in hand (if any) is stored."""
        self._stopping.set()
        self.info = self.info.model_copy(update={"state": "draining"})

    @property
    def warming(self) -> bool:
        return self._pipeline is None

    def not_ready(self) -> str | None:
        """None when warm and claiming, else why not (for /readyz)."""
        if self._pipeline is None:
            return "warming up: loading and compiling"
        if self._stopping.is_set():
            return "draining: no longer claiming jobs"
        return None

    async def abandon(self) -> None:
        """Deregister now, leaving any job in hand pending: live workers take it over at once."""
        await self._deregister()

    async def run(self) -> None:
        """Register, warm up, then serve jobs until stopped; deregister on the way out."""
        await self._set_state("warming")
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        try:
            await self._warm_up()
            for stream in self._streams:
                await self._queue.ensure_group(stream)
            if not self._stopping.is_set():
                await self._set_state("ready")
            while not self._stopping.is_set():
                await self._serve_next()
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            await self._deregister()
            self._device_thread.shutdown(wait=False)
            self._encoders.shutdown(wait=False)

    async def _warm_up(self) -> None:
        """Load, then compile and warm every shape; record how start-up time splits into phases."""
        phases = {"init": time.time() - self.info.started_at}  # imports, Redis, the metrics port
        started = time.perf_counter()
        pipeline = await self._on_device(self._load_pipeline)
        phases["load"] = time.perf_counter() - started
        shapes = self.config.shapes or pipeline.default_shapes()
        for shape in shapes:
            timings = await self._on_device(functools.partial(pipeline.compile, shape))
            for phase, seconds in (
                ("lower", timings.lower_s),
                ("compile", timings.compile_s),
                ("warmup", timings.warmup_s),
            ):
                self.metrics.compile_seconds.labels(str(shape), phase).set(seconds)
                phases[phase] = phases.get(phase, 0.0) + seconds
        for phase, seconds in phases.items():
            self.metrics.startup_seconds.labels(phase).set(seconds)
        self.metrics.devices.labels(pipeline.device_kind).set(pipeline.devices)
        self._pipeline = pipeline
        self.info = self.info.model_copy(
            update={
                "device_kind": pipeline.device_kind,
                "devices": pipeline.devices,
                "shapes": list(shapes),
                "ready_at": time.time(),
            }
        )
        start_to_ready = time.time() - self.info.started_at
        self.metrics.start_to_ready_seconds.set(start_to_ready)
        logger.info(
            "worker %s warm: %d %s devices, shapes %s; start to ready %.2fs (%s)",
            self.id,
            pipeline.devices,
            pipeline.device_kind,
            ",".join(map(str, shapes)),
            start_to_ready,
            ", ".join(f"{phase} {seconds:.2f}s" for phase, seconds in phases.items()),
        )

    @property
    def _streams(self) -> list[str]:
        """Where this worker takes jobs from: its own stream first (jobs routed to it), then the shared
        stream of each shape it compiled."""
        return [self._keys.worker_stream(self.id), *(self._keys.shape_stream(s) for s in self.info.shapes)]

    def _default_loader(self) -> SDXLPipeline:
        return SDXLPipeline.load(
            self.config.model,
            self.config.model_revision,
            self.config.images_per_request,
            attention=self.config.attention,
            model_config=self.config.model_config,
        )

    async def _serve_next(self) -> None:
        try:
            claimed = await self._next_job()
        except MalformedJob as bad:
            logger.error("rejecting malformed job: %s", bad)
            await self._queue.reject(bad, self.id, MALFORMED_RESULT_TTL_S)
            return
        except REDIS_ERRORS as exc:
            logger.warning("claim failed (%s); retrying", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 1.0)
            return
        if claimed is not None:
            await self._process(claimed)

    async def _next_job(self) -> ClaimedJob | None:
        """Jobs of dead workers first (they have waited longest), then new ones."""
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + self.config.reclaim_interval_s
            live = {w.id for w in await self._registry.workers()}
            await self._queue.rehome_orphans(live | {self.id})
            claimed = await self._queue.reclaim(self.id, live, self.config.max_deliveries, self._streams[1:])
            if claimed is not None:
                self.metrics.reclaims.inc()
                return claimed
        return await self._queue.claim(self.id, self._streams, self.config.claim_block_ms)

    async def _process(self, claimed: ClaimedJob) -> None:
        """The per-job boundary: whatever happens, the job gets a stored result and is acknowledged."""
        with bound(request=claimed.job.request_id, job=claimed.job.id):
            await self._settle(claimed)

    async def _settle(self, claimed: ClaimedJob) -> None:
        job = claimed.job
        claimed_ms = await self._record_start(claimed)
        if claimed_ms is None:
            logger.info("job %s: cancelled while queued; dropped without running", job.id)
            await self._queue.discard(claimed)
            self.metrics.jobs.labels("skipped_cancelled").inc()
            return
        self.info = self.info.model_copy(update={"state": self._serving_state("busy")})
        self.metrics.busy.set(1)
        logger.info("job %s: claimed after %d ms in queue (%s)", job.id, claimed_ms - claimed.enqueued_ms, job.shape)
        try:
            result, images = await self._run_job(job, queued_ms=claimed_ms - claimed.enqueued_ms)
        except PipelineError as exc:
            result, images = self._failure(job, str(exc)), []
        except Exception as exc:  # the worker's catch-all boundary: report the job, keep serving
            logger.exception("job %s failed", job.id)
            result, images = self._failure(job, f"{type(exc).__name__}: {exc}"), []
        stored = await self._store(claimed, result, images)
        self.metrics.busy.set(0)
        self.metrics.jobs.labels(result.status if stored else "discarded").inc()  # discarded: cancelled or duplicate
        self.info = self.info.model_copy(
            update={"state": self._serving_state("ready"), "jobs_done": self.info.jobs_done + 1}
        )
        logger.info("job %s: %s%s", job.id, result.status, "" if stored else " (duplicate result dropped)")

    async def _run_job(self, job: Job, queued_ms: float) -> tuple[JobResult, list[bytes]]:
        pipeline = self._pipeline
        assert pipeline is not None, "jobs are claimed only after warm-up"
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[int] = asyncio.Queue()
        reporter = asyncio.create_task(self._report_progress(job, steps), name=f"progress-{job.id}")

        def on_step(step: int) -> None:  # called on a runtime thread, once per denoising step
            loop.call_soon_threadsafe(steps.put_nowait, step)

        started = time.perf_counter()
        try:
            pixels: np.ndarray = await self._on_device(
                lambda: pipeline.generate(
                    job.shape, job.prompt, job.negative_prompt, job.seed, job.guidance_scale, on_step=on_step
                )
            )
        finally:
            await self._finish_progress(steps, reporter)
        generated = time.perf_counter()
        encoding = Encoding(job.output_format, job.quality, self.config.png_compress_level)
        images = await loop.run_in_executor(None, encode_all, pixels, encoding, self._encoders)
        encoded = time.perf_counter()
        timings = Timings(
            queued_ms=queued_ms, generate_ms=(generated - started) * 1000, encode_ms=(encoded - generated) * 1000
        )
        self.metrics.generate_seconds.labels(str(job.shape)).observe(generated - started)
        self.metrics.encode_seconds.labels(job.output_format).observe(encoded - generated)
        result = JobResult(
            id=job.id,
            status="succeeded",
            worker=self.id,
            seed=job.seed,
            shape=job.shape,
            media_type=encoding.media_type,
            image_count=len(images),
            timings=timings,
        )
        return result, images

    async def _report_progress(self, job: Job, steps: asyncio.Queue[int]) -> None:
        """Publish each finished step (the latest, when several arrived during one round trip) until told
        there are no more. Progress is best effort: a Redis error is logged and the job carries on."""
        finished = False
        while not finished:
            batch = [await steps.get()]
            while not steps.empty():
                batch.append(steps.get_nowait())
            finished = _NO_MORE_STEPS in batch
            reached = [step for step in batch if step != _NO_MORE_STEPS]
            if reached:
                await self._publish_step(job, max(reached))

    async def _publish_step(self, job: Job, step: int) -> None:
        try:
            status = await self._queue.progress(job.id, self.id, step, job.shape.steps)
        except REDIS_ERRORS as exc:
            logger.warning("job %s: progress not published (%s)", job.id, exc)
            return
        if status == "cancelled":
            logger.info("job %s: cancelled while running (step %d); its result will be discarded", job.id, step)

    @staticmethod
    async def _finish_progress(steps: asyncio.Queue[int], reporter: asyncio.Task[None]) -> None:
        """Let the reporter publish the last step (every step has been queued by now), within a bound."""
        steps.put_nowait(_NO_MORE_STEPS)
        try:
            await asyncio.wait_for(reporter, PROGRESS_FLUSH_TIMEOUT_S)
        except TimeoutError:
            logger.warning("progress reporting still stuck after %.0fs; dropped", PROGRESS_FLUSH_TIMEOUT_S)

    async def _record_start(self, claimed: ClaimedJob) -> int | None:
        """Announce the start; returns the claim time on Redis's clock (this host's if Redis is away), or
        None when the job was cancelled while queued."""
        try:
            return await self._queue.start(claimed, self.id)
        except REDIS_ERRORS as exc:
            logger.warning("job %s: could not record its start (%s); running it anyway", claimed.job.id, exc)
            return int(time.time() * 1000)

    async def _store(self, claimed: ClaimedJob, result: JobResult, images: list[bytes]) -> bool:
        """Store the result, retrying through Redis outages: a finished job is never dropped."""
        delay = 0.1
        while True:
            try:
                return await self._queue.complete(claimed, result, images)
            except REDIS_ERRORS as exc:
                logger.warning("job %s: storing its result failed (%s); retrying in %.1fs", result.id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _failure(self, job: Job, reason: str) -> JobResult:
        return JobResult(id=job.id, status="failed", worker=self.id, seed=job.seed, shape=job.shape, error=reason)

    async def _on_device(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._device_thread, fn)

    def _serving_state(self, state: WorkerState) -> WorkerState:
        """`state`, unless a stop was asked for: a draining worker says so until it leaves, so gateways
        and routing stop counting it even while it finishes its job."""
        return "draining" if self._stopping.is_set() else state

    async def _set_state(self, state: WorkerState) -> None:
        self.info = self.info.model_copy(update={"state": state})
        await self._registry.publish(self.info, self.config.heartbeat_ttl_s)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            try:
                await self._registry.publish(self.info, self.config.heartbeat_ttl_s)
            except REDIS_ERRORS as exc:
                logger.warning("heartbeat failed (%s)", exc)

    async def _deregister(self) -> None:
        """Leave the registry, then hand the jobs routed to this worker back to the shared streams (a live
        worker does it if this fails)."""
        try:
            await self._registry.remove(self.id)
            await self._queue.rehome(self._keys.worker_stream(self.id))
        except REDIS_ERRORS as exc:
            logger.warning("could not deregister (%s); the entry expires and others take the jobs", exc)


async def serve(config: WorkerConfig, *, started_at: float | None = None, handle_signals: bool = True) -> int:
    """Run a worker until SIGTERM or SIGINT, then drain: stop claiming, finish the job in hand within
    `drain_timeout_s`, deregister. Returns the exit status: 0 after a clean drain, 1 if the job in hand
    had to be abandoned (it stays pending and a live worker takes it over)."""
    log_config(logger, config)
    redis = connect(config.redis_url, name=f"sdxl-worker:{config.worker_id}")
    worker = Worker(config, redis, started_at=started_at)
    _use_compilation_cache(config, worker.metrics)
    http, port = await start_server(
        metrics_app(worker.metrics, worker.not_ready), config.metrics_host, config.metrics_port
    )
    worker.info = worker.info.model_copy(update={"metrics_port": port})
    stop = asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    try:
        return await _run_until_stopped(worker, stop, config.drain_timeout_s)
    finally:
        await http.cleanup()
        await redis.aclose()


def _use_compilation_cache(config: WorkerConfig, metrics: WorkerMetrics) -> None:
    if config.compile_cache_dir is None:
        disable_compilation_cache()
        return
    enable_compilation_cache(config.compile_cache_dir, config.compile_cache_max_bytes)
    on_cache_event(lambda result: metrics.compile_cache.labels(result).inc())


async def _run_until_stopped(worker: Worker, stop: asyncio.Event, drain_timeout_s: float) -> int:
    running = asyncio.create_task(worker.run(), name="worker")
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if running.done():
        running.result()
        return 0
    logger.info("stop requested: draining (at most %.0fs)", drain_timeout_s)
    worker.stop()
    if worker.warming:  # no job in hand: do not wait for a compile to finish
        await worker.abandon()
        return 0
    try:
        await asyncio.wait_for(asyncio.shield(running), drain_timeout_s)
    except TimeoutError:
        logger.error("drain timed out after %.0fs; leaving the job in hand to be taken over", drain_timeout_s)
        await worker.abandon()
        return 1
    return 0
