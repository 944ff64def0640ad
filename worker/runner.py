"""The worker loop: claim one job, generate off the event loop, then encode, store, notify and acknowledge it
behind the device while the next job generates.

The event loop only does Redis I/O; the pipeline runs on a dedicated thread (the accelerator is used by
one job at a time) and PNG encoding on a small pool, so heartbeats keep flowing while the devices work.
A job whose generation is done is handed to a delivery task (encode, store) and the loop claims the next job
at once: the accelerator never waits for encoding. At most one job is in delivery: the next hand-off waits for
it, so finished images never pile up in memory when storing is slow. A job cancelled while it runs stops at its
next denoising step (each step's progress report returns the job's status) and the worker takes its next job.
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
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis

from common.blobstore import BlobStore, open_blob_store
from common.config import log_config
from common.logs import bound
from common.protocol import DEFAULT_RESULT_TTL_S, Job, JobResult, Size, Timings
from common.redis_conn import UNAVAILABLE, connect
from common.rediskeys import RedisKeys
from common.registry import Registry, WorkerInfo, WorkerState
from common.streams import JobStreams
from worker.compile_cache import disable_compilation_cache, enable_compilation_cache, on_cache_event
from worker.config import WorkerConfig
from worker.delivery import ClaimedJob, Delivery, MalformedJob
from worker.encode import Encoding, encode_all
from worker.images import ImageWriter
from worker.metrics import WorkerMetrics, metrics_app, start_server
from worker.pipeline import PipelineError, SDXLPipeline
from worker.recovery import Recovery

logger = logging.getLogger(__name__)
T = TypeVar("T")

REDIS_ERRORS = (*UNAVAILABLE, OSError)
# A job that could not be parsed still needs its failure kept for a while, so the requester can read it.
MALFORMED_RESULT_TTL_S = DEFAULT_RESULT_TTL_S
# Publishing the last progress step must not hold up a finished job for long when Redis is slow.
PROGRESS_FLUSH_TIMEOUT_S = 2.0
_NO_MORE_STEPS = -1
# Encodes a batch of images on an executor (worker/encode.py's `encode_all`; tests put a stand-in).
EncodeImages = Callable[[np.ndarray, Encoding, Executor], list[bytes]]


class _Cancelled(Exception):
    """Raised on the device thread at a step boundary: the running job was cancelled, dispatch no more steps."""

    def __init__(self, step: int) -> None:
        super().__init__(f"cancelled after step {step}")
        self.step = step


@dataclass(frozen=True)
class _Generated:
    """A job whose device work is over: its images, the failure that stopped it, or the step where it was
    stopped because it was cancelled (then neither images nor a failure)."""

    claimed: ClaimedJob
    pixels: np.ndarray | None
    failure: JobResult | None
    queued_ms: float
    generate_ms: float
    stopped_after: int | None = None


class Worker:
    """One worker process's serving loop. `run()` serves until `stop()`; the job in hand is finished."""

    def __init__(
        self,
        config: WorkerConfig,
        redis: aioredis.Redis,
        load_pipeline: Callable[[], SDXLPipeline] | None = None,
        started_at: float | None = None,
        encode_images: EncodeImages = encode_all,
        blobs: BlobStore | None = None,
    ) -> None:
        self.config = config
        self._images = ImageWriter(blobs, config.worker_id) if blobs is not None else None
        self.id = config.worker_id
        keys = RedisKeys(config.key_prefix)
        self._keys = keys
        self._job_streams = JobStreams(redis, keys)
        self._delivery = Delivery(redis, keys)
        self._recovery = Recovery(redis, keys, self._delivery)
        self._registry = Registry(redis, keys)
        self._load_pipeline = load_pipeline or self._default_loader
        self._device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self._encoders = ThreadPoolExecutor(
            max_workers=min(config.images_per_request, os.cpu_count() or 1), thread_name_prefix="encode"
        )
        self._encode_images = encode_images
        self._delivering: asyncio.Task[None] | None = None  # the job being encoded and stored, if any
        self._delivering_job: ClaimedJob | None = None
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
            **serving(config.sizes or (), config.max_steps, config.default_steps, ()),
            started_at=started_at or time.time(),
        )

    def stop(self) -> None:
        """Stop claiming; `run()` returns once the jobs in hand (on the device, in delivery) are stored."""
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
        sweep = asyncio.create_task(self._sweep(), name="image-sweep")
        try:
            await self._warm_up()
            for stream in self._streams:
                await self._job_streams.ensure_group(stream)
            if not self._stopping.is_set():
                await self._set_state("ready")
            while not self._stopping.is_set():
                await self._serve_next()
            await self._delivered()
        finally:
            heartbeat.cancel()
            sweep.cancel()
            await asyncio.gather(heartbeat, sweep, return_exceptions=True)
            await self._deregister()
            self._device_thread.shutdown(wait=False)
            self._encoders.shutdown(wait=False)

    async def _warm_up(self) -> None:
        """Load, then compile and warm every size; record how start-up time splits into phases."""
        phases = {"init": time.time() - self.info.started_at}  # imports, Redis, the metrics port
        started = time.perf_counter()
        pipeline = await self._on_device(self._load_pipeline)
        phases["load"] = time.perf_counter() - started
        sizes = self.config.sizes or pipeline.default_sizes()
        for size in sizes:
            timings = await self._on_device(functools.partial(pipeline.compile, size))
            for phase, seconds in (
                ("lower", timings.lower_s),
                ("compile", timings.compile_s),
                ("warmup", timings.warmup_s),
            ):
                self.metrics.compile_seconds.labels(str(size), phase).set(seconds)
                phases[phase] = phases.get(phase, 0.0) + seconds
        for phase, seconds in phases.items():
            self.metrics.startup_seconds.labels(phase).set(seconds)
        self.metrics.devices.labels(pipeline.device_kind).set(pipeline.devices)
        self._pipeline = pipeline
        self.info = self.info.model_copy(
            update={
                "device_kind": pipeline.device_kind,
                "devices": pipeline.devices,
                **serving(
                    sizes, pipeline.max_steps, min(self.config.default_steps, pipeline.max_steps), pipeline.schedulers
                ),
                "ready_at": time.time(),
            }
        )
        start_to_ready = time.time() - self.info.started_at
        self.metrics.start_to_ready_seconds.set(start_to_ready)
        logger.info(
            "worker %s warm: %d %s devices, sizes %s at 1 to %d steps; start to ready %.2fs (%s)",
            self.id,
            pipeline.devices,
            pipeline.device_kind,
            ",".join(map(str, sizes)),
            pipeline.max_steps,
            start_to_ready,
            ", ".join(f"{phase} {seconds:.2f}s" for phase, seconds in phases.items()),
        )

    @property
    def _streams(self) -> list[str]:
        """Where this worker takes jobs from: its own stream first (jobs routed to it), then the shared
        stream of each size it serves."""
        return [self._keys.worker_stream(self.id), *(self._keys.size_stream(s) for s in self.info.sizes)]

    def _default_loader(self) -> SDXLPipeline:
        return SDXLPipeline.load(
            self.config.model,
            self.config.model_revision,
            self.config.images_per_request,
            attention=self.config.attention,
            model_config=self.config.model_config,
            max_steps=self.config.max_steps,
        )

    async def _serve_next(self) -> None:
        try:
            claimed = await self._next_job()
        except MalformedJob as bad:
            logger.error("rejecting malformed job: %s", bad)
            await self._delivery.reject(bad, self.id, MALFORMED_RESULT_TTL_S)
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
            await self._recovery.rehome_orphans(live | {self.id})
            claimed = await self._recovery.reclaim(self.id, live, self.config.max_deliveries, self._streams[1:])
            if claimed is not None:
                self.metrics.reclaims.inc()
                return claimed
        claimed = await self._delivery.claim(self.id, self._streams, self.config.claim_block_ms, self._in_hand())
        # A job moved off a departed worker's stream, or read again after a lost reply, may be past the limit.
        if claimed is not None and await self._delivery.dead_letter_if_exhausted(
            claimed, self.id, self.config.max_deliveries
        ):
            return None
        return claimed

    async def _process(self, claimed: ClaimedJob) -> None:
        """The per-job boundary: whatever happens, the job gets a stored result and is acknowledged."""
        with bound(request=claimed.job.request_id, job=claimed.job.id):
            await self._settle(claimed)

    async def _settle(self, claimed: ClaimedJob) -> None:
        job = claimed.job
        claimed_ms = await self._record_start(claimed)
        if claimed_ms is None:
            logger.info("job %s: cancelled while queued; dropped without running", job.id)
            await self._delivery.discard(claimed)
            self.metrics.jobs.labels("skipped_cancelled").inc()
            return
        self._device_busy(True)
        logger.info(
            "job %s: claimed after %d ms in queue (%s)", job.id, claimed_ms - claimed.enqueued_ms, job.params.shape
        )
        generated = await self._generate(claimed, queued_ms=claimed_ms - claimed.enqueued_ms)
        self._device_busy(False)
        if generated.stopped_after is not None:
            await self._drop_cancelled(claimed, generated.stopped_after)
            return
        await self._hand_off(generated)

    def _device_busy(self, busy: bool) -> None:
        self.info = self.info.model_copy(update={"state": self._serving_state("busy" if busy else "ready")})
        self.metrics.busy.set(1 if busy else 0)

    async def _generate(self, claimed: ClaimedJob, queued_ms: float) -> _Generated:
        """The job's device work; a failure becomes the job's result (the per-job boundary, device side)."""
        job = claimed.job
        started = time.perf_counter()
        pixels, failure = None, None
        try:
            pixels = await self._run_pipeline(job)
        except _Cancelled as stop:
            return _Generated(claimed, None, None, queued_ms, (time.perf_counter() - started) * 1000, stop.step)
        except PipelineError as exc:
            failure = self._failure(job, str(exc))
        except Exception as exc:  # the worker's catch-all boundary: report the job, keep serving
            logger.exception("job %s failed", job.id)
            failure = self._failure(job, f"{type(exc).__name__}: {exc}")
        generate_s = time.perf_counter() - started
        if failure is None:
            self.metrics.generate_seconds.labels(str(job.params.shape)).observe(generate_s)
        return _Generated(claimed, pixels, failure, queued_ms, generate_s * 1000)

    async def _run_pipeline(self, job: Job) -> np.ndarray:
        pipeline = self._pipeline
        assert pipeline is not None, "jobs are claimed only after warm-up"
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[int] = asyncio.Queue()
        cancelled = threading.Event()
        reporter = asyncio.create_task(self._report_progress(job, steps, cancelled), name=f"progress-{job.id}")

        def on_step(step: int) -> None:  # called on the device thread, once per denoising step
            if cancelled.is_set():
                raise _Cancelled(step)  # unwinds the pipeline's step loop: no further step is dispatched
            self.metrics.steps.inc()
            loop.call_soon_threadsafe(steps.put_nowait, step)

        try:
            return await self._on_device(lambda: pipeline.generate(job.params, on_step=on_step))
        finally:
            await self._finish_progress(steps, reporter)

    # --- Delivery: encoding and storing a generated job, behind the device.

    def _in_hand(self) -> list[ClaimedJob]:
        """The job still being encoded and stored: its entry is pending under this worker, and a claim must
        not take it again."""
        delivering = self._delivering
        if delivering is None or delivering.done() or self._delivering_job is None:
            return []
        return [self._delivering_job]

    async def _hand_off(self, generated: _Generated) -> None:
        """Deliver `generated` in a task of its own and return, so the loop claims the next job while it is
        encoded and stored. The job delivered before it is awaited first: it has had a whole generation's time,
        so the device waits only when storing is slower than generating."""
        await self._delivered()
        # The task inherits this context, so its log lines carry the job's ids.
        self._delivering = asyncio.create_task(self._deliver(generated), name=f"deliver-{generated.claimed.job.id}")
        self._delivering_job = generated.claimed

    async def _delivered(self) -> None:
        """Wait for the job in delivery, if there is one."""
        delivering, self._delivering = self._delivering, None
        if delivering is not None:
            await delivering

    async def _deliver(self, generated: _Generated) -> None:
        """Encode and store one job: whatever happens, it gets a stored result and is acknowledged, once."""
        claimed = generated.claimed
        result, images = await self._encode(generated)
        if self._images is not None and images:  # objects first: no result is visible before its images
            result, images = await self._images.put(claimed.job, result, images), []
        stored = await self._store(claimed, result, images)
        if not stored and self._images is not None:
            await self._images.discard(result)
        self.metrics.jobs.labels(result.status if stored else "discarded").inc()  # discarded: cancelled or duplicate
        self.info = self.info.model_copy(update={"jobs_done": self.info.jobs_done + 1})
        logger.info("job %s: %s%s", claimed.job.id, result.status, "" if stored else " (duplicate result dropped)")

    async def _encode(self, generated: _Generated) -> tuple[JobResult, list[bytes]]:
        """The job's result and encoded images; a failure to encode fails the job (the per-job boundary, delivery
        side)."""
        job = generated.claimed.job
        if generated.pixels is None:
            assert generated.failure is not None, "a job without images has a failure"
            return generated.failure, []
        encoding = Encoding(job.output_format, job.quality, self.config.png_compress_level)
        started = time.perf_counter()
        try:
            images = await asyncio.get_running_loop().run_in_executor(
                None, self._encode_images, generated.pixels, encoding, self._encoders
            )
        except Exception as exc:  # the worker's catch-all boundary: report the job, keep serving
            logger.exception("job %s: encoding failed", job.id)
            return self._failure(job, f"encoding failed: {type(exc).__name__}: {exc}"), []
        encode_s = time.perf_counter() - started
        self.metrics.encode_seconds.labels(job.output_format).observe(encode_s)
        timings = Timings(queued_ms=generated.queued_ms, generate_ms=generated.generate_ms, encode_ms=encode_s * 1000)
        result = JobResult(
            id=job.id,
            status="succeeded",
            worker=self.id,
            seed=job.params.seed,
            shape=job.params.shape,
            scheduler=job.params.scheduler,
            media_type=encoding.media_type,
            image_count=len(images),
            timings=timings,
        )
        return result, images

    async def _report_progress(self, job: Job, steps: asyncio.Queue[int], cancelled: threading.Event) -> None:
        """Publish each finished step (the latest, when several arrived during one round trip) until told
        there are no more; set `cancelled` when the job turns out to be. Progress is best effort: a Redis error
        is logged and the job carries on."""
        finished = False
        while not finished:
            batch = [await steps.get()]
            while not steps.empty():
                batch.append(steps.get_nowait())
            finished = _NO_MORE_STEPS in batch
            reached = [step for step in batch if step != _NO_MORE_STEPS]
            if reached and not cancelled.is_set() and await self._publish_step(job, max(reached)) == "cancelled":
                logger.info(
                    "job %s: cancelled while running (step %d); stopping at the next step", job.id, max(reached)
                )
                cancelled.set()

    async def _publish_step(self, job: Job, step: int) -> str | None:
        """The job's status after reporting `step` (None when unknown or Redis is away)."""
        try:
            return await self._delivery.progress(job.id, self.id, step, job.params.num_inference_steps)
        except REDIS_ERRORS as exc:
            logger.warning("job %s: progress not published (%s)", job.id, exc)
            return None

    async def _drop_cancelled(self, claimed: ClaimedJob, step: int) -> None:
        """Settle a job stopped because it was cancelled: its `cancelled` result is already stored, so the entry
        is only acknowledged. Should Redis be away, the entry stays pending; whoever takes it over later drops it
        (its job is cancelled)."""
        job = claimed.job
        logger.info(
            "job %s: cancelled while running; stopped after step %d of %d", job.id, step, job.params.num_inference_steps
        )
        self.metrics.jobs.labels("stopped_cancelled").inc()
        try:
            await self._delivery.discard(claimed)
        except REDIS_ERRORS as exc:
            logger.warning("job %s: could not settle the cancelled job (%s); left pending", job.id, exc)

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
            return await self._delivery.start(claimed, self.id)
        except REDIS_ERRORS as exc:
            logger.warning("job %s: could not record its start (%s); running it anyway", claimed.job.id, exc)
            return int(time.time() * 1000)

    async def _store(self, claimed: ClaimedJob, result: JobResult, images: list[bytes]) -> bool:
        """Store the result, retrying through Redis outages: a finished job is never dropped."""
        delay = 0.1
        while True:
            try:
                return await self._delivery.complete(claimed, result, images)
            except REDIS_ERRORS as exc:
                logger.warning("job %s: storing its result failed (%s); retrying in %.1fs", result.id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _sweep(self) -> None:
        if self._images is not None:
            await self._images.sweep_forever(self.config.blob_sweep_interval_s)

    def _failure(self, job: Job, reason: str) -> JobResult:
        params = job.params
        return JobResult(
            id=job.id,
            status="failed",
            worker=self.id,
            seed=params.seed,
            shape=params.shape,
            scheduler=params.scheduler,
            error=reason,
        )

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
            await self._recovery.rehome(self._keys.worker_stream(self.id))
        except REDIS_ERRORS as exc:
            logger.warning("could not deregister (%s); the entry expires and others take the jobs", exc)


def serving(sizes: Sequence[Size], max_steps: int, default_steps: int, schedulers: Sequence[str]) -> dict[str, Any]:
    """The registry's description of what a worker serves: `sizes` at any step count from 1 to `max_steps`,
    with `schedulers`."""
    return {
        "sizes": list(sizes),
        "max_steps": max_steps,
        "default_steps": default_steps,
        "schedulers": list(schedulers),
    }


async def serve(
    config: WorkerConfig,
    *,
    started_at: float | None = None,
    handle_signals: bool = True,
    load_pipeline: Callable[[], SDXLPipeline] | None = None,
) -> int:
    """Run a worker until SIGTERM or SIGINT, then drain: stop claiming, finish the job in hand within
    `drain_timeout_s`, deregister. Returns the exit status: 0 after a clean drain, 1 if the job in hand
    had to be abandoned (it stays pending and a live worker takes it over). `load_pipeline` replaces the
    model (the fault injector's stand-in workers)."""
    log_config(logger, config)
    redis = connect(config.redis_url, name=f"sdxl-worker:{config.worker_id}")
    blobs = open_blob_store(config.blob_store)
    worker = Worker(config, redis, load_pipeline=load_pipeline, started_at=started_at, blobs=blobs)
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
        if blobs is not None:
            await blobs.close()


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
