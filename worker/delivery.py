"""The worker's side of the queue: claim a job, record its start and progress, settle its entry.

A worker claims as many entries as its batch has rows free for, in one script (the ones it holds already but
is not working on first: a lost reply, a Redis restored from an older snapshot), starts each (that delivery's
attempt token becomes its job's current attempt) and, for each job on its own, in one Lua script, stores the
result if that attempt still holds the job and it is not terminal, announces it on the completions channel,
and only then acknowledges and deletes the entry. An
entry that does not parse is settled too (`reject`): a bad entry never stops the loop. Every call is safe
to run twice (docs/delivery.md). Jobs of dead workers are taken over in worker/recovery.py.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import ResponseError

from common.jobstore import terminal_args, terminal_keys, webhook_keys
from common.protocol import JOB_ID_PATTERN, Job, JobResult
from common.redis_conn import UNAVAILABLE, text
from common.rediskeys import RedisKeys
from common.scripts import register
from common.streams import JobStreams

logger = logging.getLogger(__name__)

# What a worker rides out (retries, skips or logs) when Redis is away, rather than failing the job or stopping.
REDIS_ERRORS = (*UNAVAILABLE, OSError)


class MalformedJob(Exception):
    """A stream entry that is not a valid job. `job_id` is set when the entry named one."""

    def __init__(self, stream: str, entry_id: str, job_id: str | None, reason: str) -> None:
        super().__init__(f"stream {stream} entry {entry_id}: {reason}")
        self.stream = stream
        self.entry_id = entry_id
        self.job_id = job_id
        self.reason = reason


@dataclass(frozen=True)
class ClaimedJob:
    """A job delivered to this worker, with the stream entry that must be acknowledged."""

    job: Job
    stream: str
    entry_id: str
    enqueued_ms: int  # Redis server time when the job was added (from the entry id)
    deliveries: int = 1  # how many times the job was handed out, on every stream it was on, this time included

    @property
    def token(self) -> str:
        """This delivery's attempt token: unique per delivery of a job, the same when a call is retried."""
        return f"{self.stream} {self.entry_id} {self.deliveries}"


# The dead-letter stream keeps about this many entries (XADD MAXLEN ~): an operator's view, not an archive.
DEAD_LETTER_MAX_LEN = 10_000


