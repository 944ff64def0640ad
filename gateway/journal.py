"""The jobs this gateway accepted and that have not finished, kept in memory so that a job Redis loses is
queued again.

Redis restored from an older snapshot (or a failover to a replica that missed the last writes) forgets a
job that was accepted after the snapshot: its record and its stream entry are gone, and nothing in Redis
says it existed. The gateway that accepted it still knows it. Every `interval_s` the journal asks Redis
for the status of every job it holds, in one pipelined round trip: a terminal job is forgotten, a job
Redis no longer knows is submitted again with its id, request and idempotency key (the submit script is
safe to run twice, so a job that is in fact there is not queued again). The journal is bounded: past
`capacity` jobs, the oldest is forgotten.

A job's input images stored in Redis (common/inputs.py) are lost with it, so the journal keeps their bytes too and
stores the missing ones again, for what is left of their result TTL, before it queues the job again. Those bytes
are bounded apart (`input_bytes`): past it, the oldest jobs' copies are dropped first (a rollback takes back the
latest writes, so the newest are the ones at risk), and a copy is dropped once its result TTL has passed (the
worker fails a job whose inputs are that old anyway). A job queued again without its inputs fails at the worker,
saying they are gone. Inputs in a blob store need no copy: Redis losing its data leaves them.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from common.inputs import RedisCopy, restore_inputs
from common.jobstore import ANYONE, IdempotencyConflict, JobStore, Submitter, record_ttl
from common.protocol import FINISHED, Job
from common.redis_conn import UNAVAILABLE
from common.rediskeys import RedisKeys
from common.webhooks import Outbox, WebhookSpec

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 2.0
CAPACITY = 10_000


@dataclass(frozen=True)
class Accepted:
    """What it takes to queue a job again: the job, and the idempotency key, fingerprint and submitter it came
    with."""

    job: Job
    idempotency_key: str | None
    fingerprint: str
    submitter: Submitter = ANYONE
    webhook: WebhookSpec | None = None
    inputs: RedisCopy | None = None  # its input images, when stored in Redis
    accepted_at: float = field(default_factory=time.monotonic)

    def could_have_expired(self, now: float) -> bool:
        """Whether its record may have expired after it finished: then Redis not knowing it proves nothing."""
        return now - self.accepted_at > record_ttl(self.job.result_ttl_s)

    def inputs_ttl(self, now: float) -> int:
        """What is left of its inputs' life in Redis (one result TTL from the submit), in whole seconds; 0: over."""
        return max(0, math.ceil(self.job.result_ttl_s - (now - self.accepted_at)))


