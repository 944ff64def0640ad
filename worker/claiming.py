"""Claiming: where a worker's next job comes from, and the jobs that end without a result to deliver.

A worker claims as many jobs as its engine has free rows for (a job takes `n` rows, one per image). Jobs of dead
workers come first (they have waited longest; looked for every `reclaim_interval_s`), then this worker's own stream
(jobs routed to it), then the shared stream of each size it serves, all in one claim script call. An entry that does
not parse is failed and settled; one handed out too often goes to the dead letters (not counting the deliveries given
back because its input images could not be read: those have a bound of their own, `max_input_retries`). A claimed job
is started (its attempt recorded) before it runs; one cancelled while queued, or stopped on the device by a cancel, has
its `cancelled` result stored already and its entry is only acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection, Sequence

import redis.asyncio as aioredis

from common.protocol import DEFAULT_RESULT_TTL_S, Size
from common.rediskeys import RedisKeys
from common.registry import Registry
from common.streams import JobStreams
from worker.config import WorkerConfig
from worker.delivery import REDIS_ERRORS, ClaimedJob, Delivery, MalformedJob
from worker.metrics import WorkerMetrics
from worker.recovery import Recovery

logger = logging.getLogger(__name__)

# A job that could not be parsed still needs its failure kept for a while, so the requester can read it.
MALFORMED_RESULT_TTL_S = DEFAULT_RESULT_TTL_S
# How long to wait before claiming again after Redis failed a claim.
CLAIM_RETRY_S = 1.0


class Claims:
    """Claims, starts and drops one worker's jobs. `open()` names the sizes served, before the first claim."""

    def __init__(
        self,
        config: WorkerConfig,
        redis: aioredis.Redis,
        delivery: Delivery,
        registry: Registry,
        metrics: WorkerMetrics,
    ) -> None:
        self._config = config
        self._id = config.worker_id
        self._keys = RedisKeys(config.key_prefix)
        self._delivery = delivery
        self._recovery = Recovery(redis, self._keys, delivery)
        self._job_streams = JobStreams(redis, self._keys)
        self._registry = registry
        self._metrics = metrics
        self._streams = [self._keys.worker_stream(self._id)]
        self._next_reclaim = 0.0
        # Give-backs for unreachable inputs not yet recorded (Redis was away): recorded before the next claim.
        self._unrecorded: list[tuple[ClaimedJob, str]] = []

    async def open(self, sizes: Sequence[Size]) -> None:
        """Take jobs from this worker's own stream first (jobs routed to it), then the shared stream of each of
        `sizes`; create their consumer groups where missing."""
        self._streams = [self._keys.worker_stream(self._id), *(self._keys.size_stream(s) for s in sizes)]
        for stream in self._streams:
            await self._job_streams.ensure_group(stream)

    async def next(
        self, in_hand: Collection[ClaimedJob], stopping: asyncio.Event, rows: int, wait: bool = True
    ) -> list[ClaimedJob]:
        """The next jobs to run, worth up to `rows` images (at least one job), or none yet (Redis away: then after
        a pause, cut short by `stopping`). `in_hand`: the claimed jobs this worker still works on. `wait`: block
        up to `claim_block_ms` for a job when there is none (a worker whose device is busy does not)."""
        try:
            await self._record_give_backs()
            entries = await self._next_jobs(in_hand, rows, wait)
        except REDIS_ERRORS as exc:
            logger.warning("claim failed (%s); retrying", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), CLAIM_RETRY_S)
            return []
        jobs = []
        for entry in entries:
            if isinstance(entry, MalformedJob):
                await self._reject(entry)
            elif not await self._exhausted(entry):
                jobs.append(entry)
        return jobs

    async def inputs_unreachable(self, claimed: ClaimedJob, error: str) -> None:
        """Give back a delivery whose job's input images could not be read, their store unreachable (`error`): its
        entry stays pending to be delivered again, and the give-back is recorded so that it does not count towards
        `max_deliveries`. Past `max_input_retries` give-backs the job is dead-lettered, naming the store's error.
        With Redis away the record waits for the next claim, which makes it first (the claim gives the entry back
        only then)."""
        try:
            await self._record_give_back(claimed, error)
        except REDIS_ERRORS as exc:
            logger.warning(
                "job %s: could not record the give-back (%s); recorded before the next claim", claimed.job.id, exc
            )
            self._unrecorded.append((claimed, error))

    async def _record_give_backs(self) -> None:
        """Record the give-backs Redis was away for, oldest first; one that fails again stays, with those after it."""
        while self._unrecorded:
            await self._record_give_back(*self._unrecorded[0])
            self._unrecorded.pop(0)

    async def _record_give_back(self, claimed: ClaimedJob, error: str) -> None:
        given_back = await self._delivery.given_back_unreachable(claimed, error)
        limit = self._config.max_input_retries
        if given_back > limit:
            reason = f"its input images could not be read on {given_back} deliveries, their store unreachable: {error}"
            await self._delivery.dead_letter(claimed, self._id, reason)

    async def _reject(self, bad: MalformedJob) -> None:
        logger.error("rejecting malformed job: %s", bad)
        try:
            await self._delivery.reject(bad, self._id, MALFORMED_RESULT_TTL_S)
        except REDIS_ERRORS as exc:  # its entry stays pending under this worker; the next claim returns it
            logger.warning("could not reject the malformed job (%s)", exc)

    async def _exhausted(self, claimed: ClaimedJob) -> bool:
        """Dead-letter a job delivered too often; True if it was (or might be: Redis is away, it stays pending).
        A job moved off a departed worker's stream, or read again after a lost reply, may be past the limit."""
        try:
            return await self._delivery.dead_letter_if_exhausted(claimed, self._id, self._config.max_deliveries)
        except REDIS_ERRORS as exc:
            logger.warning("job %s: could not check its deliveries (%s); left pending", claimed.job.id, exc)
            return True

    async def start(self, claimed: ClaimedJob) -> float | None:
        """Record the job's start; returns how long it was queued (ms), or None when it was cancelled while
        queued (then it is dropped without running)."""
        job = claimed.job
        claimed_ms = await self._record_start(claimed)
        if claimed_ms is None:
            logger.info("job %s: cancelled while queued; dropped without running", job.id)
            await self._delivery.discard(claimed)
            self._metrics.jobs.labels("skipped_cancelled").inc()
            return None
        queued_ms = claimed_ms - claimed.enqueued_ms
        logger.info("job %s: claimed after %d ms in queue (%s)", job.id, queued_ms, job.params.shape)
        return queued_ms

    async def drop_stopped(self, claimed: ClaimedJob, step: int) -> None:
        """Settle a job stopped because it was cancelled: its `cancelled` result is already stored, so the entry
        is only acknowledged. Should Redis be away, the entry stays pending; whoever takes it over later drops it
        (its job is cancelled)."""
        job = claimed.job
        logger.info(
            "job %s: cancelled while running; stopped after step %d of %d", job.id, step, job.params.num_inference_steps
        )
        self._metrics.jobs.labels("stopped_cancelled").inc()
        try:
            await self._delivery.discard(claimed)
        except REDIS_ERRORS as exc:
            logger.warning("job %s: could not settle the cancelled job (%s); left pending", job.id, exc)

    async def hand_back(self) -> None:
        """Move the jobs routed to this worker back to the shared streams (it is leaving)."""
        await self._recovery.rehome(self._keys.worker_stream(self._id))

    async def _next_jobs(
        self, in_hand: Collection[ClaimedJob], rows: int, wait: bool
    ) -> list[ClaimedJob | MalformedJob]:
        """Jobs of dead workers first (they have waited longest), then new ones."""
        reclaimed = await self._reclaim_due(rows)
        if reclaimed:
            return reclaimed
        block_ms = self._config.claim_block_ms if wait else None
        return await self._delivery.claim_rows(self._id, self._streams, block_ms, in_hand, rows)

    async def _reclaim_due(self, rows: int) -> list[ClaimedJob | MalformedJob]:
        """Every `reclaim_interval_s`: rehome the jobs routed to departed workers, then take over the jobs that
        dead workers held, worth up to `rows` images (at least one job)."""
        now = time.monotonic()
        if now < self._next_reclaim:
            return []
        self._next_reclaim = now + self._config.reclaim_interval_s
        live = {w.id for w in await self._registry.workers()}
        await self._recovery.rehome_orphans(live | {self._id})
        taken: list[ClaimedJob | MalformedJob] = []
        while rows > 0:
            try:
                claimed = await self._recovery.reclaim(self._id, live, self._config.max_deliveries, self._streams[1:])
            except MalformedJob as bad:
                taken.append(bad)
                break
            if claimed is None:
                break
            self._metrics.reclaims.inc()
            taken.append(claimed)
            rows -= claimed.job.params.n
        return taken

    async def _record_start(self, claimed: ClaimedJob) -> int | None:
        """Announce the start; returns the claim time on Redis's clock (this host's if Redis is away), or
        None when the job was cancelled while queued."""
        try:
            return await self._delivery.start(claimed, self._id)
        except REDIS_ERRORS as exc:
            logger.warning("job %s: could not record its start (%s); running it anyway", claimed.job.id, exc)
            return int(time.time() * 1000)
