"""The worker loop: claim one job, generate it on the device, then hand it off to be encoded and stored behind
the device while the next job generates.

`Worker` schedules; each concern is its own module: the registry entry and heartbeat (worker/presence.py), where
jobs come from (worker/claiming.py), the device thread and warm-up (worker/device.py), a running job's progress
and cancel (worker/progress.py), and encoding and storing (worker/handoff.py). The event loop only does Redis
I/O; the pipeline runs on the device thread and PNG encoding on a small pool, so heartbeats keep flowing while the
devices work. A job cancelled while it runs stops at its next denoising step (each step's progress report returns
the job's status) and the worker takes its next job. A worker joins the consumer group only after every
configured size is compiled and warmed up: until then it is registered as `warming` and takes no job.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import Callable, Sequence

import numpy as np
import redis.asyncio as aioredis

from common.blobstore import BlobStore, open_blob_store
from common.config import log_config, refuse_evicting_redis
from common.logs import bound
from common.protocol import Size
from common.redis_conn import connect
from common.rediskeys import RedisKeys
from common.registry import Registry, WorkerInfo
from worker.claiming import Claims
from worker.compile_cache import disable_compilation_cache, enable_compilation_cache, on_cache_event
from worker.config import WorkerConfig
from worker.delivery import REDIS_ERRORS, ClaimedJob, Delivery
from worker.device import Device
from worker.device_watermark import DeviceWatermark
from worker.encode import encode_all
from worker.handoff import EncodeImages, Generated, HandOff, failed
from worker.images import ImageWriter
from worker.metrics import WorkerMetrics, metrics_app, start_server
from worker.pipeline import PipelineError, PipelineOptions, SDXLPipeline
from worker.pipeline_protocol import Pipeline
from worker.presence import Presence
from worker.progress import Cancelled, JobProgress
from worker.safety import SafetyChecker

logger = logging.getLogger(__name__)


class Worker:
    """One worker process's serving loop. `run()` serves until `stop()`; the jobs in hand are finished.

    It schedules one job at a time on the device. Everything per job lives in per-job objects (the claimed entry,
    its `JobProgress`, its delivery task), so a worker that holds several jobs at once changes this loop and the
    hand-off's `limit`, not the other concerns.
    """

    def __init__(
        self,
        config: WorkerConfig,
        redis: aioredis.Redis,
        load_pipeline: Callable[[], Pipeline] | None = None,
        started_at: float | None = None,
        encode_images: EncodeImages = encode_all,
        blobs: BlobStore | None = None,
    ) -> None:
        self.config = config
        self.id = config.worker_id
        self.metrics = WorkerMetrics()
        keys = RedisKeys(config.key_prefix)
        registry = Registry(redis, keys)
        self._delivery = Delivery(redis, keys)
        self.presence = Presence(config, registry, started_at)
        self._claims = Claims(config, redis, self._delivery, registry, self.metrics)
        self._device = Device(self.metrics)
        images = ImageWriter(blobs, config.worker_id, config.blob_store_timeout_s) if blobs is not None else None
        self._handoff = HandOff(
            config,
            self._delivery,
            images,
            encode_images,
            self.metrics,
            on_settled=self.presence.settled_one,
            on_store_trouble=self.presence.image_store_refuses,
        )
        self._load_pipeline = load_pipeline or self._default_loader
        self._safety: SafetyChecker | None = None
        self._watermark: DeviceWatermark | None = None
        self._stopping = asyncio.Event()

    @property
    def info(self) -> WorkerInfo:
        """What this worker says about itself in the registry."""
        return self.presence.info

    def stop(self) -> None:
        """Stop claiming; `run()` returns once the jobs in hand (on the device, in delivery) are stored."""
        self._stopping.set()
        self.presence.drain()

    @property
    def warming(self) -> bool:
        return self._device.pipeline is None

    def not_ready(self) -> str | None:
        """None when warm and claiming, else why not (for /readyz)."""
        if self.warming:
            return f"warming up: {self.info.phase or 'starting'}"
        if self._stopping.is_set():
            return "draining: no longer claiming jobs"
        if self._handoff.store_trouble is not None:
            return f"not claiming jobs: the image store refuses writes ({self._handoff.store_trouble})"
        return None

    async def abandon(self) -> None:
        """Deregister now, leaving any job in hand pending: live workers take it over at once."""
        await self._deregister()

    async def run(self) -> None:
        """Register, warm up, then serve jobs until stopped; deregister on the way out."""
        await self.presence.announce("warming")
        background = [
            asyncio.create_task(self.presence.heartbeat(), name="heartbeat"),
            asyncio.create_task(self._handoff.sweep(), name="image-sweep"),
        ]
        try:
            await self._claims.open(await self._warm_up())
            if not self._stopping.is_set():
                await self.presence.announce("ready")
            while not self._stopping.is_set():
                await self._serve_next()
            await self._handoff.drain()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._deregister()
            self._device.close()
            self._handoff.close()

    async def _warm_up(self) -> Sequence[Size]:
        """Load, then compile and warm every size; returns the sizes served."""
        phases = {"init": time.time() - self.info.started_at}  # imports, Redis, the metrics port
        sizes = await self._device.warm_up(self._load_pipeline, self.config.sizes, phases, self._phase)
        await self._load_safety_checker(sizes)
        await self._compile_watermark(sizes)
        pipeline = self._device.pipeline
        assert pipeline is not None, "warm after warm-up"
        self.presence.warmed(pipeline, sizes)
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
        return sizes

    async def _load_safety_checker(self, sizes: Sequence[Size]) -> None:
        """With `--safety-checker`, load it and compile it for every size served, on the device thread."""
        folder = self.config.safety_checker
        if folder is None:
            return
        await self._phase("loading and compiling the safety checker")
        checker = await self._device.call(lambda: SafetyChecker.load(folder, self.config.safety_replace))
        for size in sizes:
            await self._device.call(functools.partial(checker.compile, size, self.config.images_per_request))
        self._safety = checker

    async def _compile_watermark(self, sizes: Sequence[Size]) -> None:
        """Unless `--watermark off`, compile the invisible watermark for every size served, on the device thread."""
        if not self.config.watermark:
            return
        watermark = await self._device.call(DeviceWatermark)
        for size in sizes:
            await self._device.call(functools.partial(watermark.compile, size, self.config.images_per_request))
        self._watermark = watermark

    async def _marked(self, pixels: np.ndarray) -> np.ndarray:
        """The batch with the invisible watermark on it, marked on the devices; as it is with `--watermark off`."""
        watermark = self._watermark
        if watermark is None:
            return pixels
        return await self._device.call(lambda: watermark.apply(pixels))

    async def _screen(self, pixels: np.ndarray) -> tuple[np.ndarray, list[bool] | None]:
        """The batch after the safety checker (flagged images replaced) and its verdicts; as it is without one."""
        checker = self._safety
        if checker is None:
            return pixels, None
        screened = await self._device.call(lambda: checker.screen(pixels))
        flagged = sum(screened.nsfw)
        self.metrics.images_checked.labels("flagged").inc(flagged)
        self.metrics.images_checked.labels("passed").inc(len(screened.nsfw) - flagged)
        return screened.pixels, screened.nsfw

    async def _phase(self, phase: str) -> None:
        """Say what the warm-up does now: in the log, and in the registry (`sdxl-serve status`) at once."""
        logger.info("worker %s: %s", self.id, phase)
        try:
            await self.presence.announce("warming", phase=phase)
        except REDIS_ERRORS as exc:  # the next heartbeat carries it
            logger.warning("could not publish the warm-up phase (%s)", exc)

    def _default_loader(self) -> Pipeline:
        options = PipelineOptions(
            self.config.images_per_request, attention=self.config.attention, max_steps=self.config.max_steps
        )
        return SDXLPipeline.load(self.config.model, self.config.model_revision, options, self.config.model_config)

    async def _serve_next(self) -> None:
        if self._handoff.store_trouble is not None:
            await self._handoff.until_store_writable(self._stopping)
            return
        claimed = await self._claims.next(self._handoff.in_hand(), self._stopping)
        if claimed is not None:
            with bound(request=claimed.job.request_id, job=claimed.job.id):
                await self._settle(claimed)

    async def _settle(self, claimed: ClaimedJob) -> None:
        """The per-job boundary: whatever happens, the job gets a stored result and is acknowledged."""
        queued_ms = await self._claims.start(claimed)
        if queued_ms is None:
            return
        self._device_busy(True)
        generated = await self._generate(claimed, queued_ms)
        self._device_busy(False)
        if isinstance(generated, Cancelled):
            await self._claims.drop_stopped(claimed, generated.step)
            return
        await self._handoff.hand_off(generated)

    def _device_busy(self, busy: bool) -> None:
        self.presence.busy(busy)
        self.metrics.busy.set(1 if busy else 0)

    async def _generate(self, claimed: ClaimedJob, queued_ms: float) -> Generated | Cancelled:
        """The job's device work, or where a cancel stopped it; a failure becomes the job's result (the per-job
        boundary, device side)."""
        job = claimed.job
        started = time.perf_counter()
        pixels, failure, nsfw = None, None, None
        try:
            async with JobProgress(job, self.id, self._delivery, self.metrics) as progress:
                pixels = await self._device.generate(job, progress.on_step)
            pixels, nsfw = await self._screen(pixels)
            pixels = await self._marked(pixels)
        except Cancelled as stop:
            return stop
        except PipelineError as exc:
            failure = failed(job, self.id, str(exc))
        except Exception as exc:  # the worker's catch-all boundary: report the job, keep serving
            logger.exception("job %s failed", job.id)
            failure = failed(job, self.id, f"{type(exc).__name__}: {exc}")
        generate_s = time.perf_counter() - started
        if failure is None:
            self.metrics.generate_seconds.labels(str(job.params.shape)).observe(generate_s)
        return Generated(claimed, pixels, failure, queued_ms, generate_s * 1000, nsfw)

    async def _deregister(self) -> None:
        """Leave the registry, then hand the jobs routed to this worker back to the shared streams (a live
        worker does it if this fails)."""
        try:
            await self.presence.leave()
            await self._claims.hand_back()
        except REDIS_ERRORS as exc:
            logger.warning("could not deregister (%s); the entry expires and others take the jobs", exc)


async def serve(
    config: WorkerConfig,
    *,
    started_at: float | None = None,
    handle_signals: bool = True,
    load_pipeline: Callable[[], Pipeline] | None = None,
) -> int:
    """Run a worker until SIGTERM or SIGINT, then drain: stop claiming, finish the job in hand within
    `drain_timeout_s`, deregister. Returns the exit status: 0 after a clean drain, 1 if the job in hand
    had to be abandoned (it stays pending and a live worker takes it over). `load_pipeline` replaces the
    model (the fault injector's stand-in workers)."""
    log_config(logger, config)
    redis = connect(
        config.redis_url, name=f"sdxl-worker:{config.worker_id}", allow_evicting=config.allow_evicting_redis
    )
    await refuse_evicting_redis(redis)
    blobs = open_blob_store(config.blob_store)
    worker = Worker(config, redis, load_pipeline=load_pipeline, started_at=started_at, blobs=blobs)
    _use_compilation_cache(config, worker.metrics)
    http, port = await start_server(
        metrics_app(worker.metrics, worker.not_ready), config.metrics_host, config.metrics_port
    )
    worker.presence.metrics_on(port)
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