class Journal:
    """Accepted jobs not yet seen terminal; `run()` re-queues those Redis has lost."""

    def __init__(
        self,
        jobs: JobStore,
        keys: RedisKeys,
        redis: aioredis.Redis,
        *,
        input_bytes: int,
        interval_s: float = SWEEP_INTERVAL_S,
        capacity: int = CAPACITY,
        outbox: Outbox | None = None,
    ) -> None:
        self._jobs_store = jobs
        self._outbox = outbox
        self._keys = keys
        self._interval_s = interval_s
        self._capacity = capacity
        self._redis = redis
        self._input_budget = input_bytes
        self._jobs: collections.OrderedDict[str, Accepted] = collections.OrderedDict()
        self.input_bytes = 0  # the bytes of the input copies held
        self.resubmitted = 0
        self.webhooks_restored = 0
        self.inputs_restored = 0
        self.inputs_dropped = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, accepted: Accepted) -> None:
        """Hold a job the gateway has just accepted (its submit returned `created`), and the copy of its input
        images within the budget."""
        if self._input_budget == 0:  # keep none
            accepted = dataclasses.replace(accepted, inputs=None)
        self._jobs[accepted.job.id] = accepted
        self.input_bytes += _size(accepted)
        while len(self._jobs) > self._capacity:
            self._forget(next(iter(self._jobs)))
        for job_id in list(self._jobs):  # the oldest first
            if self.input_bytes <= self._input_budget:
                break
            self._drop_inputs(job_id, "over the journal's budget for input images (--journal-input-bytes)")

    def _forget(self, job_id: str) -> None:
        accepted = self._jobs.pop(job_id, None)
        if accepted is not None:
            self.input_bytes -= _size(accepted)

    def _drop_inputs(self, job_id: str, why: str) -> None:
        accepted = self._jobs[job_id]
        if accepted.inputs is None:
            return
        self.input_bytes -= _size(accepted)
        self._jobs[job_id] = dataclasses.replace(accepted, inputs=None)
        self.inputs_dropped += 1
        logger.info("job %s: its input images' copy dropped, %s", job_id, why)

    async def run(self) -> None:
        """Sweep until cancelled; a Redis error skips a sweep."""
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.sweep()
            except (*UNAVAILABLE, OSError) as exc:
                logger.warning("accepted jobs not checked (%s)", exc)

    async def sweep(self) -> None:
        """Forget the jobs that finished; queue again the ones Redis no longer knows."""
        job_ids = list(self._jobs)
        if not job_ids:
            return
        now = time.monotonic()
        for job_id, status in zip(job_ids, await self._jobs_store.statuses(job_ids), strict=True):
            accepted = self._jobs.get(job_id)
            if status in FINISHED and accepted is not None:
                await self._keep_webhook(accepted)
            if status in FINISHED or accepted is None or accepted.could_have_expired(now):
                self._forget(job_id)
                continue
            if accepted.inputs is not None and accepted.inputs_ttl(now) == 0:
                self._drop_inputs(job_id, "past their result TTL")
            if status is None:
                await self._resubmit(self._jobs[job_id], now)

    async def _keep_webhook(self, accepted: Accepted) -> None:
        """A job that ended after Redis lost its record (a worker's result makes the record again, without the
        webhook) gets its webhook back, and its `completed` message falls due."""
        if accepted.webhook is None or self._outbox is None:
            return
        if await self._outbox.restore(accepted.job.id, accepted.webhook):
            self.webhooks_restored += 1
            logger.warning("job %s ended after Redis lost its record; its webhook restored", accepted.job.id)

    async def _resubmit(self, accepted: Accepted, now: float) -> None:
        job = accepted.job
        await self._restore_inputs(accepted, now)  # before the job: a worker that takes it finds them
        try:
            submitted = await self._jobs_store.submit(
                job,
                self._keys.size_stream(job.params.shape.size),
                accepted.idempotency_key,
                accepted.fingerprint,
                # Accepted once already: its caller's cap on jobs in flight does not refuse it again.
                submitter=dataclasses.replace(accepted.submitter, max_in_flight=0),
                webhook=accepted.webhook,
            )
        except IdempotencyConflict:
            submitted = None
        if submitted is None or submitted.job_id != job.id:  # its key names another job now: that one stands
            logger.error("job %s was lost by Redis and its key now names another job; not queued again", job.id)
            self._forget(job.id)
            return
        self.resubmitted += 1
        logger.warning("job %s was lost by Redis (restored from an older state); queued again", job.id)

    async def _restore_inputs(self, accepted: Accepted, now: float) -> None:
        """Store again the input images of a job Redis lost, those it lacks; a job whose copy is gone is queued
        without them, and fails at the worker saying so."""
        refs = accepted.job.inputs
        ttl_s = accepted.inputs_ttl(now)
        if accepted.inputs is not None and ttl_s > 0:
            restored = await restore_inputs(accepted.inputs, self._redis, ttl_s)
            self.inputs_restored += 1 if restored else 0
        elif refs is not None and refs.store == "redis":
            logger.error("job %s was lost by Redis with its input images, of which no copy is left", accepted.job.id)


def _size(accepted: Accepted) -> int:
    return 0 if accepted.inputs is None else accepted.inputs.size
