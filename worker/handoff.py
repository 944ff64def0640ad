"""Hand-off: a job whose device work is over is encoded and stored behind the device, while the next one generates.

Each generated job is delivered in a task of its own: its images are encoded on a small pool, written to the
blob store when there is one (objects first: no result is visible before its images), and its result stored,
retrying through Redis outages; whatever happens, it gets a stored result and its entry is acknowledged, once.
At most `limit` jobs are in delivery: the next hand-off waits for one to finish, so finished images never pile
up in memory when storing is slower than generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from common.protocol import Job, JobResult, Timings
from worker.config import WorkerConfig
from worker.delivery import REDIS_ERRORS, ClaimedJob, Delivery
from worker.encode import Encoding
from worker.images import ImagesNotStored, ImageWriter
from worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

# Probing an image store that refused writes: the first wait, and the most between two probes.
PROBE_FIRST_S = 0.1
PROBE_CAP_S = 5.0
# Encodes a batch of images on an executor (worker/encode.py's `encode_all`; tests put a stand-in).
EncodeImages = Callable[[np.ndarray, Encoding, Executor], list[bytes]]


@dataclass(frozen=True)
class Generated:
    """A job whose device work is over: its images, or the failure that stopped it."""

    claimed: ClaimedJob
    pixels: np.ndarray | None
    failure: JobResult | None
    queued_ms: float
    generate_ms: float
    nsfw: list[bool] | None = None  # per image, from the safety checker when one runs


def failed(job: Job, worker_id: str, reason: str) -> JobResult:
    """`job`'s result when it failed for `reason`."""
    params = job.params
    return JobResult(
        id=job.id,
        status="failed",
        worker=worker_id,
        seed=params.seed,
        shape=params.shape,
        scheduler=params.scheduler,
        error=reason,
    )


