"""The worker loop: drive the engine step by step, claiming jobs for its free rows, and hand each finished job off
to be encoded and stored behind the device while the others denoise.

`Worker` schedules; each concern is its own module: the registry entry and heartbeat (worker/presence.py), where
jobs come from (worker/claiming.py), the device thread and warm-up (worker/device.py), the engine that holds the
rows of several jobs at once (worker/engine.py; worker/sequential.py runs one job at a time), a running job's
progress and cancel (worker/progress.py), and encoding and storing (worker/handoff.py). The event loop only does
Redis I/O; the engine's steps run on the device thread and PNG encoding on a small pool, so heartbeats keep flowing
while the devices work. With the device idle the worker waits for jobs; while it denoises, a claim for the free rows
runs beside each step, never holding the device up. A job cancelled while it runs leaves the batch at its next
denoising step (each step's progress report returns the job's status); the others carry on. A worker joins the
consumer group only after every configured size is compiled and warmed up: until then it is registered as `warming`
and takes no job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

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
from worker.inpainting_model import check_engine, kinds_before_loading
from worker.inputs import InputsLost, InputsRefused, InputsUnreachable, JobInputs
from worker.lora_source import LoraSource, adapter_loader, open_lora_source, refusal
from worker.metrics import WorkerMetrics, metrics_app, start_server
from worker.pipeline import PipelineError, PipelineOptions, SDXLPipeline
from worker.pipeline_protocol import Engine, Pipeline, Tick
from worker.presence import Presence
from worker.progress import Cancelled, JobProgress
from worker.safety import SafetyChecker
from worker.sequential import RequestAtATime, as_engine

logger = logging.getLogger(__name__)

# A finished job's images after the safety checker and the watermark, and the checker's verdicts.
Outcome = tuple[np.ndarray, list[bool] | None]
# What a worker's loader returns: an engine, or a pipeline (then run one request at a time).
Loader = Callable[[], Pipeline | Engine]


@dataclass
class Running:
    """A job the engine holds: its entry, its progress reporter, and when it was queued and admitted."""

    claimed: ClaimedJob
    progress: JobProgress
    queued_ms: float
    started: float  # time.perf_counter() at admission


class Worker:
    """One worker process's serving loop. `run()` serves until `stop()`; the jobs in hand are finished.

    It drives an engine that holds the rows of several jobs at once. Everything per job lives in per-job objects
    (the claimed entry, its `JobProgress`, its delivery task), and each job is settled on its own.
    """

    def __init__(
        self,
        config: WorkerConfig,
        redis: aioredis.Redis,
        load_pipeline: Loader | None = None,
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
        # The LoRA adapters offered (None without --lora-dir); the engine loads them through `adapter_loader`.
        self.loras: LoraSource | None = open_lora_source(config)
        self.presence = Presence(config, registry, started_at, self.loras)
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
        self._load = load_pipeline or self._default_loader
        self._own_model = load_pipeline is None  # a stand-in's loader (the fault injector's) serves its own model
        self._inputs = JobInputs(redis, blobs, config.takes_images)
        self._running: dict[str, Running] = {}
        self._claiming: asyncio.Task[list[ClaimedJob]] | None = None
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
        return self._device.engine is None

    def not_ready(self) -> str | None:
        """None when warm and claiming, else why not (for /readyz)."""
        if self.warming:
            return f"warming up: {self.info.phase or 'starting'}"
        if self._stopping.is_set():
            return "draining: no longer claiming jobs"
        if self._handoff.store_trouble is not None:
            return f"not claiming jobs: the image store is unavailable ({self._handoff.store_trouble})"
        return None

    async def abandon(self) -> None:
        """Deregister now, leaving any job in hand pending: live workers take it over at once."""
        await self._deregister()

    async def run(self) -> None:
        """Register, warm up, then serve jobs until stopped; deregister on the way out."""
        await self._kinds_before_loading()
        await self.presence.announce("warming")
        background = [
            asyncio.create_task(self.presence.heartbeat(), name="heartbeat"),
            asyncio.create_task(self._handoff.sweep(), name="image-sweep"),
        ]
        try:
            await self._claims.open(await self._warm_up())
            if not self._stopping.is_set():
                await self.presence.announce("ready")
            engine = self._device.engine
            assert engine is not None, "warm after warm-up"
            while not self._stopping.is_set() or engine.busy or self._claiming is not None:
                await self._serve(engine)
            await self._handoff.drain()
        finally:
            if self._claiming is not None:  # a claim cut short: its entries stay pending, taken over once it leaves
                self._claiming.cancel()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._deregister()
            self._device.close()
            self._handoff.close()

    async def _kinds_before_loading(self) -> None:
        """Where the model's UNet config can be read before its weights (worker/inpainting_model.py), advertise the
        kinds of request it runs from the first entry on, and refuse at once an engine that runs none of them."""
        if not self._own_model:
            return
        config = self.config
        kinds = await asyncio.to_thread(kinds_before_loading, config.model, config.model_revision)
        if kinds is not None:
            check_engine(config.model, kinds, config.engine)
            self.presence.model_runs(kinds)

    async def _warm_up(self) -> Sequence[Size]:
        """Load, then compile and warm every size; returns the sizes served."""
        phases = {"init": time.time() - self.info.started_at}  # imports, Redis, the metrics port
        sizes = await self._device.warm_up(self._engine_of_loaded, self.config.sizes, phases, self._phase)
        engine = self._device.engine
        assert engine is not None, "warm after warm-up"
        await self._load_safety_checker(sizes, engine.max_images)
        await self._compile_watermark(sizes, engine.max_images)
        self._handoff.limit = max(1, engine.rows)  # a full batch's jobs may finish in one step
        pipeline = engine.pipeline
        self.presence.warmed(engine, sizes)
        self._rows_changed(engine)
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

    async def _load_safety_checker(self, sizes: Sequence[Size], batch: int) -> None:
        """With `--safety-checker`, load it and compile it for every size served at `batch` images (a job's are
        padded up to it), on the device thread."""
        folder = self.config.safety_checker
        if folder is None:
            return
        await self._phase("loading and compiling the safety checker")
        checker = await self._device.call(lambda: SafetyChecker.load(folder, self.config.safety_replace))
        for size in sizes:
            await self._device.call(functools.partial(checker.compile, size, batch))
        self._safety = checker

    async def _compile_watermark(self, sizes: Sequence[Size], batch: int) -> None:
        """Unless `--watermark off`, compile the invisible watermark for every size served at `batch` images (a
        job's are padded up to it), on the device thread."""
        if not self.config.watermark:
            return
        watermark = await self._device.call(DeviceWatermark)
        for size in sizes:
            await self._device.call(functools.partial(watermark.compile, size, batch))
        self._watermark = watermark

    async def _marked(self, pixels: np.ndarray) -> np.ndarray:
        """The batch with the invisible watermark on it, marked on the devices; as it is with `--watermark off`."""
        watermark = self._watermark
        if watermark is None:
            return pixels
        return await self._device.call(lambda: padded(watermark.apply, pixels, self._batch))

    async def _screen(self, pixels: np.ndarray) -> tuple[np.ndarray, list[bool] | None]:
        """The batch after the safety checker (flagged images replaced) and its verdicts; as it is without one."""
        checker = self._safety
        if checker is None:
            return pixels, None
        screened = await self._device.call(lambda: checker.screen(pad(pixels, self._batch)))
        screened_pixels, nsfw = screened.pixels[: len(pixels)], screened.nsfw[: len(pixels)]
        flagged = sum(nsfw)
        self.metrics.images_checked.labels("flagged").inc(flagged)
        self.metrics.images_checked.labels("passed").inc(len(nsfw) - flagged)
        return screened_pixels, nsfw

    @property
    def _batch(self) -> int:
        """The batch the safety checker and the watermark are compiled for: the most images of one job."""
        engine = self._device.engine
        return engine.max_images if engine is not None else self.config.images_per_request

    async def _phase(self, phase: str) -> None:
        """Say what the warm-up does now: in the log, and in the registry (`sdxl-serve status`) at once."""
        logger.info("worker %s: %s", self.id, phase)
        try:
            await self.presence.announce("warming", phase=phase)
        except REDIS_ERRORS as exc:  # the next heartbeat carries it
            logger.warning("could not publish the warm-up phase (%s)", exc)

    def _engine_of_loaded(self) -> Engine:
        """The loader's engine (a pipeline it returned runs one request at a time)."""
        return as_engine(self._load(), self.config.images_per_request)

    def _default_loader(self) -> Engine:
        """The model, under the engine `--engine` names: `rows` (worker/engine.py) or `request`."""
        config = self.config
        options = PipelineOptions(config.images_per_request, attention=config.attention, max_steps=config.max_steps)
        pipeline = SDXLPipeline.load(config.model, config.model_revision, options, config.model_config)
        check_engine(config.model, pipeline.request_kinds, config.engine)  # a single file's kind is in its weights
        if config.engine == "request":
            return RequestAtATime(pipeline, config.images_per_request)
        # Imported here: the row engine loads with the model, and only where it is asked for.
        engines = importlib.import_module("worker.engine")
        row_engine = engines.RowEngine(
            pipeline,
            config.rows_per_device,
            config.batch_policy,
            config.images_per_request,
            **self._lora_options(pipeline),
        )
        if self.loras is not None:
            self.presence.loaded_by(row_engine.loaded)
        return cast(Engine, row_engine)

    def _lora_options(self, pipeline: SDXLPipeline) -> dict[str, Any]:
        """The row engine's adapter pool and reader with `--lora-dir` (none without): an adapter is read from the
        source and parsed against this model's layers (worker/lora_files.py) on the pool's loading thread."""
        if self.loras is None:
            return {}
        from worker.lora import LoraConfig
        from worker.lora_files import layer_shapes, read_adapter

        config, layers = self.config, layer_shapes(pipeline._params)
        return {
            "lora": LoraConfig(slots=config.lora_cache, max_rank=config.lora_max_rank, max_loras=config.max_loras),
            "load_lora": adapter_loader(
                self.loras, lambda name, files: read_adapter(name, files.weights, layers, files.config)
            ),
        }

    async def _serve(self, engine: Engine) -> None:
        """One turn of the loop: with the device idle, wait for jobs; with rows on it, run one step (claiming for
        the free rows beside it) and settle what the step ended."""
        if not engine.busy:
            await self._serve_idle(engine)
            return
        step = asyncio.ensure_future(self._device.call(engine.step))
        self._claim_beside(engine)
        try:
            tick = await step
        except Exception as exc:  # the device side of the per-job boundary: every job on it fails, the loop goes on
            logger.exception("an engine step failed")
            tick = self._all_failed(engine, f"{type(exc).__name__}: {exc}")
        await self._settle_tick(tick)
        if self._claiming is not None and self._claiming.done():
            await self._admit_all(engine, await self._claimed())
        self._rows_changed(engine)

    async def _serve_idle(self, engine: Engine) -> None:
        """Nothing on the device: take the jobs of a claim under way, else wait for new ones (not while the image
        store is unavailable, nor once stopping)."""
        if self._claiming is not None:
            await self._admit_all(engine, await self._claimed())
            return
        if self._handoff.store_trouble is not None:
            await self._handoff.until_store_writable(self._stopping)
            return
        if self._stopping.is_set():
            return
        jobs = await self._claims.next(self._in_hand(), self._stopping, engine.free_rows(), wait=True)
        await self._admit_all(engine, jobs)

    def _claim_beside(self, engine: Engine) -> None:
        """Claim, without waiting, for the rows the engine has free, in a task beside the step: the device never
        waits for Redis."""
        if self._claiming is not None or self._stopping.is_set() or self._handoff.store_trouble is not None:
            return
        rows = engine.free_rows()
        if rows > 0:
            claim = self._claims.next(self._in_hand(), self._stopping, rows, wait=False)
            self._claiming = asyncio.create_task(claim, name="claim")

    async def _claimed(self) -> list[ClaimedJob]:
        claiming, self._claiming = self._claiming, None
        assert claiming is not None, "a claim is under way"
        return await claiming

    def _in_hand(self) -> list[ClaimedJob]:
        """The entries pending under this worker that it works on: on the device and in delivery."""
        return [run.claimed for run in self._running.values()] + self._handoff.in_hand()

    async def _admit_all(self, engine: Engine, jobs: list[ClaimedJob]) -> None:
        for claimed in jobs:
            with bound(request=claimed.job.request_id, job=claimed.job.id):
                await self._admit(engine, claimed)
        self._rows_changed(engine)

    async def _admit(self, engine: Engine, claimed: ClaimedJob) -> None:
        """Start a claimed job and give it to the engine; one it cannot serve fails alone (the per-job boundary)."""
        job = claimed.job
        if job.id in self._running:  # the same job on a second entry (moved meanwhile): the first settles it
            logger.warning("job %s: delivered again while on the device; the extra entry is dropped", job.id)
            with contextlib.suppress(*REDIS_ERRORS):  # left pending: the next claim returns it again
                await self._delivery.discard(claimed)
            return
        queued_ms = await self._claims.start(claimed)
        if queued_ms is None:
            return
        # Adapters this worker does not offer (or too many): the gateway routes no such job here, but a race or an
        # older gateway may; it fails, naming the adapter, before the engine sees it.
        info = self.presence.info
        if (reason := refusal(job.params.loras, info.loras, info.max_loras)) is not None:
            await self._handoff.hand_off(Generated(claimed, None, failed(job, self.id, reason), queued_ms, 0.0))
            return
        # Input images: read and checked, then given to the engine; a job this worker cannot take them for fails alone.
        try:
            image = await self._inputs.read(job)
        except InputsRefused as exc:
            if not (isinstance(exc, InputsLost) and await self._gave_back_lost(claimed)):
                await self._handoff.hand_off(Generated(claimed, None, failed(job, self.id, str(exc)), queued_ms, 0.0))
            return
        except InputsUnreachable as exc:
            await self._inputs_later(claimed, exc)
            return
        progress = JobProgress(job, self.id, self._delivery, self.metrics)
        await progress.__aenter__()
        try:
            await self._device.call(functools.partial(engine.admit, job.id, job.params, progress.on_step, image=image))
        except Exception as exc:  # PipelineError: a request it cannot serve; anything else: the catch-all boundary
            await progress.__aexit__(None, None, None)
            reason = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
            await self._handoff.hand_off(Generated(claimed, None, failed(job, self.id, reason), queued_ms, 0.0))
            return
        self._running[job.id] = Running(claimed, progress, queued_ms, time.perf_counter())

    async def _gave_back_lost(self, claimed: ClaimedJob) -> bool:
        """Whether the job, whose inputs are gone from Redis, was lost by Redis with them (then it is given back to
        the journal of the gateway that accepted it, which queues it again with its inputs), rather than expired.
        Redis away: the entry stays pending, to be delivered again."""
        try:
            lost = await self._delivery.give_back_lost(claimed)
        except REDIS_ERRORS as exc:
            logger.warning(
                "job %s: its input images are gone and Redis is away (%s); left pending", claimed.job.id, exc
            )
            return True
        if lost:
            logger.warning("job %s: lost by Redis with its input images; given back to its gateway", claimed.job.id)
            self.metrics.jobs.labels("inputs_lost").inc()
        return lost

    async def _inputs_later(self, claimed: ClaimedJob, exc: InputsUnreachable) -> None:
        """A job whose input images' store cannot be reached now is neither failed nor acknowledged: its entry stays
        pending under this worker, out of hand, and the claim script gives it back as a new delivery (as it does an
        entry whose reply was lost). The give-back is recorded in the job's record, so it does not use up the job's
        `--max-deliveries` (meant for jobs that kill their workers); past `--max-input-retries` give-backs the job
        is dead-lettered, naming the store's error (worker/claiming.py). With the blob store away the worker first
        claims nothing until the store takes a write again, as after a refused write; with Redis away the claims
        wait for it. Heartbeats go on, so no other worker takes the job over meanwhile; should this one stop, they
        do."""
        job = claimed.job
        logger.warning("job %s: its input images cannot be read now (%s); left pending, to run once read", job.id, exc)
        self.metrics.jobs.labels("inputs_unreachable").inc()
        if exc.in_blob_store:
            self._handoff.store_unavailable(f"a job's input images could not be read: {exc}")
        await self._claims.inputs_unreachable(claimed, str(exc))

    async def _settle_tick(self, tick: Tick) -> None:
        """Count the step's UNet samples, then hand off what it ended, each job on its own."""
        for kind, count in tick.samples.items():
            self.metrics.unet_samples.labels(kind).inc(count)
        for key, pixels in tick.finished:
            await self._settle(key, pixels)
        for key, error in tick.stopped:
            await self._settle(key, error)
        for key, reason in tick.failed:
            await self._settle(key, reason)

    async def _settle(self, key: str, outcome: np.ndarray | BaseException | str) -> None:
        """Settle one job the step ended: its images (`outcome` an array), what stopped it, or why it failed."""
        run = self._running.pop(key, None)
        if run is None:
            logger.error("the engine ended %s, which it was not given", key)
            return
        job = run.claimed.job
        with bound(request=job.request_id, job=job.id):
            await run.progress.__aexit__(None, None, None)
            if isinstance(outcome, Cancelled):
                await self._claims.drop_stopped(run.claimed, outcome.step)
                return
            await self._handoff.hand_off(await self._generated(run, outcome))

    async def _generated(self, run: Running, outcome: np.ndarray | BaseException | str) -> Generated:
        """The job's hand-off: its checked and marked images, or its failure (the per-job boundary)."""
        job = run.claimed.job
        generate_s = time.perf_counter() - run.started
        if isinstance(outcome, str):
            reason = outcome
        elif isinstance(outcome, BaseException):
            reason = f"{type(outcome).__name__}: {outcome}"
        else:
            try:
                pixels, nsfw = await self._finished(outcome)
            except Exception as exc:  # the worker's catch-all boundary: report the job, keep serving
                logger.exception("job %s failed after the device", job.id)
                reason = f"{type(exc).__name__}: {exc}"
            else:
                self.metrics.generate_seconds.labels(str(job.params.shape)).observe(generate_s)
                return Generated(run.claimed, pixels, None, run.queued_ms, generate_s * 1000, nsfw)
        return Generated(run.claimed, None, failed(job, self.id, reason), run.queued_ms, generate_s * 1000)

    async def _finished(self, pixels: np.ndarray) -> Outcome:
        """A finished job's images after the safety checker and the watermark."""
        pixels, nsfw = await self._screen(pixels)
        return await self._marked(pixels), nsfw

    def _all_failed(self, engine: Engine, reason: str) -> Tick:
        """Every job the engine holds, failed for `reason` (and dropped from the engine)."""
        for key in self._running:
            engine.cancel(key)
        return Tick(failed=[(key, reason) for key in self._running])

    def _rows_changed(self, engine: Engine) -> None:
        """Publish the rows held and free (with the next heartbeat), and the metrics."""
        free = engine.free_rows()
        self.presence.holding(engine.rows, free, busy=engine.busy)
        self.metrics.busy.set(1 if engine.busy else 0)
        self.metrics.rows_in_use.set(engine.rows - free)

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
    load_pipeline: Loader | None = None,
) -> int:
    """Run a worker until SIGTERM or SIGINT, then drain: stop claiming, finish the job in hand within
    `drain_timeout_s`, deregister. Returns the exit status: 0 after a clean drain, 1 if the jobs in hand
    had to be abandoned (they stay pending and live workers take them over). `load_pipeline` replaces the
    model and its engine (the fault injector's stand-in workers)."""
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


def pad(pixels: np.ndarray, batch: int) -> np.ndarray:
    """`pixels` with black images added up to `batch`: what the safety checker and the watermark are compiled for,
    so a job of any `n` runs the one executable."""
    missing = batch - len(pixels)
    if missing <= 0:
        return pixels
    return np.concatenate([pixels, np.zeros((missing, *pixels.shape[1:]), dtype=pixels.dtype)])


def padded(apply: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, batch: int) -> np.ndarray:
    """`apply` over `pixels` padded up to `batch`, cut back to `pixels`' images."""
    return apply(pad(pixels, batch))[: len(pixels)]