class Delivery:
    """Claim, start, report and settle the jobs one worker takes."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys, dead_letter_max_len: int = DEAD_LETTER_MAX_LEN) -> None:
        self._redis = redis
        self._keys = keys
        self._dead_letter_max_len = dead_letter_max_len
        self._streams = JobStreams(redis, keys)
        self._store = register(redis, "store_result")
        self._start = register(redis, "start")
        self._unstart = register(redis, "unstart")
        self._progress = register(redis, "progress")
        self._claim = register(redis, "claim")
        self._dead_letter = register(redis, "dead_letter")
        self._inputs_unreachable = register(redis, "inputs_unreachable")
        self._held: collections.deque[tuple[str, str, dict[bytes, bytes]]] = collections.deque()

    async def claim(
        self, consumer: str, streams: list[str], block_ms: int, in_hand: Collection[ClaimedJob] = ()
    ) -> ClaimedJob | None:
        """Take the next job for `consumer` from `streams` (in order of preference), waiting up to
        `block_ms`; None if there was none. `in_hand`: the jobs the consumer is still working on.

        `claim_rows` with a budget of one row: one job. Raises MalformedJob for an entry that does not parse; the
        caller settles it with `reject`.
        """
        for entry in await self.claim_rows(consumer, streams, block_ms, in_hand, rows=1):
            if isinstance(entry, MalformedJob):
                raise entry
            return entry
        return None

    async def claim_rows(
        self, consumer: str, streams: list[str], block_ms: int | None, in_hand: Collection[ClaimedJob], rows: int
    ) -> list[ClaimedJob | MalformedJob]:
        """Take jobs for `consumer` from `streams` (in order of preference) worth up to `rows` images (their `n`),
        at least one; wait up to `block_ms` for one when there is none (`None`: do not wait). `in_hand`: the jobs
        the consumer is still working on. None when `rows` is 0.

        One script (claim.lua) first takes the entries already pending under `consumer` that are not in hand
        (the reply that delivered them was lost, or Redis came back from an older snapshot), then new entries
        from the first stream that has them, so a worker takes its jobs even when several streams have a
        backlog; only when all are empty does it wait on all of them. Should that wait deliver two entries at
        once (two streams written in the same instant), the second stays pending under this consumer and is
        returned by the next call: held, never lost.

        An entry that does not parse comes back as a MalformedJob, beside the others; the caller settles it with
        `reject`. Each job is settled on its own: what happens to one never touches another's result.
        """
        if rows <= 0:
            return []
        if self._held:
            return [_parsed(*self._held.popleft())]
        held = [f"{c.stream} {c.entry_id}" for c in in_hand]
        if now := await self._claim_now(consumer, streams, rows, held):
            return now
        if block_ms is None:
            return []
        found = await self._read(consumer, dict.fromkeys(streams, ">"), block_ms)
        if not found:
            return []
        self._held.extend(found[1:])
        return [_parsed(*found[0])]

    async def _claim_now(
        self, consumer: str, streams: list[str], rows: int, in_hand: list[str]
    ) -> list[ClaimedJob | MalformedJob]:
        args = [self._keys.workers_group, consumer, str(rows), *in_hand]
        try:
            reply: Any = await self._claim(keys=streams, args=args)
        except ResponseError as exc:
            if not _stream_gone(exc):
                raise
            for stream in streams:  # a stream vanished under us: recreate it, as `_read` does
                await self._streams.ensure_group(stream)
            reply = await self._claim(keys=streams, args=args)
        return [
            _parsed(text(stream), text(entry_id), pairs(fields), int(deliveries))
            for stream, entry_id, fields, deliveries in reply or ()
        ]

    async def _read(
        self, consumer: str, streams: dict[str, str], block_ms: int | None
    ) -> list[tuple[str, str, dict[bytes, bytes]]]:
        try:
            reply: Any = await self._redis.xreadgroup(
                self._keys.workers_group,
                consumer,
                streams,  # type: ignore[arg-type]
                count=1,
                block=block_ms,
            )
        except ResponseError as exc:
            if not _stream_gone(exc):
                raise
            # A stream vanished under us (deleted while this worker was blocked on it, as when it was taken
            # for gone and its own stream rehomed; Redis restarted without persistence; an operator's DEL):
            # recreate it with its group. The next claim reads it again.
            logger.warning("a job stream vanished under the read (%s); recreating it", exc)
            for stream in streams:
                await self._streams.ensure_group(stream)
            return []
        return [
            (text(stream), text(entry_id), fields) for stream, entries in reply or () for entry_id, fields in entries
        ]

    async def start(self, claimed: ClaimedJob, worker_id: str) -> int | None:
        """Make this delivery the job's current attempt: record that `worker_id` runs it, append to its
        history, announce it. From then on only this delivery's result is accepted (`complete`).

        Returns the Redis server time in ms (the one clock that hosts share, for queue-wait figures), or
        None when the job is terminal (cancelled, or finished by another attempt) and must not run: settle
        it with `discard`. Safe to run twice: a rerun for the same delivery returns the same time.
        """
        job = claimed.job
        ms = int(
            await self._start(
                keys=[self._keys.job(job.id), self._keys.attempts(job.id), *webhook_keys(self._keys, job.id)],
                args=[worker_id, self._keys.job_events_channel, job.id, claimed.token],
            )
        )
        return None if ms < 0 else ms

    async def give_back_lost(self, claimed: ClaimedJob) -> bool:
        """Undo this delivery's start of a job Redis lost (its record, made again by the start, holds no job):
        the record is removed and the entry acknowledged, for the accepting gateway's journal to queue the job
        again. False (nothing changed) when Redis knows the job: it was not lost."""
        job_id = claimed.job.id
        keys = [self._keys.job(job_id), self._keys.attempts(job_id)]
        if not int(await self._unstart(keys=keys, args=[claimed.token])):
            return False
        await self.discard(claimed)
        return True

    async def discard(self, claimed: ClaimedJob) -> None:
        """Acknowledge and drop an entry whose job must not run (cancelled while queued)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(claimed.stream, self._keys.workers_group, claimed.entry_id)
            pipe.xdel(claimed.stream, claimed.entry_id)
            await pipe.execute()

    async def progress(self, job_id: str, worker_id: str, step: int, total: int) -> str | None:
        """Record and announce a finished denoising step; returns the job's status (None if unknown).

        Only the worker the job is recorded as running on reports; a status of `cancelled` tells the
        worker to stop the job (its `cancelled` result is already stored) and `discard` its entry.
        """
        status = await self._progress(
            keys=[self._keys.job(job_id), *webhook_keys(self._keys, job_id)],
            args=[worker_id, step, total, self._keys.job_events_channel, job_id],
        )
        return None if status is None else text(status)

    async def complete(self, claimed: ClaimedJob, result: JobResult, images: list[bytes]) -> bool:
        """Store a result, announce it, then acknowledge the entry, if this delivery may: the job is not
        terminal and this delivery is its current attempt (or none was started).

        Returns False when the result was refused (the job already had one, was cancelled, or another
        attempt holds it). Safe to run twice: a rerun after a stored result returns True again.
        """
        job = claimed.job
        outcome = await self._store_and_ack(
            claimed.stream,
            claimed.entry_id,
            result,
            images,
            job.result_ttl_s,
            claimed.token,
            claimed.enqueued_ms,
            job.webhook or "",
        )
        return outcome == "stored"

    async def reject(self, malformed: MalformedJob, worker_id: str, ttl_s: int) -> None:
        """Settle an unparseable entry: fail its job if it named one (and is not terminal), acknowledge it,
        and count it (`malformed_entries`)."""
        await self._redis.hincrby(self._keys.stats, "malformed_entries", 1)
        if malformed.job_id is not None:
            result = JobResult(
                id=malformed.job_id, status="failed", worker=worker_id, error=f"invalid job: {malformed.reason}"
            )
            await self._store_and_ack(malformed.stream, malformed.entry_id, result, [], ttl_s, "", 0)
            return
        await self._redis.xack(malformed.stream, self._keys.workers_group, malformed.entry_id)
        await self._redis.xdel(malformed.stream, malformed.entry_id)

    async def dead_letter(self, claimed: ClaimedJob, worker_id: str, reason: str) -> None:
        """Give up on a job: record it with its history on the dead-letter stream and fail it. Safe to run
        twice: only the first run records and fails it.

        The entry describes the job without its prompts (their lengths only): a prompt is the caller's, and
        stays only in the job's record, which expires with its result. The stream is bounded (about
        DEAD_LETTER_MAX_LEN entries), and each add drops the entries older than the job's result TTL by Redis's
        clock (a worker's own may run ahead) and makes the stream expire that long after its last entry.
        """
        job = claimed.job
        history = [text(a) for a in await self._redis.lrange(self._keys.attempts(job.id), 0, -1)]
        result = JobResult(
            id=job.id,
            status="failed",
            worker=worker_id,
            seed=job.params.seed,
            shape=job.params.shape,
            scheduler=job.params.scheduler,
            error=f"gave up: {reason} (attempts: {', '.join(history) or 'none'})",
        )
        done = await self._dead_letter(
            keys=[*terminal_keys(self._keys, claimed.stream, job.id), self._keys.dead_letter_stream],
            args=[
                self._keys.workers_group,
                claimed.entry_id,
                *terminal_args(self._keys, job.id, job.result_ttl_s),
                result.model_dump_json(),
                _without_prompts(job),
                claimed.deliveries,
                reason,
                self._dead_letter_max_len,
            ],
        )
        if done:
            logger.error("job %s dead-lettered: %s", job.id, reason)

    async def dead_letter_if_exhausted(self, claimed: ClaimedJob, worker_id: str, max_deliveries: int) -> bool:
        """Dead-letter a job delivered more than `max_deliveries` times in all (every stream it was on
        counted), not counting the deliveries given back because its input images could not be read
        (`given_back_unreachable`): those did not kill a worker. True if it was dead-lettered.

        The record is read only for a job past the limit by its delivery count alone."""
        if claimed.deliveries <= max_deliveries:
            return False
        given_back = int(await self._redis.hget(self._keys.job(claimed.job.id), "unreachable") or 0)
        if claimed.deliveries - given_back <= max_deliveries:
            return False
        also = f" ({given_back} of them given back, their input images unreachable)" if given_back else ""
        await self.dead_letter(
            claimed,
            worker_id,
            f"delivered {claimed.deliveries} times{also}; every worker that took it stopped before finishing",
        )
        return True

    async def given_back_unreachable(self, claimed: ClaimedJob, error: str) -> int:
        """Record that this delivery is given back, its job's input images unreachable (`error`, the store's):
        its entry stays pending to be delivered again, and the delivery does not count towards the job's
        `max_deliveries`. Returns how many deliveries of the job were given back so far (this one included), -1 when
        the job is terminal (nothing recorded). Safe to run twice: a rerun counts nothing more."""
        count = await self._inputs_unreachable(keys=[self._keys.job(claimed.job.id)], args=[claimed.token, error])
        return int(count)

    async def _store_and_ack(
        self,
        stream: str,
        entry_id: str,
        result: JobResult,
        images: list[bytes],
        ttl_s: int,
        token: str,
        enqueued_ms: int,
        webhook: str = "",
    ) -> str:
        outcome = await self._store(
            keys=terminal_keys(self._keys, stream, result.id),
            args=[
                self._keys.workers_group,
                entry_id,
                *terminal_args(self._keys, result.id, ttl_s),
                result.model_dump_json(),
                result.status,
                token,
                enqueued_ms,
                webhook,
                *images,
            ],
        )
        return text(outcome)