class HandOff:
    """Delivers generated jobs in the background, at most `limit` at a time. `on_settled` is called as each
    job's result is stored (or dropped as a duplicate)."""

    def __init__(
        self,
        config: WorkerConfig,
        delivery: Delivery,
        images: ImageWriter | None,
        encode_images: EncodeImages,
        metrics: WorkerMetrics,
        on_settled: Callable[[], None],
        on_store_trouble: Callable[[bool], None] = lambda refuses: None,
        limit: int = 1,
    ) -> None:
        self._config = config
        self._delivery = delivery
        self._images = images
        self._encode_images = encode_images
        self._encoders = ThreadPoolExecutor(
            max_workers=min(config.images_per_request, os.cpu_count() or 1), thread_name_prefix="encode"
        )
        self._metrics = metrics
        self._on_settled = on_settled
        self._on_store_trouble = on_store_trouble
        self.store_trouble: str | None = None  # why the image store refuses writes, while it does
        self.limit = limit  # the worker raises it to its batch's rows: a full batch may finish in one step
        self._delivering: dict[asyncio.Task[None], ClaimedJob] = {}

    def in_hand(self) -> list[ClaimedJob]:
        """The jobs still being encoded and stored: their entries are pending under this worker, and a claim must
        not take them again."""
        return [claimed for task, claimed in self._delivering.items() if not task.done()]

    async def hand_off(self, generated: Generated) -> None:
        """Deliver `generated` in a task of its own and return, so the loop claims the next job while it is
        encoded and stored. When `limit` jobs are in delivery, one is awaited first: it has had a whole
        generation's time, so the device waits only when storing is slower than generating."""
        while len(self._delivering) >= self.limit:
            await self._one_delivered()
        # The task inherits this context, so its log lines carry the job's ids.
        task = asyncio.create_task(self._deliver(generated), name=f"deliver-{generated.claimed.job.id}")
        self._delivering[task] = generated.claimed

    async def drain(self) -> None:
        """Wait for every job in delivery."""
        while self._delivering:
            await self._one_delivered()

    async def sweep(self) -> None:
        """Remove expired images from the blob store, forever (nothing to do without one)."""
        if self._images is not None:
            await self._images.sweep_forever(self._config.blob_sweep_interval_s)

    def close(self) -> None:
        self._encoders.shutdown(wait=False)

    async def _one_delivered(self) -> None:
        done, _ = await asyncio.wait(self._delivering, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            del self._delivering[task]
            task.result()  # a delivery that raised is a bug: it stops the worker, as it always did

    async def _deliver(self, generated: Generated) -> None:
        """Encode and store one job: whatever happens, it gets a stored result and is acknowledged, once."""
        claimed = generated.claimed
        result, images = await self._encode(generated)
        if self._images is not None and images:  # objects first: no result is visible before its images
            try:
                result = await self._images.put(claimed.job, result, images)
            except ImagesNotStored as exc:
                result = self._unstorable(claimed.job, exc)
            images = []
        stored = await self._store(claimed, result, images)
        if not stored and self._images is not None:
            await self._images.discard(result)
        self._metrics.jobs.labels(result.status if stored else "discarded").inc()  # discarded: cancelled or duplicate
        self._on_settled()
        logger.info("job %s: %s%s", claimed.job.id, result.status, "" if stored else " (duplicate result dropped)")

    def _unstorable(self, job: Job, exc: ImagesNotStored) -> JobResult:
        """The failed result of a job whose images the store kept refusing; the worker claims nothing more
        (registry state `draining`, /readyz 503) until the store takes a write again."""
        logger.error("job %s: failed: %s; not claiming until the image store takes writes", job.id, exc)
        self._metrics.image_store_failures.inc()
        self.store_unavailable(str(exc))
        return failed(job, self._config.worker_id, f"could not store its images: {exc}")

    def store_unavailable(self, trouble: str) -> None:
        """The image store failed a write or a read (`trouble`, why): the worker claims nothing (registry state
        `draining`, /readyz 503) until `until_store_writable` finds it taking a write again."""
        self._metrics.image_store_writable.set(0)
        self.store_trouble = trouble
        self._on_store_trouble(True)

    async def until_store_writable(self, stopping: asyncio.Event) -> None:
        """Probe the image store, with backoff, until it takes a write or `stopping` is set."""
        assert self._images is not None, "only a store can refuse writes"
        delay = PROBE_FIRST_S
        while not stopping.is_set():
            trouble = await self._images.writable()
            if trouble is None:
                logger.info("the image store takes writes again; claiming jobs")
                self.store_trouble = None
                self._metrics.image_store_writable.set(1)
                self._on_store_trouble(False)
                return
            self.store_trouble = trouble
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
            delay = min(delay * 2, PROBE_CAP_S)

    async def _encode(self, generated: Generated) -> tuple[JobResult, list[bytes]]:
        """The job's result and encoded images; a failure to encode fails the job (the per-job boundary, delivery
        side)."""
        job = generated.claimed.job
        if generated.pixels is None:
            assert generated.failure is not None, "a job without images has a failure"
            return generated.failure, []
        # The runner has put the watermark on already, on the devices (worker/device_watermark.py).
        encoding = Encoding(job.output_format, job.quality, self._config.png_compress_level, watermark=False)
        started = time.perf_counter()
        try:
            images = await asyncio.get_running_loop().run_in_executor(
                None, self._encode_images, generated.pixels, encoding, self._encoders
            )
        except Exception as exc:  # the worker's catch-all boundary: report the job, keep serving
            logger.exception("job %s: encoding failed", job.id)
            return failed(job, self._config.worker_id, f"encoding failed: {type(exc).__name__}: {exc}"), []
        encode_s = time.perf_counter() - started
        self._metrics.encode_seconds.labels(job.output_format).observe(encode_s)
        timings = Timings(queued_ms=generated.queued_ms, generate_ms=generated.generate_ms, encode_ms=encode_s * 1000)
        return self._succeeded(job, encoding, len(images), timings).model_copy(update={"nsfw": generated.nsfw}), images

    def _succeeded(self, job: Job, encoding: Encoding, count: int, timings: Timings) -> JobResult:
        return JobResult(
            id=job.id,
            status="succeeded",
            worker=self._config.worker_id,
            seed=job.params.seed,
            shape=job.params.shape,
            scheduler=job.params.scheduler,
            media_type=encoding.media_type,
            image_count=count,
            timings=timings,
        )

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