def parse_entry(stream: str, entry_id: str, fields: dict[bytes, bytes], deliveries: int = 1) -> ClaimedJob:
    raw = fields.get(b"job")
    if raw is None:
        raise MalformedJob(stream, entry_id, None, "no 'job' field")
    try:
        job = Job.model_validate_json(raw)
    except ValidationError as exc:
        raise MalformedJob(stream, entry_id, _job_id_of(raw), _first_error(exc)) from exc
    # A job moved off a departed worker's stream carries the deliveries it had there.
    try:
        earlier = int(fields.get(b"deliveries", b"0"))
        enqueued = int(fields.get(b"enqueued", entry_id.split("-", 1)[0]))
    except ValueError:
        raise MalformedJob(stream, entry_id, job.id, "deliveries and enqueued must be integers") from None
    return ClaimedJob(job=job, stream=stream, entry_id=entry_id, enqueued_ms=enqueued, deliveries=deliveries + earlier)


def _parsed(stream: str, entry_id: str, fields: dict[bytes, bytes], deliveries: int = 1) -> ClaimedJob | MalformedJob:
    """The entry's job, or the MalformedJob that says why it has none."""
    try:
        return parse_entry(stream, entry_id, fields, deliveries)
    except MalformedJob as bad:
        return bad


def _stream_gone(exc: ResponseError) -> bool:
    """The error of a read from a stream (or group) that no longer exists: NOGROUP, or UNBLOCKED for a read
    that was blocked on it when it was deleted."""
    message = str(exc)
    return message.startswith(("NOGROUP", "UNBLOCKED")) or "NOGROUP" in message


def _without_prompts(job: Job) -> str:
    """A job's JSON as the dead-letter stream keeps it: the prompts replaced by their lengths."""
    params = job.params
    described = job.model_dump(mode="json", exclude={"params": {"prompt", "negative_prompt"}})
    described.update(prompt_chars=len(params.prompt), negative_prompt_chars=len(params.negative_prompt))
    return json.dumps(described)


def pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """A stream entry's fields as Lua returns them, [k1, v1, k2, v2, ...], as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _job_id_of(raw: bytes) -> str | None:
    """The id of a job that failed validation, if it had a usable one."""
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        data: Any = json.loads(raw)
        job_id = data.get("id") if isinstance(data, dict) else None
        if isinstance(job_id, str) and re.fullmatch(JOB_ID_PATTERN, job_id):
            return job_id
    return None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "job"
    return f"{where}: {err['msg']}"
